"""Boxes: the one box convention of minimask, and the geometry every other op builds on.

The convention (stated here once, used everywhere)
--------------------------------------------------
A box is ``(x1, y1, x2, y2)`` in pixels of the (resized) input image: ``(x1, y1)`` its top-left
corner, ``(x2, y2)`` its bottom-right corner, with ``x2 >= x1`` and ``y2 >= y1``. Coordinates are
continuous, so

    width = x2 - x1        height = y2 - y1        (no "+ 1")

and a box of zero width or height is legal but empty (area 0). A set of boxes is an array of shape
(N, 4). :func:`check_boxes` asserts all of this where boxes enter minimask (datasets, model inputs);
inner ops trust it.

IoU, the overlap measure of the whole detector (Faster R-CNN §3.1.2, Mask R-CNN §3):

    IoU(a, b) = area(a ∩ b) / area(a ∪ b) = inter / (area(a) + area(b) - inter)

Shape letters: N, M numbers of boxes.

Every function runs on NumPy or CuPy (``xp = get_array_module(boxes)``) and has torchvision.ops'
semantics, with one deliberate difference: the IoU of two empty boxes (0 / 0) is 0 here, not NaN.
"""

from __future__ import annotations

from minimask.backend import get_array_module, to_host


def check_boxes(boxes, name: str = "boxes"):
    """Assert that ``boxes`` follow the convention above, and return them unchanged.

    Checks: shape (N, 4), every coordinate finite, ``x2 >= x1`` and ``y2 >= y1``.

    Raises:
        ValueError: naming the argument ``name`` and the first offending row, for example
            ``gt_boxes[3] = [10. 5. 2. 8.]: x2 < x1 (boxes are (x1, y1, x2, y2), see boxes.py)``.
    """
    xp = get_array_module(boxes)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(
            f"{name} must have shape (N, 4) as (x1, y1, x2, y2) rows, got shape {boxes.shape}"
        )
    if boxes.shape[0] == 0:
        return boxes
    problems = (
        (~xp.isfinite(boxes).all(axis=1), "a coordinate is not finite"),
        (boxes[:, 2] < boxes[:, 0], "x2 < x1"),
        (boxes[:, 3] < boxes[:, 1], "y2 < y1"),
    )
    for bad, what in problems:
        if bool(bad.any()):
            row = int(xp.argmax(bad))  # the first True
            raise ValueError(
                f"{name}[{row}] = {to_host(boxes[row])}: {what} "
                "(boxes are (x1, y1, x2, y2) with x2 >= x1 and y2 >= y1, see minimask/ops/boxes.py)"
            )
    return boxes


def box_area(boxes):
    """Areas ``(x2 - x1) * (y2 - y1)`` of boxes of shape (..., 4); returns shape (...)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _pairwise_intersection(boxes1, boxes2):
    """Intersection areas of every pair: (N, 4), (M, 4) -> (N, M)."""
    xp = get_array_module(boxes1, boxes2)
    top_left = xp.maximum(boxes1[:, None, :2], boxes2[None, :, :2])  # (N, M, 2)
    bottom_right = xp.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])  # (N, M, 2)
    wh = xp.clip(bottom_right - top_left, 0, None)  # (N, M, 2); disjoint boxes overlap by 0
    return wh[..., 0] * wh[..., 1]


def _safe_divide(numerator, denominator):
    """``numerator / denominator``, with 0 where the denominator is 0 (empty boxes)."""
    xp = get_array_module(numerator, denominator)
    empty = denominator == 0
    ratio = numerator / xp.where(empty, 1, denominator)
    return xp.where(empty, 0, ratio)


def box_iou(boxes1, boxes2):
    """Pairwise IoU of (N, 4) and (M, 4) boxes: an (N, M) array with values in [0, 1].

    ``iou[n, m] = inter / (area1[n] + area2[m] - inter)``, computed for all pairs at once
    by broadcasting. Pairs whose union is empty (two zero-area boxes) have IoU 0 (torchvision:
    NaN), so a degenerate box never overlaps anything and no NaN reaches a loss.
    """
    inter = _pairwise_intersection(boxes1, boxes2)  # (N, M)
    union = box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - inter  # (N, M)
    return _safe_divide(inter, union)


def box_ioa(regions, boxes):
    """Intersection over the *box's* area: the fraction of each box that lies inside each region.

    ``ioa[n, m] = area(regions[n] ∩ boxes[m]) / area(boxes[m])``: shapes (N, 4), (M, 4) -> (N, M),
    values in [0, 1], 0 for an empty box. Unlike IoU it does not shrink when the region is much
    larger than the box, which is what marking anchors inside a large crowd region needs
    (:mod:`minimask.ops.matcher`).
    """
    inter = _pairwise_intersection(regions, boxes)  # (N, M)
    return _safe_divide(inter, box_area(boxes)[None, :])


def clip_boxes_to_image(boxes, size):
    """Clamp boxes of shape (..., 4) into an image of ``size = (height, width)``.

    x coordinates go to [0, width] and y coordinates to [0, height]; a box entirely outside the
    image becomes an empty box on its border. Returns a new array of the same shape and dtype.
    """
    xp = get_array_module(boxes)
    height, width = size
    clipped = boxes.copy()
    clipped[..., 0::2] = xp.clip(boxes[..., 0::2], 0, width)  # x1, x2
    clipped[..., 1::2] = xp.clip(boxes[..., 1::2], 0, height)  # y1, y2
    return clipped


def remove_small_boxes(boxes, min_size: float):
    """Indices (int64, increasing) of the boxes whose width AND height are both >= ``min_size``.

    Args:
        boxes: (N, 4) boxes.
        min_size: the smallest side kept, in pixels.
    """
    xp = get_array_module(boxes)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    keep = (widths >= min_size) & (heights >= min_size)
    return xp.flatnonzero(keep).astype(xp.int64)
