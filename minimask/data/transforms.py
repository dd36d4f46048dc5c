"""Sample transforms of the data pipeline: horizontal flip (training augmentation), and resize.

The image, its boxes and its masks always move together, so a box stays the box of its mask.
Boxes are (x1, y1, x2, y2) in pixels with continuous coordinates (``minimask/ops/boxes.py``):
a pixel ``j`` covers ``[j, j + 1)``, so an image ``W`` pixels wide spans ``[0, W]``.

Horizontal flip maps ``x -> W - x``, so ``(x1, x2) -> (W - x2, W - x1)``; keypoints move the same
way and trade left for right (``flip_index``: a mirrored person's left wrist is a right wrist).

Resizing to the model's scale is the model's own job (:mod:`minimask.model.transform`): datasets
hand it samples at their stored size, and detections come back at that size. :func:`resize` is
the same rule applied to a whole sample, for lessons and tests that want to look at a resized one.

Shape letters: H, W size; G instances.
"""

from __future__ import annotations

import numpy as np

from minimask.model.transform import (
    resize_boxes,
    resize_image,
    resize_keypoints,
    resize_masks,
    resized_size,
)


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
    if sample.get("keypoints") is not None:
        out["keypoints"] = resize_keypoints(np.asarray(sample["keypoints"], np.float32),
                                            (height, width), size)  # fmt: skip
    return out


def horizontal_flip(sample: dict, flip_index=None) -> dict:
    """A copy of ``sample`` mirrored left-right: image, masks and boxes (x -> W - x), and
    keypoints (G, K, 3): x -> W - x, then keypoint k becomes keypoint ``flip_index[k]``.

    As torchvision's reference training, an unlabelled keypoint (v = 0) stays (0, 0, 0).
    """
    _, _, width = sample["image"].shape
    out = dict(sample)
    out["image"] = np.ascontiguousarray(sample["image"][:, :, ::-1])
    if "masks" in sample:
        out["masks"] = np.ascontiguousarray(sample["masks"][:, :, ::-1])
    if "boxes" in sample:
        b = np.asarray(sample["boxes"], np.float32).reshape(-1, 4)
        out["boxes"] = np.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], axis=1)
    if sample.get("keypoints") is not None:
        if flip_index is None:
            raise ValueError(
                "flipping keypoints needs flip_index, the left/right swap (CocoDataset.flip_index)"
            )
        kp = np.array(sample["keypoints"], np.float32)  # (G, K, 3), a copy
        kp[..., 0] = width - kp[..., 0]
        kp[kp[..., 2] == 0] = 0
        out["keypoints"] = kp[:, list(flip_index)]  # (G, K, 3): left and right trade places
    return out


def random_horizontal_flip(sample: dict, generator: np.random.Generator, p: float = 0.5,
                           flip_index=None):  # fmt: skip
    """``horizontal_flip(sample, flip_index)`` with probability ``p`` (drawn from ``generator``)."""
    return horizontal_flip(sample, flip_index) if generator.random() < p else sample
