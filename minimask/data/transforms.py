"""Sample transforms: resize to a shorter side (longer side capped) and horizontal flip.

The image, its boxes and its masks always move together, so a box stays the box of its mask.
Boxes are (x1, y1, x2, y2) in pixels with continuous coordinates (``minimask/ops/boxes.py``):
a pixel ``j`` covers ``[j, j + 1)``, so an image ``W`` pixels wide spans ``[0, W]``.

Resize (Mask R-CNN §4, "images are resized such that their scale (shorter edge) is 800 pixels",
with the longer edge capped at 1333 as in Detectron)::

    s = min_size / min(H, W);  if s · max(H, W) > max_size: s = max_size / max(H, W)
    (h, w) = (round(s·H), round(s·W));  boxes · (w / W, h / H, w / W, h / H)

Images are resampled bilinearly (Pillow, antialiased when shrinking); masks take the nearest
source pixel (by pixel centres), so they stay binary. Horizontal flip maps
``x -> W - x``, so ``(x1, x2) -> (W - x2, W - x1)``.

The batch is padded to a multiple of 32 by ``MaskRCNN.preprocess``; detections come back in the
resized image's pixels, and :func:`detections_to_original` maps them to the stored image's size
for evaluation (boxes scaled back, masks resampled bilinearly and thresholded at 0.5).

Shape letters: H, W size before; h, w size after; G instances; D detections.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(h, w) after scaling the shorter side to ``min_size``, the longer capped at ``max_size``."""
    scale = min_size / min(height, width)
    if scale * max(height, width) > max_size:
        scale = max_size / max(height, width)
    return max(int(round(height * scale)), 1), max(int(round(width * scale)), 1)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(3, H, W) float32 -> (3, h, w), bilinear (antialiased when shrinking), per channel."""
    h, w = size
    if image.shape[1:] == (h, w):
        return image
    channels = [
        np.asarray(Image.fromarray(c.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))
        for c in image
    ]  # three calls into Pillow's C resampler
    return np.stack(channels).astype(np.float32)  # (3, h, w)


def nearest_indices(src: int, dst: int) -> np.ndarray:
    """(dst,) source index of each destination pixel, matched by pixel centres."""
    return np.minimum(((np.arange(dst) + 0.5) * (src / dst)).astype(np.int64), src - 1)


def resize_masks(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(G, H, W) binary -> (G, h, w), nearest source pixel (stays binary)."""
    g, height, width = masks.shape
    h, w = size
    if (height, width) == (h, w):
        return masks
    rows, cols = nearest_indices(height, h), nearest_indices(width, w)
    return np.take(np.take(masks, rows, axis=1), cols, axis=2)  # (G, h, W) -> (G, h, w)


def scale_boxes(boxes: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """(G, 4) x1y1x2y2 with x scaled by ``sx`` and y by ``sy``."""
    return (np.asarray(boxes, np.float32) * np.array([sx, sy, sx, sy], np.float32)).reshape(-1, 4)


def resize(sample: dict, min_size: int, max_size: int) -> dict:
    """A copy of ``sample`` resized by the rule above; ``orig_size`` is kept for evaluation."""
    _, height, width = sample["image"].shape
    h, w = resized_size(height, width, min_size, max_size)
    out = dict(sample)
    out["orig_size"] = sample.get("orig_size", (height, width))
    out["image"] = resize_image(sample["image"], (h, w))
    if "boxes" in sample:
        out["boxes"] = scale_boxes(sample["boxes"], w / width, h / height)
    if "masks" in sample:
        out["masks"] = resize_masks(sample["masks"], (h, w))
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


def detections_to_original(det: dict, size: tuple[int, int], orig_size: tuple[int, int]) -> dict:
    """Detections on the resized image (h, w) -> on the stored image (H, W).

    ``det``: ``boxes`` (D, 4), ``scores`` (D,), ``labels`` (D,), optionally ``masks`` (D, h, w).
    """
    (h, w), (height, width) = size, orig_size
    out = dict(det)
    boxes = scale_boxes(det["boxes"], width / w, height / h)
    out["boxes"] = np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)
    if "masks" in det and (h, w) != (height, width):
        masks = np.zeros((len(det["masks"]), height, width), dtype=np.uint8)
        for d, m in enumerate(det["masks"]):  # one Pillow resample per detection
            up = Image.fromarray(np.asarray(m, np.uint8) * 255).resize(
                (width, height), Image.BILINEAR
            )
            masks[d] = np.asarray(up) >= 128  # probability >= 0.5
        out["masks"] = masks
    return out
