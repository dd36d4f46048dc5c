"""max_pool2d and upsample_nearest, checked like the convs (see tests/test_conv.py).

1. Backprop agrees with central finite differences in float64 (max pooling on tie-free inputs:
   a shuffled linspace, so no window has two maxima and the differences never cross a kink).
2. Values and gradients agree with torch in float64, ties included.
3. Values agree with a slow nested-loop reference written from the definition.
4. Hand-worked known answers, and 5. edge cases (1x1 images, a batch of 1, float32).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import check_gradients, requires_torch, torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minimask.engine import Tensor
from minimask.nn.pool import (
    max_pool2d,
    max_pool2d_backward,
    max_pool2d_forward,
    nearest_source_index,
    upsample_nearest,
    upsample_nearest_backward,
    upsample_nearest_forward,
)


# ---------------------------------------------------------------------------- references
def max_pool2d_reference(x, kernel, stride, padding):
    """out[n, c, h, w] = max of x over the window's pixels inside the image (padding is -inf)."""
    N, C, H, W = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    out = np.full((N, C, Ho, Wo), -np.inf)
    for n in range(N):
        for c in range(C):
            for h in range(Ho):
                for v in range(Wo):
                    for i in range(kh):
                        for j in range(kw):
                            row, col = h * sh - ph + i, v * sw - pw + j
                            if 0 <= row < H and 0 <= col < W:
                                out[n, c, h, v] = max(out[n, c, h, v], x[n, c, row, col])
    return out


def upsample_nearest_reference(x, out_size, scale_factor=None):
    """out[n, c, h, w] = x[n, c, src(h), src(w)], src(d) = min(floor(d * scale), size - 1).

    torch computes ``scale`` (in/out, or 1/scale_factor) and the product in float32, so a few
    sizes round differently from exact fractions (e.g. 2 -> 82); the reference does the same.
    """
    N, C, H, W = x.shape
    Ho, Wo = out_size

    def src(d, size, out, factor):
        if size == out:
            return d
        scale = np.float32(1.0 / factor) if factor else np.float32(size) / np.float32(out)
        return min(int(math.floor(np.float32(d) * scale)), size - 1)

    factors = (None, None) if scale_factor is None else scale_factor
    out = np.zeros((N, C, Ho, Wo))
    for h in range(Ho):
        for v in range(Wo):
            out[:, :, h, v] = x[:, :, src(h, H, Ho, factors[0]), src(v, W, Wo, factors[1])]
    return out


# ---------------------------------------------------------------------------- strategies
@st.composite
def pool_cases(draw, max_side=7):
    """A tie-free x (N, C, H, W) (a shuffled linspace) and a valid kernel, stride, padding."""
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = tuple(draw(st.integers(0, k // 2)) for k in kernel)
    size = [draw(st.integers(max(1, k - 2 * p), max_side)) for k, p in zip(kernel, padding)]
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), *size)
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = rng.permutation(np.linspace(-3, 3, int(np.prod(shape)))).reshape(shape)
    return x, kernel, stride, padding


@st.composite
def upsample_cases(draw, max_side=5):
    """x (N, C, H, W) and either a size (up or down, not a whole ratio) or a scale factor."""
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    shape += (draw(st.integers(1, max_side)), draw(st.integers(1, max_side)))
    x = np.random.default_rng(draw(st.integers(0, 2**16))).standard_normal(shape)
    if draw(st.booleans()):
        return x, dict(
            size=(draw(st.integers(1, 3 * max_side)), draw(st.integers(1, 3 * max_side)))
        )
    factors = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 1.7]
    factor = [draw(st.sampled_from([f for f in factors if n * f >= 1])) for n in shape[2:]]
    return x, dict(scale_factor=tuple(factor))


def output_size(x, options):
    if "size" in options:
        return options["size"]
    return tuple(math.floor(n * f) for n, f in zip(x.shape[2:], options["scale_factor"]))


# ---------------------------------------------------------------------------- 1. finite differences
@settings(max_examples=100)
@given(pool_cases(max_side=5))
def test_max_pool2d_gradients_match_finite_differences(case):
    x, kernel, stride, padding = case
    check_gradients(lambda t: max_pool2d(t, kernel, stride, padding), x)


@settings(max_examples=80)
@given(upsample_cases(max_side=4))
def test_upsample_nearest_gradients_match_finite_differences(case):
    x, options = case
    check_gradients(lambda t: upsample_nearest(t, **options), x)


# ---------------------------------------------------------------------------- 2. torch
def compare_with_torch(ours_fn, torch_fn, x):
    t = Tensor(x, requires_grad=True)
    out = ours_fn(t)
    grad = np.random.default_rng(0).standard_normal(out.shape)
    out.backward(grad)
    ref_x = torch.tensor(x, requires_grad=True)
    ref = torch_fn(ref_x)
    ref.backward(torch.tensor(grad))
    np.testing.assert_allclose(out.data, ref.detach().numpy(), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(t.grad, ref_x.grad.numpy(), rtol=1e-6, atol=1e-12)


@requires_torch
@settings(max_examples=150)
@given(pool_cases(max_side=9), st.booleans())
def test_max_pool2d_matches_torch(case, with_ties):
    x, kernel, stride, padding = case
    if with_ties:  # a few distinct values: windows often have several maxima
        x = np.round(x)
    compare_with_torch(
        lambda t: max_pool2d(t, kernel, stride, padding),
        lambda t: torch.nn.functional.max_pool2d(t, kernel, stride, padding),
        x,
    )


@requires_torch
@settings(max_examples=150)
@given(upsample_cases(max_side=8))
def test_upsample_nearest_matches_torch(case):
    x, options = case
    compare_with_torch(
        lambda t: upsample_nearest(t, **options),
        lambda t: torch.nn.functional.interpolate(t, mode="nearest", **options),
        x,
    )


@requires_torch
@pytest.mark.parametrize("in_size, out_size", [(2, 82), (3, 7), (25, 50), (13, 25), (7, 3)])
def test_upsample_source_index_matches_torch_where_float32_rounding_matters(in_size, out_size):
    x = torch.arange(float(in_size)).reshape(1, 1, 1, in_size)
    expected = torch.nn.functional.interpolate(x, size=(1, out_size), mode="nearest")
    np.testing.assert_array_equal(nearest_source_index(in_size, out_size), expected[0, 0, 0])


# ---------------------------------------------------------------------------- 3. nested loops
@settings(max_examples=80)
@given(pool_cases())
def test_max_pool2d_matches_nested_loops(case):
    x, kernel, stride, padding = case
    out, _ = max_pool2d_forward(x, kernel, stride, padding)
    np.testing.assert_array_equal(out, max_pool2d_reference(x, kernel, stride, padding))


@settings(max_examples=80)
@given(upsample_cases())
def test_upsample_nearest_matches_nested_loops(case):
    x, options = case
    out, _ = upsample_nearest_forward(x, **options)
    expected = upsample_nearest_reference(x, output_size(x, options), options.get("scale_factor"))
    np.testing.assert_array_equal(out, expected)


# ---------------------------------------------------------------------------- 4. known answers
X44 = np.array([[1.0, 9, 2, 0], [4, 3, 8, 5], [7, 6, 0, 2], [1, 2, 3, 4]]).reshape(1, 1, 4, 4)


def test_max_pool2d_known_answers():
    out, saved = max_pool2d_forward(X44, 2, 2)  # four 2x2 blocks
    np.testing.assert_array_equal(out[0, 0], [[9, 8], [7, 4]])
    grad = max_pool2d_backward(np.ones_like(out), saved)[0, 0]  # 1 at each block's max
    np.testing.assert_array_equal(grad, [[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]])
    # The ResNet stem's pooling (3x3, stride 2, padding 1): windows overlap, and the 9 wins two.
    out, saved = max_pool2d_forward(X44, 3, 2, 1)
    np.testing.assert_array_equal(out[0, 0], [[9, 9], [7, 8]])
    grad = max_pool2d_backward(np.ones_like(out), saved)[0, 0]
    np.testing.assert_array_equal(grad, [[0, 2, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])


def test_max_pool2d_tie_goes_to_the_first_pixel_of_the_window():
    out, saved = max_pool2d_forward(np.zeros((1, 1, 2, 4)), 2, 2)
    grad = max_pool2d_backward(np.ones_like(out), saved)
    np.testing.assert_array_equal(grad[0, 0], [[1, 0, 1, 0], [0, 0, 0, 0]])


def test_upsample_nearest_known_answers():
    x = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    out, saved = upsample_nearest_forward(x, scale_factor=2)
    np.testing.assert_array_equal(
        out[0, 0], [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
    )
    np.testing.assert_array_equal(upsample_nearest_backward(np.ones_like(out), saved), 4.0)
    # FPN's top-down path with an odd side: 3 -> 5 takes source rows floor(d * 3/5).
    out, saved = upsample_nearest_forward(np.arange(3.0).reshape(1, 1, 3, 1), size=(5, 1))
    np.testing.assert_array_equal(out[0, 0, :, 0], [0, 0, 1, 1, 2])
    grad = upsample_nearest_backward(np.ones_like(out), saved)
    np.testing.assert_array_equal(grad[0, 0, :, 0], [2, 2, 1])


@pytest.mark.parametrize(
    ("size", "scale_factor"), [((8, 12), None), ((12, 6), None), (None, (2.0, 3.0)), ((5, 6), None)]
)
def test_upsample_whole_factor_shortcut_equals_the_index_maps(size, scale_factor):
    # An exact k-fold upsample is one broadcast copy and its gradient a sum of k*k strided
    # views; both must equal the general gather through the index maps (and its adjoint).
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, 4, 3))
    out, saved = upsample_nearest_forward(x, size=size, scale_factor=scale_factor)
    np.testing.assert_array_equal(out, x[:, :, saved.rows][:, :, :, saved.cols])
    g = rng.standard_normal(out.shape)
    expected = np.zeros_like(x)
    np.add.at(expected, (slice(None), slice(None), saved.rows[:, None], saved.cols[None]), g)
    np.testing.assert_allclose(upsample_nearest_backward(g, saved), expected, rtol=1e-12)


# ---------------------------------------------------------------------------- 5. edge cases
def test_pooling_and_upsampling_a_1x1_image():
    x = np.array([[[[3.0]]], [[[-1.0]]]])  # a batch of two 1x1 images
    np.testing.assert_array_equal(max_pool2d_forward(x, 3, 2, 1)[0], x)  # the stem's pooling
    np.testing.assert_array_equal(max_pool2d_forward(x, 1, 2)[0], x)  # FPN's P6
    out, _ = upsample_nearest_forward(x, size=(2, 3))
    np.testing.assert_array_equal(out, np.broadcast_to(x, (2, 1, 2, 3)))


def test_p6_pooling_subsamples_and_batch_of_one():
    x = np.random.default_rng(0).standard_normal((1, 2, 5, 5))
    out, saved = max_pool2d_forward(x, 1, 2)
    np.testing.assert_array_equal(out, x[:, :, ::2, ::2])
    grad = max_pool2d_backward(np.ones_like(out), saved)
    np.testing.assert_array_equal(grad[:, :, ::2, ::2], 1.0)
    assert grad.sum() == out.size


def test_float32_stays_float32():
    x = Tensor(np.random.default_rng(0).standard_normal((1, 2, 6, 6)).astype(np.float32), True)
    pooled = max_pool2d(x, 3, 2, 1)
    up = upsample_nearest(pooled, size=(6, 6))
    up.sum().backward()
    assert pooled.dtype == up.dtype == x.grad.dtype == np.float32


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="half the window"):
        max_pool2d_forward(np.zeros((1, 1, 4, 4)), 2, 2, 2)
    with pytest.raises(ValueError, match="exactly one"):
        upsample_nearest_forward(np.zeros((1, 1, 2, 2)))
    with pytest.raises(ValueError, match="empty"):
        upsample_nearest_forward(np.zeros((1, 1, 1, 3)), scale_factor=0.5)


@pytest.mark.gpu
def test_pool_and_upsample_on_gpu_match_cpu():
    import cupy  # noqa: PLC0415 - only with a GPU

    x = np.random.default_rng(1).permutation(np.linspace(-1, 1, 2 * 3 * 9 * 7)).reshape(2, 3, 9, 7)
    for forward, backward, options in [
        (max_pool2d_forward, max_pool2d_backward, dict(kernel_size=3, stride=2, padding=1)),
        (upsample_nearest_forward, upsample_nearest_backward, dict(size=(13, 20))),
    ]:
        cpu, saved = forward(x, **options)
        gpu, saved_gpu = forward(cupy.asarray(x), **options)
        np.testing.assert_array_equal(gpu.get(), cpu)
        grad = np.random.default_rng(2).standard_normal(cpu.shape)
        expected = backward(grad, saved)
        np.testing.assert_allclose(backward(cupy.asarray(grad), saved_gpu).get(), expected)
