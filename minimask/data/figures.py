"""Synthetic stick figures with 7 keypoints each: the CPU task for the keypoint head (§5).

A figure is a head (a disc) on a body of six strokes: neck to head, neck to pelvis, two arms from
the neck and two legs from the pelvis. Its keypoints are the joints and limb ends::

    0 head    1 neck    2 pelvis    3 left_hand    4 right_hand    5 left_foot    6 right_foot

"left" is the figure's left, on the image's right as for a person facing the camera: each arm
and leg keeps to its own side of the body (left arm angles within ±60° of the image's +x axis,
left leg 10°..45° from straight down toward +x; the right ones mirrored), so which is which can
be seen, and the whole figure then turns by up to ±25°. Figures are 28..60 pixels tall in a
128-pixel image, 1 to 3 of them, painted in order; a joint that a later figure paints over is
labelled but hidden (v = 1, as COCO marks occluded keypoints), every other is visible (v = 2).

Each figure's box is the tight box of all its strokes (hidden parts included, as a person's box
covers an occluded limb), its mask the pixels that stay visible, and its ``area``, the scale of
the OKS (object keypoint similarity) in the keypoint AP, is the box's: the strokes are thin, and
their painted area says little of the figure's size.

OKS sigmas (:data:`OKS_SIGMAS`): each joint takes COCO's sigma of the person keypoint it stands
for (head: ears 0.035; neck: shoulders 0.079; pelvis: hips 0.107; hands: wrists 0.062; feet:
ankles 0.089), so the metric is as strict as COCO's for the same joints.

Deterministic as the shapes (:mod:`minimask.data.shapes`): image ``i`` of split ``p`` with seed
``s`` is drawn from ``numpy.random.default_rng((s, 2 + p, i))`` (the ``2 +`` keeps the
figures' stream apart from the shapes'). A sample is the shapes' dict plus ``keypoints`` (G, 7, 3)
(x, y, v) in pixels (a pixel ``j`` covers ``[j, j + 1)``) and ``areas`` (G,).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minimask.data.shapes import SPLITS

CLASSES = ("__background__", "figure")
KEYPOINT_NAMES = (
    "head", "neck", "pelvis", "left_hand", "right_hand", "left_foot", "right_foot"
)  # fmt: skip
SKELETON = ((0, 1), (1, 2), (1, 3), (1, 4), (2, 5), (2, 6))  # the strokes, as keypoint pairs
FLIP_INDEX = (0, 1, 2, 4, 3, 6, 5)  # after a horizontal flip, keypoint k is keypoint FLIP[k]
OKS_SIGMAS = (0.035, 0.079, 0.107, 0.062, 0.062, 0.089, 0.089)  # COCO's, joint by joint


@dataclass(frozen=True)
class FiguresConfig:
    image_size: int = 128  # H = W in pixels
    min_figures: int = 1  # figures per image
    max_figures: int = 3
    min_height: float = 28.0  # figure height (head top to feet), pixels
    max_height: float = 60.0
    max_tilt: float = 25.0  # the whole figure turns by up to this many degrees
    max_overlap: float = 0.15  # a new figure's box overlaps an earlier one by at most this IoU
    noise: float = 0.03  # std of Gaussian pixel noise on the image


def figure_joints(height: float, max_tilt: float, rng) -> tuple[np.ndarray, float]:
    """The 7 joints (7, 2) of one figure around (0, 0), image axes (y down), and its head radius;
    the figure turned by up to ``max_tilt`` degrees either way."""
    deg = np.pi / 180
    head_r = 0.1 * height
    neck, pelvis = np.array([0.0, -0.2 * height]), np.array([0.0, 0.12 * height])
    head = neck + [0.0, -0.08 * height - head_r]
    arm, leg = 0.35 * height, 0.38 * height
    left_arm = rng.uniform(-60, 60) * deg  # from +x (the image's right), positive is down
    right_arm = np.pi - rng.uniform(-60, 60) * deg
    left_leg = (90 - rng.uniform(10, 45)) * deg  # from +x: 90° is straight down
    right_leg = (90 + rng.uniform(10, 45)) * deg
    ends = [neck + arm * np.array([np.cos(a), np.sin(a)]) for a in (left_arm, right_arm)] + [
        pelvis + leg * np.array([np.cos(a), np.sin(a)]) for a in (left_leg, right_leg)
    ]
    joints = np.stack([head, neck, pelvis, *ends])  # (7, 2)
    turn = rng.uniform(-max_tilt, max_tilt) * deg
    rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    return joints @ rotation.T, head_r


def _stroke(a, b, width: float, yy, xx) -> np.ndarray:
    """Boolean (H, W): pixel centres within ``width / 2`` of the segment a-b."""
    d = b - a
    t = np.clip(((xx - a[0]) * d[0] + (yy - a[1]) * d[1]) / max(d @ d, 1e-9), 0, 1)
    return (xx - a[0] - t * d[0]) ** 2 + (yy - a[1] - t * d[1]) ** 2 <= (width / 2) ** 2


def _box_iou(a, b) -> float:
    w = max(min(a[2], b[2]) - max(a[0], b[0]), 0)
    h = max(min(a[3], b[3]) - max(a[1], b[1]), 0)
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def make_sample(seed: int, index: int, config: FiguresConfig = FiguresConfig(),
                split: str = "train") -> dict:  # fmt: skip
    """Image ``index`` of the ``split`` of the figures dataset with ``seed`` (module docstring)."""
    rng = np.random.default_rng((seed, 2 + SPLITS[split], index))
    size = config.image_size
    yy, xx = np.mgrid[0:size, 0:size] + 0.5  # pixel centres, each (H, W)
    image = np.broadcast_to(rng.uniform(0.0, 0.35, 3)[:, None, None], (3, size, size)).copy()
    n = int(rng.integers(config.min_figures, config.max_figures + 1))
    masks, boxes, keypoints = [], [], []
    for _ in range(n):
        for _attempt in range(20):  # a place that leaves the earlier figures mostly in view
            height = rng.uniform(config.min_height, config.max_height)
            joints, head_r = figure_joints(height, config.max_tilt, rng)
            width = max(2.0, 0.07 * height)  # stroke width
            margin = np.array([head_r, head_r])
            low = np.minimum(joints.min(axis=0), joints[0] - margin) - width / 2
            high = np.maximum(joints.max(axis=0), joints[0] + margin) + width / 2
            offset = rng.uniform(1 - low, size - 1 - high)  # the figure inside the image
            box = np.concatenate([low + offset, high + offset])
            if all(_box_iou(box, b) <= config.max_overlap for b in boxes):
                break
        else:
            continue  # no room left: fewer figures
        joints = joints + offset
        mask = (xx - joints[0, 0]) ** 2 + (yy - joints[0, 1]) ** 2 <= head_r**2
        for a, b in SKELETON:
            mask |= _stroke(joints[a], joints[b], width, yy, xx)
        for earlier in masks:
            earlier &= ~mask  # the new figure hides what lies under it
        image[:, mask] = rng.uniform(0.45, 1.0, 3)[:, None]
        rows, cols = np.nonzero(mask)
        boxes.append(np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], float))
        masks.append(mask)
        keypoints.append(np.concatenate([joints, np.full((7, 1), 2.0)], axis=1))
    keypoints = np.array(keypoints, dtype=np.float32).reshape(-1, 7, 3)
    for g in range(len(masks)):  # a joint under a later figure: labelled, hidden
        px = np.clip(keypoints[g, :, :2].astype(int), 0, size - 1)  # (7, 2) the joint's pixel
        hidden = ~np.stack(masks)[g, px[:, 1], px[:, 0]]
        keypoints[g, hidden, 2] = 1
    image += rng.normal(0.0, config.noise, size=image.shape)
    boxes = np.array(boxes, dtype=np.float32).reshape(-1, 4)
    return {
        "image": np.clip(image, 0.0, 1.0).astype(np.float32),
        "boxes": boxes,
        "labels": np.ones(len(boxes), dtype=np.int64),
        "masks": np.array(masks, dtype=np.uint8).reshape(-1, size, size),
        "keypoints": keypoints,
        "areas": ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).astype(np.float32),
        "image_id": int(index),
    }


class FiguresDataset:
    """A fixed set of ``length`` figure images (the validation set), indexable and iterable."""

    classes = CLASSES

    def __init__(self, length: int, seed: int = 0, config: FiguresConfig = FiguresConfig(),
                 split: str = "val"):  # fmt: skip
        if split not in SPLITS:
            raise ValueError(f"split={split!r}; use one of {sorted(SPLITS)}")
        self.length, self.seed, self.config, self.split = int(length), int(seed), config, split

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"figures index {index} out of range [0, {self.length})")
        return make_sample(self.seed, index, self.config, self.split)

    def __iter__(self):
        return (self[i] for i in range(self.length))


def figures_batches(seed: int, batch_size: int, config: FiguresConfig | None = None):
    """``i -> (images, targets)`` for the training stream: images ``i·B .. i·B + B - 1``."""
    config = config or FiguresConfig()

    def get_batch(i: int):
        samples = [make_sample(seed, i * batch_size + k, config) for k in range(batch_size)]
        return [s["image"] for s in samples], samples

    return get_batch
