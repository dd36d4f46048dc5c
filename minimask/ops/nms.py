"""Non-maximum suppression (NMS): keep the best box of each cluster of overlapping boxes.

Both the RPN (Faster R-CNN §3.3, on proposals) and the detector's output (per class) produce many
near-duplicate boxes around each object. Greedy NMS keeps the highest-scoring box, removes every
remaining box whose IoU with it is greater than ``iou_threshold``, and repeats with the next box
still standing. In sorted order (scores decreasing), that is one rule per box:

    keep[j] = not any(keep[i] and IoU(i, j) > iou_threshold  for i < j)

Ties in score are broken by index: of two equal scores, the box that comes first in the input is
considered first (a stable sort), as in torchvision's CPU kernel. The result lists the kept
indices in that order (decreasing score, then increasing index).

NaN scores are ordered as torchvision orders them: torch's descending sort puts NaN above every
number, so boxes with a NaN score come first (in input order) and can suppress the others. (NumPy
would put them last.) They are not refused: a NaN objectness logit during training must reach the
loss, where the training loop stops with its explanation of where the NaN arose.

Greedy NMS without a loop over boxes (the xp version)
-----------------------------------------------------
The rule above is sequential, but it can be evaluated a block of ``B`` sorted boxes at a time:

1. Boxes already suppressed by earlier blocks drop out of the block.
2. Inside the block, with ``S[i, j] = IoU(i, j) > t`` for ``i < j``, solve
   ``keep[j] = not any(keep[i] and S[i, j] for i < j)`` by iterating that assignment for all
   ``j`` at once, starting from all-True. Entry ``j`` depends only on entries before it, so after
   ``s`` steps the first ``s`` entries are final; an iteration that changes nothing has reached
   the rule's unique solution. Usually that takes a handful of steps (chains of boxes that
   suppress one another are short); never more than ``B + 1``.
3. The block's kept boxes suppress every later box they overlap (one (k, rest) IoU matrix).

By induction over blocks this keeps exactly the boxes greedy NMS keeps: step 1 applies the
earlier blocks' kept boxes, step 2 applies the rule inside the block, step 3 hands its kept boxes
on. ``IoU > t`` is computed with torchvision's formula and rounding
(``inter / (area_i + area_j - inter)`` in the boxes' dtype), so the kept indices are identical to
``torchvision.ops.nms``. Empty boxes have IoU 0/0 = NaN there, which suppresses nothing.

On the GPU (CuPy input) a RawKernel does the same work as in Faster R-CNN's original CUDA NMS: one
thread per box writes a 64-bit mask of the later boxes it suppresses, and one block of threads
then walks the boxes in order, skipping the suppressed ones and OR-ing in the kept ones' masks.

Shape letters:
    N  boxes, K  kept boxes, B  boxes per block
"""

from __future__ import annotations

import numpy as np

from minimask.backend import get_array_module, is_cupy, to_host
from minimask.engine.profiler import section

BLOCK = 128  # boxes per block: bounds step 2's iterations; speed is flat from 64 to 256
FIXED_POINT_STEPS = 4  # then a block is finished box by box (_walk_block)
MAX_PAIRS = 1 << 22  # largest (kept, rest) matrix evaluated at once, to bound memory


def nms(boxes, scores, iou_threshold: float):
    """Greedy NMS: the indices of the boxes to keep, by decreasing score.

    Args:
        boxes: (N, 4) boxes ``(x1, y1, x2, y2)`` (float32 or float64; see ``boxes.py``).
        scores: (N,) scores.
        iou_threshold: a box is removed when its IoU with a kept, higher-scoring box is
            *greater* than this.

    Returns:
        (K,) int64 indices into ``boxes``, in decreasing order of score (ties: lower index
        first; NaN scores before all others, as in torchvision), on the input's device. Empty
        input gives an empty array.
    """
    return batched_nms(boxes, scores, None, iou_threshold)


def batched_nms(boxes, scores, idxs, iou_threshold: float):
    """NMS done independently per category: boxes of different ``idxs`` never suppress each other.

    Args:
        boxes: (N, 4) boxes; scores: (N,) scores.
        idxs: (N,) integer category of each box (the class, or the image in a batch), or None
            for one category (plain :func:`nms`).
        iou_threshold: as in :func:`nms`.

    Returns:
        (K,) int64 indices of the kept boxes of all categories, by decreasing score (ties:
        lower index first).
    """
    with section("nms"):  # a row of its own in a profile (engine/profiler.py)
        return _batched_nms(boxes, scores, idxs, iou_threshold)


def _batched_nms(boxes, scores, idxs, iou_threshold: float):
    xp = get_array_module(boxes, scores)
    boxes, scores = xp.asarray(boxes), xp.asarray(scores)
    idxs = None if idxs is None else xp.asarray(idxs)
    if boxes.dtype.kind != "f" or boxes.dtype.itemsize < 4:
        boxes = boxes.astype(xp.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {boxes.shape}")
    n = boxes.shape[0]
    if scores.shape != (n,) or (idxs is not None and idxs.shape != (n,)):
        raise ValueError(f"scores and idxs must have shape ({n},)")
    if n == 0:
        return xp.zeros(0, dtype=xp.int64)

    order = xp.argsort(-scores, kind="stable")  # (N,) best first; ties keep input order
    # NaN first, in input order, as torch sorts them (module docstring). The sort put them last,
    # in input order; a stable sort on "is a number" moves them to the front, without asking the
    # host whether there are any (a sync on a device).
    is_number = (~xp.isnan(scores[order])).astype(np.int8)  # (N,) 0 for NaN, 1 for a number
    order = order[xp.argsort(is_number, kind="stable")]
    sorted_boxes = xp.ascontiguousarray(boxes[order])  # (N, 4)
    classes = None if idxs is None else idxs[order]  # (N,)
    bound = _suppression_bound(iou_threshold, boxes.dtype)
    if is_cupy(xp):  # the kernel needs real CuPy; NumPy and the CPU stand-in take the xp path
        keep = _greedy_cuda(sorted_boxes, classes, bound)
    elif classes is None:
        keep = _greedy_blocks(sorted_boxes, None, bound)
    else:  # categories are independent: solve them one after another, then merge by rank
        group = xp.argsort(classes, kind="stable")  # (N,) by category, best first within each
        grouped_boxes, grouped = sorted_boxes[group], classes[group]  # (N, 4), (N,)
        starts = to_host(xp.flatnonzero(grouped[1:] != grouped[:-1]) + 1).tolist()
        keep = xp.zeros(n, dtype=bool)
        for first, last in zip([0, *starts], [*starts, n]):  # one category: boxes[first:last]
            keep[group[first:last]] = _greedy_blocks(grouped_boxes[first:last], None, bound)
    return order[keep].astype(xp.int64)


def _suppression_bound(iou_threshold: float, dtype):
    """The smallest value ``v`` of ``dtype`` above the threshold: for an IoU in that dtype,
    ``iou > iou_threshold`` (a comparison in float64, as torchvision's) ⟺ ``iou >= v``.
    """
    dtype = np.dtype(dtype)
    v = dtype.type(iou_threshold)
    if float(v) <= iou_threshold:
        v = np.nextafter(v, dtype.type(np.inf))
    return v


def _suppresses(coords, areas, i, j, bound, classes):
    """(len(i), len(j)) booleans: ``IoU(box i, box j) > t``, in torchvision's rounding.

    ``coords`` is (4, N): the rows x1, y1, x2, y2, each contiguous so that the (I, J) broadcasts
    below stream through memory.
    """
    xp = get_array_module(coords)
    a = coords[:, i][:, :, None]  # (4, I, 1) the suppressing boxes, rows x1, y1, x2, y2
    b = coords[:, j][:, None, :]  # (4, 1, J) the boxes they may suppress
    width = xp.minimum(a[2], b[2]) - xp.maximum(a[0], b[0])  # (I, J), < 0 when disjoint
    height = xp.minimum(a[3], b[3]) - xp.maximum(a[1], b[1])
    inter = xp.maximum(width, 0, out=width)
    inter *= xp.maximum(height, 0, out=height)
    union = areas[i][:, None] + areas[j][None, :]
    union -= inter
    iou = xp.divide(inter, union, out=inter)  # NaN for two empty boxes: 0 / 0
    hit = iou >= bound
    if classes is not None:
        hit &= classes[i][:, None] == classes[j][None, :]
    return hit


def _greedy_blocks(boxes, classes, bound):
    """Greedy NMS on boxes already sorted best-first: (N,) booleans, True for the kept ones.

    Runs on NumPy or CuPy; on the GPU :func:`_greedy_cuda` replaces it.
    """
    xp = get_array_module(boxes)
    n = boxes.shape[0]
    coords = xp.ascontiguousarray(boxes.T)  # (4, N)
    areas = (coords[2] - coords[0]) * (coords[3] - coords[1])  # (N,)
    alive = xp.ones(n, dtype=bool)  # not (yet) suppressed by a kept box
    keep = xp.zeros(n, dtype=bool)
    upper = xp.triu(xp.ones((BLOCK, BLOCK), dtype=bool), k=1)  # (B, B) True where i < j
    with np.errstate(invalid="ignore", divide="ignore"):  # 0 / 0 (empty boxes) is NaN: no hit
        for start in range(0, n, BLOCK):
            stop = min(start + BLOCK, n)
            block = start + xp.flatnonzero(alive[start:stop])  # (b,) survivors of earlier blocks
            if block.size == 0:
                continue
            # Step 2: S[i, j] = "i suppresses j" for i < j within the block.
            hits = _suppresses(coords, areas, block, block, bound, classes)  # (b, b)
            hits &= upper[: block.size, : block.size]  # only i < j (xp.triu, without its copy)
            kept = _solve_block(hits)  # (b,)
            winners = block[kept]  # (k,)
            keep[winners] = True
            # Step 3: the block's kept boxes suppress later boxes, a chunk of columns at a time.
            rest = stop + xp.flatnonzero(alive[stop:])  # (r,)
            if bound > 0:  # only boxes near the winners can be hit (see _near)
                rest = rest[_near(coords, classes, winners, rest)]
            step = max(1, MAX_PAIRS // winners.size)
            for c in range(0, rest.size, step):
                cols = rest[c : c + step]
                hit = _suppresses(coords, areas, winners, cols, bound, classes).any(axis=0)
                alive[cols[hit]] = False
    return keep


def _near(coords, classes, winners, rest):
    """(r,) booleans: which ``rest`` boxes meet the bounding box of all ``winners`` (and share
    the range of their categories). The others have no overlap with any winner, so an IoU of 0
    (or NaN for empty boxes), which suppresses nothing when the threshold is >= 0.

    Why: a block's winners usually lie in one region (a chain, one object's cluster, one class
    of :func:`batched_nms`, whose boxes are grouped by class), and this test costs 4 comparisons
    a box where the IoU matrix costs ~10 operations per (winner, box) pair. On a 6,000-box
    chain it cut step 3 from 18 M pairs to 0.2 M; on random boxes it removes little and costs
    little.
    """
    low, high = coords[:2, winners].min(axis=1), coords[2:, winners].max(axis=1)  # (2,) each
    box = coords[:, rest]  # (4, r)
    near = (box[0] < high[0]) & (box[2] > low[0]) & (box[1] < high[1]) & (box[3] > low[1])
    if classes is not None:
        kinds = classes[winners]
        near &= (classes[rest] >= kinds.min()) & (classes[rest] <= kinds.max())
    return near


def _solve_block(hits):
    """Step 2: (b, b) booleans ``S`` (upper triangular) -> (b,) ``keep`` with
    ``keep[j] = not any(keep[i] and S[i, j] for i < j)``, by iterating that assignment for all
    ``j`` at once from all-True (module docstring), at most :data:`FIXED_POINT_STEPS` times.

    A chain of boxes that each suppress only the next (every other box kept) needs one step per
    link; such a block is finished by :func:`_walk_block`, the rule applied box by box.
    """
    xp = get_array_module(hits)
    matrix = hits.astype(xp.float32)  # (b, b) 0/1, for a matrix-vector product
    kept = xp.ones(hits.shape[0], dtype=bool)
    for _ in range(FIXED_POINT_STEPS):
        suppressed = kept.astype(xp.float32) @ matrix > 0  # (b,) any kept i hits j
        if bool(xp.array_equal(~suppressed, kept)):
            return kept
        kept = ~suppressed
    return _walk_block(hits)


def _walk_block(hits):
    """The rule of :func:`_solve_block` in order, the way the GPU kernel walks: each row of
    ``hits`` becomes one Python integer (bit ``j`` set: ``i`` suppresses ``j``), and a box still
    standing ORs its row into the mask of removed boxes. About 0.3 µs a box on the CPU, whatever
    the chains (a 6,000-box chain: 360 ms with the fixed-point steps alone, 20 ms with this).
    """
    xp = get_array_module(hits)
    b = hits.shape[0]
    rows = to_host(xp.packbits(hits, axis=1, bitorder="little"))  # (b, ceil(b / 8)) uint8
    masks = [int.from_bytes(row.tobytes(), "little") for row in rows]
    removed = 0
    for i, mask in enumerate(masks):
        if not removed >> i & 1:
            removed |= mask
    keep = ~np.unpackbits(np.frombuffer(removed.to_bytes(-(-b // 8), "little"), np.uint8),
                          count=b, bitorder="little").astype(bool)  # fmt: skip
    return xp.asarray(keep)


# ---------------------------------------------------------------------------- CuPy kernel
# The bitmask NMS of Faster R-CNN's CUDA code, written for the same arithmetic as
# `_suppresses` (same operation order, no fused multiply-add) so that CPU and GPU keep the same
# boxes. T is float or double.
_CUDA_SOURCE = r"""
typedef TYPE T;

__device__ __forceinline__ T lo(T a, T b) { return a < b ? a : b; }
__device__ __forceinline__ T hi(T a, T b) { return a > b ? a : b; }

// Grid (words, words), 64 threads: thread t of block (cb, rb) takes box i = 64 rb + t and sets
// bit k of mask[i, cb] when i suppresses box j = 64 cb + k (j > i, same class).
extern "C" __global__ void nms_mask(const int n, const T* __restrict__ boxes,
                                    const long long* __restrict__ classes, const T bound,
                                    unsigned long long* __restrict__ mask) {
  const int rb = blockIdx.y, cb = blockIdx.x;
  if (rb > cb) return;  // earlier boxes only suppress later ones
  const int words = (n + 63) / 64;
  const int rows = min(n - rb * 64, 64), cols = min(n - cb * 64, 64);
  __shared__ T col_boxes[64 * 5];  // x1, y1, x2, y2, area
  __shared__ long long col_classes[64];
  if (threadIdx.x < cols) {
    const T* b = boxes + (cb * 64 + threadIdx.x) * 4;
    T* c = col_boxes + threadIdx.x * 5;
    c[0] = b[0]; c[1] = b[1]; c[2] = b[2]; c[3] = b[3];
    c[4] = (b[2] - b[0]) * (b[3] - b[1]);
    col_classes[threadIdx.x] = classes[cb * 64 + threadIdx.x];
  }
  __syncthreads();
  if (threadIdx.x >= rows) return;
  const int i = rb * 64 + threadIdx.x;
  const T* a = boxes + i * 4;
  const T area = (a[2] - a[0]) * (a[3] - a[1]);
  const long long cls = classes[i];
  unsigned long long bits = 0;
  for (int k = (rb == cb) ? threadIdx.x + 1 : 0; k < cols; k++) {
    const T* c = col_boxes + k * 5;
    const T w = lo(a[2], c[2]) - hi(a[0], c[0]);
    const T h = lo(a[3], c[3]) - hi(a[1], c[1]);
    const T inter = hi(w, (T)0) * hi(h, (T)0);
    const T iou = inter / (area + c[4] - inter);
    if (iou >= bound && col_classes[k] == cls) bits |= 1ULL << k;
  }
  mask[(long long)i * words + cb] = bits;
}

// One block: walk the boxes in order; thread t owns words t, t + blockDim.x, ... of `removed`.
extern "C" __global__ void nms_scan(const int n, const unsigned long long* __restrict__ mask,
                                    volatile unsigned long long* removed, bool* keep) {
  const int words = (n + 63) / 64;
  for (int i = 0; i < n; i++) {
    const int w = i / 64;
    const bool kept = !((removed[w] >> (i % 64)) & 1ULL);
    __syncthreads();  // everyone has read removed[w] before anyone updates it
    if (kept) {
      if (threadIdx.x == 0) keep[i] = true;
      const unsigned long long* row = mask + (long long)i * words;
      for (int k = w + threadIdx.x; k < words; k += blockDim.x) removed[k] |= row[k];
    }
    __syncthreads();
  }
}
"""
_cuda_modules: dict = {}


def _cuda_module(dtype):
    import cupy  # noqa: PLC0415 - only with CuPy

    name = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}[np.dtype(dtype)]
    if name not in _cuda_modules:
        source = _CUDA_SOURCE.replace("TYPE", name)
        # --fmad=false: no fused multiply-add, so the IoU rounds exactly as on the CPU.
        _cuda_modules[name] = cupy.RawModule(code=source, options=("--fmad=false",))
    return _cuda_modules[name]


def _greedy_cuda(boxes, classes, bound):
    """The GPU twin of :func:`_greedy_blocks`: (N,) booleans on the device."""
    import cupy  # noqa: PLC0415 - only with CuPy

    n = boxes.shape[0]
    words = (n + 63) // 64
    module = _cuda_module(boxes.dtype)
    if classes is None:
        classes = cupy.zeros(n, dtype=cupy.int64)
    classes = cupy.ascontiguousarray(classes.astype(cupy.int64))
    mask = cupy.zeros((n, words), dtype=cupy.uint64)  # (N, words) suppression bits
    module.get_function("nms_mask")(
        (words, words), (64,), (np.int32(n), boxes, classes, boxes.dtype.type(bound), mask)
    )
    removed = cupy.zeros(words, dtype=cupy.uint64)
    keep = cupy.zeros(n, dtype=cupy.bool_)
    module.get_function("nms_scan")((1,), (256,), (np.int32(n), mask, removed, keep))
    return keep
