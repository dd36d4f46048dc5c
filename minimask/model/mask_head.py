"""The mask branch of Mask R-CNN (§3): one small FCN per RoI, one M×M mask per class.

Each foreground RoI is pooled to 14×14 by multi-scale RoIAlign, goes through four 3×3 convs, a 2×
transposed conv (to 28×28) and a 1×1 conv to K mask logits. Only the mask of the RoI's class is
trained (:func:`minimask.ops.losses.mask_loss`): classes do not compete, the box branch decides the
class. The target is the GT mask cropped to the RoI and resized to 28×28 by RoIAlign of the binary
mask (Mask R-CNN §3, "the mask target is the intersection between an RoI and its GT mask").

At inference the predicted class's 28×28 probabilities are pasted into the image: resized to the
box by bilinear interpolation and thresholded at 0.5.

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
        self.pooler = MultiScaleRoIAlign(config.mask_pool_size, config.pool_sampling_ratio)
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
        self.threshold = config.mask_threshold

    def forward(self, features, boxes, padded_size) -> Tensor:
        """Mask logits (R, K, 28, 28) for per-image boxes (a list of (R_i, 4) arrays)."""
        x = self.pooler(features, boxes, [padded_size])  # (R, C, 14, 14)
        for conv in self.convs:
            x = conv(x).relu()
        return self.logits(self.upsample(x).relu())

    def loss(self, features, sampled, targets, padded_size) -> Tensor:
        """L_mask on the foreground RoIs of the box head's sampled minibatch."""
        boxes, labels, mask_targets = [], [], []
        for (rois, lab, matches, _), target in zip(sampled, targets):
            fg = get_array_module(lab).flatnonzero(lab > 0)
            boxes.append(rois[fg])
            labels.append(lab[fg])
            mask_targets.append(project_masks(target["masks"], rois[fg], matches[fg], 28))
        xp = get_array_module(labels[0])
        logits = self.forward(features, boxes, padded_size)  # (R, K, 28, 28)
        return mask_loss(logits, xp.concatenate(labels), xp.concatenate(mask_targets))

    @no_grad()
    def predict(self, features, detections, image_sizes, padded_size) -> None:
        """Add ``masks`` (D, H, W) uint8 to each detection dict, in place."""
        boxes = [d["boxes"] for d in detections]
        logits = self.forward(features, boxes, padded_size).data  # (D, K, 28, 28)
        xp = get_array_module(logits)
        start = 0
        for det, size in zip(detections, image_sizes):
            d = len(det["boxes"])
            picked = logits[xp.arange(start, start + d), det["labels"]]  # (D, 28, 28)
            probs = 1 / (1 + xp.exp(-picked))
            det["masks"] = (paste_masks(probs, det["boxes"], size) >= self.threshold).astype(
                xp.uint8
            )
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


def _paste_weights(start, extent, m: int, pixels: int, xp):
    """(D, pixels, m + 2) bilinear weights from a zero-bordered m-wide mask to image pixels.

    Detection d's mask covers [start_d, start_d + extent_d) in pixels. The mask gets a zero
    border of one cell and the box grows by the same fraction (as torchvision's paste), so the
    resized mask fades to 0 at the box edge instead of ending in a step.
    """
    scale = (m + 2) / m
    extent = xp.maximum(extent, 1e-6)  # a zero-width box pastes nothing instead of NaN
    centre = start + extent / 2
    start, extent = centre - extent * scale / 2, extent * scale  # the grown box, (D,)
    px = xp.arange(pixels, dtype=start.dtype) + 0.5  # pixel centres
    u = (px[None, :] - start[:, None]) / extent[:, None] * (m + 2) - 0.5  # (D, pixels)
    u = xp.clip(u, 0, m + 1)  # beyond the border: the zero border cell
    low = xp.minimum(xp.floor(u).astype(xp.int64), m)  # (D, pixels)
    frac = u - low
    weights = xp.zeros((len(start), pixels, m + 2), dtype=start.dtype)
    d, p = xp.indices(low.shape)
    weights[d, p, low] = 1 - frac
    weights[d, p, low + 1] += frac
    return weights


def paste_masks(probs, boxes, image_size):
    """Paste (D, M, M) mask probabilities into (D, H, W) images, each stretched over its box.

    Bilinear resizing is separable, so each pasted mask is ``Wy (H×M') @ P (M'×M') @ Wx^T``
    with M' = M + 2 (the zero border): two batched matrix products, no loop over detections.
    """
    xp = get_array_module(probs)
    height, width = image_size
    d, m = probs.shape[0], probs.shape[-1]
    if d == 0:
        return xp.zeros((0, height, width), dtype=probs.dtype)
    padded = xp.pad(probs, ((0, 0), (1, 1), (1, 1)))  # (D, M+2, M+2)
    boxes = boxes.astype(probs.dtype)
    wy = _paste_weights(boxes[:, 1], boxes[:, 3] - boxes[:, 1], m, height, xp)  # (D, H, M+2)
    wx = _paste_weights(boxes[:, 0], boxes[:, 2] - boxes[:, 0], m, width, xp)  # (D, W, M+2)
    return wy @ padded @ wx.transpose(0, 2, 1)  # (D, H, W)
