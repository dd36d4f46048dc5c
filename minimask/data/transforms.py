"""Sample transforms of the data pipeline: horizontal flip (training augmentation), and resize.

The image, its boxes and its masks always move together, so a box stays the box of its mask.
Boxes are (x1, y1, x2, y2) in pixels with continuous coordinates (``minimask/ops/boxes.py``):
a pixel ``j`` covers ``[j, j + 1)``, so an image ``W`` pixels wide spans ``[0, W]``.

Horizontal flip maps ``x -> W - x``, so ``(x1, x2) -> (W - x2, W - x1)``.

Resizing to the model's scale is the model's own job (:mod:`minimask.model.transform`): datasets
hand it samples at their stored size, and detections come back at that size. :func:`resize` is
the same rule applied to a whole sample, for lessons and tests that want to look at a resized one.

Shape letters: H, W size; G instances.
"""

from __future__ import annotations

import numpy as np

from minimask.model.transform import resize_boxes, resize_image, resize_masks, resized_size


def resize(sample: dict, min_size: int, max_size: int) -> dict:
    """A copy of ``sample`` resized as the model resizes it; ``orig_size`` keeps the stored size.

    Image bilinear, boxes scaled, masks by nearest pixel (:mod:`minimask.model.transform`).
    """
    _, height, width = sample["image"].shape
    size = resized_size(height, width, min_size, max_size)
    out = dict(sample)
    out["orig_size"] = sample.get("orig_size", (height, width))
    out["image"] = resize_image(np.asarray(sample["image"], np.float32), size)
    if "boxes" in sample:
        boxes = np.asarray(sample["boxes"], np.float32).reshape(-1, 4)
        out["boxes"] = resize_boxes(boxes, (height, width), size)
    if "masks" in sample:
        out["masks"] = resize_masks(np.asarray(sample["masks"]), size)
    return out


def horizontal_flip(sample: dict) -> dict:
    """A copy of ``sample`` mirrored left-right: image, masks and boxes (x -> W - x)."""
    _, _, width = sample["image"].shape
    out = dict(sample)
    out["image"] = np.ascontiguousarray(sample["image"][:, :, ::-1])
    if "masks" in sample:
        out["masks"] = np.ascontiguousarray(sample["masks"][:, :, ::-1])
    if "boxes" in sample:
        b = np.asarray(sample["boxes"], np.float32).reshape(-1, 4)
        out["boxes"] = np.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], axis=1)
    return out


def random_horizontal_flip(sample: dict, generator: np.random.Generator, p: float = 0.5):
    """``horizontal_flip(sample)`` with probability ``p`` (drawn from ``generator``)."""
    return horizontal_flip(sample) if generator.random() < p else sample
