"""Mask R-CNN (He et al., 2017): Faster R-CNN plus a mask branch, on a ResNet-FPN backbone.

The whole model in forward order::

    images ─ normalise, pad to /32 ─ ResNet ─ C2..C5 ─ FPN ─ P2..P6
        P2..P6 ─ RPN ─ proposals (+ L_rpn = L_cls + λ·p*·L_box)
        P2..P5, proposals ─ RoIAlign 7×7 ─ box head ─ classes, boxes (+ L_cls, L_box)
        P2..P5, foreground RoIs ─ RoIAlign 14×14 ─ mask head ─ K masks (+ L_mask)

``forward(images, targets)`` returns a dict of named losses in training mode (``model.train()``)
and a list of detections in inference mode (``model.eval()``). The total loss is
L = L_cls + L_box + L_mask plus the RPN's two terms (§3).

Inputs: ``images`` is a list of N float arrays (3, H_i, W_i), RGB in [0, 1] (or one (N, 3, H, W)
array). ``targets`` is a list of N dicts: ``boxes`` (G, 4) (x1, y1, x2, y2) pixels, ``labels``
(G,) in 1..K-1, ``masks`` (G, H_i, W_i) binary, optionally ``is_crowd`` (G,) booleans.

Detections: N dicts with ``boxes`` (D, 4) float32 pixels of the input image, ``scores`` (D,),
``labels`` (D,) int64 and ``masks`` (D, H_i, W_i) uint8, D <= ``detections_per_image``.
"""

from __future__ import annotations

import numpy as np

from minimask.backend import get_array_module, to_host
from minimask.engine import Tensor
from minimask.model.backbone import ResNet
from minimask.model.config import MaskRCNNConfig
from minimask.model.fpn import FPN
from minimask.model.mask_head import MaskHead
from minimask.model.roi_heads import RoIHeads
from minimask.model.rpn import RPN
from minimask.nn import Module


class MaskRCNN(Module):
    def __init__(self, config: MaskRCNNConfig):
        super().__init__()
        self.config = config
        self.backbone = ResNet(config)
        self.fpn = FPN(self.backbone.out_channels, config.fpn_channels)
        self.rpn = RPN(config, config.fpn_channels)
        self.roi_heads = RoIHeads(config, config.fpn_channels)
        self.mask_head = MaskHead(config, config.fpn_channels)

    @property
    def rng(self):
        return self.rpn.rng

    @rng.setter
    def rng(self, generator) -> None:
        """The random generator of both samplers (the trainer sets one per iteration)."""
        self.rpn.rng = generator
        self.roi_heads.rng = generator

    def preprocess(self, images) -> tuple[Tensor, list[tuple[int, int]], tuple[int, int]]:
        """Normalise with the config's mean/std and pad to a multiple of ``size_divisible``.

        Returns the batch (N, 3, H, W), each image's (height, width), and the padded (H, W).
        """
        weight = self.backbone.stem[0].weight.data  # where the model lives, and its dtype
        xp, dtype = get_array_module(weight), weight.dtype
        images = [xp.asarray(im, dtype=dtype) for im in images]
        for i, im in enumerate(images):
            if im.ndim != 3 or im.shape[0] != 3:
                raise ValueError(f"image {i} has shape {im.shape}; expected (3, H, W) RGB")
        sizes = [tuple(int(s) for s in im.shape[1:]) for im in images]
        d = self.config.size_divisible
        height = -(-max(h for h, _ in sizes) // d) * d  # round up to a multiple of d
        width = -(-max(w for _, w in sizes) // d) * d
        mean = xp.asarray(self.config.image_mean, dtype=dtype).reshape(3, 1, 1)
        std = xp.asarray(self.config.image_std, dtype=dtype).reshape(3, 1, 1)
        batch = xp.zeros((len(images), 3, height, width), dtype=dtype)
        for i, (im, (h, w)) in enumerate(zip(images, sizes)):
            batch[i, :, :h, :w] = (im - mean) / std
        return Tensor(batch), sizes, (height, width)

    def forward(self, images, targets=None):
        """Losses (training mode, needs ``targets``) or detections (inference mode)."""
        if self.training and targets is None:
            raise ValueError("training mode needs targets; call model.eval() to predict")
        if targets is not None and len(targets) != len(images):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        x, sizes, padded = self.preprocess(images)
        features = self.fpn(self.backbone(x))  # [P2, P3, P4, P5, P6]
        pooled_levels = features[:4]  # the heads pool from P2..P5
        if self.training:
            proposals, losses = self.rpn(features, sizes, padded, targets)
            box_losses, sampled = self.roi_heads(pooled_levels, proposals, sizes, padded, targets)
            losses.update(box_losses)
            losses["loss_mask"] = self.mask_head.loss(pooled_levels, sampled, targets, padded)
            return losses
        proposals, _ = self.rpn(features, sizes, padded)
        detections, _ = self.roi_heads(pooled_levels, proposals, sizes, padded)
        self.mask_head.predict(pooled_levels, detections, sizes, padded)
        return detections


def detections_to_host(detections) -> list[dict]:
    """Detections as NumPy arrays (copied from the GPU when needed)."""
    return [{k: np.asarray(to_host(v)) for k, v in d.items()} for d in detections]
