"""RoIPool (Fast R-CNN §2.1): max-pool each box into a fixed PH×PW grid of quantized bins.

Shape letters: N images, C channels, H×W the feature map, K RoIs, PH×PW the output grid.
A RoI is a row ``[n, x1, y1, x2, y2]`` of a (K, 5) array: image index and box in image pixels.

What it computes (torchvision's ``roi_pool``, which follows the Fast R-CNN Caffe layer)
----------------------------------------------------------------------------------------
Two roundings, the ones RoIAlign removes (Mask R-CNN §3):

1. The box is scaled and rounded to whole cells (half away from zero):
   ``x1' = round(x1 * spatial_scale)``... and measured *inclusively*, as the Caffe layer did:
   ``roi_w = max(x2' - x1' + 1, 1)``. This ``+ 1`` is the legacy pixel-count convention of
   RoIPool, kept deliberately for torchvision parity; nothing else in minimask uses it.
2. Bin ``pw`` covers cells ``[floor(pw * roi_w / PW), ceil((pw + 1) * roi_w / PW))`` shifted by
   ``x1'`` and clipped to the map; bins may overlap by one cell. Same in y.

``out[k, c, ph, pw]`` is the max of ``F[n, c]`` over the bin, or 0 for a bin that is empty
after clipping. Backward sends each output's gradient to the cell that held the max (its argmax).

How it is computed: scan keys in a sparse table
-----------------------------------------------
Bins have different sizes, so no fixed window can be vectorized. Instead, per image:

1. Every cell of every channel gets one integer *key* that orders the cells as a max-pooling
   scan prefers them: ``key = rank << bits | cell``, where ``rank`` is smaller for larger values
   and equal for equal values, ``cell = y * W + x`` and ``bits`` is enough bits for a cell. The
   smallest key in a bin belongs to its largest value and, among equal values, to the first cell
   in row-major order, which is exactly torchvision's choice at ties. So one ``min`` finds both
   the max and its argmax (the low ``bits`` of the key). For float32 the rank is the value's own
   32 bits read as an integer that orders like the float (:func:`float32_rank`): no sort is
   needed, and the max can be read back from the key itself. For other dtypes the rank numbers
   the channel's distinct values from the largest down, after a sort.
2. A 2-D sparse table ``T[a, b][y, x] = min key over the 2^a × 2^b block at (y, x)`` is built by
   doubling: each level is the min of two shifted copies of the previous one.
3. A bin of h×w cells is the union of four (possibly overlapping) 2^a × 2^b blocks at its
   corners, ``a = floor(log2 h)``, ``b = floor(log2 w)``, so its key is the min of four table
   lookups, done for every bin of a block of RoIs at once.

The plain definition, :func:`roi_pool_plain`, comes first below: one bin at a time, the
reference that the fast form is tested against.

NaNs rank below every number, so a bin's NaNs are skipped as in torchvision. Two cases differ
from torchvision on purpose, because its kernel starts each bin's max at -FLT_MAX (the most
negative float32) and replaces it only by a larger value:

* a bin of nothing but NaNs gives NaN, where torchvision gives -FLT_MAX;
* a bin whose values are all below -FLT_MAX (float64 only, e.g. -1e300) gives its true max and
  passes the gradient to it, where torchvision gives -FLT_MAX and no gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from minimask.backend import get_array_module, scatter_add, to_host
from minimask.engine.tensor import Function, Tensor
from minimask.ops import cuda_kernels
from minimask.ops.roi_align import as_pair, check_rois

# Outputs (RoIs × C × PH × PW) computed together: enough that the Python loop over blocks of RoIs
# costs nothing next to the arithmetic, few enough that the temporaries stay in the CPU's cache.
# The GPU prefers fewer, larger launches.
BLOCK_OUTPUTS = 2**18
BLOCK_OUTPUTS_GPU = 2**22


def _round_half_away(x):
    """C's ``round``: halves go away from zero (NumPy's ``round`` sends them to even).

    The fraction is compared with 1/2 exactly: ``|x| - floor(|x|)`` is exact in floating point.
    The shortcut ``floor(|x| + 0.5)`` is not: for the largest double below 1/2,
    0.49999999999999994, the sum rounds up to 1.0.
    """
    xp = get_array_module(x)
    size = xp.abs(x)
    whole = xp.floor(size)
    return xp.sign(x) * (whole + (size - whole >= 0.5))


def roi_bins(rois, output_size, spatial_scale, shape, dtype):
    """Cell ranges of every bin, clipped to the map.

    Returns ``(y_start, y_end, x_start, x_end)``: y ranges (K, PH) and x ranges (K, PW), integer,
    each bin covering ``[start, end)``; ``end <= start`` marks an empty bin. The arithmetic runs
    in the features' dtype, as torchvision's kernel does.
    """
    xp = get_array_module(rois)
    (PH, PW), (H, W) = output_size, shape
    corners = _round_half_away(rois[:, 1:].astype(dtype) * dtype.type(spatial_scale))
    x1, y1, x2, y2 = corners.astype(np.int64).T  # (K,) each, in cells

    def ranges(first, last, P, size):
        length = xp.maximum(last - first + 1, 1).astype(dtype)  # inclusive count (see docstring)
        bin_size = (length / dtype.type(P))[:, None]  # (K, 1)
        p = xp.arange(P, dtype=dtype)[None, :]  # (1, P)
        start = xp.floor(p * bin_size).astype(np.int64) + first[:, None]
        end = xp.ceil((p + 1) * bin_size).astype(np.int64) + first[:, None]
        return xp.clip(start, 0, size), xp.clip(end, 0, size)  # (K, P) each

    return (*ranges(y1, y2, PH, H), *ranges(x1, x2, PW, W))


def roi_pool_plain(features, rois, output_size, spatial_scale: float = 1.0):
    """RoIPool by its definition, one bin at a time: the reference for the fast form below.

    features (N, C, H, W), rois (K, 5) ``[n, x1, y1, x2, y2]`` -> out (K, C, PH, PW): each output
    is the max of its bin (:func:`roi_bins`), 0 for an empty bin. (NaN aside: here a NaN in a bin
    wins; the fast form skips it, as torchvision does.)
    """
    xp = get_array_module(features)
    N, C, H, W = features.shape
    PH, PW = as_pair(output_size)
    rois = check_rois(xp.asarray(rois), N)
    bins = roi_bins(rois, (PH, PW), spatial_scale, (H, W), features.dtype)
    y0, y1, x0, x1 = (to_host(b).tolist() for b in bins)  # (K, PH) and (K, PW) cell ranges
    out = xp.zeros((len(rois), C, PH, PW), dtype=features.dtype)
    for k, n in enumerate(to_host(rois[:, 0]).astype(int).tolist()):
        for ph in range(PH):
            for pw in range(PW):
                window = features[n, :, y0[k][ph] : y1[k][ph], x0[k][pw] : x1[k][pw]]  # (C, h, w)
                if window.size:
                    out[k, :, ph, pw] = window.max(axis=(1, 2))
    return out


# ---------------------------------------------------------------------------- the fast form
# What follows computes the same outputs (and the argmax cells the backward pass needs) for every
# bin at once, with the scan keys and sparse table of the module docstring: at 512 RoIs of 7×7
# bins on a 256×50×50 map it takes about as long as torchvision's compiled loop, where a loop
# over bins in Python would take seconds.


def _floor_log2(n):
    """floor(log2(n)) of positive integers, exact."""
    xp = get_array_module(n)
    return xp.floor(xp.log2(n.astype(np.float64))).astype(np.int64)


def float32_rank(values):
    """Integers that order float32 values from the largest down: int64, the shape of ``values``.

    A float32's bits read as a signed int32 order like the float for positive values; for
    negative ones the 31 low bits count the wrong way, which ``^ 0x7FFFFFFF`` undoes. The rank is
    the bitwise not of that (so the largest value gets the smallest rank). -0.0 ranks as 0.0 and
    every NaN below every number, as a max-pooling scan treats them.
    """
    xp = get_array_module(values)
    bits = (values + np.float32(0)).view(np.int32)  # -0.0 + 0.0 is +0.0
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # int32 that compare as the floats do
    ordered[xp.isnan(values)] = np.iinfo(np.int32).min
    return ~ordered.astype(np.int64)


def scan_keys(fmap):
    """The keys of a (C, H, W) map (module docstring, step 1), channels last: (H*W, C).

    Returns ``(keys, bits)``. The keys are int32 while they fit (maps of up to 2^15 cells, about
    181×181), else int64.
    """
    xp = get_array_module(fmap)
    C, H, W = fmap.shape
    cells = H * W
    bits = max(int(cells - 1).bit_length(), 1)
    dtype = np.int32 if 2 * bits < 31 else np.int64
    values = fmap.reshape(C, cells)
    if values.dtype == np.float32:  # sort (rank, cell) pairs packed in one int64: no argsort
        packed = float32_rank(values) << bits | xp.arange(cells)  # (C, H*W)
        packed.sort(axis=1)
        order, ranked = packed & (2**bits - 1), packed >> bits
    else:
        order = xp.argsort(-values, axis=1)  # (C, H*W): each channel's cells, largest value first
        ranked = xp.take_along_axis(values, order, axis=1)
    new_value = ranked[:, 1:] != ranked[:, :-1]  # (C, H*W - 1)
    rank_in_order = xp.zeros((C, cells), dtype=dtype)
    xp.cumsum(new_value, axis=1, dtype=dtype, out=rank_in_order[:, 1:])
    rank = xp.empty(C * cells, dtype=dtype)
    rank[(order + xp.arange(0, C * cells, cells)[:, None]).ravel()] = rank_in_order.ravel()
    keys = rank.reshape(C, cells) << bits | xp.arange(cells, dtype=dtype)  # (C, H*W)
    return xp.ascontiguousarray(keys.T), bits


def sparse_table(keys, shape, levels_y: int, levels_x: int):
    """Block minima of (H*W, C) keys: (levels_y, levels_x, H, W, C).

    ``T[a, b, y, x]`` is the min over the 2^a × 2^b block whose top-left cell is (y, x); entries
    whose block would cross the map's edge are left unset (no query reads them).
    """
    xp = get_array_module(keys)
    H, W = shape
    T = xp.empty((levels_y, levels_x, H, W, keys.shape[1]), dtype=keys.dtype)
    T[0, 0] = keys.reshape(H, W, -1)
    for b in range(1, levels_x):  # wider blocks, one row tall
        step, fit = 2 ** (b - 1), W - 2**b + 1  # shift, and blocks of the new width that fit
        xp.minimum(T[0, b - 1, :, :fit], T[0, b - 1, :, step : step + fit], out=T[0, b, :, :fit])
    for a in range(1, levels_y):  # then taller blocks, for every width
        step, fit = 2 ** (a - 1), H - 2**a + 1
        xp.minimum(T[a - 1, :, :fit], T[a - 1, :, step : step + fit], out=T[a, :, :fit])
    return T


@dataclass
class RoIPoolSaved:
    """What :func:`roi_pool_backward` needs: the input's shape and every output's argmax."""

    shape: tuple[int, int, int, int]
    argmax: object  # (K, C, PH, PW) flat index into the (N, C, H, W) input; -1: empty bin


def roi_pool_forward(features, rois, output_size, spatial_scale: float = 1.0):
    """RoIPool on plain arrays.

    Args:
        features: (N, C, H, W) float array.
        rois: (K, 5) rows ``[n, x1, y1, x2, y2]``, boxes in image pixels.
        output_size: PH×PW, an int or a pair.
        spatial_scale: map cells per image pixel (1/16 for a stride-16 map).

    Returns:
        ``(out, saved)``: out (K, C, PH, PW), and what :func:`roi_pool_backward` needs.
    """
    xp = get_array_module(features)
    N, C, H, W = features.shape
    PH, PW = output_size = as_pair(output_size)
    rois = check_rois(xp.asarray(rois), N)
    K = rois.shape[0]
    if K == 0 or H == 0 or W == 0:
        out = xp.zeros((K, C, PH, PW), dtype=features.dtype)
        return out, RoIPoolSaved(features.shape, xp.full(out.shape, -1, dtype=np.int32))
    if cuda_kernels.use_kernel(features):  # CuPy: the CUDA kernel, the same semantics in one
        # pass (no sparse table, no host sync)
        out, argmax = cuda_kernels.roi_pool_forward(features, rois, output_size, spatial_scale)
        return out, RoIPoolSaved(features.shape, argmax)
    index_dtype = np.int32 if features.size < 2**31 else np.int64  # int32 as torchvision
    out = xp.empty((K, C, PH, PW), dtype=features.dtype)  # every RoI is written below
    argmax = xp.empty((K, C, PH, PW), dtype=index_dtype)
    y0, y1, x0, x1 = roi_bins(rois, output_size, spatial_scale, (H, W), features.dtype)
    y0, y1 = y0[:, :, None], y1[:, :, None]  # (K, PH, 1)
    x0, x1 = x0[:, None, :], x1[:, None, :]  # (K, 1, PW)
    empty = (y1 <= y0) | (x1 <= x0)  # (K, PH, PW)
    a = _floor_log2(xp.maximum(y1 - y0, 1))  # (K, PH, 1) table level along y
    b = _floor_log2(xp.maximum(x1 - x0, 1))  # (K, 1, PW)
    # Work on the RoIs sorted by image, so that each block of RoIs is a slice of the outputs.
    image_of = rois[:, 0].astype(np.int64)
    order = xp.argsort(image_of, kind="stable")
    bounds = xp.searchsorted(image_of[order], xp.arange(N + 1))
    # The loops below need a few integers on the host: the table's levels, where each image's
    # RoIs start, whether the RoIs come out of order and whether any bin is empty. One explicit
    # download reads them all (one sync per call, instead of one for each).
    flags = [a.max() + 1, b.max() + 1, (order != xp.arange(K)).any(), empty.any()]
    facts = to_host(xp.concatenate([xp.stack(flags).astype(np.int64), bounds])).tolist()
    levels_y, levels_x, shuffled, any_empty, bounds = *facts[:4], facts[4:]
    # the four blocks that cover each bin, as rows of the table seen as (levels*H*W, C)
    top, bottom, left, right = y0, y1 - 2**a, x0, x1 - 2**b
    level = a * levels_x + b  # (K, PH, PW)
    corners = [(level * H + y) * W + x for y in (top, bottom) for x in (left, right)]
    lookup = xp.where(empty, 0, xp.stack(corners))  # (4, K, PH, PW); empty bins: any valid row
    lookup = lookup[:, order]
    flat_features = features.reshape(-1)
    in_range = {"mode": "clip"} if xp is np else {}  # NumPy: skip the bounds check, cell is valid
    block = max(1, (BLOCK_OUTPUTS if xp is np else BLOCK_OUTPUTS_GPU) // (C * PH * PW))  # RoIs
    for n in range(N):  # a handful of images
        first, last = bounds[n], bounds[n + 1]  # this image's RoIs, in sorted order
        if first == last:
            continue
        keys, bits = scan_keys(features[n])
        table = sparse_table(keys, (H, W), levels_y, levels_x).reshape(-1, C)  # (levels*H*W, C)
        first_cell = ((n * C + xp.arange(C)) * (H * W)).astype(index_dtype)[:, None, None]
        for start in range(first, last, block):  # blocks of RoIs, see BLOCK_OUTPUTS
            part = slice(start, min(start + block, last))
            key = xp.take(table, lookup[0, part], axis=0)  # (k, PH, PW, C)
            for corner in lookup[1:, part]:  # the other three corner blocks
                xp.minimum(key, xp.take(table, corner, axis=0), out=key)
            cell = argmax[part]  # (k, C, PH, PW), a view: filled in place
            xp.bitwise_and(key.transpose(0, 3, 1, 2), (1 << bits) - 1, out=cell)
            cell += first_cell  # now a flat index into the input
            xp.take(flat_features, cell, out=out[part], **in_range)
    if shuffled:  # back to the order of rois
        inverse = xp.argsort(order)
        out, argmax = out[inverse], argmax[inverse]
    if any_empty:  # empty bins (after clipping) give 0 and pass no gradient
        out.transpose(0, 2, 3, 1)[empty] = 0
        argmax.transpose(0, 2, 3, 1)[empty] = -1
    return out, RoIPoolSaved(features.shape, argmax)


def roi_pool_backward(grad_out, saved: RoIPoolSaved):
    """Gradient of RoIPool: each output's gradient is added at its argmax cell.

    Args:
        grad_out: (K, C, PH, PW).
        saved: from :func:`roi_pool_forward`.

    Returns:
        (N, C, H, W), zero except at cells that were a max of some bin.
    """
    if cuda_kernels.use_kernel(grad_out):  # CuPy: the CUDA kernel's atomic adds
        return cuda_kernels.roi_pool_backward(grad_out, saved.argmax, saved.shape)
    xp = get_array_module(grad_out)
    # One slot more than the input: the -1 of an empty bin indexes it, and it is then dropped.
    grad = xp.zeros(math.prod(saved.shape) + 1, dtype=grad_out.dtype)
    scatter_add(grad, saved.argmax.ravel(), grad_out.ravel())
    return grad[:-1].reshape(saved.shape)


class RoIPool(Function):
    """RoIPool as an engine op: gradient for the features only (RoIs are constants)."""

    def forward(self, features, rois=None, output_size=7, spatial_scale=1.0):
        out, self.saved = roi_pool_forward(features, rois, output_size, spatial_scale)
        return out

    def backward(self, grad):
        return (roi_pool_backward(grad, self.saved),)


def roi_pool(x: Tensor, rois, output_size, spatial_scale: float = 1.0) -> Tensor:
    """RoIPool of a (N, C, H, W) tensor at (K, 5) ``[n, x1, y1, x2, y2]`` rois: (K, C, PH, PW).

    Same arguments and semantics as ``torchvision.ops.roi_pool``.
    """
    rois = rois.data if isinstance(rois, Tensor) else rois
    return RoIPool.apply(x, rois=rois, output_size=output_size, spatial_scale=spatial_scale)
