"""Synthetic shapes: squares, circles and triangles with instance masks, for the CPU demo.

Each image holds a few shapes of random colour on a random background. Shapes are painted in order,
so a later shape occludes an earlier one: every instance mask is what remains *visible*, and its box
is the tight box of that visible mask. Shapes hidden below ``min_visible`` of their area are
dropped, so every target is learnable.

Everything is deterministic: image ``i`` of split ``p`` with seed ``s`` is the same on every machine
and every run (it is drawn from ``numpy.random.default_rng((s, p, i))``), so the training stream is
endless but reproducible and the validation set is fixed and disjoint from it.

Shape letters: H, W image size; G number of instances in an image.

A sample is a dict::

    image   (3, H, W) float32 in [0, 1]
    boxes   (G, 4) float32, (x1, y1, x2, y2) in pixels, x2 and y2 exclusive edges
    labels  (G,) int64 in 1..3 (0 is background): 1 square, 2 circle, 3 triangle
    masks   (G, H, W) uint8 in {0, 1}
    image_id int
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLASSES = ("__background__", "square", "circle", "triangle")


@dataclass(frozen=True)
class ShapesConfig:
    image_size: int = 128  # H = W in pixels
    min_shapes: int = 1  # shapes drawn per image, before occlusion removes any
    max_shapes: int = 4
    min_size: int = 16  # shape extent in pixels (side, diameter, triangle base)
    max_size: int = 48
    min_visible: float = 0.4  # drop a shape whose visible area fell below this fraction
    noise: float = 0.03  # std of Gaussian pixel noise on the image


def _shape_mask(kind: int, cx: float, cy: float, size: float, angle: float, yy, xx) -> np.ndarray:
    """Boolean (H, W) mask of one shape centred at (cx, cy); yy, xx are pixel-centre grids."""
    half = size / 2
    if kind == 1:  # square, rotated by `angle`
        c, s = np.cos(angle), np.sin(angle)
        u = (xx - cx) * c + (yy - cy) * s
        v = -(xx - cx) * s + (yy - cy) * c
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if kind == 2:  # circle
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= half**2
    # triangle: three vertices on the circle of radius `half`, rotated by `angle`
    t = angle + np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3])
    vx, vy = cx + half * np.cos(t), cy + half * np.sin(t)
    # A point is inside when it lies on the same side of all three edges.
    side = np.stack(
        [
            (vx[j] - vx[i]) * (yy - vy[i]) - (vy[j] - vy[i]) * (xx - vx[i])
            for i, j in ((0, 1), (1, 2), (2, 0))
        ]
    )  # (3, H, W)
    return (side >= 0).all(axis=0) | (side <= 0).all(axis=0)


SPLITS = {"train": 0, "val": 1}


def make_sample(
    seed: int, index: int, config: ShapesConfig = ShapesConfig(), split: str = "train"
) -> dict:
    """Image ``index`` of the ``split`` of the shapes dataset with ``seed`` (module docstring)."""
    rng = np.random.default_rng((seed, SPLITS[split], index))
    size = config.image_size
    yy, xx = np.mgrid[0:size, 0:size] + 0.5  # pixel centres, each (H, W)
    background = rng.uniform(0.0, 0.35, size=3)
    image = np.broadcast_to(background[:, None, None], (3, size, size)).copy()

    n = int(rng.integers(config.min_shapes, config.max_shapes + 1))
    kinds = rng.integers(1, len(CLASSES), size=n)
    extents = rng.uniform(config.min_size, config.max_size, size=n)
    centres = rng.uniform(0.1 * size, 0.9 * size, size=(n, 2))
    angles = rng.uniform(0, 2 * np.pi, size=n)
    colours = rng.uniform(0.45, 1.0, size=(n, 3))

    masks = np.zeros((n, size, size), dtype=bool)
    full_area = np.zeros(n)
    for g in range(n):  # a handful of shapes per image
        m = _shape_mask(int(kinds[g]), *centres[g], extents[g], angles[g], yy, xx)
        full_area[g] = m.sum()
        masks[:g] &= ~m  # the new shape hides what lies under it
        masks[g] = m
        image[:, m] = colours[g][:, None]

    image += rng.normal(0.0, config.noise, size=image.shape)
    visible = masks.sum(axis=(1, 2))
    keep = (full_area > 0) & (visible >= config.min_visible * np.maximum(full_area, 1))
    masks, kinds = masks[keep], kinds[keep]
    return {
        "image": np.clip(image, 0.0, 1.0).astype(np.float32),
        "boxes": masks_to_boxes(masks),
        "labels": kinds.astype(np.int64),
        "masks": masks.astype(np.uint8),
        "image_id": int(index),
    }


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight (x1, y1, x2, y2) boxes of (G, H, W) masks; x2, y2 are exclusive pixel edges."""
    if len(masks) == 0:
        return np.zeros((0, 4), dtype=np.float32)
    rows = masks.any(axis=2)  # (G, H)
    cols = masks.any(axis=1)  # (G, W)
    y1 = rows.argmax(axis=1)
    y2 = rows.shape[1] - rows[:, ::-1].argmax(axis=1)
    x1 = cols.argmax(axis=1)
    x2 = cols.shape[1] - cols[:, ::-1].argmax(axis=1)
    return np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)


class ShapesDataset:
    """A fixed set of ``length`` shapes images (the validation set), indexable and iterable."""

    def __init__(
        self, length: int, seed: int = 0, config: ShapesConfig = ShapesConfig(), split="val"
    ):
        if split not in SPLITS:
            raise ValueError(f"split={split!r}; use one of {sorted(SPLITS)}")
        self.length, self.seed, self.config, self.split = int(length), int(seed), config, split
        self.classes = CLASSES

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"shapes index {index} out of range [0, {self.length})")
        return make_sample(self.seed, index, self.config, self.split)

    def __iter__(self):
        return (self[i] for i in range(self.length))


def shapes_stream(seed: int = 0, start: int = 0, config: ShapesConfig = ShapesConfig()):
    """An endless, reproducible training stream: images ``start``, ``start + 1``, ...

    ``start`` lets a resumed run continue the stream exactly where it stopped.
    """
    index = start
    while True:
        yield make_sample(seed, index, config, "train")
        index += 1


def shapes_batches(seed: int, batch_size: int, shapes: ShapesConfig | None = None):
    """``i -> (images, targets)`` for the training stream: images ``i·B .. i·B + B - 1``.

    Deterministic in ``i``, so a resumed run replays the same batches
    (:func:`minimask.train.fit`).
    """
    shapes = shapes or ShapesConfig()

    def get_batch(i: int):
        samples = [make_sample(seed, i * batch_size + k, shapes) for k in range(batch_size)]
        return [s["image"] for s in samples], samples

    return get_batch
