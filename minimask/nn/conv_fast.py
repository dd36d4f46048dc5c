"""The fast form of conv2d and conv_transpose2d: a few copies and one matrix product.

``minimask/nn/conv.py`` defines the convolution (and ``conv2d_plain`` computes it tap by tap);
this module computes the same numbers quickly. Layouts and sizes are conv.py's::

    conv2d:            x (N, C, H, W), weight (O, C, kh, kw)  ->  (N, O, Ho, Wo)
    conv_transpose2d:  x (N, C, H, W), weight (C, O, kh, kw)  ->  (N, O, Ho, Wo)

Shape letters: N images, C input and O output channels, H x W input and Ho x Wo output size,
kh x kw kernel, B rows per image in the column matrix, R = N*B (+ a few) its rows, K its channels.

What it buys: the plain form makes kh*kw small matrix products and kh*kw full passes over the
output; here a 3x3 conv is three copies of the input and one large GEMM, so nearly all the time
is BLAS arithmetic. Measured with one thread (CPU time, float32, forward + backward, the 3x3
rows of ``python -m minimask.bench conv``): the GEMMs take 84-96 % of the time, and the whole
pass 1.0-1.16x torch's (docs/benchmarks.md has the tables).

How: NumPy's fastest operation is the matrix product (a BLAS GEMM), so the conv becomes one GEMM
``weight (O, K) @ columns (K, R*Wo)``, each column holding what one output pixel sees.

1. **Columns**: for each horizontal tap j, copy x into a slab (C, R, Wo) holding
   ``x_pad[n, c, row, w*s + j*d]``, with the images stacked into blocks of B rows, one after
   another. Neighbours share their padding rows (the bottom padding of one image is the top
   padding of the next), so a block is only ``H + p`` rows.
2. **GEMM**: the kernel rows need no copy of their own: kernel row i reads the slab row below by
   ``i*d``, which is the same matrix shifted by ``i*d*Wo`` columns. So all kernel rows go in one
   GEMM, stacked along M: ``(kh*O, kw*C) @ cols`` -> per_row (kh, O, R*Wo).
3. **Shift and sum**: ``out = sum_i per_row[i]`` shifted left by ``i*d*Wo`` columns. The last rows
   of each block straddle two images: they are computed and dropped.

Textbook "im2col" copies all kh*kw taps (9 copies of the input for a 3x3 kernel); this copies kw.
With a vertical stride > 1 the kernel rows are not a whole number of rows apart, so every tap is
copied (im2col), B = Ho, and there is one GEMM with no shift: ``groups = 1`` below instead of
``kh``. A 1x1 kernel needs no copy at all: it is a matmul over channels.

The backward pass is the adjoint of each step, in reverse: place a copy of the output gradient
at each shift (step 3), one GEMM with the weight (step 2), and add every column back to the pixel
it was copied from ("fold", step 1). That gradient with respect to the input *is* the transposed
conv, so ``conv_transpose2d`` is built from it.

Memory: nothing but x is kept for the backward pass, which copies the columns again. The big
temporaries (columns, GEMM outputs) live in a per-thread :class:`Workspace`, reused across calls.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from minimask.backend import blas_threads, get_array_module, single_threaded_blas


class Workspace(threading.local):
    """Scratch arrays reused across calls, one per name, grown when a call needs more.

    Why: a fresh array of tens of MB is new memory, and the OS zeroes every new page on first
    touch. For a conv's temporaries that page-faulting costs a large fraction of a GEMM, and BLAS
    threads writing into fresh pages wait on each other. Only temporaries that die inside one call
    come from here; results and saved arrays are always fresh arrays. The buffers stay as large
    as the largest conv seen; :meth:`clear` gives the memory back.
    """

    def __init__(self):
        self.buffers = {}

    def clear(self) -> None:
        self.buffers.clear()

    def get(self, name: str, shape, dtype, xp):
        """An uninitialised C-contiguous array of ``shape``; it is overwritten by the next
        ``get(name, ...)`` in this thread."""
        size, dtype = int(np.prod(shape)), np.dtype(dtype)
        key = (name, xp.__name__, dtype)
        if key not in self.buffers or self.buffers[key].size < size:
            self.buffers.pop(key, None)  # free the old one before allocating the larger one
            self.buffers[key] = xp.empty(size, dtype)
        return self.buffers[key][:size].reshape(shape)


workspace = Workspace()


def _pair(value) -> tuple[int, int]:
    """``3 -> (3, 3)``; ``(3, 5) -> (3, 5)``: one number per spatial axis (height, width)."""
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    h, w = value
    return int(h), int(w)


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a conv along one axis: ``(size + 2p - d(k - 1) - 1) // s + 1``."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


class Geometry(NamedTuple):
    """Every size of one conv2d, and the layout of its column matrix (see the module docstring)."""

    x_shape: tuple  # (N, C, H, W)
    w_shape: tuple  # (O, C, kh, kw)
    stride: tuple
    padding: tuple
    dilation: tuple
    out_size: tuple  # (Ho, Wo)
    groups: int  # GEMMs stacked along M: kh (kernel rows as shifts) or 1 (every tap copied)
    block: int  # B: rows per image in the columns (the first Ho of them are outputs)
    rows: int  # R: rows of the columns, N*B plus the reach of the shifted kernel rows


def conv_geometry(x_shape, w_shape, stride=1, padding=0, dilation=1) -> Geometry:
    """Check the sizes of a conv2d of x (N, C, H, W) with weight (O, C, kh, kw); plan its layout."""
    (N, C, H, W), (O, C_w, kh, kw) = x_shape, w_shape
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    if C != C_w:
        raise ValueError(f"conv2d: x has {C} channels, the weight {tuple(w_shape)} expects {C_w}")
    Ho, Wo = conv_output_size(H, kh, sh, ph, dh), conv_output_size(W, kw, sw, pw, dw)
    if Ho < 1 or Wo < 1:
        raise ValueError(
            f"conv2d: a {kh}x{kw} kernel with dilation {(dh, dw)} does not fit in the {H}x{W} "
            f"input padded by {(ph, pw)}"
        )
    if sh == 1 and kh > 1:  # kernel rows as shifts: a block holds the image and its padding
        groups, block, reach = kh, max(H + ph, Ho), dh * (kh - 1)
    else:  # every tap copied: a block is just the output rows
        groups, block, reach = 1, Ho, 0
    return Geometry(
        (N, C, H, W),
        (O, C, kh, kw),
        (sh, sw),
        (ph, pw),
        (dh, dw),
        (Ho, Wo),
        groups,
        block,
        N * block + reach,
    )


def _valid(out_len: int, size: int, pad: int, offset: int, stride: int):
    """The outputs ``o`` in [lo, hi) whose input ``o*stride + offset - pad`` lies in [0, size),
    and the slice of the input they read, along one axis."""
    lo = min(out_len, max(0, -(-(pad - offset) // stride)))
    hi = max(lo, min(out_len, (size - 1 + pad - offset) // stride + 1))
    start = lo * stride + offset - pad
    return lo, hi, slice(start, start + (hi - lo - 1) * stride + 1 if hi > lo else start, stride)


def _taps(geo: Geometry):
    """For every tap copied into the columns: its index (u, j), the rows [t0, t1) and columns
    [w0, w1) of a block that see the image, and the slices of the image they read."""
    (_, _, H, W), (_, _, kh, kw) = geo.x_shape, geo.w_shape
    (sh, sw), (ph, pw), (dh, dw) = geo.stride, geo.padding, geo.dilation
    for u in range(kh // geo.groups):
        t0, t1, rows = _valid(geo.block, H, ph, u * dh, sh)
        for j in range(kw):
            w0, w1, cols = _valid(geo.out_size[1], W, pw, j * dw, sw)
            yield (u, j), (t0, t1, rows), (w0, w1, cols)


def _columns(x, geo: Geometry):
    """Step 1: x (N, C, H, W) -> the column matrix (K, R*Wo), K = taps*C (workspace scratch).

    Each tap's slab (C, R, Wo) gets the image where its window sees the image, zeros elsewhere.
    """
    xp = get_array_module(x)
    N, C, _, _ = x.shape
    B, Wo = geo.block, geo.out_size[1]
    x_cnhw = x.transpose(1, 0, 2, 3)  # (C, N, H, W): channels first, so one GEMM spans all images
    shape = (geo.w_shape[2] // geo.groups, geo.w_shape[3], C, geo.rows, Wo)
    cols = workspace.get("cols", shape, x.dtype, xp)
    for (u, j), (t0, t1, rows), (w0, w1, columns) in _taps(geo):
        cols[u, j, :, N * B :] = 0  # below the last image
        blocks = cols[u, j, :, : N * B].reshape(C, N, B, Wo)  # a view into cols
        blocks[:, :, :t0] = 0  # rows that see the padding...
        blocks[:, :, t1:] = 0
        blocks[:, :, t0:t1, :w0] = 0  # ...and columns
        blocks[:, :, t0:t1, w1:] = 0
        blocks[:, :, t0:t1, w0:w1] = x_cnhw[:, :, rows, columns]
    return cols.reshape(-1, geo.rows * Wo)  # (K, R*Wo)


def _unshifted_tap(geo: Geometry):
    """The horizontal tap j that reads the image unshifted (``j*d == p``) in a stride-1 conv
    that keeps the width (every 3x3 conv of ResNet, FPN and the heads), else None."""
    (_, _, _, W), kw = geo.x_shape, geo.w_shape[3]
    (pw, dw), same_width = (geo.padding[1], geo.dilation[1]), geo.out_size[1] == W
    if geo.groups == 1 or geo.stride[1] != 1 or not same_width or pw % dw or pw // dw >= kw:
        return None
    return pw // dw


def _fold(cols, geo: Geometry):
    """Adjoint of step 1: add every column back to the pixel it was copied from.

    cols (K, R*Wo) -> grad_x (N, C, H, W); overlapping windows add up, padding is dropped. cols
    is scratch and may be overwritten.
    """
    xp = get_array_module(cols)
    N, C, H, W = geo.x_shape
    B, Wo, kw = geo.block, geo.out_size[1], geo.w_shape[3]
    base = _unshifted_tap(geo)
    if base is not None:
        # The width is kept, so a shift by some columns is a flat shift of the whole (R*Wo) slab,
        # except where a column sees the padding: it would wrap into the next row, so zero it.
        # Then the taps add up with long contiguous adds, onto the unshifted tap's slab.
        slabs = cols.reshape(kw, C, geo.rows, Wo)
        total = slabs[base].reshape(C, geo.rows * Wo)
        for (_, j), _, (w0, w1, _) in _taps(geo):
            shift = j * geo.dilation[1] - geo.padding[1]
            if shift == 0:
                continue
            slabs[j, :, :, :w0] = 0
            slabs[j, :, :, w1:] = 0
            flat = slabs[j].reshape(C, geo.rows * Wo)
            if shift > 0:
                total[:, shift:] += flat[:, :-shift]
            else:
                total[:, :shift] += flat[:, -shift:]
        ph = geo.padding[0]
        images = total[:, : N * B * Wo].reshape(C, N, B, Wo)[:, :, ph : ph + H]  # (C, N, H, W)
        return images.transpose(1, 0, 2, 3).copy()  # (N, C, H, W)

    cols = cols.reshape(geo.w_shape[2] // geo.groups, kw, C, geo.rows, Wo)
    kh, (Ho, Wo) = geo.w_shape[2], geo.out_size
    # The taps tile the image, each pixel seen by exactly one (the mask head's 2x2, stride-2
    # conv_transpose2d): assign, with no zeros to add onto (half the time of adding).
    tiles = geo.stride == (kh, kw) and geo.dilation == (1, 1) and geo.padding == (0, 0)
    tiles = tiles and (H, W) == (Ho * kh, Wo * kw)
    grad = (xp.empty if tiles else xp.zeros)((N, C, H, W), cols.dtype)
    grad_cnhw = grad.transpose(1, 0, 2, 3)  # (C, N, H, W) view
    for (u, j), (t0, t1, rows), (w0, w1, columns) in _taps(geo):
        blocks = cols[u, j, :, : N * B].reshape(C, N, B, Wo)
        if tiles:
            grad_cnhw[:, :, rows, columns] = blocks[:, :, t0:t1, w0:w1]
        else:
            grad_cnhw[:, :, rows, columns] += blocks[:, :, t0:t1, w0:w1]  # no pixel twice per tap
    return grad


def _weight_matrix(w, groups: int):
    """Step 2's left factor: weight (O, C, kh, kw) -> (groups*O, K), K ordered like the columns."""
    O, C, kh, kw = w.shape
    w = w.reshape(O, C, groups, kh // groups, kw)
    return w.transpose(2, 0, 3, 4, 1).reshape(groups * O, -1)  # (groups*O, taps*C)


def _sum_shifted(per_row, geo: Geometry):
    """Step 3: per_row (groups*O, R*Wo) -> out (N, O, Ho, Wo), kernel row g shifted by g*d*Wo.

    ``out[n, o, h, w] = sum_g per_row[g, o, (n*B + h + g*d)*Wo + w]``; the rows of each block past
    Ho (they straddle two images) are dropped.
    """
    xp = get_array_module(per_row)
    N, (Ho, Wo), groups = geo.x_shape[0], geo.out_size, geo.groups
    per_row = per_row.reshape(groups, -1, geo.rows * Wo)  # (groups, O, R*Wo)
    O, block_out, shift = per_row.shape[1], geo.block, geo.dilation[0] * Wo

    def shifted(g):  # kernel row g's product as an (N, O, Ho, Wo) view
        view = per_row[g, :, g * shift : g * shift + N * block_out * Wo]
        return view.reshape(O, N, block_out, Wo)[:, :, :Ho].transpose(1, 0, 2, 3)

    out = xp.empty((N, O, Ho, Wo), per_row.dtype)
    if groups == 1:
        out[...] = shifted(0)
        return out
    xp.add(shifted(0), shifted(1), out=out)
    for g in range(2, groups):
        out += shifted(g)
    return out


def _place(grad_out, geo: Geometry):
    """Adjoint of step 3: grad_out (N, O, Ho, Wo) -> (groups*O, R*Wo) (scratch), copy g shifted by
    g*d*Wo, zero everywhere else (the dropped rows and the ends)."""
    xp = get_array_module(grad_out)
    N, O, Ho, Wo = grad_out.shape
    block_out, shift = geo.block, geo.dilation[0] * Wo
    placed = workspace.get("per_row", (geo.groups, O, geo.rows * Wo), grad_out.dtype, xp)
    for g in range(geo.groups):
        start, stop = g * shift, g * shift + N * block_out * Wo
        placed[g, :, :start] = 0
        placed[g, :, stop:] = 0
        blocks = placed[g, :, start:stop].reshape(O, N, block_out, Wo)  # a view into placed
        blocks[:, :, :Ho] = grad_out.transpose(1, 0, 2, 3)
        blocks[:, :, Ho:] = 0
    return placed.reshape(geo.groups * O, -1)


# Split a weight gradient's sum over pixels into RANGES ranges when it has at least RANGES times
# this many pixels (below that, a thread's start costs more than the split saves). The ranges do
# not depend on the thread count, so neither does the sum's rounding: a run gives the same
# numbers at 1 or 2 threads, which exact resume needs (the thread policy may change the count
# between a run and its resumption).
SPLIT_PIXELS = 512
RANGES = 4
_executors = {}  # threads -> ThreadPoolExecutor, made on first use
# A forked child (multiprocessing's default on Linux) inherits the executors but not their
# threads: work given to them would wait forever. The child makes its own.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_executors.clear)


def _sum_over_pixels(a, b):
    """``a (M, L) @ b (K, L).T -> (M, K)``: a weight gradient, the sum over L pixels.

    Why not just ``a @ b.T``: L is tens of thousands, M and K a few hundred. A multi-threaded
    BLAS splits such a product along M and K, and its threads meet after every block of a few
    hundred pixels; on a busy machine each meeting waits for the slowest thread. Measured with 2
    threads beside other jobs: 90-640 ms where one thread takes 30 ms (M = K = 192, L = 33,280).
    So the pixels are cut into :data:`RANGES` ranges, each range's product runs on a Python
    thread (as many as BLAS threads) with a single-threaded BLAS (NumPy releases the GIL
    meanwhile), and the partial sums are added in order: one meeting instead of hundreds (56-66
    ms in the same run).
    """
    xp = get_array_module(a, b)
    pixels = a.shape[1]
    if xp is not np or pixels < SPLIT_PIXELS * RANGES:
        return a @ b.T
    threads = min(blas_threads(), RANGES)
    edges = [pixels * i // RANGES for i in range(RANGES + 1)]

    def part(i):  # the pixels [edges[i], edges[i + 1]) of both factors
        return a[:, edges[i] : edges[i + 1]] @ b[:, edges[i] : edges[i + 1]].T  # (M, K)

    if threads == 1:  # the same ranges one after another: the same sums, no thread to start
        parts = [part(i) for i in range(RANGES)]
    else:
        if threads not in _executors:
            _executors[threads] = ThreadPoolExecutor(threads, thread_name_prefix="conv")
        with single_threaded_blas():
            parts = list(_executors[threads].map(part, range(RANGES)))
    total = parts[0]
    for other in parts[1:]:
        total += other
    return total


# ---------------------------------------------------------------------------- conv2d, arrays
class ConvSaved(NamedTuple):
    """What :func:`conv2d_backward` needs from :func:`conv2d_forward`."""

    x: object  # (N, C, H, W): the backward pass copies its columns again
    weight: object  # (O, C, kh, kw)
    geo: Geometry


def _is_pointwise(geo: Geometry) -> bool:
    return geo.w_shape[2:] == (1, 1) and geo.padding == (0, 0)


def _pixels_seen(x, geo: Geometry):
    """What a 1x1 conv sees of x (N, C, H, W): every s-th pixel, as (N, C, Ho*Wo)."""
    N, C, _, _ = x.shape
    (Ho, Wo), (sh, sw) = geo.out_size, geo.stride
    return x[:, :, ::sh, ::sw].reshape(N, C, Ho * Wo)  # a view at stride 1, else a copy


def conv2d_forward(x, w, stride=1, padding=0, dilation=1):
    """2-D convolution (cross-correlation, as in torch) of plain arrays.

    Args:
        x: (N, C, H, W) input.
        w: (O, C, kh, kw) weight.
        stride, padding, dilation: an int, or a (height, width) pair.

    Returns:
        ``(out, saved)``: out (N, O, Ho, Wo) in x's dtype, and what :func:`conv2d_backward` needs.
    """
    xp = get_array_module(x, w)
    geo = conv_geometry(x.shape, w.shape, stride, padding, dilation)
    (N, C, _, _), O, (Ho, Wo) = x.shape, w.shape[0], geo.out_size
    if N == 0:  # no images (a head given no RoIs): an empty output, and no GEMM to plan
        return xp.zeros((0, O, Ho, Wo), dtype=x.dtype), ConvSaved(x, w, geo)
    if _is_pointwise(geo):  # a 1x1 conv is a matmul over channels
        out = xp.matmul(w.reshape(O, C), _pixels_seen(x, geo))  # (N, O, Ho*Wo)
        return out.reshape(N, O, Ho, Wo), ConvSaved(x, w, geo)
    cols = _columns(x, geo)  # (K, R*Wo)
    # One GEMM for every kernel row (stacked along M, which BLAS runs faster than thin GEMMs).
    weight = _weight_matrix(w, geo.groups)  # (groups*O, K)
    per_row = workspace.get("per_row", (weight.shape[0], cols.shape[1]), cols.dtype, xp)
    xp.matmul(weight, cols, out=per_row)  # (groups*O, R*Wo)
    return _sum_shifted(per_row, geo), ConvSaved(x, w, geo)


def conv2d_backward(grad_out, saved: ConvSaved, need_x: bool = True, need_w: bool = True):
    """Gradients of :func:`conv2d_forward`.

    Args:
        grad_out: (N, O, Ho, Wo) gradient of the output.
        saved: the second result of :func:`conv2d_forward`.
        need_x, need_w: skip a gradient that nobody needs (returned as None).

    Returns:
        ``(grad_x (N, C, H, W), grad_w (O, C, kh, kw))``.
    """
    xp = get_array_module(grad_out)
    geo, w = saved.geo, saved.weight
    (N, C, H, W), (O, _, kh, kw), (Ho, Wo) = geo.x_shape, w.shape, geo.out_size
    if N == 0:  # no images: zero gradients of the right shapes
        grad_x = xp.zeros(geo.x_shape, grad_out.dtype) if need_x else None
        return grad_x, (xp.zeros(w.shape, grad_out.dtype) if need_w else None)
    if _is_pointwise(geo):
        g = grad_out.reshape(N, O, Ho * Wo)  # (N, O, Ho*Wo)
        grad_w = grad_x = None
        if need_w:  # sum over images of (O, Ho*Wo) @ (Ho*Wo, C)
            seen = _pixels_seen(saved.x, geo)  # (N, C, Ho*Wo)
            grad_w = xp.zeros((O, C), dtype=grad_out.dtype)
            for n in range(N):
                grad_w += _sum_over_pixels(g[n], seen[n])  # (O, C)
            grad_w = grad_w.reshape(O, C, 1, 1)
        if need_x:
            seen = (w.reshape(O, C).T @ g).reshape(N, C, Ho, Wo)  # (N, C, Ho, Wo)
            if (Ho, Wo) == (H, W):
                grad_x = seen
            else:  # strided: the pixels the conv skipped get no gradient
                grad_x = xp.zeros((N, C, H, W), grad_out.dtype)
                grad_x[:, :, :: geo.stride[0], :: geo.stride[1]] = seen
        return grad_x, grad_w

    placed = _place(grad_out, geo)  # (groups*O, R*Wo)
    grad_w = grad_x = None
    if need_w:
        grad_w = _sum_over_pixels(placed, _columns(saved.x, geo))  # (groups*O, K)
        grad_w = grad_w.reshape(geo.groups, O, kh // geo.groups, kw, C)
        grad_w = grad_w.transpose(1, 4, 0, 2, 3).reshape(O, C, kh, kw)
    if need_x:
        grad_x = _input_grad(placed, w, geo)
    return grad_x, grad_w


def _input_grad(placed, w, geo: Geometry):
    """Steps 3 and 2 backwards: placed (groups*O, R*Wo) -> the gradient of x (N, C, H, W)."""
    xp = get_array_module(placed)
    weight_t = _weight_matrix(w, geo.groups).T  # (K, groups*O)
    grad_cols = workspace.get("cols", (weight_t.shape[0], placed.shape[1]), placed.dtype, xp)
    xp.matmul(weight_t, placed, out=grad_cols)  # (K, R*Wo)
    return _fold(grad_cols, geo)


# ---------------------------------------------------------------------------- transposed, arrays
class ConvTransposeSaved(NamedTuple):
    x: object  # (N, C, H', W'): the input, zero-extended to the conv2d output it is the grad of
    weight: object  # (C, O, kh, kw)
    geo: Geometry  # the conv2d whose input gradient this transposed conv is
    x_size: tuple  # (H, W) of the input as given


def _pad_or_crop(x, rows: int, cols: int):
    """x (N, C, H, W) grown by zeros (positive) or cropped (negative) at the bottom and right."""
    xp = get_array_module(x)
    x = x[:, :, : x.shape[2] + min(rows, 0), : x.shape[3] + min(cols, 0)]
    if rows > 0 or cols > 0:
        x = xp.pad(x, ((0, 0), (0, 0), (0, max(rows, 0)), (0, max(cols, 0))))
    return x


def conv_transpose2d_forward(x, w, stride=1, padding=0, output_padding=0, dilation=1):
    """Transposed convolution of plain arrays, as ``torch.nn.functional.conv_transpose2d``.

    Each input pixel adds ``x[n, c, h, w] * weight[c, :, i, j]`` to output pixel
    ``(h*s - p + i*d, w*s - p + j*d)``: the gradient of :func:`conv2d_forward` with respect to its
    input, for a conv2d from O to C channels with the same weight array.

    Args:
        x: (N, C, H, W) input.
        w: (C, O, kh, kw) weight (torch's layout for transposed convs).
        stride, padding, output_padding, dilation: an int or a (height, width) pair;
            ``Ho = (H - 1)s - 2p + d(kh - 1) + output_padding + 1``.

    Returns:
        ``(out (N, O, Ho, Wo), saved)``.
    """
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    (oh, ow), (dh, dw) = _pair(output_padding), _pair(dilation)
    N, C, H, W = x.shape
    C_w, O, kh, kw = w.shape
    if C != C_w:
        raise ValueError(
            f"conv_transpose2d: x has {C} channels, the weight {w.shape} expects {C_w}"
        )
    Ho = (H - 1) * sh - 2 * ph + dh * (kh - 1) + oh + 1
    Wo = (W - 1) * sw - 2 * pw + dw * (kw - 1) + ow + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(f"conv_transpose2d: padding {(ph, pw)} leaves no output for {H}x{W}")
    geo = conv_geometry((N, O, Ho, Wo), w.shape, (sh, sw), (ph, pw), (dh, dw))
    # With output_padding at stride 1 the conv2d output is larger than x: extend x with zeros.
    x = _pad_or_crop(x, geo.out_size[0] - H, geo.out_size[1] - W)  # (N, C, conv2d's Ho, Wo)
    if _is_pointwise(geo):
        out, _ = conv2d_backward(x, ConvSaved(None, w, geo), need_w=False)
    else:
        out = _input_grad(_place(x, geo), w, geo)
    return out, ConvTransposeSaved(x, w, geo, (H, W))


def conv_transpose2d_backward(
    grad_out, saved: ConvTransposeSaved, need_x: bool = True, need_w: bool = True
):
    """Gradients of :func:`conv_transpose2d_forward`: grad_x (N, C, H, W), grad_w (C, O, kh, kw).

    The adjoint of the adjoint: the gradient of x is conv2d of ``grad_out`` with the same weight,
    and the weight gradient is conv2d's, with the roles of x and grad_out swapped.
    """
    geo, grad_x, grad_w = saved.geo, None, None
    if need_w:  # as if grad_out were the input of the conv2d and x the gradient of its output
        conv_saved = ConvSaved(grad_out, saved.weight, geo)
        grad_w = conv2d_backward(saved.x, conv_saved, need_x=False)[1]
    if need_x:
        grad_x, _ = conv2d_forward(grad_out, saved.weight, geo.stride, geo.padding, geo.dilation)
        H, W = saved.x_size  # drop the zeros that output_padding added at stride 1
        grad_x = get_array_module(grad_x).ascontiguousarray(grad_x[:, :, :H, :W])
    return grad_x, grad_w
