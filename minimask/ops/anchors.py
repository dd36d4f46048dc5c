"""Anchors: the reference boxes the RPN classifies and regresses (Faster R-CNN, Ren et al. 2015,
§3.1.1; FPN, Lin et al. 2017, §4.1).

At every location of a feature map the RPN considers ``A = len(aspect_ratios) * len(sizes)``
boxes centred on that location, one per (aspect ratio, size) pair. A size ``s`` and an aspect
ratio ``r = height / width`` give a box of area about ``s * s``:

    width = s / sqrt(r)        height = s * sqrt(r)

These ``A`` *base anchors* are centred on (0, 0) (and their corners rounded to whole pixels, as
torchvision does), then copied to every location ``(x, y) * stride`` of the feature map, where
``stride`` is the number of image pixels between two neighbouring feature-map cells.

Two designs of Mask R-CNN (§3, "Network Architecture"):

* **C4**: one feature map (ResNet's conv4, stride 16) with all 5 sizes × 3 ratios = 15 anchors
  per location: :meth:`AnchorGenerator.c4`.
* **FPN**: 5 levels P2–P6 (strides 4 to 64), one size per level (32 to 512) × 3 ratios = 3 anchors
  per location, each level seeing the objects of its scale: :meth:`AnchorGenerator.fpn`.

Ordering (identical to torchvision's ``AnchorGenerator``, so weights and targets line up): levels
in order; within a level, locations row-major (y outer, x inner); within a location, base anchors
ratio-major (ratio outer, size inner). The RPN head's outputs follow the same order.

Boxes are ``(x1, y1, x2, y2)`` in image pixels (see :mod:`minimask.ops.boxes`); anchors near the
border stick out of the image, as in the papers.

Shape letters:
    A       anchors per location (ratios × sizes)
    Hf, Wf  height and width of one feature map
    L       feature-map levels
"""

from __future__ import annotations

import numpy as np


def base_anchors(sizes, aspect_ratios, dtype=np.float32):
    """The ``A`` anchors of one location, centred on (0, 0): shape (A, 4).

    Row ``i * len(sizes) + j`` has ratio ``aspect_ratios[i]`` and size ``sizes[j]``. The corners
    ``(-w/2, -h/2, w/2, h/2)`` are computed in float32 and rounded half-to-even to whole pixels,
    exactly as torchvision's ``AnchorGenerator.generate_anchors``.
    """
    sizes = np.asarray(sizes, dtype=np.float32)  # (S,)
    ratios = np.asarray(aspect_ratios, dtype=np.float32)  # (Q,)
    h_ratios = np.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * sizes[None, :]).reshape(-1)  # (A,) = (Q * S,)
    hs = (h_ratios[:, None] * sizes[None, :]).reshape(-1)  # (A,)
    corners = np.stack([-ws, -hs, ws, hs], axis=1) / 2  # (A, 4)
    return np.round(corners).astype(dtype)


def grid_anchors(base, grid_size, stride, xp=np):
    """Copy the (A, 4) ``base`` anchors to every cell of a feature map: shape (Hf * Wf * A, 4).

    Cell ``(y, x)`` is centred on image pixel ``(x * stride_x, y * stride_y)``.

    Args:
        base: (A, 4) anchors centred on (0, 0), from :func:`base_anchors`.
        grid_size: ``(Hf, Wf)`` of the feature map.
        stride: ``(stride_y, stride_x)`` in image pixels per feature-map cell.
        xp: numpy or cupy, where the anchors are made.
    """
    grid_h, grid_w = (int(v) for v in grid_size)
    stride_y, stride_x = (int(v) for v in stride)
    shift_x = xp.arange(grid_w, dtype=xp.int64) * stride_x  # (Wf,)
    shift_y = xp.arange(grid_h, dtype=xp.int64) * stride_y  # (Hf,)
    shift_y, shift_x = xp.meshgrid(shift_y, shift_x, indexing="ij")  # (Hf, Wf) each
    shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)  # (Hf * Wf,)
    shifts = xp.stack([shift_x, shift_y, shift_x, shift_y], axis=1)  # (Hf * Wf, 4)
    base = xp.asarray(base)
    anchors = shifts[:, None, :].astype(base.dtype) + base[None, :, :]  # (Hf * Wf, A, 4)
    return anchors.reshape(-1, 4)  # (Hf * Wf * A, 4)


class AnchorGenerator:
    """Anchors for every level of a feature pyramid (or the single map of the C4 design).

    Args:
        sizes: per level, the anchor sizes in pixels, e.g. ``((32,), (64,), ...)`` for FPN.
        aspect_ratios: per level, the ratios ``height / width``; one tuple, e.g.
            ``(0.5, 1.0, 2.0)``, is used for every level.

    Call it with the (padded) image size and the feature-map sizes; the stride of each level is
    ``image_size // feature_size`` per axis, as in torchvision.
    """

    def __init__(self, sizes, aspect_ratios=(0.5, 1.0, 2.0)):
        sizes = tuple(tuple(level) for level in sizes)
        if not isinstance(aspect_ratios[0], (tuple, list)):
            aspect_ratios = (tuple(aspect_ratios),) * len(sizes)
        aspect_ratios = tuple(tuple(level) for level in aspect_ratios)
        if len(sizes) != len(aspect_ratios):
            raise ValueError(
                f"sizes has {len(sizes)} levels but aspect_ratios has {len(aspect_ratios)}"
            )
        self.sizes = sizes
        self.aspect_ratios = aspect_ratios
        # (A_l, 4) per level, made once; float32 like torchvision's, cast when called.
        self.cell_anchors = [base_anchors(s, r) for s, r in zip(sizes, aspect_ratios)]

    @classmethod
    def c4(cls, sizes=(32, 64, 128, 256, 512), aspect_ratios=(0.5, 1.0, 2.0)):
        """The C4 design: one feature map, 15 anchors per location (Mask R-CNN §3)."""
        return cls((tuple(sizes),), aspect_ratios)

    @classmethod
    def fpn(cls, sizes=(32, 64, 128, 256, 512), aspect_ratios=(0.5, 1.0, 2.0)):
        """The FPN design: one size per level P2..P6, 3 anchors per location (FPN §4.1)."""
        return cls(tuple((s,) for s in sizes), aspect_ratios)

    def __repr__(self) -> str:
        return f"AnchorGenerator(sizes={self.sizes}, aspect_ratios={self.aspect_ratios})"

    @property
    def num_levels(self) -> int:
        return len(self.sizes)

    def num_anchors_per_location(self) -> list[int]:
        """``A`` for each level: the number of anchor channels the RPN head predicts."""
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios)]

    def strides(self, image_size, feature_sizes) -> list[tuple[int, int]]:
        """``(stride_y, stride_x)`` of each level: ``image_size // feature_size``."""
        height, width = image_size
        return [(int(height) // int(fh), int(width) // int(fw)) for fh, fw in feature_sizes]

    def per_level(self, image_size, feature_sizes, xp=np, dtype=np.float32):
        """The anchors of each level: a list of L arrays of shape (Hf_l * Wf_l * A_l, 4).

        Args:
            image_size: ``(height, width)`` of the (padded) image batch.
            feature_sizes: ``[(Hf, Wf), ...]``, one per level, in the order of ``sizes``.
            xp, dtype: where and in which float type to make them.
        """
        if len(feature_sizes) != self.num_levels:
            raise ValueError(
                f"{len(feature_sizes)} feature maps given, but the generator has "
                f"{self.num_levels} levels of sizes {self.sizes}"
            )
        strides = self.strides(image_size, feature_sizes)
        return [
            grid_anchors(base.astype(dtype), grid, stride, xp=xp)
            for base, grid, stride in zip(self.cell_anchors, feature_sizes, strides)
        ]

    def __call__(self, image_size, feature_sizes, xp=np, dtype=np.float32):
        """All anchors of one image, levels concatenated: shape (sum_l Hf_l * Wf_l * A_l, 4).

        The same rows, in the same order, as torchvision's ``AnchorGenerator`` for one image.
        """
        return xp.concatenate(self.per_level(image_size, feature_sizes, xp=xp, dtype=dtype))
