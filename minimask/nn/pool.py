"""Max pooling, nearest and bilinear upsampling: plain array functions, then engine ops.

Where Mask R-CNN uses them: ResNet's stem max-pools with a 3x3 window, stride 2, padding 1; FPN
makes its coarsest level P6 by max-pooling P5 with a 1x1 window and stride 2 (Lin et al. 2017),
and its top-down path upsamples each level to the size of the next finer one (``size=``, which
may not be an exact 2x when an image side is odd). The keypoint head (Mask R-CNN §5) doubles its
28x28 heatmaps to 56x56 by bilinear upsampling; its inference resizes each RoI's heatmaps to the
RoI's size in pixels bicubically.

Shape letters: N images, C channels, H x W input size, Ho x Wo output size, kh x kw window.
All follow torch: ``F.max_pool2d`` (padding counts as -inf) and ``F.interpolate`` with
``mode="nearest"``, ``"bilinear"`` and ``"bicubic"`` (``align_corners=False``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from minimask.backend import get_array_module, scatter_add
from minimask.engine.tensor import Function, Tensor
from minimask.nn.conv import _pair


# ---------------------------------------------------------------------------- max pooling
class MaxPoolSaved(NamedTuple):
    winner: object  # (N, C, Ho, Wo) uint8: which tap of the window held the max (i*kw + j)
    x_shape: tuple
    kernel: tuple
    stride: tuple
    padding: tuple


def max_pool2d_forward(x, kernel_size, stride=None, padding=0):
    """Max over each ``kh x kw`` window, moved by ``stride``; padding counts as -inf.

    ``out[n, c, h, w] = max_{i, j} x_pad[n, c, h*s + i, w*s + j]`` with
    ``Ho = (H + 2p - kh) // s + 1``. ``stride`` defaults to the window size, as in torch. At a tie
    the first tap in row-major window order wins (torch's rule), and takes all the gradient.

    Args:
        x: (N, C, H, W).
        kernel_size, stride, padding: an int or a (height, width) pair; padding <= kernel // 2.

    Returns:
        ``(out (N, C, Ho, Wo), saved)``.
    """
    xp = get_array_module(x)
    (kh, kw) = kernel = _pair(kernel_size)
    (sh, sw) = stride = _pair(kernel_size if stride is None else stride)
    (ph, pw) = padding = _pair(padding)
    if 2 * ph > kh or 2 * pw > kw:
        raise ValueError(f"max_pool2d: padding {padding} must be at most half the window {kernel}")
    N, C, H, W = x.shape
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(f"max_pool2d: a {kernel} window does not fit in {H}x{W} + {padding}")

    padded = xp.full((N, C, H + 2 * ph, W + 2 * pw), -np.inf, dtype=x.dtype)
    padded[:, :, ph : ph + H, pw : pw + W] = x
    height, width = sh * (Ho - 1) + 1, sw * (Wo - 1) + 1
    best = padded[:, :, 0:height:sh, 0:width:sw].copy()  # tap (0, 0) of every window
    winner = xp.zeros((N, C, Ho, Wo), dtype=np.uint8)
    for tap in range(1, kh * kw):  # a loop over the window's taps, each over all pixels at once
        i, j = divmod(tap, kw)
        candidate = padded[:, :, i : i + height : sh, j : j + width : sw]
        better = candidate > best  # strict: the earlier tap keeps a tie
        # Taps come in increasing order, so the winner is the last (largest) tap that was better.
        xp.maximum(winner, better.astype(np.uint8) * np.uint8(tap), out=winner)
        xp.maximum(best, candidate, out=best)
    return best, MaxPoolSaved(winner, x.shape, kernel, stride, padding)


def max_pool2d_backward(grad_out, saved: MaxPoolSaved):
    """Gradient of :func:`max_pool2d_forward`: each window's gradient goes to its max.

    Returns grad_x (N, C, H, W). Windows that overlap add into the shared pixel.
    """
    xp = get_array_module(grad_out)
    N, C, H, W = saved.x_shape
    (kh, kw), (sh, sw), (ph, pw) = saved.kernel, saved.stride, saved.padding
    Ho, Wo = grad_out.shape[2:]
    # Flat index in x of each window's winner: the window's top-left corner plus the tap's
    # offset. The winner is always a real pixel (padding is -inf and no window is all padding).
    corner = (
        xp.arange(N * C).reshape(N * C, 1, 1) * (H * W)
        + (xp.arange(Ho).reshape(1, Ho, 1) * sh - ph) * W
        + (xp.arange(Wo).reshape(1, 1, Wo) * sw - pw)
    )  # (N*C, Ho, Wo)
    taps = xp.arange(kh * kw)
    tap_offset = (taps // kw) * W + taps % kw  # (kh*kw,): tap (i, j) is i*W + j
    winners = corner + tap_offset[saved.winner.reshape(N * C, Ho, Wo)]
    grad = xp.zeros((N, C, H, W), dtype=grad_out.dtype)
    # Overlapping windows may share a winner, so add every window's gradient (no assignment).
    scatter_add(grad.reshape(-1), winners.reshape(-1), grad_out.reshape(-1))
    return grad


# ---------------------------------------------------------------------------- nearest upsampling
class UpsampleSaved(NamedTuple):
    rows: object  # (Ho,) source row of each output row, on x's device
    cols: object  # (Wo,) source column of each output column
    x_shape: tuple
    scales: tuple  # the scale factors given, or (None, None)


def nearest_source_index(in_size: int, out_size: int, scale_factor: float | None = None, xp=np):
    """Source index of each output index, exactly as torch's ``mode="nearest"``.

    ``src = min(floor(dst * scale), in_size - 1)`` with ``scale = 1 / scale_factor`` when a scale
    factor was given, else ``in_size / out_size``, computed in float32 like torch's CPU kernel (so
    that the rounding, and hence the chosen pixel, is identical). Returns (out_size,) int64, made
    by ``xp`` where it is used (on a device: no index map built on the host and uploaded).
    """
    if out_size == in_size:
        return xp.arange(out_size)
    if scale_factor is not None and scale_factor > 0:
        scale = np.float32(1.0 / scale_factor)
    else:
        scale = np.float32(in_size) / np.float32(out_size)
    src = xp.floor(xp.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return xp.minimum(src, in_size - 1)


def upsample_nearest_forward(x, size=None, scale_factor=None):
    """Nearest-neighbour resize of x (N, C, H, W) to ``size`` or to ``floor(H * scale_factor)``.

    Give exactly one of ``size`` (int or (Ho, Wo)) and ``scale_factor`` (number or pair), as in
    ``torch.nn.functional.interpolate(x, size, scale_factor, mode="nearest")``.

    Returns:
        ``(out (N, C, Ho, Wo), saved)``.
    """
    xp = get_array_module(x)
    N, C, H, W = x.shape
    if (size is None) == (scale_factor is None):
        raise ValueError("upsample_nearest: give exactly one of size and scale_factor")
    if size is not None:
        (Ho, Wo), scales = _pair(size), (None, None)
    else:
        scales = (float(scale_factor),) * 2 if np.ndim(scale_factor) == 0 else scale_factor
        scales = tuple(map(float, scales))
        Ho, Wo = math.floor(H * scales[0]), math.floor(W * scales[1])
    if Ho < 1 or Wo < 1:
        raise ValueError(f"upsample_nearest: {H}x{W} resized to {Ho}x{Wo} is empty")
    rows = nearest_source_index(H, Ho, scales[0], xp)
    cols = nearest_source_index(W, Wo, scales[1], xp)
    # Columns first: gathering along the last axis is the slow one, so do it on fewer rows.
    out = x.take(cols, axis=3).take(rows, axis=2)  # (N, C, Ho, Wo)
    return out, UpsampleSaved(rows, cols, x.shape, scales)


def _whole_factors(saved: UpsampleSaved, out_size):
    """``(kh, kw)`` when output pixel (h, w) is source pixel (h // kh, w // kw), else None.

    The backward pass's shortcut for the common exact 2x, decided on the host from the sizes
    alone (the same index maps made by NumPy), so no device array is read.
    """
    factors = []
    for size, out, scale in zip(saved.x_shape[2:], out_size, saved.scales):
        k = out // size
        if k * size != out or not np.array_equal(
            nearest_source_index(size, out, scale), np.arange(out) // k
        ):
            return None
        factors.append(k)
    return tuple(factors)


def _sum_by_source(g, source, size: int, axis: int, scale_factor: float | None):
    """``out[..., k, ...] = sum of g[..., o, ...] over the o with source[o] == k``, along ``axis``.

    ``source`` is sorted, so the outputs of one source index are consecutive; the loop runs over
    the largest number of copies of one pixel (2 for a 2x upsample), not over pixels.
    """
    xp = get_array_module(g)
    # How many outputs each source made is shape logic: the host works it out from the sizes
    # alone (the same map, made by NumPy) to know the loop's length. The indices stay on g's
    # device: where each source's outputs start and stop.
    copies = np.bincount(nearest_source_index(size, len(source), scale_factor), minlength=size)
    cells = xp.arange(size)
    first, stop = xp.searchsorted(source, cells), xp.searchsorted(source, cells, side="right")
    shape = [1] * g.ndim
    shape[axis] = size
    total = 0
    for k in range(int(copies.max())):  # the k-th copy of every source pixel at once
        picked = g.take(xp.minimum(first + k, len(source) - 1), axis=axis)
        if not (copies > k).all():  # some sources have fewer than k + 1 copies: mask them out
            picked = picked * (first + k < stop).reshape(shape)
        total = total + picked
    return total


def upsample_nearest_backward(grad_out, saved: UpsampleSaved):
    """Gradient of :func:`upsample_nearest_forward`: each input pixel receives the sum of the
    gradients of the output pixels copied from it. Returns grad_x (N, C, H, W)."""
    H, W = saved.x_shape[2:]
    factors = _whole_factors(saved, grad_out.shape[2:])
    if factors is not None:  # each input pixel: the sum of its kh x kw block of the output
        (kh, kw), (N, C), Wo = factors, grad_out.shape[:2], grad_out.shape[3]
        by_row = grad_out.reshape(N, C, H, kh, Wo)  # the kh output rows of each input row
        rows = by_row[:, :, :, 0].copy()  # (N, C, H, Wo); whole rows first, the fast way
        for i in range(1, kh):
            rows += by_row[:, :, :, i]
        total = rows[..., 0::kw].copy()  # (N, C, H, W)
        for j in range(1, kw):
            total += rows[..., j::kw]
        return total  # about 2.5x faster than the general sums below (a 2x upsample of 256x100x136)
    scale_h, scale_w = saved.scales
    grad = _sum_by_source(grad_out, saved.rows, H, 2, scale_h)  # (N, C, H, Wo): rows first
    return _sum_by_source(grad, saved.cols, W, 3, scale_w)  # (N, C, H, W)


# ---------------------------------------------------------------------------- engine ops
class MaxPool2d(Function):
    def forward(self, x, kernel_size=1, stride=None, padding=0):
        out, self.saved = max_pool2d_forward(x, kernel_size, stride, padding)
        return out

    def backward(self, g):
        return (max_pool2d_backward(g, self.saved),)


class UpsampleNearest(Function):
    def forward(self, x, size=None, scale_factor=None):
        out, self.saved = upsample_nearest_forward(x, size, scale_factor)
        return out

    def backward(self, g):
        return (upsample_nearest_backward(g, self.saved),)


def max_pool2d(x: Tensor, kernel_size, stride=None, padding=0) -> Tensor:
    """Max pooling of x (N, C, H, W), as ``torch.nn.functional.max_pool2d`` (see
    :func:`max_pool2d_forward`)."""
    return MaxPool2d.apply(x, kernel_size=kernel_size, stride=stride, padding=padding)


def upsample_nearest(x: Tensor, size=None, scale_factor=None) -> Tensor:
    """Nearest-neighbour resize of x (N, C, H, W), as ``F.interpolate(mode="nearest")`` (see
    :func:`upsample_nearest_forward`)."""
    return UpsampleNearest.apply(x, size=size, scale_factor=scale_factor)


# ---------------------------------------------------------------------------- bilinear and bicubic
def bilinear_taps(src: int, dst: int, xp, dtype, scale: float | None = None):
    """Where each of ``dst`` output pixels samples a ``src``-long axis: ``(low, high, frac)``.

    Half-pixel centres (``align_corners=False``): output pixel ``j`` sits at source coordinate
    ``u = (j + 0.5)·scale - 0.5``, clamped at 0, with ``scale = src/dst`` (or the given one: torch
    uses ``1 / scale_factor`` when a scale factor is given); it blends pixels ``low = floor(u)``
    and ``high = min(low + 1, src - 1)`` with weights ``1 - frac`` and ``frac = u - low``.
    """
    scale = src / dst if scale is None else scale
    u = (xp.arange(dst, dtype=dtype) + 0.5) * dtype(scale) - 0.5
    u = xp.maximum(u, 0)
    low = xp.minimum(xp.floor(u).astype(xp.int64), src - 1)
    high = xp.minimum(low + 1, src - 1)
    return low, high, (u - low).astype(dtype)


def bilinear_matrix(src: int, dst: int, xp, dtype, scale: float | None = None):
    """(dst, src) weights ``A`` with ``resized = A @ line`` along one axis (:func:`bilinear_taps`).

    Each row holds ``1 - frac`` at ``low`` and ``frac`` at ``high`` (one 1 where they coincide).
    """
    low, high, frac = bilinear_taps(src, dst, xp, dtype, scale)
    rows = xp.arange(dst)
    a = xp.zeros((dst, src), dtype=dtype)
    a[rows, low] = 1 - frac
    a[rows, high] += frac  # low == high at the last pixel: the row still sums to 1
    return a


CUBIC_A = -0.75  # torch's (and OpenCV's) cubic convolution parameter (Keys 1981 uses -0.5)


def bicubic_matrix(src: int, dst: int, xp, dtype):
    """(dst, src) weights ``A`` of torch's bicubic resize along one axis, ``resized = A @ line``.

    ``F.interpolate(mode="bicubic", align_corners=False)``: output pixel ``j`` sits at
    ``u = (j + 0.5)·src/dst - 0.5`` (not clamped, unlike bilinear), and blends the four pixels
    ``floor(u) - 1 .. floor(u) + 2`` (clamped to the axis, so the border repeats) with the cubic
    convolution weights of ``t = u - floor(u)``::

        w(d) = (a + 2)|d|^3 - (a + 3)|d|^2 + 1      for |d| <= 1
               a|d|^3 - 5a|d|^2 + 8a|d| - 4a        for 1 < |d| < 2,      a = -0.75
    """
    if src == dst:  # torch copies an axis that keeps its size
        return xp.eye(src, dtype=dtype)
    a = CUBIC_A
    u = (xp.arange(dst, dtype=dtype) + 0.5) * dtype(src / dst) - 0.5
    base = xp.floor(u)
    t = (u - base).astype(dtype)
    near = lambda d: ((a + 2) * d - (a + 3)) * d * d + 1  # noqa: E731 - |d| <= 1
    far = lambda d: ((a * d - 5 * a) * d + 8 * a) * d - 4 * a  # noqa: E731 - 1 < |d| < 2
    weights = [far(t + 1), near(t), near(1 - t), far(2 - t)]  # taps at offsets -1, 0, 1, 2
    m = xp.zeros((dst, src), dtype=dtype)
    rows = xp.arange(dst)
    for offset, w in zip((-1, 0, 1, 2), weights):
        index = xp.clip(base.astype(xp.int64) + offset, 0, src - 1)
        scatter_add(m, (rows, index), w.astype(dtype))  # clamped taps may share a pixel
    return m


def resize_bicubic(x, size: tuple[int, int]):
    """(..., H, W) -> (..., Ho, Wo), as ``F.interpolate(x, size, mode="bicubic",
    align_corners=False)``: separable, ``Ah @ x @ Aw^T`` (:func:`bicubic_matrix`)."""
    xp = get_array_module(x)
    (H, W), (Ho, Wo) = x.shape[-2:], size
    ah = bicubic_matrix(H, Ho, xp, x.dtype.type)  # (Ho, H)
    aw = bicubic_matrix(W, Wo, xp, x.dtype.type)  # (Wo, W)
    return ah @ x @ aw.T  # (..., Ho, Wo)


class BilinearSaved(NamedTuple):
    rows: object  # (Ho, H) the row weights Ah
    cols: object  # (Wo, W) the column weights Aw


def upsample_bilinear_forward(x, scale_factor: float = 2.0):
    """Bilinear resize of x (N, C, H, W) by ``scale_factor``, as ``F.interpolate(x,
    scale_factor=s, mode="bilinear", align_corners=False)`` (torchvision's keypoint predictor).

    Bilinear resizing is linear and separable: ``out = Ah @ x @ Aw^T`` with the (Ho, H) and (Wo,
    W) weights of :func:`bilinear_matrix`, two small matrix products per channel. Output size
    ``floor(H · s)``; the source coordinate uses ``1 / s`` as torch does with a scale factor.

    Returns:
        ``(out (N, C, Ho, Wo), saved)``.
    """
    xp = get_array_module(x)
    H, W = x.shape[-2:]
    Ho, Wo = math.floor(H * scale_factor), math.floor(W * scale_factor)
    if Ho < 1 or Wo < 1:
        raise ValueError(f"upsample_bilinear: {H}x{W} resized to {Ho}x{Wo} is empty")
    dtype = x.dtype.type
    ah = bilinear_matrix(H, Ho, xp, dtype, 1.0 / scale_factor)  # (Ho, H)
    aw = bilinear_matrix(W, Wo, xp, dtype, 1.0 / scale_factor)  # (Wo, W)
    return ah @ x @ aw.T, BilinearSaved(ah, aw)


def upsample_bilinear_backward(grad_out, saved: BilinearSaved):
    """Gradient of :func:`upsample_bilinear_forward`: the transposed maps, ``Ah^T @ g @ Aw``.
    Returns grad_x (N, C, H, W)."""
    return saved.rows.T @ grad_out @ saved.cols


class UpsampleBilinear(Function):
    def forward(self, x, scale_factor=2.0):
        out, self.saved = upsample_bilinear_forward(x, scale_factor)
        return out

    def backward(self, g):
        return (upsample_bilinear_backward(g, self.saved),)


def upsample_bilinear(x: Tensor, scale_factor: float = 2.0) -> Tensor:
    """Bilinear resize of x (N, C, H, W) by ``scale_factor`` (see
    :func:`upsample_bilinear_forward`)."""
    return UpsampleBilinear.apply(x, scale_factor=scale_factor)
