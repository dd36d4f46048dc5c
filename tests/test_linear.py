"""Linear and the other thin layers, and initialisation with torch's fan conventions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import check_gradients, requires_torch, torch
from hypothesis import given
from hypothesis import strategies as st

from minimask import nn
from minimask.engine import Tensor

shapes = st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 4))  # (N, F_in, F_out)


def reference_linear(x, w, b):
    """Plain loops: y[n, o] = sum_i x[n, i] * w[o, i] + b[o]."""
    n, f_in = x.shape
    f_out = w.shape[0]
    y = np.zeros((n, f_out))
    for r in range(n):
        for o in range(f_out):
            y[r, o] = sum(x[r, i] * w[o, i] for i in range(f_in)) + b[o]
    return y


# ---------------------------------------------------------------------------- Linear
def test_linear_known_answer():
    x = Tensor(np.array([[1.0, 2.0]]))
    w = Tensor(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))  # (F_out=3, F_in=2)
    b = Tensor(np.array([0.5, -1.0, 0.0]))
    np.testing.assert_array_equal(nn.linear(x, w, b).data, [[1.5, 1.0, 3.0]])
    np.testing.assert_array_equal(nn.linear(x, w).data, [[1.0, 2.0, 3.0]])


@given(shapes, st.integers(0, 2**16), st.booleans())
def test_linear_gradients_match_finite_differences(shape, seed, leading_axis):
    n, f_in, f_out = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, n, f_in) if leading_axis else (n, f_in))
    w, b = rng.standard_normal((f_out, f_in)), rng.standard_normal(f_out)
    check_gradients(nn.linear, x, w, b)


@given(shapes, st.integers(0, 2**16))
def test_linear_matches_the_plain_loop_reference(shape, seed):
    n, f_in, f_out = shape
    rng = np.random.default_rng(seed)
    x, w, b = (
        rng.standard_normal((n, f_in)),
        rng.standard_normal((f_out, f_in)),
        rng.standard_normal(f_out),
    )
    out = nn.linear(Tensor(x), Tensor(w), Tensor(b)).data
    np.testing.assert_allclose(out, reference_linear(x, w, b), rtol=1e-12, atol=1e-12)


@requires_torch
@given(shapes, st.integers(0, 2**16), st.booleans())
def test_linear_module_matches_torch(shape, seed, bias):
    n, f_in, f_out = shape
    rng = np.random.default_rng(seed)
    ours = nn.Linear(f_in, f_out, bias=bias, dtype=np.float64)
    theirs = torch.nn.Linear(f_in, f_out, bias=bias, dtype=torch.float64)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    theirs.load_state_dict({k: torch.tensor(v) for k, v in ours.state_dict().items()})
    x, g = rng.standard_normal((n, f_in)), rng.standard_normal((n, f_out))
    tx = torch.tensor(x, requires_grad=True)
    expected = theirs(tx)
    (expected * torch.tensor(g)).sum().backward()
    mx = Tensor(x, requires_grad=True)
    out = ours(mx)
    out.backward(g)
    np.testing.assert_allclose(out.data, expected.detach().numpy(), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(mx.grad, tx.grad.numpy(), rtol=1e-6, atol=1e-12)
    for name, p in ours.named_parameters():
        t = dict(theirs.named_parameters())[name]
        np.testing.assert_allclose(p.grad, t.grad.numpy(), rtol=1e-6, atol=1e-12)


def test_linear_takes_an_empty_batch():
    layer = nn.Linear(3, 2)
    x = Tensor(np.zeros((0, 3), dtype=np.float32), requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 2)
    y.sum().backward()
    np.testing.assert_array_equal(layer.weight.grad, np.zeros((2, 3)))


# ---------------------------------------------------------------------------- init
@requires_torch
@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 2, 2), (8, 1, 3, 3), (2, 6, 1, 5)])
def test_fans_match_torch(shape):
    expected = torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))
    assert nn.init.calculate_fan_in_and_fan_out(np.empty(shape)) == expected


@requires_torch
@pytest.mark.parametrize(
    "nonlinearity,param",
    [("linear", None), ("relu", None), ("tanh", None), ("leaky_relu", None),
     ("leaky_relu", math.sqrt(5)), ("sigmoid", None), ("selu", None), ("conv2d", None)],
)  # fmt: skip
def test_gains_match_torch(nonlinearity, param):
    expected = torch.nn.init.calculate_gain(nonlinearity, param)
    assert nn.init.calculate_gain(nonlinearity, param) == pytest.approx(expected)


def test_init_errors():
    with pytest.raises(ValueError, match="2 or more dims"):
        nn.init.kaiming_uniform_(np.empty(5))
    with pytest.raises(ValueError, match="mode"):
        nn.init.kaiming_normal_(np.empty((2, 2)), mode="fan_avg")
    with pytest.raises(ValueError, match="nonlinearity"):
        nn.init.calculate_gain("swish")


def test_kaiming_statistics_and_bounds():
    w = np.empty((256, 64, 3, 3))  # fan_in 576, fan_out 2304
    nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")
    assert w.std() == pytest.approx(math.sqrt(2 / 2304), rel=0.02)
    assert abs(w.mean()) < 1e-3
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))  # torch's default: bound = 1 / sqrt(fan_in)
    bound = 1 / math.sqrt(576)
    assert w.max() <= bound and w.min() >= -bound and w.max() > 0.99 * bound


def test_default_layer_init_follows_torch():
    layer = nn.Linear(100, 300)
    bound = 1 / math.sqrt(100)
    for p in (layer.weight.data, layer.bias.data):
        assert p.dtype == np.float32 and np.abs(p).max() <= bound
    assert layer.weight.data.std() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    # a transposed conv's "fan_in" is weight.shape[1] * kh * kw = C_out * 4, as torch computes it
    up = nn.ConvTranspose2d(64, 16, 2, stride=2)
    assert up.weight.shape == (64, 16, 2, 2)
    assert np.abs(up.bias.data).max() <= 1 / math.sqrt(16 * 4)


def test_manual_seed_makes_init_reproducible_and_fill_functions_work():
    nn.init.manual_seed(7)
    a = nn.Linear(4, 4).weight.data.copy()
    nn.init.manual_seed(7)
    np.testing.assert_array_equal(a, nn.Linear(4, 4).weight.data)
    t = nn.Parameter(np.empty((2, 3), dtype=np.float32))
    assert nn.init.constant_(t, 0.25) is t and np.all(t.data == 0.25) and t.dtype == np.float32
    nn.init.zeros_(t)
    assert not t.data.any()
    nn.init.ones_(t)
    assert np.all(t.data == 1)
    nn.init.normal_(t, mean=5.0, std=0.0)
    assert np.all(t.data == 5.0)
    nn.init.uniform_(t, -1, 1, rng=np.random.default_rng(0))
    assert np.abs(t.data).max() <= 1


# ---------------------------------------------------------------------------- the thin layers
def test_relu_sigmoid_identity_flatten():
    x = Tensor(np.array([[-1.0, 0.0, 2.0]]))
    np.testing.assert_array_equal(nn.ReLU()(x).data, [[0.0, 0.0, 2.0]])
    np.testing.assert_allclose(nn.Sigmoid()(x).data, 1 / (1 + np.exp(-x.data)))
    assert nn.Identity()(x) is x
    images = Tensor(np.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5))
    assert nn.Flatten()(images).shape == (2, 60)
    assert nn.flatten(images, start_dim=2).shape == (2, 3, 20)
    assert nn.Flatten()(Tensor(np.zeros((0, 3, 4, 5)))).shape == (0, 60)
    np.testing.assert_array_equal(nn.Flatten()(images).data[1], images.data[1].ravel())


@requires_torch
@pytest.mark.parametrize(
    "ours,theirs",
    [
        (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), lambda: torch.nn.Conv2d(3, 4, 3, 2, 1)),
        (lambda: nn.Conv2d(3, 4, (1, 3), bias=False, dilation=2),
         lambda: torch.nn.Conv2d(3, 4, (1, 3), bias=False, dilation=2)),
        (lambda: nn.ConvTranspose2d(3, 2, 2, stride=2),
         lambda: torch.nn.ConvTranspose2d(3, 2, 2, 2)),
        (lambda: nn.MaxPool2d(2), lambda: torch.nn.MaxPool2d(2)),
        (lambda: nn.MaxPool2d(3, 2, 1), lambda: torch.nn.MaxPool2d(3, 2, 1)),
        (lambda: nn.Upsample(scale_factor=2), lambda: torch.nn.Upsample(scale_factor=2)),
    ],
    ids=["conv", "conv-dilated", "conv-transpose", "maxpool", "maxpool-padded", "upsample"],
)  # fmt: skip
def test_layers_pass_their_settings_through_like_torch(ours, theirs):
    """Each layer holds torch's parameter names and shapes, and calls its op with the settings in
    the right order (the ops themselves are tested in test_conv.py and test_pool.py)."""
    ours, theirs = ours().to(dtype=np.float64), theirs().double()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in theirs.state_dict().items()
    }
    theirs.load_state_dict({k: torch.tensor(v) for k, v in ours.state_dict().items()})
    x = np.random.default_rng(0).permutation(2 * 3 * 7 * 6).reshape(2, 3, 7, 6) / 10.0  # no ties
    g = np.random.default_rng(1).standard_normal(theirs(torch.tensor(x)).shape)
    tx = torch.tensor(x, requires_grad=True)
    (theirs(tx) * torch.tensor(g)).sum().backward()
    mx = Tensor(x, requires_grad=True)
    out = ours(mx)
    out.backward(g)
    np.testing.assert_allclose(out.data, theirs(tx).detach().numpy(), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(mx.grad, tx.grad.numpy(), rtol=1e-6, atol=1e-12)
    for name, p in ours.named_parameters():
        t = dict(theirs.named_parameters())[name]
        np.testing.assert_allclose(p.grad, t.grad.numpy(), rtol=1e-6, atol=1e-12)


def test_conv_layer_gradients_match_finite_differences():
    conv = nn.Conv2d(2, 3, 3, padding=1).to(dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((1, 2, 4, 3))
    check_gradients(
        lambda x, w, b: nn.conv2d(x, w, b, padding=1), x, conv.weight.data, conv.bias.data
    )
    check_gradients(conv, x)
