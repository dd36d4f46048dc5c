"""conv2d and conv_transpose2d, checked five ways (the method is in minimask/nn/conv.py).

1. Backprop agrees with central finite differences in float64, on hypothesis-drawn small shapes,
   strides, paddings and dilations.
2. Values and gradients agree with torch in float64 (rel. err. <= 1e-6).
3. Values agree with a slow nested-loop reference written from the definition.
4. Hand-worked known answers (a 3x3 input and a 2x2 kernel).
5. Edge cases: a 1x1 image, a kernel larger than the image, a batch of 1, float32, and the
   gradient of x being the transposed conv of the gradient of the output (the adjoint law).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import check_gradients, requires_torch, torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minimask.engine import Tensor
from minimask.nn.conv import (
    conv2d,
    conv2d_backward,
    conv2d_forward,
    conv2d_plain,
    conv_output_size,
    conv_transpose2d,
    conv_transpose2d_backward,
    conv_transpose2d_forward,
)


# ---------------------------------------------------------------------------- references
def conv2d_reference(x, w, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """out[n, o, h, w] = sum_{c,i,j} x[n, c, h*s - p + i*d, w*s - p + j*d] * w[o, c, i, j]."""
    N, C, H, W = x.shape
    O, _, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    Ho, Wo = conv_output_size(H, kh, sh, ph, dh), conv_output_size(W, kw, sw, pw, dw)
    out = np.zeros((N, O, Ho, Wo), dtype=x.dtype)
    for n in range(N):
        for o in range(O):
            for h in range(Ho):
                for v in range(Wo):
                    for c in range(C):
                        for i in range(kh):
                            for j in range(kw):
                                row, col = h * sh - ph + i * dh, v * sw - pw + j * dw
                                if 0 <= row < H and 0 <= col < W:  # outside: zero padding
                                    out[n, o, h, v] += x[n, c, row, col] * w[o, c, i, j]
    return out


def conv_transpose2d_reference(
    x, w, stride=(1, 1), padding=(0, 0), output_padding=(0, 0), dilation=(1, 1)
):
    """Each input pixel adds x[n, c, h, v] * w[c, o, i, j] to out[n, o, h*s - p + i*d, ...]."""
    N, C, H, W = x.shape
    _, O, kh, kw = w.shape
    (sh, sw), (ph, pw), (oh, ow), (dh, dw) = stride, padding, output_padding, dilation
    Ho = (H - 1) * sh - 2 * ph + dh * (kh - 1) + oh + 1
    Wo = (W - 1) * sw - 2 * pw + dw * (kw - 1) + ow + 1
    out = np.zeros((N, O, Ho, Wo), dtype=x.dtype)
    for n in range(N):
        for c in range(C):
            for h in range(H):
                for v in range(W):
                    for o in range(O):
                        for i in range(kh):
                            for j in range(kw):
                                row, col = h * sh - ph + i * dh, v * sw - pw + j * dw
                                if 0 <= row < Ho and 0 <= col < Wo:  # outside: cropped
                                    out[n, o, row, col] += x[n, c, h, v] * w[c, o, i, j]
    return out


# ---------------------------------------------------------------------------- strategies
@st.composite
def conv_cases(draw, max_side=6, max_channels=3):
    """A small conv2d: x (N, C, H, W), weight (O, C, kh, kw) and its options, always valid."""
    N = draw(st.integers(1, 2))
    C, O = draw(st.integers(1, max_channels)), draw(st.integers(1, max_channels))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    size = []
    for k, p, d in zip(kernel, padding, dilation):
        smallest = max(1, d * (k - 1) + 1 - 2 * p)  # the kernel must fit in the padded image
        size.append(draw(st.integers(smallest, max(smallest, max_side))))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = rng.standard_normal((N, C, *size))
    w = rng.standard_normal((O, C, *kernel))
    b = rng.standard_normal(O) if draw(st.booleans()) else None
    return x, w, b, dict(stride=stride, padding=padding, dilation=dilation)


@st.composite
def conv_transpose_cases(draw, max_side=4, max_channels=3):
    """A small conv_transpose2d: x (N, C, H, W), weight (C, O, kh, kw), options, always valid."""
    N = draw(st.integers(1, 2))
    C, O = draw(st.integers(1, max_channels)), draw(st.integers(1, max_channels))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    size, padding, output_padding = [], [], []
    for k, s, d in zip(kernel, stride, dilation):
        extra = draw(st.integers(0, max(s, d) - 1))  # torch: output_padding < stride or dilation
        h = draw(st.integers(1, max_side))
        full = (h - 1) * s + d * (k - 1) + extra + 1  # output size before cropping the padding
        size.append(h)
        padding.append(draw(st.integers(0, (full - 1) // 2)))  # leave at least one output pixel
        output_padding.append(extra)
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = rng.standard_normal((N, C, *size))
    w = rng.standard_normal((C, O, *kernel))
    b = rng.standard_normal(O) if draw(st.booleans()) else None
    options = dict(stride=stride, padding=tuple(padding), output_padding=tuple(output_padding))
    return x, w, b, dict(options, dilation=dilation)


def with_bias(fn, x, w, b, options):
    """Call fn(x, w[, b]) on Tensors made from arrays, for check_gradients."""
    arrays = (x, w) if b is None else (x, w, b)

    def call(*tensors):
        return fn(*tensors[:2], tensors[2] if len(tensors) == 3 else None, **options)

    return call, arrays


# ---------------------------------------------------------------------------- 1. finite differences
@settings(max_examples=80)
@given(conv_cases(max_side=5, max_channels=2))
def test_conv2d_gradients_match_finite_differences(case):
    x, w, b, options = case
    call, arrays = with_bias(conv2d, x, w, b, options)
    check_gradients(call, *arrays)


@settings(max_examples=80)
@given(conv_transpose_cases(max_side=3, max_channels=2))
def test_conv_transpose2d_gradients_match_finite_differences(case):
    x, w, b, options = case
    call, arrays = with_bias(conv_transpose2d, x, w, b, options)
    check_gradients(call, *arrays)


# ---------------------------------------------------------------------------- 2. torch
def assert_close(ours, theirs, what):
    theirs = theirs.detach().numpy()
    scale = max(1.0, float(np.abs(theirs).max()))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6 * scale, err_msg=what)


def compare_with_torch(ours_fn, torch_fn, x, w, b, options):
    tensors = [Tensor(a, requires_grad=True) for a in (x, w, b) if a is not None]
    out = ours_fn(tensors[0], tensors[1], tensors[2] if b is not None else None, **options)
    grad = np.random.default_rng(0).standard_normal(out.shape)
    out.backward(grad)
    refs = [torch.tensor(a, requires_grad=True) for a in (x, w, b) if a is not None]
    ref = torch_fn(refs[0], refs[1], refs[2] if b is not None else None, **options)
    ref.backward(torch.tensor(grad))
    assert_close(out.data, ref, "value")
    for name, t, r in zip(("x", "weight", "bias"), tensors, refs):
        assert_close(t.grad, r.grad, f"gradient of {name}")


@requires_torch
@settings(max_examples=150)
@given(conv_cases(max_side=9, max_channels=4))
def test_conv2d_matches_torch(case):
    compare_with_torch(conv2d, torch.nn.functional.conv2d, *case)


@requires_torch
@settings(max_examples=150)
@given(conv_transpose_cases(max_side=6, max_channels=4))
def test_conv_transpose2d_matches_torch(case):
    compare_with_torch(conv_transpose2d, torch.nn.functional.conv_transpose2d, *case)


@requires_torch
@pytest.mark.parametrize(
    "x_shape, k, options",
    [
        ((2, 3, 17, 13), 7, dict(stride=2, padding=3)),  # the ResNet stem
        ((2, 8, 9, 10), 3, dict(stride=2, padding=1)),  # a ResNet downsampling conv
        ((2, 8, 9, 10), 1, dict(stride=2)),  # a ResNet shortcut
        ((3, 8, 6, 5), 3, dict(padding=1)),  # FPN, RPN and mask head
        ((1, 4, 5, 6), 3, dict(padding=2, dilation=2)),
    ],
)
def test_conv2d_matches_torch_at_mask_rcnn_shapes(x_shape, k, options):
    rng = np.random.default_rng(1)
    x, w, b = rng.standard_normal(x_shape), rng.standard_normal((5, x_shape[1], k, k)), None
    compare_with_torch(conv2d, torch.nn.functional.conv2d, x, w, b, options)


# ---------------------------------------------------------------------------- 3. nested loops
@settings(max_examples=80)
@given(conv_cases(max_side=6))
def test_conv2d_matches_nested_loops(case):
    x, w, _, options = case
    out, _ = conv2d_forward(x, w, **options)
    np.testing.assert_allclose(out, conv2d_reference(x, w, **options), rtol=1e-10, atol=1e-10)


@settings(max_examples=80)
@given(conv_cases(max_side=6))
def test_conv2d_plain_definition_matches_nested_loops_and_the_fast_form(case):
    x, w, _, options = case
    plain = conv2d_plain(x, w, **options)
    np.testing.assert_allclose(plain, conv2d_reference(x, w, **options), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(conv2d_forward(x, w, **options)[0], plain, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("x_shape", "k", "options"),
    [
        ((2, 16, 40, 36), 3, dict(padding=1)),  # the stride-4 layers, smaller
        ((9, 32, 14, 14), 3, dict(padding=1)),  # the mask head on 9 RoIs
        ((2, 3, 33, 31), 7, dict(stride=2, padding=3)),  # the ResNet stem
        ((2, 16, 21, 20), 3, dict(stride=2, padding=1)),
        ((2, 16, 21, 20), 1, dict(stride=2)),
    ],
)
def test_fast_form_equals_the_plain_definition_in_float32(x_shape, k, options):
    rng = np.random.default_rng(6)
    x = rng.standard_normal(x_shape, dtype=np.float32)
    w = rng.standard_normal((24, x_shape[1], k, k), dtype=np.float32)
    out, _ = conv2d_forward(x, w, **options)
    plain = conv2d_plain(x, w, **options)
    assert out.dtype == plain.dtype == np.float32
    scale = np.sqrt(x_shape[1] * k * k)  # the size of a sum of C*k*k unit products
    np.testing.assert_allclose(out, plain, rtol=0, atol=1e-5 * scale)


@settings(max_examples=80)
@given(conv_transpose_cases(max_side=4))
def test_conv_transpose2d_matches_nested_loops(case):
    x, w, _, options = case
    out, _ = conv_transpose2d_forward(x, w, **options)
    expected = conv_transpose2d_reference(x, w, **options)
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel", [(2, 2), (2, 3), (1, 2)])
def test_conv_transpose2d_whose_taps_tile_the_output_matches_nested_loops(kernel):
    # stride == kernel: each output pixel comes from exactly one tap (the mask head's upsampling),
    # which the fast form assigns instead of adding onto zeros.
    rng = np.random.default_rng(8)
    x, w = rng.standard_normal((3, 4, 3, 2)), rng.standard_normal((4, 5, *kernel))
    out, saved = conv_transpose2d_forward(x, w, stride=kernel)
    np.testing.assert_allclose(out, conv_transpose2d_reference(x, w, stride=kernel), atol=1e-12)
    check_gradients(lambda a, b: conv_transpose2d(a, b, stride=kernel), x, w)


# ---------------------------------------------------------------------------- 4. known answers
X33 = np.arange(9.0).reshape(1, 1, 3, 3)  # [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
W22 = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)


def test_conv2d_known_answer():
    # out[0, 0] = 0*1 + 1*2 + 3*3 + 4*4 = 27, and so on for each 2x2 window.
    out, saved = conv2d_forward(X33, W22)
    np.testing.assert_array_equal(out[0, 0], [[27, 37], [57, 67]])
    grad_x, grad_w = conv2d_backward(np.ones_like(out), saved)
    # Each weight tap sees one pixel per window: the sum of a 2x2 block of x.
    np.testing.assert_array_equal(grad_w[0, 0], [[8, 12], [20, 24]])
    # Each pixel collects the taps of the windows that cover it.
    np.testing.assert_array_equal(grad_x[0, 0], [[1, 3, 2], [4, 10, 6], [3, 7, 4]])


def test_conv2d_known_answer_with_padding_and_stride():
    # Padding 1 and stride 2 on the 3x3 image: windows at rows/cols -1 and 1.
    out, _ = conv2d_forward(X33, W22, stride=2, padding=1)
    np.testing.assert_array_equal(out[0, 0], [[0 * 4, 1 * 3 + 2 * 4], [3 * 2 + 6 * 4, 67]])


def test_conv_transpose2d_known_answers():
    x = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    # k = s = 2 (the mask head's upsampling): each pixel paints its own 2x2 block.
    out, _ = conv_transpose2d_forward(x, np.ones((1, 1, 2, 2)), stride=2)
    np.testing.assert_array_equal(
        out[0, 0], [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
    )
    # Stride 1: the painted 2x2 blocks overlap and add up.
    out, saved = conv_transpose2d_forward(x, W22)
    np.testing.assert_array_equal(out[0, 0], [[1, 4, 4], [6, 20, 16], [9, 24, 16]])
    grad_x, grad_w = conv_transpose2d_backward(np.ones_like(out), saved)
    np.testing.assert_array_equal(grad_x[0, 0], [[10, 10], [10, 10]])  # each pixel: sum of W
    np.testing.assert_array_equal(grad_w[0, 0], [[10, 10], [10, 10]])  # each tap: sum of x


# ---------------------------------------------------------------------------- 5. edge cases
def test_conv2d_on_a_1x1_image_uses_only_the_centre_tap():
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((2, 3, 1, 1)), rng.standard_normal((4, 3, 3, 3))
    out, _ = conv2d_forward(x, w, padding=1)
    np.testing.assert_allclose(out[:, :, 0, 0], x[:, :, 0, 0] @ w[:, :, 1, 1].T)


def test_conv2d_kernel_larger_than_the_image():
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((1, 2, 3, 2)), rng.standard_normal((3, 2, 5, 5))
    out, _ = conv2d_forward(x, w, padding=2)
    np.testing.assert_allclose(out, conv2d_reference(x, w, padding=(2, 2)), atol=1e-12)
    check_gradients(lambda a, b: conv2d(a, b, padding=2), x, w)


@pytest.mark.parametrize("kernel, stride", [(3, 1), (3, 2), (1, 1), (1, 2), (7, 2)])
def test_conv2d_on_an_empty_batch(kernel, stride):
    """A head given no RoIs convolves a (0, C, H, W) batch: empty output, zero weight grad."""
    x = np.zeros((0, 3, 14, 14))
    w = np.random.default_rng(0).standard_normal((4, 3, kernel, kernel))
    out, saved = conv2d_forward(x, w, stride=stride, padding=kernel // 2)
    size = (14 + 2 * (kernel // 2) - kernel) // stride + 1
    assert out.shape == (0, 4, size, size)
    grad_x, grad_w = conv2d_backward(np.zeros_like(out), saved)
    assert grad_x.shape == x.shape and grad_w.shape == w.shape and not grad_w.any()


def test_conv2d_batch_of_one_and_padding_larger_than_the_kernel_reach():
    rng = np.random.default_rng(4)
    x, w = rng.standard_normal((1, 2, 4, 3)), rng.standard_normal((2, 2, 1, 3))
    options = dict(stride=(1, 2), padding=(2, 1), dilation=(1, 2))
    out, _ = conv2d_forward(x, w, **options)
    np.testing.assert_allclose(out, conv2d_reference(x, w, **options), atol=1e-12)
    check_gradients(lambda a, b: conv2d(a, b, **options), x, w)


def test_conv2d_float32_stays_float32_and_close_to_float64():
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((2, 8, 12, 12)), rng.standard_normal((16, 8, 3, 3))
    xt = Tensor(x.astype(np.float32), requires_grad=True)
    wt = Tensor(w.astype(np.float32), requires_grad=True)
    out = conv2d(xt, wt, padding=1)
    out.backward(np.ones(out.shape, np.float32))
    assert out.dtype == xt.grad.dtype == wt.grad.dtype == np.float32
    expected, saved = conv2d_forward(x, w, padding=1)
    grad_x, grad_w = conv2d_backward(np.ones_like(expected), saved)
    np.testing.assert_allclose(out.data, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(xt.grad, grad_x, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(wt.grad, grad_w, rtol=1e-4, atol=1e-3)


@settings(max_examples=150)
@given(conv_cases(max_side=7))
def test_grad_of_x_is_the_transposed_conv_of_grad_out(case):
    """<conv2d(x), y> = <x, conv_transpose2d(y)>: the two ops are adjoint (the same weight).

    The weight (O, C, kh, kw) of a conv2d from C to O channels is, in conv_transpose2d's layout,
    that of a transposed conv from O to C channels. It gives back x's size when output_padding
    adds the rows (columns) that the conv2d's last stride left out: (H + 2p - d(k-1) - 1) mod s.
    """
    x, w, _, options = case
    out = conv2d(Tensor(x), Tensor(w), **options).data
    y = np.random.default_rng(0).standard_normal(out.shape)
    left_out = tuple(
        (size + 2 * p - d * (k - 1) - 1) % s
        for size, k, s, p, d in zip(
            x.shape[2:], w.shape[2:], options["stride"], options["padding"], options["dilation"]
        )
    )
    back = conv_transpose2d(Tensor(y), Tensor(w), output_padding=left_out, **options).data
    assert back.shape == x.shape
    np.testing.assert_allclose((out * y).sum(), (x * back).sum(), rtol=1e-10, atol=1e-10)
    # and conv2d's backward is that transposed conv
    grad_x, _ = conv2d_backward(y, conv2d_forward(x, w, **options)[1], need_w=False)
    np.testing.assert_allclose(grad_x, back, rtol=1e-10, atol=1e-12)


def test_unneeded_gradients_are_skipped():
    rng = np.random.default_rng(6)
    x = Tensor(rng.standard_normal((1, 2, 5, 5)))  # an image: no gradient wanted
    w = Tensor(rng.standard_normal((3, 2, 3, 3)), requires_grad=True)
    conv2d(x, w, padding=1).sum().backward()
    assert x.grad is None and w.grad.shape == (3, 2, 3, 3)


def test_bad_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match="channels"):
        conv2d_forward(np.zeros((1, 3, 5, 5)), np.zeros((2, 4, 3, 3)))
    with pytest.raises(ValueError, match="does not fit"):
        conv2d_forward(np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 3, 3)))


@pytest.mark.gpu
def test_conv_on_gpu_matches_cpu():
    import cupy  # noqa: PLC0415 - only with a GPU

    rng = np.random.default_rng(7)
    x, g = rng.standard_normal((2, 3, 9, 8)), rng.standard_normal((2, 4, 5, 4))
    w, wt = rng.standard_normal((4, 3, 3, 3)), rng.standard_normal((4, 3, 2, 2))
    for stride, padding in [(1, 1), (2, 1), ((2, 1), (0, 2))]:
        cpu, saved = conv2d_forward(x, w, stride, padding)
        gpu, saved_gpu = conv2d_forward(cupy.asarray(x), cupy.asarray(w), stride, padding)
        np.testing.assert_allclose(gpu.get(), cpu, atol=1e-10)
        grad = rng.standard_normal(cpu.shape)
        for ours, theirs in zip(
            conv2d_backward(cupy.asarray(grad), saved_gpu), conv2d_backward(grad, saved)
        ):
            np.testing.assert_allclose(ours.get(), theirs, atol=1e-10)
    cpu, saved = conv_transpose2d_forward(g, wt, stride=2)
    gpu, saved_gpu = conv_transpose2d_forward(cupy.asarray(g), cupy.asarray(wt), stride=2)
    np.testing.assert_allclose(gpu.get(), cpu, atol=1e-10)
    grad = rng.standard_normal(cpu.shape)
    for ours, theirs in zip(
        conv_transpose2d_backward(cupy.asarray(grad), saved_gpu),
        conv_transpose2d_backward(grad, saved),
    ):
        np.testing.assert_allclose(ours.get(), theirs, atol=1e-10)


@pytest.mark.parametrize(("k", "options"), [(3, dict(padding=1)), (1, {}), (3, dict(stride=2))])
def test_weight_gradient_split_between_threads_equals_one_product(k, options, monkeypatch):
    # With 2 BLAS threads the sum over pixels of a weight gradient is cut in two ranges, each
    # computed on its own thread (conv_fast._sum_over_pixels); the result must not change.
    from minimask.backend import blas_threads, set_threads  # noqa: PLC0415
    from minimask.nn import conv_fast  # noqa: PLC0415

    rng = np.random.default_rng(9)
    x, w = rng.standard_normal((2, 6, 20, 17)), rng.standard_normal((5, 6, k, k))
    out, saved = conv2d_forward(x, w, **options)
    grad = rng.standard_normal(out.shape)
    single = conv2d_backward(grad, saved)
    before = blas_threads()
    try:
        if set_threads(2) != 2 or blas_threads() != 2:
            pytest.skip("this BLAS does not take 2 threads")
        monkeypatch.setattr(conv_fast, "SPLIT_PIXELS", 16)
        calls = []
        real = conv_fast.single_threaded_blas

        def counted():
            calls.append(blas_threads())
            return real()

        monkeypatch.setattr(conv_fast, "single_threaded_blas", counted)
        split = conv2d_backward(grad, saved)
        assert calls and blas_threads() == 2  # split, and the thread count given back
    finally:
        set_threads(before)
    np.testing.assert_allclose(split[1], single[1], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(split[0], single[0])


def test_conv2d_with_relu_equals_conv2d_then_relu():
    rng = np.random.default_rng(10)
    x, w, b = rng.standard_normal((2, 3, 6, 5)), rng.standard_normal((4, 3, 3, 3)), rng.random(4)
    grad = rng.standard_normal((2, 4, 6, 5))
    results = []
    for relu in (True, False):
        xt, wt, bt = (Tensor(a, requires_grad=True) for a in (x, w, b))
        out = conv2d(xt, wt, bt, padding=1, relu=True) if relu else conv2d(xt, wt, bt, padding=1)
        out = out if relu else out.relu()
        out.backward(grad)
        results.append((out.data, xt.grad, wt.grad, bt.grad))
    for fused, plain in zip(*results):
        np.testing.assert_allclose(fused, plain, rtol=1e-12, atol=1e-12)
    assert (results[0][0] == 0).any()
    check_gradients(lambda a, c: conv2d(a, c, padding=1, relu=True), x, w)


def test_weight_gradient_has_the_same_bits_at_one_and_two_threads(monkeypatch):
    # Exact resume needs the same numbers whatever thread count the policy picks on resuming:
    # the pixel ranges of the split sum do not depend on the thread count.
    from minimask.backend import blas_threads, set_threads  # noqa: PLC0415
    from minimask.nn import conv_fast  # noqa: PLC0415

    monkeypatch.setattr(conv_fast, "SPLIT_PIXELS", 16)
    rng = np.random.default_rng(10)
    x = rng.standard_normal((2, 6, 20, 17)).astype(np.float32)
    w = rng.standard_normal((5, 6, 3, 3)).astype(np.float32)
    out, saved = conv2d_forward(x, w, padding=1)
    grad = rng.standard_normal(out.shape).astype(np.float32)
    before = blas_threads()
    try:
        results = []
        for threads in (1, 2):
            set_threads(threads)
            results.append(conv2d_backward(grad, saved)[1])
    finally:
        set_threads(before)
    np.testing.assert_array_equal(results[0], results[1])


def _backward_in_child(queue):
    from minimask.backend import set_threads  # noqa: PLC0415
    from minimask.nn import conv_fast  # noqa: PLC0415

    set_threads(2)
    conv_fast.SPLIT_PIXELS = 16
    x, w = np.ones((2, 3, 20, 17), np.float32), np.ones((4, 3, 3, 3), np.float32)
    out, saved = conv2d_forward(x, w, padding=1)
    queue.put(float(conv2d_backward(np.ones_like(out), saved)[1].sum()))


def test_a_forked_child_can_split_a_weight_gradient_again(monkeypatch):
    # The parent's thread pool is inherited without its threads by a forked child (as the
    # ablation bench's workers are); the child must make its own instead of waiting forever.
    import multiprocessing  # noqa: PLC0415

    from minimask.backend import blas_threads, set_threads  # noqa: PLC0415
    from minimask.nn import conv_fast  # noqa: PLC0415

    monkeypatch.setattr(conv_fast, "SPLIT_PIXELS", 16)
    before = blas_threads()
    try:
        if set_threads(2) != 2:
            pytest.skip("this BLAS does not take 2 threads")
        x, w = np.ones((2, 3, 20, 17), np.float32), np.ones((4, 3, 3, 3), np.float32)
        out, saved = conv2d_forward(x, w, padding=1)
        expected = float(conv2d_backward(np.ones_like(out), saved)[1].sum())  # pool made here
    finally:
        set_threads(before)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_backward_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    hung = child.is_alive()
    if hung:
        child.kill()
    assert not hung, "the forked child waited on its parent's thread pool"
    assert queue.get(timeout=5) == expected
