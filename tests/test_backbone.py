"""The ResNet unit: a frozen batch norm folded into its conv equals the conv then the norm."""

import numpy as np
import pytest
from helpers import check_gradients
from hypothesis import given, settings
from hypothesis import strategies as st

from minimask.engine import Tensor, no_grad
from minimask.model.backbone import ConvNorm, conv_norm
from minimask.model.config import PRESETS
from minimask.nn import Conv2d, FrozenBatchNorm2d, GroupNorm, Sequential


def frozen_unit(c_in, c_out, kernel, stride, rng, dtype):
    """A ConvNorm with a random conv weight and random (non-identity) frozen statistics."""
    conv = Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False, dtype=dtype)
    conv.weight.data = rng.standard_normal(conv.weight.shape).astype(dtype)
    bn = FrozenBatchNorm2d(c_out, dtype=dtype)
    bn.load_state_dict(
        {
            "weight": rng.uniform(0.5, 2.0, c_out).astype(dtype),
            "bias": rng.standard_normal(c_out).astype(dtype),
            "running_mean": rng.standard_normal(c_out).astype(dtype),
            "running_var": rng.uniform(0.1, 2.0, c_out).astype(dtype),
        }
    )
    return ConvNorm(conv, bn)


def unfolded(unit, x):
    """The same unit run as the plain Sequential: the conv, then the norm's multiply and add."""
    return Sequential.forward(unit, x)


@settings(max_examples=30, deadline=None)
@given(
    c_in=st.integers(1, 4),
    c_out=st.integers(1, 4),
    kernel=st.sampled_from([1, 3, 7]),
    stride=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_folded_frozen_norm_equals_conv_then_norm_values_and_gradients(
    c_in, c_out, kernel, stride, seed
):
    rng = np.random.default_rng(seed)
    unit = frozen_unit(c_in, c_out, kernel, stride, rng, np.float64)
    x_data = rng.standard_normal((2, c_in, 9, 8))
    grad = None
    results = []
    for run in (unit, lambda t: unfolded(unit, t)):
        x = Tensor(x_data, requires_grad=True)
        unit[0].weight.grad = None
        out = run(x)
        grad = rng.standard_normal(out.shape) if grad is None else grad
        out.backward(grad)
        results.append((out.data, x.grad, unit[0].weight.grad))
    for folded, plain in zip(*results):
        np.testing.assert_allclose(folded, plain, rtol=1e-10, atol=1e-10)
    # folded: one conv with a bias makes the output; unfolded: the norm's add
    assert unit(Tensor(x_data, requires_grad=True))._ctx.name == "Conv2d"
    assert unfolded(unit, Tensor(x_data, requires_grad=True))._ctx.name == "Add"


def test_folded_unit_passes_finite_differences():
    rng = np.random.default_rng(0)
    unit = frozen_unit(2, 3, 3, 1, rng, np.float64)

    def fn(x, w):
        unit[0].weight = w
        return unit(x)

    check_gradients(fn, rng.standard_normal((1, 2, 5, 4)), unit[0].weight.data.copy())


def test_folded_unit_in_float32_inference_and_frozen_weight():
    rng = np.random.default_rng(1)
    unit = frozen_unit(16, 8, 3, 1, rng, np.float32)
    unit[0].weight.requires_grad = False  # a frozen stage
    x = Tensor(rng.standard_normal((2, 16, 12, 10)).astype(np.float32))
    with no_grad():
        out = unit(x)
    expected = unfolded(unit, x)
    assert out.dtype == np.float32 and not out.requires_grad
    np.testing.assert_allclose(out.data, expected.data, rtol=1e-5, atol=1e-4)


def test_group_norm_units_run_unfolded_and_state_dict_names_stay():
    config = PRESETS["tiny"]()
    assert config.norm == "group_norm"
    unit = conv_norm(config, 3, 4, 3)
    assert isinstance(unit, ConvNorm) and isinstance(unit[1], GroupNorm)
    x = Tensor(np.random.default_rng(2).standard_normal((1, 3, 6, 6)).astype(np.float32))
    np.testing.assert_array_equal(unit(x).data, unfolded(unit, x).data)
    frozen = conv_norm(PRESETS["r50_fpn"](), 3, 4, 3)
    assert set(frozen.state_dict()) == {
        "0.weight",
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
    }


@pytest.mark.parametrize("kernel", [1, 3])
def test_a_conv_with_bias_is_not_folded(kernel):
    rng = np.random.default_rng(3)
    unit = frozen_unit(2, 2, kernel, 1, rng, np.float64)
    unit[0].bias = Conv2d(2, 2, kernel, bias=True, dtype=np.float64).bias
    x = Tensor(rng.standard_normal((1, 2, 5, 5)))
    np.testing.assert_array_equal(unit(x).data, unfolded(unit, x).data)


@pytest.mark.parametrize("frozen", [True, False])
def test_unit_with_relu_equals_the_unit_then_relu(frozen):
    rng = np.random.default_rng(4)
    unit = frozen_unit(3, 4, 3, 1, rng, np.float64)
    if not frozen:
        unit = ConvNorm(unit[0], GroupNorm(2, 4, dtype=np.float64))
    x_data = rng.standard_normal((2, 3, 7, 6))
    grad = rng.standard_normal((2, 4, 7, 6))
    results = []
    for run in (lambda t: unit(t, relu=True), lambda t: unfolded(unit, t).relu()):
        x = Tensor(x_data, requires_grad=True)
        unit[0].weight.grad = None
        out = run(x)
        out.backward(grad)
        results.append((out.data, x.grad, unit[0].weight.grad))
    for fused, plain in zip(*results):
        np.testing.assert_allclose(fused, plain, rtol=1e-10, atol=1e-10)
    assert (results[0][0] == 0).any() and (results[0][0] > 0).any()  # the ReLU did cut
