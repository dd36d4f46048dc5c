"""The mask branch of Mask R-CNN (§3): one small FCN per RoI, one M×M mask per class.

Each foreground RoI is pooled to 14×14 by multi-scale RoIAlign, goes through four 3×3 convs, a 2×
transposed conv (to 28×28) and a 1×1 conv to K mask logits. Only the mask of the RoI's class is
trained (:func:`minimask.ops.losses.mask_loss`): classes do not compete, the box branch decides the
class. The target is the GT mask cropped to the RoI and resized to 28×28 by RoIAlign of the binary
mask (Mask R-CNN §3, "the mask target is the intersection between an RoI and its GT mask").

At inference each detection keeps the 28×28 logits of its predicted class; the model's transform
(:mod:`minimask.model.transform`) pastes their probabilities once, into the original image.

Shape letters: R RoIs, K classes, M = 28 the mask size, G GT masks, D detections, H×W image size.
"""

from __future__ import annotations

from minimask.backend import get_array_module
from minimask.engine import Tensor, no_grad
from minimask.model.config import MaskRCNNConfig
from minimask.nn import Conv2d, ConvTranspose2d, Module, ModuleList, init
from minimask.ops.losses import mask_loss
from minimask.ops.poolers import MultiScaleRoIAlign
from minimask.ops.roi_align import roi_align_forward


class MaskHead(Module):
    """(R, C, 14, 14) pooled features -> (R, K, 28, 28) mask logits."""

    def __init__(self, config: MaskRCNNConfig, channels: int):
        super().__init__()
        self.pooler = MultiScaleRoIAlign(
            config.mask_pool_size, config.pool_sampling_ratio, aligned=config.roi_align_aligned
        )
        convs, c_in = [], channels
        for width in config.mask_conv_channels:
            convs.append(Conv2d(c_in, width, 3, padding=1))
            c_in = width
        self.convs = ModuleList(convs)
        self.upsample = ConvTranspose2d(c_in, c_in, 2, stride=2)
        self.logits = Conv2d(c_in, config.num_classes, 1)
        for layer in [*self.convs, self.upsample, self.logits]:  # torchvision's mask head init
            init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            init.zeros_(layer.bias)

    def forward(self, features, boxes, padded_size) -> Tensor:
        """Mask logits (R, K, 28, 28) for per-image boxes (a list of (R_i, 4) arrays)."""
        x = self.pooler(features, boxes, [padded_size])  # (R, C, 14, 14)
        for conv in self.convs:
            x = conv(x, relu=True)
        return self.logits(self.upsample(x).relu())

    def loss(self, features, sampled, targets, padded_size) -> Tensor:
        """L_mask on the foreground RoIs of the box head's sampled minibatch."""
        boxes, labels, matched = [], [], []
        for rois, lab, matches, _ in sampled:
            fg = get_array_module(lab).flatnonzero(lab > 0)
            boxes.append(rois[fg])
            labels.append(lab[fg])
            matched.append(matches[fg])
        xp = get_array_module(labels[0])
        logits = self.forward(features, boxes, padded_size)  # (R, K, M, M)
        m = logits.shape[-1]  # the targets take the logits' size, whatever the head's layers
        mask_targets = [
            project_masks(t["masks"], b, g, m) for t, b, g in zip(targets, boxes, matched)
        ]
        return mask_loss(logits, xp.concatenate(labels), xp.concatenate(mask_targets))

    @no_grad()
    def predict(self, features, detections, padded_size) -> None:
        """Add ``mask_logits`` (D, M, M), the logits of each detection's class, in place."""
        boxes = [d["boxes"] for d in detections]
        logits = self.forward(features, boxes, padded_size).data  # (D, K, M, M)
        xp = get_array_module(logits)
        start = 0
        for det in detections:
            d = len(det["boxes"])
            det["mask_logits"] = logits[xp.arange(start, start + d), det["labels"]]  # (D, M, M)
            start += d


def project_masks(gt_masks, boxes, matches, size: int):
    """GT masks cropped to ``boxes`` and resized to size×size: (R, size, size) in [0, 1].

    Args:
        gt_masks: (G, H, W) binary masks of one image.
        boxes: (R, 4) RoIs in pixels; matches: (R,) the GT index of each RoI.
    """
    xp = get_array_module(boxes)
    if len(boxes) == 0:
        return xp.zeros((0, size, size), dtype=boxes.dtype)
    masks = xp.asarray(gt_masks, dtype=boxes.dtype)[:, None]  # (G, 1, H, W)
    rois = xp.concatenate([matches[:, None].astype(boxes.dtype), boxes], axis=1)  # (R, 5)
    out, _ = roi_align_forward(masks, rois, size, 1.0, -1, False)  # torchvision's settings
    return out[:, 0]  # (R, size, size)
