"""RoIAlign (Mask R-CNN §3): a fixed-size feature grid for every box, without rounding.

Shape letters: N images, C channels, H×W the feature map, K RoIs, PH×PW the output grid,
G samples per bin along one axis. A RoI is a row ``[n, x1, y1, x2, y2]`` of a (K, 5) array:
the image index ``n`` and a box in image pixels ``(x1, y1, x2, y2)`` (see ``boxes.py``).

What it computes
----------------
The box is scaled to the feature map (``* spatial_scale``), shifted by half a cell when
``aligned`` (so that box edges fall between cells, as pixel edges do), and split into PH×PW equal
bins. Each bin averages ``Gy×Gx`` bilinear samples placed at the centres of a regular sub-grid::

    y = y1 + ph * bin_h + (iy + 1/2) * bin_h / Gy        iy = 0..Gy-1
    out[k, c, ph, pw] = 1/(Gy Gx) * sum_{iy, ix} bilinear(F[n, c], y, x)

``sampling_ratio > 0`` fixes ``Gy = Gx = sampling_ratio``; ``<= 0`` adapts per RoI,
``G = ceil(roi_size / out_size)``. Nothing is rounded, unlike RoIPool, which is the point (§3).

Border rules, as torchvision's ``roi_align``: a sample with ``y < -1`` or ``y > H`` (or the same
in x) counts as 0 but still counts in the average; otherwise y is clamped to ``[0, H-1]`` before
interpolating. When not ``aligned``, a RoI is at least 1×1 cell (legacy Detectron behaviour).

How it is computed: the separable form, in windows
--------------------------------------------------
Bilinear interpolation is a y-weight times an x-weight, the out-of-map rule is a y-test times an
x-test, and averaging over the sub-grid is linear. So, per RoI, the whole op is two small
matrices (:func:`axis_weights` builds them)::

    out[k, c] = Ay[k] @ F[n, c] @ Ax[k].T        Ay[k]: (PH, H), Ax[k]: (PW, W)

where ``Ay[k][ph, y]`` is the average y-weight that bin row ``ph`` puts on map row ``y``, whatever
the number of samples. Backward is the transpose: ``dF[n, c] += Ay[k].T @ dout[k, c] @ Ax[k]``.

Most columns of ``Ay[k]`` are zero: a RoI touches only the rows and columns under it, so the work
is done in windows. The RoIs of an image are sorted by size and then along a Z-order curve and cut
into blocks of ``BLOCK_ROIS`` neighbours. Each block is pooled one of two ways, whichever a cost
estimate says is cheaper:

* **shared window**: the smallest slice of the map that holds the whole block. The y-stage is
  ``(k·PH, h) @ window[c]`` for every channel c, the x-stage ``rows[c, k] @ Ax[k].T`` for every
  channel and RoI, and backward adds the result into the gradient's slice. Best when the RoIs
  crowd together (a small map, or proposals around one object); with the whole map as the window
  this is the plain dense form.
* **own windows**: every RoI its own crop, gathered channels-last: the rows and the columns that
  its samples touch (at most 2·G per bin and axis, however large the RoI, as in torchvision's
  kernel). The y-stage is one small product per RoI and crop column, the x-stage one per RoI and
  bin row, and backward scatter-adds the crops. Best for RoIs scattered over a large map (FPN's
  P2), where any shared window would be mostly empty.

Every stage is one NumPy call over a batch of small matrix products. The Python loop runs over
blocks (and images), never over RoIs, bins or cells.

Non-finite values
-----------------
By the definition, a bin depends only on the cells that its samples interpolate with a non-zero
weight. The products above also multiply the zero weights of a window by the cells they do not
use, and 0 · NaN = NaN (0 · inf too): one NaN anywhere in a shared window would reach every bin
of every RoI pooled in it. So when the features (in backward, the output's gradient) are not all
finite, the op is computed in two parts (:func:`_only_weighted_terms`). The same products of the
values with the non-finite ones set to 0 give the sum of every bin's finite terms. The same
products of a 0/1 mask of the NaNs (then of the +infs, the -infs) with 0/1 weights, 1 where a
weight is not 0, tell which outputs they reach; those outputs get the NaN (inf) added, as the
full sum would. One ``isfinite`` pass over the input decides; the extra products run only when
there is something to mask.

torchvision's kernel reads the four cells around every sample even where a weight is 0 (a sample
exactly on a row or column of cell centres, or clamped onto the border), and cell (0, 0), with
weight 0, for a sample outside the map. There a NaN or inf reaches bins that minimask leaves
finite; elsewhere the two agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from minimask.backend import get_array_module, scatter_add, to_host
from minimask.engine.tensor import Function, Tensor
from minimask.ops import cuda_kernels

# RoIs pooled together (module docstring). Small blocks keep windows tight on the CPU; the GPU
# prefers fewer, larger launches.
BLOCK_ROIS = 16
BLOCK_ROIS_GPU = 256
# The largest matrix product (multiply-adds) of a shared window on the CPU when there are many
# channels: BLAS runs small products on one thread each, larger ones on several threads, and one
# such call per channel stalls often on a busy machine, where threads wait for each other.
MAX_PRODUCT = 2**18
# The cost of one value of an own window (gathered in forward, scatter-added in backward), and of
# one of its cells (its index), in multiply-adds of a GEMM; measured on a 2-core x86.
OWN_VALUE_COST = 64
OWN_INDEX_COST = 64


def as_pair(size) -> tuple[int, int]:
    """``7`` -> ``(7, 7)``; ``(7, 5)`` stays."""
    if isinstance(size, (tuple, list)):
        return int(size[0]), int(size[1])
    return int(size), int(size)


def check_rois(rois, num_images: int):
    """Assert that ``rois`` is a (K, 5) array of ``[n, x1, y1, x2, y2]`` rows with valid ``n``."""
    if rois.ndim != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must have shape (K, 5) as [n, x1, y1, x2, y2], got {rois.shape}")
    # One sync on a device: a wrong index would silently pool another image, so it is worth it.
    if rois.shape[0] and bool(((rois[:, 0] < 0) | (rois[:, 0] >= num_images)).any()):
        raise ValueError(f"rois[:, 0] must be image indices in [0, {num_images})")
    return rois


def axis_weights(start, bin_size, grid, out_size: int, size: int, samples: int | None = None):
    """The (K, P, size) matrix that averages the bilinear samples of each bin along one axis.

    ``A[k, p, i]`` is the weight that bin ``p`` of RoI ``k`` gives to map row (or column) ``i``:
    the mean over the bin's ``grid[k]`` samples of their linear-interpolation weights, with
    torchvision's border rules (module docstring). Rows of A sum to the fraction of samples that
    fall inside ``[-1, size]``.

    Args:
        start: (K,) first RoI coordinate on the map, in cells (after scale and offset).
        bin_size: (K,) bin length in cells.
        grid: (K,) integer samples per bin; ``<= 0`` gives an all-zero row.
        out_size: P, the number of bins.
        size: the map length along this axis (H or W).
        samples: ``grid.max()`` when the caller knows it (a fixed sampling ratio); None reads
            it from ``grid`` (a sync on a device).
    """
    xp = get_array_module(start)
    dtype = start.dtype
    K = start.shape[0]
    G = max(int(grid.max()) if samples is None else samples, 1) if K else 1
    p = xp.arange(out_size, dtype=dtype)[None, :, None]  # (1, P, 1)
    g = xp.arange(G, dtype=dtype)[None, None, :]  # (1, 1, G)
    start, bin_size = start[:, None, None], bin_size[:, None, None]  # (K, 1, 1)
    count = xp.maximum(grid, 1).astype(dtype)[:, None, None]  # (K, 1, 1)
    # the sample positions, in torchvision's order of operations so that float64 agrees exactly
    pos = start + p * bin_size + (g + 0.5) * bin_size / count  # (K, P, G)
    used = (g < grid[:, None, None]) & (pos >= -1) & (pos <= size)
    weight = xp.where(used, 1 / count, 0)  # the 1/G of the average, or 0
    pos = xp.maximum(pos, 0)
    floor = xp.floor(pos)
    at_end = floor >= size - 1  # past the last cell centre: all weight on the last cell
    frac = xp.where(at_end, 0, pos - floor)
    low = xp.minimum(floor, size - 1).astype(np.int64)
    high = xp.minimum(low + 1, size - 1)
    base = (xp.arange(K)[:, None, None] * out_size + xp.arange(out_size)[None, :, None]) * size
    index = xp.concatenate([(base + low).ravel(), (base + high).ravel()])
    values = xp.concatenate([(weight * (1 - frac)).ravel(), (weight * frac).ravel()])
    # Sum the terms that land on one cell, in float64 (as bincount would, which on a device
    # reads the largest index on the host: a sync that scatter-add into a known size avoids).
    A = xp.zeros(K * out_size * size, dtype=np.float64)
    scatter_add(A, index, values.astype(np.float64))
    return A.reshape(K, out_size, size).astype(dtype, copy=False)


def roi_weights(rois, output_size, spatial_scale, sampling_ratio, aligned, shape, dtype):
    """``Ay`` (K, PH, H) and ``Ax`` (K, PW, W) of the separable form, for (K, 5) ``rois``.

    The arithmetic runs in the features' dtype, as torchvision's kernels do.
    """
    xp = get_array_module(rois)
    (PH, PW), (H, W) = output_size, shape
    offset = 0.5 if aligned else 0.0
    scaled = rois[:, 1:].astype(dtype) * dtype.type(spatial_scale) - dtype.type(offset)
    x1, y1, x2, y2 = scaled.T  # (K,) each
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:  # legacy: force malformed RoIs to be at least 1x1
        roi_w, roi_h = xp.maximum(roi_w, 1), xp.maximum(roi_h, 1)
    if sampling_ratio > 0:
        grid_h = grid_w = xp.full(rois.shape[0], sampling_ratio, dtype=np.int64)
        samples_h = samples_w = sampling_ratio
    else:  # adaptive: about one sample per cell
        grid_h = xp.ceil(roi_h / PH).astype(np.int64)
        grid_w = xp.ceil(roi_w / PW).astype(np.int64)
        samples_h = samples_w = None
        if rois.shape[0]:  # the arrays' sizes: both largest grids in one read (one sync)
            samples_h, samples_w = to_host(xp.stack([grid_h.max(), grid_w.max()])).tolist()
    Ay = axis_weights(y1, roi_h / PH, grid_h, PH, H, samples_h)
    Ax = axis_weights(x1, roi_w / PW, grid_w, PW, W, samples_w)
    return Ay, Ax


def touched(A):
    """Which map rows (or columns) each RoI's (K, P, size) weights touch: (K, size) booleans,
    with the first and last touched index and their count, each (K,) (0 for a RoI that touches
    nothing along this axis)."""
    xp = get_array_module(A)
    size = A.shape[2]
    hit = (A != 0).any(axis=1)  # (K, size)
    cell = xp.arange(size)
    first = xp.where(hit, cell, size).min(axis=1)
    last = xp.where(hit, cell, -1).max(axis=1)
    count = hit.sum(axis=1)
    return hit, xp.where(count > 0, first, 0), xp.where(count > 0, last, 0), count


def z_order(y, x):
    """Position of integer points (y, x) along the Z-order (Morton) curve: the bits of y and x
    interleaved. Points close along the curve are close in 2-D, so a run of RoIs sorted by it
    covers a compact part of the map."""
    xp = get_array_module(y)
    code = xp.zeros(y.shape, dtype=np.int64)
    for bit in range(16):  # maps up to 65536 cells a side
        code |= ((y >> bit) & 1) << (2 * bit + 1) | ((x >> bit) & 1) << (2 * bit)
    return code


@dataclass
class _Block:
    """Up to BLOCK_ROIS RoIs of one image and the window(s) they are pooled in."""

    image: int
    index: object  # (k,) rows of rois
    ay: object  # (k, PH, h): weights on the rows of the window(s)
    ax: object  # (k, PW, w)
    rows: slice = None  # shared window: map rows [y0, y1) and columns [x0, x1)
    cols: slice = None
    cells: object = None  # own windows: (k, w, h) map cells y * W + x, crop column by column


def _first_touched(hit, count: int):
    """The first ``count`` touched indices of each row of (k, size) booleans, in increasing order,
    padded with untouched ones: (k, count)."""
    xp = get_array_module(hit)
    return xp.argsort((~hit).astype(np.int8), axis=1, kind="stable")[:, :count]


def plan_blocks(ay_all, ax_all, image_of, num_images: int, channels: int) -> list[_Block]:
    """Group the RoIs of each image into blocks of similar size and nearby position, and choose
    each block's windows (module docstring)."""
    xp = get_array_module(ay_all)
    PH, W = ay_all.shape[1], ax_all.shape[2]
    size = BLOCK_ROIS if xp is np else BLOCK_ROIS_GPU
    largest = MAX_PRODUCT if xp is np else math.inf
    hit_y, y_first, y_last, y_count = touched(ay_all)  # (K, H), then (K,) each
    hit_x, x_first, x_last, x_count = touched(ax_all)
    # The plan is shape logic: which RoIs go together, and the sizes of their windows, which
    # the host needs to slice and shape the arrays. So read the few integers it needs of every
    # RoI in one explicit download (one sync per call, not one per image or block), plan on the
    # host, and upload the order of the RoIs once.
    facts = to_host(xp.stack([image_of, y_first, y_last, y_count, x_first, x_last, x_count], 1))
    image, y_first, y_last, y_count, x_first, x_last, x_count = facts.T  # (K,) each, on the host
    extent = np.maximum(y_last - y_first, x_last - x_first) + 1
    size_class = np.floor(np.log2(extent)).astype(np.int64)
    centre = z_order((y_first + y_last) // 2, (x_first + x_last) // 2)
    key = image << 48 | size_class << 32 | centre  # by image, then size, then along the Z curve
    order = np.argsort(key, kind="stable")
    order_on_device = xp.asarray(order)
    bounds = np.searchsorted(image[order], np.arange(num_images + 1))
    blocks = []
    for n in range(num_images):  # a handful of images
        for start in range(bounds[n], bounds[n + 1], size):
            stop = min(start + size, bounds[n + 1])
            part = order[start:stop]  # (k,) this block's RoIs, on the host...
            index = order_on_device[start:stop]  # ...and on the device
            y0, y1 = int(y_first[part].min()), int(y_last[part].max()) + 1  # shared window
            x0, x1 = int(x_first[part].min()), int(x_last[part].max()) + 1
            h, w = int(y_count[part].max()), int(x_count[part].max())  # own windows' size
            shared_cost = PH * (y1 - y0) * (x1 - x0)  # multiply-adds per RoI and channel
            own_cost = h * w * (OWN_VALUE_COST + PH + OWN_INDEX_COST / channels)
            few_calls = channels <= 4 or shared_cost * part.size <= largest  # see MAX_PRODUCT
            if shared_cost <= own_cost and few_calls:
                rows, cols = slice(y0, y1), slice(x0, x1)
                ay, ax = ay_all[index, :, rows], ax_all[index, :, cols]  # (k, PH, h), (k, PW, w)
                blocks.append(_Block(n, index, ay, ax, rows=rows, cols=cols))
            else:  # each RoI's own crop: the rows and columns its samples touch
                rows, cols = _first_touched(hit_y[index], h), _first_touched(hit_x[index], w)
                ay = xp.take_along_axis(ay_all[index], rows[:, None, :], axis=2)  # (k, PH, h)
                ax = xp.take_along_axis(ax_all[index], cols[:, None, :], axis=2)  # (k, PW, w)
                cells = cols[:, :, None] + rows[:, None, :] * W  # (k, w, h), column by column
                blocks.append(_Block(n, index, ay, ax, cells=cells))
    return blocks


@dataclass
class RoIAlignSaved:
    """What :func:`roi_align_backward` needs: the input's shape and the blocks' weights."""

    shape: tuple[int, int, int, int]
    blocks: list


def roi_align_forward(
    features,
    rois,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
):
    """RoIAlign on plain arrays.

    Args:
        features: (N, C, H, W) float array.
        rois: (K, 5) rows ``[n, x1, y1, x2, y2]``, boxes in image pixels.
        output_size: PH×PW, an int or a pair.
        spatial_scale: map cells per image pixel (1/16 for a stride-16 map).
        sampling_ratio: samples per bin and axis; ``<= 0`` for ``ceil(roi_size / out_size)``.
        aligned: shift by half a cell so that a box edge maps to a cell edge (Detectron2's fix).

    Returns:
        ``(out, saved)``: out (K, C, PH, PW), and what :func:`roi_align_backward` needs.
    """
    xp = get_array_module(features)
    N, C, H, W = features.shape
    PH, PW = output_size = as_pair(output_size)
    rois = check_rois(xp.asarray(rois), N)
    if H == 0 or W == 0:  # an empty map: every sample is outside it
        out = xp.zeros((rois.shape[0], C, PH, PW), dtype=features.dtype)
        return out, RoIAlignSaved(features.shape, [])
    if cuda_kernels.use_kernel(features):  # CuPy: the CUDA kernel, the same semantics in one
        # pass (no block planning, no host sync)
        return cuda_kernels.roi_align_forward(
            features, rois, output_size, spatial_scale, sampling_ratio, aligned
        )
    ay_all, ax_all = roi_weights(
        rois, output_size, spatial_scale, sampling_ratio, aligned, (H, W), features.dtype
    )
    blocks = plan_blocks(ay_all, ax_all, rois[:, 0].astype(np.int64), N, C)
    out_shape = (rois.shape[0], C, PH, PW)
    out = _only_weighted_terms(lambda v, bs: _pool(v, bs, out_shape), features, blocks)
    return out, RoIAlignSaved(features.shape, blocks)


def _pool(features, blocks, out_shape):
    """``out[k, c] = Ay[k] @ F[n, c] @ Ax[k].T`` for the RoIs of every block: (K, C, PH, PW)."""
    xp = get_array_module(features)
    C, PH = out_shape[1], out_shape[2]
    out = xp.empty(out_shape, dtype=features.dtype)  # every RoI is in a block: all written
    pixels = {}  # per image, the map channels-last (H*W, C), for own windows
    for b in blocks:
        (k, _, h), w = b.ay.shape, b.ax.shape[2]
        if b.cells is None:  # shared window, a (C, h, w) slice of the map
            window = features[b.image, :, b.rows, b.cols]
            rows = b.ay.reshape(k * PH, h) @ window  # (C, k*PH, w): the y-stage
            pooled = rows.reshape(C, k, PH, w) @ b.ax.transpose(0, 2, 1)  # (C, k, PH, PW)
            out[b.index] = pooled.transpose(1, 0, 2, 3)
        else:  # own windows, gathered column by column
            if b.image not in pixels:
                pixels[b.image] = xp.ascontiguousarray(features[b.image].reshape(C, -1).T)
            crops = pixels[b.image][b.cells]  # (k, w, h, C)
            rows = b.ay[:, None] @ crops  # (k, w, PH, C): the y-stage
            pooled = b.ax[:, None] @ rows.transpose(0, 2, 1, 3)  # (k, PH, PW, C): the x-stage
            out[b.index] = pooled.transpose(0, 3, 1, 2)
    return out


def roi_align_backward(grad_out, saved: RoIAlignSaved):
    """Gradient of RoIAlign with respect to the features.

    Args:
        grad_out: (K, C, PH, PW), the gradient of the output.
        saved: from :func:`roi_align_forward`.

    Returns:
        (N, C, H, W): ``dF[n, c] = sum over RoIs k of image n of Ay[k].T @ grad_out[k, c] @ Ax[k]``.
    """
    if isinstance(saved, cuda_kernels.RoIAlignKernelSaved):  # forward ran the CUDA kernel
        return cuda_kernels.roi_align_backward(grad_out, saved)
    return _only_weighted_terms(lambda g, bs: _unpool(g, bs, saved.shape), grad_out, saved.blocks)


def _unpool(grad_out, blocks, shape):
    """The transpose of :func:`_pool`: ``dF[n, c] = sum_k Ay[k].T @ grad_out[k, c] @ Ax[k]``."""
    xp = get_array_module(grad_out)
    N, C, H, W = shape
    grad = xp.zeros(shape, dtype=grad_out.dtype)
    pixels = {}  # per image, the gradient of the own windows, channels-last (H*W*C,)
    for b in blocks:
        (k, PH, h), w = b.ay.shape, b.ax.shape[2]
        if b.cells is None:  # shared window
            g = grad_out[b.index].transpose(1, 0, 2, 3)  # (C, k, PH, PW)
            cols = (g @ b.ax).reshape(C, k * PH, w)  # the x-stage, transposed
            grad[b.image, :, b.rows, b.cols] += b.ay.reshape(k * PH, h).T @ cols  # (C, h, w)
        else:  # own windows
            g = grad_out[b.index].transpose(0, 2, 3, 1)  # (k, PH, PW, C)
            cols = b.ax.transpose(0, 2, 1)[:, None] @ g  # (k, PH, w, C): the x-stage, transposed
            crops = b.ay.transpose(0, 2, 1)[:, None] @ cols.transpose(0, 2, 1, 3)  # (k, w, h, C)
            if b.image not in pixels:
                pixels[b.image] = xp.zeros(H * W * C, dtype=grad_out.dtype)
            flat = b.cells[..., None] * C + xp.arange(C)  # (k, w, h, C) into (H*W*C,)
            scatter_add(pixels[b.image], flat.ravel(), crops.ravel())
    for n, g in pixels.items():
        grad[n] += g.reshape(H * W, C).T.reshape(C, H, W)
    return grad


def _only_weighted_terms(linear, values, blocks):
    """``linear(values, blocks)``, where a NaN or inf reaches only the outputs that give it a
    non-zero weight (module docstring, "Non-finite values").

    ``linear`` is :func:`_pool` or :func:`_unpool`: each output a sum of ``weight * value``
    terms over the blocks' windows, with weights >= 0.
    """
    xp = get_array_module(values)
    finite = xp.isfinite(values)
    # One sync per call on a device, which pays: the masked path below costs four passes.
    if bool(finite.all()):  # no 0 * NaN can arise: the plain products are the definition
        return linear(values, blocks)
    result = linear(xp.where(finite, values, 0), blocks)  # the sum of the finite terms
    # The outputs a non-finite value reaches: the same products of a 0/1 mask of those values
    # with 0/1 weights (1 where the weight is not 0) count its terms of non-zero weight.
    support = [
        replace(b, ay=(b.ay != 0).astype(b.ay.dtype), ax=(b.ax != 0).astype(b.ax.dtype))
        for b in blocks
    ]
    for value, where in ((xp.inf, values == xp.inf), (-xp.inf, values == -xp.inf),
                         (xp.nan, xp.isnan(values))):  # fmt: skip
        if bool(where.any()):
            reached = linear(where.astype(values.dtype), support) > 0
            with np.errstate(invalid="ignore"):  # as in the full sum: inf - inf is NaN
                result[reached] += value  # and anything + NaN is NaN
    return result


class RoIAlign(Function):
    """RoIAlign as an engine op: gradient for the features only (RoIs are constants)."""

    def forward(
        self,
        features,
        rois=None,
        output_size=7,
        spatial_scale=1.0,
        sampling_ratio=-1,
        aligned=False,
    ):
        out, self.saved = roi_align_forward(
            features, rois, output_size, spatial_scale, sampling_ratio, aligned
        )
        return out

    def backward(self, grad):
        return (roi_align_backward(grad, self.saved),)


def roi_align(
    x: Tensor,
    rois,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """RoIAlign of a (N, C, H, W) tensor at (K, 5) ``[n, x1, y1, x2, y2]`` rois: (K, C, PH, PW).

    Arguments as :func:`roi_align_forward`; same defaults as ``torchvision.ops.roi_align``.
    """
    rois = rois.data if isinstance(rois, Tensor) else rois
    return RoIAlign.apply(
        x,
        rois=rois,
        output_size=output_size,
        spatial_scale=spatial_scale,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
    )
