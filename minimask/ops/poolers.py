"""Multi-scale RoIAlign: pool each RoI from the FPN level that matches its size.

Shape letters: L pyramid levels, N images, C channels (the same on every level), K RoIs,
PH×PW the output grid. RoIs are (K, 5) rows ``[n, x1, y1, x2, y2]`` in image pixels; the
per-image form is a list of (Ki, 4) boxes ``(x1, y1, x2, y2)`` (see ``boxes.py``).

The level of a RoI (FPN, Lin et al. 2017, §4.2 eq. 1), as torchvision's ``LevelMapper``::

    k = floor(k0 + log2(sqrt(w * h) / 224) + 1e-6),   clamped to [k_min, k_max]

A 224×224 box (ImageNet's size) goes to level k0 = 4 (stride 16); each halving of the box's side
moves it one level finer. Level k has stride 2^k, so its ``spatial_scale`` is 2^-k. As torchvision
does, the scales are inferred from the feature and image heights (rounded to powers of two), and
k_min, k_max are the levels of the first and last feature map given.

Mask R-CNN with FPN (§3, "Network Architecture") pools its box head (7×7) and mask head (14×14)
this way; the RoIAlign itself is :mod:`minimask.ops.roi_align`. With a single map (the C4 design)
every RoI pools from it. The op is a choice (:data:`POOL_OPS`): RoIAlign, or Fast R-CNN's RoIPool
(:mod:`minimask.ops.roi_pool`) for the paper's Table 2c ablation.
"""

from __future__ import annotations

import math

import numpy as np

from minimask.backend import get_array_module, to_host
from minimask.engine.tensor import Function, Tensor
from minimask.ops.roi_align import as_pair, roi_align_backward, roi_align_forward
from minimask.ops.roi_pool import roi_pool_backward, roi_pool_forward


def _roi_pool_forward(features, rois, output_size, spatial_scale, sampling_ratio, aligned):
    """RoIPool with RoIAlign's arguments: it has no samples and no half-pixel shift."""
    return roi_pool_forward(features, rois, output_size, spatial_scale)


# The pooling ops a pooler can use, by name: (forward, backward) on plain arrays, with
# RoIAlign's arguments (features, rois, output_size, spatial_scale, sampling_ratio, aligned).
POOL_OPS = {
    "roi_align": (roi_align_forward, roi_align_backward),
    "roi_pool": (_roi_pool_forward, roi_pool_backward),
}


def infer_scale(feature_size: int, image_size: int) -> float:
    """The stride-derived scale of a map: ``2 ** round(log2(feature_size / image_size))``."""
    return float(2.0 ** np.round(np.log2(feature_size / image_size)))


def map_levels(boxes, k_min: int, k_max: int, canonical_scale=224, canonical_level=4, eps=1e-6):
    """The pyramid level of every box, counted from ``k_min``: (K,) integers in [0, k_max - k_min].

    Args:
        boxes: (K, 4) ``(x1, y1, x2, y2)`` in image pixels.
        k_min, k_max: the levels (log2 of the strides) of the finest and coarsest maps.
    """
    xp = get_array_module(boxes)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    with np.errstate(divide="ignore"):  # an empty box: log2(0) = -inf, clamped to k_min
        level = xp.floor(canonical_level + xp.log2(xp.sqrt(area) / canonical_scale) + eps)
    return (xp.clip(level, k_min, k_max) - k_min).astype(np.int64)


def boxes_to_rois(boxes):
    """A list of (Ki, 4) boxes, one array per image, as (sum Ki, 5) ``[n, x1, y1, x2, y2]`` rois."""
    xp = get_array_module(*boxes)
    parts = [
        xp.concatenate([xp.full((len(b), 1), n, dtype=b.dtype), b], axis=1)
        for n, b in enumerate(boxes)
    ]
    return xp.concatenate(parts, axis=0)


class MultiScaleRoIAlignFn(Function):
    """RoIAlign (or RoIPool, ``op``) of each RoI on its own level, as one engine op over the L
    level maps."""

    def forward(
        self,
        *levels,
        rois=None,
        level_of=None,
        scales=None,
        output_size=7,
        sampling_ratio=-1,
        aligned=False,
        op="roi_align",
    ):
        pool_forward, self.pool_backward = POOL_OPS[op]
        xp = get_array_module(levels[0])
        C = levels[0].shape[1]
        PH, PW = as_pair(output_size)
        out = xp.zeros((rois.shape[0], C, PH, PW), dtype=levels[0].dtype)
        # Which RoIs each level pools: how many is shape logic the host needs, so read the levels
        # in one explicit download (one sync, not one per level) and upload their order once.
        level_host = to_host(level_of)
        order = np.argsort(level_host, kind="stable")  # (K,) the RoIs level by level
        bounds = np.searchsorted(level_host[order], np.arange(len(levels) + 1))
        order_on_device = xp.asarray(order)
        self.parts = []  # per level: (which RoIs, what its backward needs), or None
        for fmap, scale, k in zip(levels, scales, range(len(levels))):  # a few levels
            if bounds[k] == bounds[k + 1]:
                self.parts.append(None)
                continue
            index = order_on_device[bounds[k] : bounds[k + 1]]  # (K_k,) this level's RoIs
            pooled, saved = pool_forward(
                fmap, rois[index], (PH, PW), scale, sampling_ratio, aligned
            )
            out[index] = pooled
            self.parts.append((index, saved))
        return out

    def backward(self, grad):
        return tuple(
            None
            if part is None or not self.wants(k)
            else self.pool_backward(grad[part[0]], part[1])
            for k, part in enumerate(self.parts)
        )


def multiscale_roi_align(
    features: list[Tensor],
    rois,
    scales: list[float],
    output_size,
    sampling_ratio: int = -1,
    aligned: bool = False,
    canonical_scale: int = 224,
    canonical_level: int = 4,
    op: str = "roi_align",
) -> Tensor:
    """Pool every RoI from the level of its size and return the results in RoI order.

    Args:
        features: L tensors (N, C, Hl, Wl), finest first.
        rois: (K, 5) rows ``[n, x1, y1, x2, y2]`` in image pixels.
        scales: L spatial scales (``1 / stride``), powers of two.
        output_size, sampling_ratio, aligned: as :func:`minimask.ops.roi_align.roi_align`.
        op: ``"roi_align"`` or ``"roi_pool"`` (which ignores ``sampling_ratio`` and ``aligned``).

    Returns:
        (K, C, PH, PW).
    """
    if op not in POOL_OPS:
        raise ValueError(f"pooling op {op!r}; use one of {', '.join(POOL_OPS)}")
    rois = rois.data if isinstance(rois, Tensor) else rois
    xp = get_array_module(features[0].data)
    rois = xp.asarray(rois)
    if len(features) == 1:  # as torchvision: no level mapping with a single map
        level_of = xp.zeros(rois.shape[0], dtype=np.int64)
    else:
        k_min, k_max = int(-math.log2(scales[0])), int(-math.log2(scales[-1]))
        level_of = map_levels(rois[:, 1:], k_min, k_max, canonical_scale, canonical_level)
    return MultiScaleRoIAlignFn.apply(
        *features,
        rois=rois,
        level_of=level_of,
        scales=scales,
        output_size=output_size,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
        op=op,
    )


class MultiScaleRoIAlign:
    """torchvision's ``MultiScaleRoIAlign`` on minimask tensors (no parameters, just settings).

    Example (box head of Mask R-CNN with FPN)::

        pooler = MultiScaleRoIAlign(output_size=7, sampling_ratio=2)
        pooled = pooler([p2, p3, p4, p5], [boxes_0, boxes_1], [(800, 1216), (800, 1216)])

    ``op="roi_pool"`` pools with Fast R-CNN's RoIPool instead (same levels, same scales).
    """

    def __init__(
        self,
        output_size,
        sampling_ratio: int,
        canonical_scale=224,
        canonical_level=4,
        aligned: bool = False,
        op: str = "roi_align",
    ):
        if op not in POOL_OPS:
            raise ValueError(f"pooling op {op!r}; use one of {', '.join(POOL_OPS)}")
        self.op = op  # "roi_align" (Mask R-CNN) or "roi_pool" (Fast R-CNN)
        self.output_size = as_pair(output_size)
        self.sampling_ratio = sampling_ratio  # samples per bin and axis; <= 0: adaptive
        self.canonical_scale = canonical_scale  # a box of this side goes to canonical_level
        self.canonical_level = canonical_level
        self.aligned = aligned  # False, as torchvision's MultiScaleRoIAlign

    def scales(self, features: list[Tensor], image_sizes) -> list[float]:
        """Each map's scale, from its height and the tallest image (as torchvision)."""
        tallest = max(h for h, _ in image_sizes)
        return [infer_scale(f.shape[2], tallest) for f in features]

    def __call__(self, features: list[Tensor], boxes, image_sizes) -> Tensor:
        """Pool (Ki, 4) ``boxes`` of each image from the L maps ``features`` (finest first).

        ``image_sizes`` are the (height, width) of the images the maps were computed from.
        Returns (sum Ki, C, PH, PW), in the order of the boxes.
        """
        return multiscale_roi_align(
            features,
            boxes_to_rois(boxes),
            self.scales(features, image_sizes),
            self.output_size,
            self.sampling_ratio,
            self.aligned,
            self.canonical_scale,
            self.canonical_level,
            self.op,
        )
