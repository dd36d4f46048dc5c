"""Mask R-CNN (He et al., 2017): Faster R-CNN plus a mask branch, on a ResNet-FPN backbone (or
the paper's other design, ResNet-C4: :mod:`minimask.model.c4`, picked by ``config.layout`` in
:func:`build_layout`).

The whole model in forward order (FPN)::

    raw images ─ transform: normalise, resize (shorter side 800), pad to /32
        ─ ResNet ─ C2..C5 ─ FPN ─ P2..P6
        P2..P6 ─ RPN ─ proposals (+ L_rpn = L_cls + λ·p*·L_box)
        P2..P5, proposals ─ RoIAlign 7×7 ─ box head ─ classes, boxes (+ L_cls, L_box)
        P2..P5, foreground RoIs ─ RoIAlign 14×14 ─ mask head ─ K masks (+ L_mask)
        P2..P5, foreground RoIs ─ RoIAlign 14×14 ─ keypoint head ─ K heatmaps (+ L_keypoint, §5)
    detections ─ transform: boxes back to each input's pixels, masks pasted there once

``forward(images, targets)`` returns a dict of named losses in training mode (``model.train()``)
and a list of detections in inference mode (``model.eval()``). The total loss is
L = L_cls + L_box + L_mask plus the RPN's two terms (§3).

Inputs: ``images`` is a list of N float arrays (3, H_i, W_i), RGB in [0, 1], of any size (or one
(N, 3, H, W) array); :mod:`minimask.model.transform` resizes them. ``targets`` is a list of N
dicts at the same sizes: ``boxes`` (G, 4) (x1, y1, x2, y2) pixels, ``labels`` (G,) in 1..K-1,
``masks`` (G, H_i, W_i) binary, optionally ``is_crowd`` (G,) booleans; with a keypoint head
(``config.num_keypoints`` > 0) also ``keypoints`` (G, K, 3) (x, y, visibility) pixels. The mask
head is optional (``config.mask_head="none"``; torchvision's Keypoint R-CNN has none), and so are
masks then.

Detections: N dicts with ``boxes`` (D, 4) float32 pixels of the input image, ``scores`` (D,),
``labels`` (D,) int64 and ``masks`` (D, H_i, W_i) uint8, D <= ``detections_per_image``; with a
keypoint head also ``keypoints`` (D, K, 3) (x, y, 1) pixels and ``keypoints_scores`` (D, K).
"""

from __future__ import annotations

import numpy as np

from minimask.backend import get_array_module, to_host
from minimask.model.backbone import ResNet
from minimask.model.c4 import Res5Head
from minimask.model.config import MaskRCNNConfig
from minimask.model.fpn import FPN
from minimask.model.keypoint_head import KeypointHead
from minimask.model.mask_head import MaskHead, MLPMaskHead
from minimask.model.roi_heads import RoIHeads
from minimask.model.rpn import RPN
from minimask.model.transform import ImageTransform
from minimask.nn import Module
from minimask.ops.anchors import AnchorGenerator

MASK_HEADS = {"fcn": MaskHead, "mlp": MLPMaskHead}  # config.mask_head -> the class


def build_layout(model: MaskRCNN, config: MaskRCNNConfig) -> None:
    """Give ``model`` the parts of ``config.layout``: the one place that tells FPN from C4.

    FPN: ResNet C2..C5, the FPN, the RPN over P2..P6, the box head's two FC layers, the mask FCN
    pooling its own 14×14. C4: ResNet C2..C4, the RPN on C4 with every anchor size at one level,
    res5 as the box head (:class:`~minimask.model.c4.Res5Head`), and the mask head reading
    res5's maps through the box head.
    """
    if config.layout == "fpn":
        model.backbone = ResNet(config)
        model.fpn = FPN(model.backbone.out_channels, config.fpn_channels)
        anchors = AnchorGenerator.fpn(config.anchor_sizes, config.aspect_ratios)
        model.rpn = RPN(config, config.fpn_channels, anchors)
        model.roi_heads = RoIHeads(config, config.fpn_channels)
        head_channels = config.fpn_channels
        if config.has_masks:
            model.mask_head = MASK_HEADS[config.mask_head](config, config.fpn_channels)
    elif config.layout == "c4":
        model.backbone = ResNet(config, num_stages=3)  # stem, C2, C3, C4
        c4 = model.backbone.out_channels[-1]
        anchors = AnchorGenerator.c4(config.anchor_sizes, config.aspect_ratios)
        model.rpn = RPN(config, c4, anchors)
        res5 = Res5Head(config)
        model.roi_heads = RoIHeads(config, c4, head=res5, width=res5.out_channels)
        head_channels = c4
        if config.has_masks:
            model.mask_head = MASK_HEADS[config.mask_head](
                config, res5.out_channels, roi_features=model.roi_heads.box_features
            )
    elif config.layout == "c5":  # Table 2d's ablation: stride 32, the FPN layout's heads
        model.backbone = ResNet(config)
        c5 = model.backbone.out_channels[-1]
        anchors = AnchorGenerator.c4(config.anchor_sizes, config.aspect_ratios)  # one level
        model.rpn = RPN(config, c5, anchors)
        model.roi_heads = RoIHeads(config, c5)
        head_channels = c5
        if config.has_masks:
            model.mask_head = MASK_HEADS[config.mask_head](config, c5)
    else:  # the config refuses other values; this guards a config built around its check
        raise ValueError(f"config.layout={config.layout!r}; use 'fpn', 'c4' or 'c5'")
    if config.num_keypoints:  # Mask R-CNN §5: the keypoint branch, pooling the heads' maps
        model.keypoint_head = KeypointHead(config, head_channels)


class MaskRCNN(Module):
    def __init__(self, config: MaskRCNNConfig):
        super().__init__()
        self.config = config
        build_layout(self, config)
        self.transform = ImageTransform(config)

    # What 4-step alternating training shares and trains in turn (Faster R-CNN §3.2).
    def shared_modules(self) -> list[Module]:
        """The feature extractor the RPN and the detector share: [backbone, fpn] (FPN), or
        [the ResNet trunk up to C4] (C4), [the ResNet] (C5)."""
        return [self.backbone, self.fpn] if self.config.layout == "fpn" else [self.backbone]

    def rpn_modules(self) -> list[Module]:
        """The RPN's own layers: [rpn]."""
        return [self.rpn]

    def detector_modules(self) -> list[Module]:
        """The detector's own layers: [roi_heads, mask_head, keypoint_head], those the model has
        (C4: res5, the box head, is ``roi_heads.head``)."""
        heads = [self.roi_heads]
        heads += [self.mask_head] if self.config.has_masks else []
        return heads + ([self.keypoint_head] if self.config.num_keypoints else [])

    def freeze_backbone(self, trainable: int) -> None:
        """Train only the last ``trainable`` of the ResNet's (stem, C2, C3, C4, C5), as
        ``config.trainable_stages``; in C4, C5 is res5 in the box head."""
        self.backbone.freeze(trainable)
        if isinstance(self.roi_heads.head, Res5Head):
            self.roi_heads.head.freeze(trainable)

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

        FPN: the RPN sees [P2..P6] and the heads pool from [P2..P5]. C4 (C5): both see [C4]
        ([C5]).
        """
        if self.config.layout in ("c4", "c5"):  # one map: C4 (N, c4, H/16, W/16) or C5 (H/32)
            top = self.backbone(x)[-1]
            return [top], [top]
        features = self.fpn(self.backbone(x))  # [P2, P3, P4, P5, P6]
        return features, features[:4]

    def detector_losses(self, features, proposals, sizes, padded, targets) -> dict:
        """The box and mask heads' losses on ``proposals`` (N arrays (P_i, 4), padded pixels)."""
        heads = self.roi_heads
        sampled = heads.sample_proposals(proposals, targets)
        box_features = heads.box_features(features, [s[0] for s in sampled], padded)
        losses = heads.loss(box_features, sampled)
        if self.config.has_masks:
            losses["loss_mask"] = self.mask_head.loss(
                features, sampled, targets, padded, box_features
            )
        if self.config.num_keypoints:
            losses["loss_keypoint"] = self.keypoint_head.loss(features, sampled, targets, padded)
        return losses

    def detect(self, features, proposals, sizes, padded) -> list[dict]:
        """Detections at the resized sizes: boxes, scores, labels, 28×28 ``mask_logits`` (with a
        mask head) and ``keypoints``, ``keypoints_scores`` (with a keypoint head)."""
        detections, _ = self.roi_heads(features, proposals, sizes, padded)
        if self.config.has_masks:
            self.mask_head.predict(features, detections, padded)
        if self.config.num_keypoints:
            self.keypoint_head.predict(features, detections, padded)
        return detections


def detections_to_host(detections) -> list[dict]:
    """Detections as NumPy arrays (copied from the GPU when needed)."""
    return [{k: np.asarray(to_host(v)) for k, v in d.items()} for d in detections]
