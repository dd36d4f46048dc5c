"""Mask R-CNN (He et al., 2017): Faster R-CNN plus a mask branch, on a ResNet-FPN backbone.

The whole model in forward order::

    raw images ─ transform: normalise, resize (shorter side 800), pad to /32
        ─ ResNet ─ C2..C5 ─ FPN ─ P2..P6
        P2..P6 ─ RPN ─ proposals (+ L_rpn = L_cls + λ·p*·L_box)
        P2..P5, proposals ─ RoIAlign 7×7 ─ box head ─ classes, boxes (+ L_cls, L_box)
        P2..P5, foreground RoIs ─ RoIAlign 14×14 ─ mask head ─ K masks (+ L_mask)
    detections ─ transform: boxes back to each input's pixels, masks pasted there once

``forward(images, targets)`` returns a dict of named losses in training mode (``model.train()``)
and a list of detections in inference mode (``model.eval()``). The total loss is
L = L_cls + L_box + L_mask plus the RPN's two terms (§3).

Inputs: ``images`` is a list of N float arrays (3, H_i, W_i), RGB in [0, 1], of any size (or one
(N, 3, H, W) array); :mod:`minimask.model.transform` resizes them. ``targets`` is a list of N
dicts at the same sizes: ``boxes`` (G, 4) (x1, y1, x2, y2) pixels, ``labels`` (G,) in 1..K-1,
``masks`` (G, H_i, W_i) binary, optionally ``is_crowd`` (G,) booleans.

Detections: N dicts with ``boxes`` (D, 4) float32 pixels of the input image, ``scores`` (D,),
``labels`` (D,) int64 and ``masks`` (D, H_i, W_i) uint8, D <= ``detections_per_image``.
"""

from __future__ import annotations

import numpy as np

from minimask.backend import get_array_module, to_host
from minimask.model.backbone import ResNet
from minimask.model.config import MaskRCNNConfig
from minimask.model.fpn import FPN
from minimask.model.mask_head import MaskHead
from minimask.model.roi_heads import RoIHeads
from minimask.model.rpn import RPN
from minimask.model.transform import ImageTransform
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
        self.transform = ImageTransform(config)

    @property
    def rng(self):
        return self.rpn.rng

    @rng.setter
    def rng(self, generator) -> None:
        """The random generator of both samplers (the trainer sets one per iteration)."""
        self.rpn.rng = generator
        self.roi_heads.rng = generator

    def preprocess(self, images, targets=None):
        """The transform's half before the backbone: ``(batch, sizes, original_sizes, targets)``.

        ``batch`` is the normalised, resized and padded (N, 3, Hp, Wp) Tensor on the model's
        device and in its dtype; ``sizes`` each image's resized (h, w); ``original_sizes`` each
        input's (H, W); ``targets`` the checked targets at the resized sizes (or None).
        """
        weight = self.backbone.stem[0].weight.data  # where the model lives, and its dtype
        xp, dtype = get_array_module(weight), weight.dtype
        return self.transform(images, targets, xp, dtype)

    def forward(self, images, targets=None):
        """Losses (training mode, needs ``targets``) or detections (inference mode)."""
        if self.training and targets is None:
            raise ValueError("training mode needs targets; call model.eval() to predict")
        if targets is not None and len(targets) != len(images):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        x, sizes, original_sizes, targets = self.preprocess(images, targets)
        padded = tuple(x.shape[-2:])
        rpn_features, head_features = self.features(x)
        if self.training:
            proposals, losses = self.rpn(rpn_features, sizes, padded, targets)
            losses.update(self.detector_losses(head_features, proposals, sizes, padded, targets))
            return losses
        proposals, _ = self.rpn(rpn_features, sizes, padded)
        detections = self.detect(head_features, proposals, sizes, padded)
        return self.transform.postprocess(detections, sizes, original_sizes)

    # The three seams below split the model where the slides' 4-step training splits it: the
    # shared features, the RPN (``self.rpn``), and the detector (box and mask heads) on given
    # proposals.
    def features(self, x):
        """The backbone on a preprocessed batch: ``(rpn_features, head_features)``.

        FPN: the RPN sees [P2..P6] and the heads pool from [P2..P5].
        """
        features = self.fpn(self.backbone(x))  # [P2, P3, P4, P5, P6]
        return features, features[:4]

    def detector_losses(self, features, proposals, sizes, padded, targets) -> dict:
        """The box and mask heads' losses on ``proposals`` (N arrays (P_i, 4), padded pixels)."""
        losses, sampled = self.roi_heads(features, proposals, sizes, padded, targets)
        losses["loss_mask"] = self.mask_head.loss(features, sampled, targets, padded)
        return losses

    def detect(self, features, proposals, sizes, padded) -> list[dict]:
        """Detections at the resized sizes: boxes, scores, labels and 28×28 ``mask_logits``."""
        detections, _ = self.roi_heads(features, proposals, sizes, padded)
        self.mask_head.predict(features, detections, padded)
        return detections

    # The model's parameters in the three groups that 4-step alternating training trains in turn
    # (minimask.alternating); every parameter belongs to exactly one group.
    def shared_modules(self) -> list[Module]:
        """The modules computing the features that both the RPN and the heads read."""
        return [self.backbone, self.fpn]

    def rpn_modules(self) -> list[Module]:
        """The RPN's own layers (on the shared features)."""
        return [self.rpn]

    def detector_modules(self) -> list[Module]:
        """The detector's own layers: the box head and the mask head."""
        return [self.roi_heads, self.mask_head]


def detections_to_host(detections) -> list[dict]:
    """Detections as NumPy arrays (copied from the GPU when needed)."""
    return [{k: np.asarray(to_host(v)) for k, v in d.items()} for d in detections]
