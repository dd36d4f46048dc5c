"""The mask branch of Mask R-CNN (§3): one small FCN per RoI, one M×M mask per class.

Each foreground RoI is pooled to 14×14 by multi-scale RoIAlign, goes through four 3×3 convs, a 2×
transposed conv (to 28×28) and a 1×1 conv to K mask logits. Only the mask of the RoI's class is
trained (:func:`minimask.ops.losses.mask_loss`): classes do not compete, the box branch decides the
class. The target is the GT mask cropped to the RoI and resized to M×M by RoIAlign of the binary
mask (Mask R-CNN §3, "the mask target is the intersection between an RoI and its GT mask").

At inference each detection keeps the M×M logits of its predicted class; the model's transform
(:mod:`minimask.model.transform`) pastes their probabilities once, into the original image.

The paper's variants, each a config field (:mod:`minimask.model.config`):

- the C4 layout: no pooling and no 3×3 convs; the head reads the box head's res5 maps (7×7) and
  predicts 14×14 masks (``roi_features``, :mod:`minimask.model.c4`);
- ``mask_head="mlp"``: fully-connected layers instead of convs (Table 2e), :class:`MLPMaskHead`;
- ``mask_class_agnostic``: one mask per RoI instead of K (channel 0 everywhere);
- ``mask_loss="softmax"``: masks compete through a per-pixel softmax
  (:func:`minimask.ops.losses.mask_softmax_loss`, Table 2b's "multinomial").

Shape letters: R RoIs, K classes (1 when class-agnostic), M the mask size (28; 14 for C4),
G GT masks, D detections, H×W image size.
"""

from __future__ import annotations

from minimask.backend import get_array_module
from minimask.engine import Tensor, no_grad
from minimask.model.config import MaskRCNNConfig
from minimask.model.roi_heads import make_pooler
from minimask.nn import Conv2d, ConvTranspose2d, Linear, Module, ModuleList, init
from minimask.ops.losses import mask_loss, mask_softmax_loss
from minimask.ops.roi_align import roi_align_forward


class MaskHead(Module):
    """(R, C, S, S) RoI features -> (R, K, 2S, 2S) mask logits, by the paper's FCN.

    Args:
        config: the model's config (pool size, conv widths, classes and the mask switches).
        channels: C, the channels of the maps it reads.
        roi_features: how the head sees a list of per-image boxes, ``(features, boxes,
            padded_size) -> (R, C, S, S)``. None (FPN): its own RoIAlign, S = mask_pool_size.
            C4 passes the box head's pool + res5, whose output for the sampled RoIs it reuses
            in training.
    """

    def __init__(self, config: MaskRCNNConfig, channels: int, roi_features=None):
        super().__init__()
        self.config = config
        self.pooler = make_pooler(config, config.mask_pool_size) if roi_features is None else None
        self.shared_roi_features = roi_features  # a function, not a sub-module: not saved twice
        outputs = 1 if config.mask_class_agnostic else config.num_classes
        self.build(config, channels, outputs)

    def build(self, config: MaskRCNNConfig, channels: int, outputs: int) -> None:
        """The FCN: 3×3 convs + ReLU, a 2× deconv + ReLU, a 1×1 conv to ``outputs`` masks."""
        convs, c_in = [], channels
        for width in config.mask_conv_channels:
            convs.append(Conv2d(c_in, width, 3, padding=1))
            c_in = width
        self.convs = ModuleList(convs)
        width = config.mask_deconv_channels or c_in  # None: the width the deconv receives
        self.upsample = ConvTranspose2d(c_in, width, 2, stride=2)
        self.logits = Conv2d(width, outputs, 1)
        for layer in [*self.convs, self.upsample, self.logits]:  # torchvision's mask head init
            init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            init.zeros_(layer.bias)

    def layers(self, x: Tensor) -> Tensor:
        """(R, C, S, S) -> (R, K, 2S, 2S) by the FCN."""
        for conv in self.convs:
            x = conv(x, relu=True)
        return self.logits(self.upsample(x).relu())

    def roi_features(self, features, boxes, padded_size) -> Tensor:
        """(R, C, S, S): what the head reads for per-image ``boxes`` (a list of (R_i, 4))."""
        if self.shared_roi_features is not None:
            return self.shared_roi_features(features, boxes, padded_size)
        return self.pooler(features, boxes, [padded_size])

    def forward(self, features, boxes, padded_size) -> Tensor:
        """Mask logits (R, K, M, M) for per-image boxes (a list of (R_i, 4) arrays)."""
        return self.layers(self.roi_features(features, boxes, padded_size))

    def loss(self, features, sampled, targets, padded_size, box_features=None) -> Tensor:
        """L_mask on the foreground RoIs of the box head's sampled minibatch.

        ``box_features``: the box head's output for every sampled RoI; a head that reads the box
        head's maps (C4) takes its foreground rows instead of computing them again.
        """
        boxes, labels, matched, rows, start = [], [], [], [], 0
        for rois, lab, matches, _ in sampled:
            fg = get_array_module(lab).flatnonzero(lab > 0)
            boxes.append(rois[fg])
            labels.append(lab[fg])
            matched.append(matches[fg])
            rows.append(fg + start)
            start += len(lab)
        xp = get_array_module(labels[0])
        if self.shared_roi_features is not None and box_features is not None:
            logits = self.layers(box_features[xp.concatenate(rows)])  # (R, K, M, M)
        else:
            logits = self.forward(features, boxes, padded_size)  # (R, K, M, M)
        m = logits.shape[-1]  # the targets take the logits' size, whatever the head's layers
        mask_targets = xp.concatenate(
            [project_masks(t["masks"], b, g, m) for t, b, g in zip(targets, boxes, matched)]
        )
        labels = xp.concatenate(labels)
        if self.config.mask_loss == "softmax":
            return mask_softmax_loss(logits, labels, mask_targets)
        if self.config.mask_class_agnostic:
            labels = xp.zeros_like(labels)  # the one mask, channel 0
        return mask_loss(logits, labels, mask_targets)

    @no_grad()
    def predict(self, features, detections, padded_size) -> None:
        """Add ``mask_logits`` (D, M, M) to each detection in place: the logit whose sigmoid is
        the mask probability of the detection's class (of the one mask when class-agnostic)."""
        boxes = [d["boxes"] for d in detections]
        logits = self.forward(features, boxes, padded_size).data  # (D, K, M, M)
        xp = get_array_module(logits)
        if self.config.mask_loss == "softmax":
            logits = softmax_log_odds(logits)
        start = 0
        for det in detections:
            d = len(det["boxes"])
            channel = 0 if self.config.mask_class_agnostic else det["labels"]
            det["mask_logits"] = logits[xp.arange(start, start + d), channel]  # (D, M, M)
            start += d


def softmax_log_odds(logits):
    """Per channel k, ``log(p_k / (1 - p_k))`` with ``p = softmax(logits)`` over axis 1.

    So ``sigmoid`` of the result is the softmax probability of class k, and the transform pastes
    softmax masks as it pastes sigmoid ones. ``1 - p_k`` is the softmax mass of the other
    channels, so ``log(p_k / (1 - p_k)) = x_k - logsumexp_{j != k} x_j``, computed stably.

    Args:
        logits: (R, K, M, M) array, K >= 2.
    """
    xp = get_array_module(logits)
    k = logits.shape[1]
    out = xp.empty_like(logits)
    for c in range(k):  # K is small: one logsumexp over the other channels each
        others = xp.concatenate([logits[:, :c], logits[:, c + 1 :]], axis=1)  # (R, K-1, M, M)
        top = others.max(axis=1)  # (R, M, M)
        rest = top + xp.log(xp.exp(others - top[:, None]).sum(axis=1))
        out[:, c] = logits[:, c] - rest
    return out


class MLPMaskHead(MaskHead):
    """The MLP mask head of Table 2e: (R, C, S, S) -> fc, fc -> (R, K·M·M) -> (R, K, M, M).

    Two hidden layers of ``mask_mlp_dim`` (1024 in the paper) on the flattened pooled features,
    then a linear layer to K masks of M = 2S pixels a side (28 from the 14×14 pool). Every output
    pixel has its own weights: the spatial layout is learnt, not kept by convolution, which the
    paper found 2.1 mask AP worse than the FCN.
    """

    def build(self, config: MaskRCNNConfig, channels: int, outputs: int) -> None:
        s = config.mask_pool_size
        self.mask_size = 2 * s
        self.fc1 = Linear(channels * s * s, config.mask_mlp_dim)
        self.fc2 = Linear(config.mask_mlp_dim, config.mask_mlp_dim)
        self.logits = Linear(config.mask_mlp_dim, outputs * self.mask_size**2)
        self.outputs = outputs

    def layers(self, x: Tensor) -> Tensor:
        """(R, C, S, S) -> (R, K, M, M) by the MLP."""
        r = x.shape[0]
        x = self.fc2(self.fc1(x.reshape(r, -1)).relu()).relu()  # (R, D)
        return self.logits(x).reshape(r, self.outputs, self.mask_size, self.mask_size)


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
