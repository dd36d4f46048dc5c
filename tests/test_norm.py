"""GroupNorm and FrozenBatchNorm2d: finite differences, plain loops, torch, known answers."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import check_gradients, requires_torch, requires_torchvision, torch, torchvision
from hypothesis import assume, given
from hypothesis import strategies as st

from minimask import nn
from minimask.engine import Tensor
from minimask.nn.norm import group_norm_backward, group_norm_forward


@st.composite
def group_norm_cases(draw, max_size=3):
    """(x, weight, bias, num_groups) with x (N, C, *S), C = G * (C/G), 0-2 spatial axes."""
    n = draw(st.integers(1, 2))
    groups = draw(st.integers(1, 3))
    per_group = draw(st.integers(1, 3))
    spatial = draw(st.lists(st.integers(1, max_size), min_size=0, max_size=2))
    c = groups * per_group
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    # spread-out values: a slab of near-equal values has a tiny variance and amplifies FD error
    x = rng.standard_normal((n, c, *spatial)) * draw(st.sampled_from([0.5, 1.0, 3.0]))
    x += draw(st.floats(-2, 2))
    weight = rng.standard_normal(c)
    bias = rng.standard_normal(c)
    return x, weight, bias, groups


def reference_group_norm(x, weight, bias, num_groups, eps):
    """Plain loops over (image, group), straight from the definition in Wu & He (2018), eq. (1)."""
    n, c = x.shape[:2]
    per_group = c // num_groups
    y = np.empty_like(x)
    for i in range(n):
        for g in range(num_groups):
            channels = range(g * per_group, (g + 1) * per_group)
            values = [v for ch in channels for v in x[i, ch].reshape(-1)]
            mean = sum(values) / len(values)
            var = sum((v - mean) ** 2 for v in values) / len(values)
            for ch in channels:
                y[i, ch] = (x[i, ch] - mean) / np.sqrt(var + eps)
                if weight is not None:
                    y[i, ch] = y[i, ch] * weight[ch] + bias[ch]
    return y


# ---------------------------------------------------------------------------- GroupNorm
@given(group_norm_cases(), st.booleans())
def test_group_norm_gradients_match_finite_differences(case, affine):
    x, weight, bias, groups = case
    if affine:
        check_gradients(lambda x, w, b: nn.group_norm(x, groups, w, b), x, weight, bias)
    else:
        check_gradients(lambda x: nn.group_norm(x, groups), x)


@given(group_norm_cases(max_size=4), st.sampled_from([1e-5, 1e-2]))
def test_group_norm_matches_the_plain_loop_reference(case, eps):
    x, weight, bias, groups = case
    out = nn.group_norm(Tensor(x), groups, Tensor(weight), Tensor(bias), eps=eps)
    np.testing.assert_allclose(
        out.data, reference_group_norm(x, weight, bias, groups, eps), rtol=1e-10, atol=1e-12
    )


def test_group_norm_known_answer():
    """One group of [1, 2, 3, 4]: mean 2.5, variance 1.25, so y = [-3, -1, 1, 3] / sqrt(5)."""
    x = Tensor(np.array([[[1.0], [2.0], [3.0], [4.0]]]))  # (N=1, C=4, L=1)
    y = nn.group_norm(x, 1, eps=0.0)
    np.testing.assert_allclose(y.data.ravel(), np.array([-3, -1, 1, 3]) / np.sqrt(5))
    # two groups of two: each becomes [-1, 1]
    y2 = nn.group_norm(x, 2, eps=0.0)
    np.testing.assert_allclose(y2.data.ravel(), [-1, 1, -1, 1])


@given(group_norm_cases(), st.floats(0.1, 10), st.floats(-5, 5))
def test_group_norm_ignores_a_shift_and_positive_scale_of_its_input(case, scale, shift):
    x, weight, bias, groups = case
    assume(x[0].size // groups > 1)  # a slab of one value has variance 0: 0/0 without eps
    a = nn.group_norm(Tensor(x), groups, Tensor(weight), Tensor(bias), eps=0.0).data
    b = nn.group_norm(Tensor(x * scale + shift), groups, Tensor(weight), Tensor(bias), eps=0.0)
    np.testing.assert_allclose(a, b.data, rtol=1e-6, atol=1e-6)


@requires_torch
@given(group_norm_cases(max_size=5), st.booleans())
def test_group_norm_matches_torch(case, affine):
    x, weight, bias, groups = case
    assume(x.size // x.shape[1] > 1)  # torch refuses one value per channel
    w_out = np.random.default_rng(1).standard_normal(x.shape)
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(weight, requires_grad=True) if affine else None
    tb = torch.tensor(bias, requires_grad=True) if affine else None
    expected = torch.nn.functional.group_norm(tx, groups, tw, tb, eps=1e-5)
    (expected * torch.tensor(w_out)).sum().backward()

    mx = Tensor(x, requires_grad=True)
    mw = Tensor(weight, requires_grad=True) if affine else None
    mb = Tensor(bias, requires_grad=True) if affine else None
    out = nn.group_norm(mx, groups, mw, mb, eps=1e-5)
    out.backward(w_out)
    np.testing.assert_allclose(out.data, expected.detach().numpy(), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(mx.grad, tx.grad.numpy(), rtol=1e-6, atol=1e-10)
    if affine:
        np.testing.assert_allclose(mw.grad, tw.grad.numpy(), rtol=1e-6, atol=1e-10)
        np.testing.assert_allclose(mb.grad, tb.grad.numpy(), rtol=1e-6, atol=1e-10)


@requires_torch
def test_group_norm_module_matches_torch_module():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 5, 4))
    ours = nn.GroupNorm(4, 8).to(dtype=np.float64)
    theirs = torch.nn.GroupNorm(4, 8).double()
    assert set(ours.state_dict()) == set(theirs.state_dict())
    # torch's defaults (weight 1, bias 0) are ours; set new values through our state_dict
    ours.load_state_dict({"weight": rng.standard_normal(8), "bias": rng.standard_normal(8)})
    theirs.load_state_dict({k: torch.tensor(v) for k, v in ours.state_dict().items()})
    np.testing.assert_allclose(
        ours(Tensor(x)).data, theirs(torch.tensor(x)).detach().numpy(), rtol=1e-6, atol=1e-12
    )


def test_group_norm_plain_array_functions_run_without_the_engine():
    x = np.random.default_rng(0).standard_normal((2, 4, 3, 3))
    w, b = np.full(4, 2.0), np.zeros(4)
    y, saved = group_norm_forward(x, w, b, num_groups=2)
    dx, dw, db = group_norm_backward(np.ones_like(y), saved)
    # sum(y) does not depend on x (each slab sums to 0 before the affine map), so dx = 0
    np.testing.assert_allclose(dx, 0, atol=1e-12)
    np.testing.assert_allclose(db, np.full(4, 2 * 9))
    assert dw.shape == (4,)


def test_group_norm_module_defaults_errors_and_empty_batch():
    gn = nn.GroupNorm(2, 6)
    np.testing.assert_array_equal(gn.weight.data, np.ones(6))
    np.testing.assert_array_equal(gn.bias.data, np.zeros(6))
    assert gn.weight.dtype == np.float32
    with pytest.raises(ValueError, match="divide"):
        nn.GroupNorm(4, 6)
    with pytest.raises(ValueError, match="6 channels"):
        gn(Tensor(np.zeros((1, 4, 2, 2), dtype=np.float32)))
    assert list(nn.GroupNorm(2, 6, affine=False).parameters()) == []

    x = Tensor(np.zeros((0, 6, 3, 3), dtype=np.float32), requires_grad=True)  # no RoIs
    y = gn(x)
    assert y.shape == (0, 6, 3, 3) and y.dtype == np.float32
    y.sum().backward()
    assert x.grad.shape == (0, 6, 3, 3)
    np.testing.assert_array_equal(gn.weight.grad, np.zeros(6))


def test_group_norm_keeps_float32():
    x = Tensor(np.random.default_rng(0).standard_normal((1, 4, 3, 3)).astype(np.float32))
    x.requires_grad = True
    gn = nn.GroupNorm(2, 4)
    y = gn(x)
    y.backward(np.ones(y.shape, dtype=np.float32))
    assert y.dtype == x.grad.dtype == gn.weight.grad.dtype == np.float32


# ---------------------------------------------------------------------------- FrozenBatchNorm2d
def _frozen_bn(c, rng, dtype=np.float64):
    bn = nn.FrozenBatchNorm2d(c).to(dtype=dtype)
    bn.load_state_dict(
        {
            "weight": rng.standard_normal(c),
            "bias": rng.standard_normal(c),
            "running_mean": rng.standard_normal(c),
            "running_var": rng.uniform(0.1, 2.0, c),
        }
    )
    return bn


@given(st.integers(1, 2), st.integers(1, 4), st.integers(1, 3), st.integers(0, 2**16))
def test_frozen_batch_norm_gradients_and_formula(n, c, size, seed):
    rng = np.random.default_rng(seed)
    bn = _frozen_bn(c, rng)
    x = rng.standard_normal((n, c, size, size + 1))
    check_gradients(bn, x)
    # the definition, channel by channel
    y = bn(Tensor(x)).data
    for ch in range(c):
        mean, var = bn.running_mean.data[ch], bn.running_var.data[ch]
        expected = (x[:, ch] - mean) / np.sqrt(var + 1e-5) * bn.weight.data[ch] + bn.bias.data[ch]
        np.testing.assert_allclose(y[:, ch], expected, rtol=1e-12, atol=1e-12)


def test_frozen_batch_norm_known_answer_and_buffers():
    bn = nn.FrozenBatchNorm2d(1, eps=0.0)
    bn.load_state_dict(
        {
            "weight": np.array([2.0]),
            "bias": np.array([1.0]),
            "running_mean": np.array([3.0]),
            "running_var": np.array([4.0]),
        }
    )
    x = Tensor(np.array([[[[3.0, 5.0]]]], dtype=np.float32))
    # (x - 3) / 2 * 2 + 1 = x - 2
    np.testing.assert_array_equal(bn(x).data, [[[[1.0, 3.0]]]])
    assert list(bn.parameters()) == []
    assert set(bn.state_dict()) == {"weight", "bias", "running_mean", "running_var"}


@requires_torchvision
def test_frozen_batch_norm_matches_torchvision():
    rng = np.random.default_rng(0)
    ours = _frozen_bn(5, rng)
    theirs = torchvision.ops.FrozenBatchNorm2d(5).double()
    theirs.load_state_dict({k: torch.tensor(v) for k, v in ours.state_dict().items()})
    x = rng.standard_normal((2, 5, 4, 3))
    g = rng.standard_normal(x.shape)
    tx = torch.tensor(x, requires_grad=True)
    (theirs(tx) * torch.tensor(g)).sum().backward()
    mx = Tensor(x, requires_grad=True)
    out = ours(mx)
    out.backward(g)
    np.testing.assert_allclose(out.data, theirs(tx).detach().numpy(), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(mx.grad, tx.grad.numpy(), rtol=1e-6, atol=1e-12)
