"""The Region Proposal Network (Faster R-CNN §3.1), run on every FPN level (FPN §4.1), or on
the one C4 map of the C4 layout (one level holding every anchor size).

A small network slides over each feature map: a shared 3x3 conv, then at every location one
objectness logit and four box deltas ``(t_x, t_y, t_w, t_h)`` for each of its A anchors. Decoding
the deltas against the anchors gives proposals; the best of them, after NMS, are the RoIs of the
box and mask heads.

Shape letters: N images; L levels; A anchors per location; Hl×Wl the size of level l;
T = Σ_l Hl·Wl·A all anchors of one image; G ground-truth boxes of one image.
Anchors are ordered location-major, anchor-minor (index ``(y·Wl + x)·A + a``), as torchvision's
AnchorGenerator, so the head's outputs are permuted to that order before they meet the anchors.
Boxes are (x1, y1, x2, y2) in pixels of the padded batch.
"""

from __future__ import annotations

import numpy as np

from minimask.backend import get_array_module, rng, to_host
from minimask.engine import Tensor, concatenate, no_grad
from minimask.model.config import MaskRCNNConfig
from minimask.nn import Conv2d, Module, init
from minimask.ops.anchors import AnchorGenerator
from minimask.ops.box_coder import RPN_WEIGHTS, BoxCoder
from minimask.ops.boxes import clip_boxes_to_image, remove_small_boxes
from minimask.ops.losses import rpn_loss
from minimask.ops.matcher import Matcher
from minimask.ops.nms import batched_nms
from minimask.ops.sampler import BalancedPositiveNegativeSampler


class RPNHead(Module):
    """3x3 conv + ReLU shared by all levels, then 1x1 convs to A logits and 4A deltas."""

    def __init__(self, channels: int, num_anchors: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)
        self.cls_logits = Conv2d(channels, num_anchors, 1)
        self.bbox_pred = Conv2d(channels, 4 * num_anchors, 1)
        for conv in (self.conv, self.cls_logits, self.bbox_pred):  # torchvision's RPNHead init
            init.normal_(conv.weight, std=0.01)
            init.zeros_(conv.bias)

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Per level (N, C, Hl, Wl) -> objectness (N, T) and deltas (N, T, 4), levels joined."""
        logits, deltas = [], []
        for x in features:
            h = self.conv(x, relu=True)
            n, _, height, width = h.shape
            obj = self.cls_logits(h)  # (N, A, Hl, Wl)
            a = obj.shape[1]
            logits.append(obj.permute(0, 2, 3, 1).reshape(n, height * width * a))  # (N, HlWlA)
            d = self.bbox_pred(h).reshape(n, a, 4, height, width)  # (N, A, 4, Hl, Wl)
            deltas.append(d.permute(0, 3, 4, 1, 2).reshape(n, height * width * a, 4))
        return concatenate(logits, axis=1), concatenate(deltas, axis=1)


class RPN(Module):
    """Anchors, the head, proposals (decode, top-k per level, clip, NMS, top-N) and the loss."""

    def __init__(self, config: MaskRCNNConfig, channels: int, anchor_generator=None):
        """``anchor_generator``: the layout's (default: FPN's, one anchor size per level)."""
        super().__init__()
        self.config = config
        self.anchor_generator = anchor_generator or AnchorGenerator.fpn(
            config.anchor_sizes, config.aspect_ratios
        )
        self.head = RPNHead(channels, self.anchor_generator.num_anchors_per_location()[0])
        self.box_coder = BoxCoder(RPN_WEIGHTS)
        self.matcher = Matcher(config.rpn_fg_iou, config.rpn_bg_iou, allow_low_quality_matches=True)
        self.sampler = BalancedPositiveNegativeSampler(
            config.rpn_batch_per_image, config.rpn_positive_fraction
        )
        self.rng = rng(0)  # the sampler's generator; the trainer sets one per iteration

    def forward(self, features, image_sizes, padded_size, targets=None):
        """Proposals for each image, and the RPN losses when ``targets`` are given.

        Args:
            features: [P2..P6] (FPN) or [C4], each (N, C, Hl, Wl).
            image_sizes: N (height, width) of the images before padding (proposals are clipped
                to them).
            padded_size: (height, width) of the padded batch.
            targets: N dicts with ``boxes`` (G, 4) and optionally ``is_crowd`` (G,), or None.

        Returns:
            ``(proposals, losses)``: N arrays (P_i, 4), and ``{}`` without targets.
        """
        xp = features[0].xp
        sizes = [tuple(f.shape[-2:]) for f in features]
        levels = self.anchor_generator.per_level(padded_size, sizes, xp=xp, dtype=features[0].dtype)
        anchors = xp.concatenate(levels)  # (T, 4)
        level_of = xp.concatenate(
            [xp.full(len(a), i, dtype=xp.int64) for i, a in enumerate(levels)]
        )  # (T,)
        logits, deltas = self.head(features)  # (N, T), (N, T, 4)
        level_sizes = [len(a) for a in levels]  # known here: _proposals needs no sync for them
        proposals = self._proposals(
            logits.data, deltas.data, anchors, level_of, image_sizes, level_sizes
        )
        losses = {}
        if targets is not None:
            losses = self._loss(logits, deltas, anchors, targets)
        return proposals, losses

    # ------------------------------------------------------------------ proposals
    @no_grad()
    def _proposals(self, logits, deltas, anchors, level_of, image_sizes, level_sizes=None):
        """Decode, keep the top-k per level, clip, drop tiny boxes, NMS per level, keep top-N.

        ``level_of`` (T,) is the level of each anchor, levels one after another; ``level_sizes``
        the number of anchors of each level (read from ``level_of`` when not given).
        """
        c, xp = self.config, get_array_module(logits)
        pre = c.rpn_pre_nms_top_n_train if self.training else c.rpn_pre_nms_top_n_test
        post = c.rpn_post_nms_top_n_train if self.training else c.rpn_post_nms_top_n_test
        n = logits.shape[0]
        if level_sizes is None:
            level_sizes = np.bincount(to_host(level_of)).tolist()
        # Top-k per level and image, all images at once: (N, K) candidate anchor indices.
        candidates, start = [], 0
        for size in level_sizes:
            idx = xp.arange(start, start + size)  # (T_l,) the anchors of this level
            start += size
            if pre < idx.size:
                part = xp.argpartition(-logits[:, idx], pre - 1, axis=1)[:, :pre]  # (N, pre)
            else:
                part = xp.broadcast_to(xp.arange(idx.size), (n, idx.size))  # (N, T_l)
            candidates.append(idx[part])
        candidates = xp.concatenate(candidates, axis=1)  # (N, K)
        rows = xp.arange(n)[:, None]
        scores = logits[rows, candidates]  # (N, K)
        boxes = self.box_coder.decode(
            deltas[rows, candidates].reshape(-1, 4), anchors[candidates].reshape(-1, 4)
        ).reshape(n, -1, 4)  # (N, K, 4)
        out = []
        for i in range(n):  # a handful of images: per-image NMS
            b = clip_boxes_to_image(boxes[i], image_sizes[i])
            keep = remove_small_boxes(b, c.rpn_min_size)
            b, s, lv = b[keep], scores[i][keep], level_of[candidates[i][keep]]
            keep = batched_nms(b, s, lv, c.rpn_nms_iou)[:post]  # sorted by score
            out.append(b[keep])
        return out

    # ------------------------------------------------------------------ loss
    def _loss(self, logits: Tensor, deltas: Tensor, anchors, targets) -> dict:
        """Match anchors to GT boxes, sample 256 per image, and apply :func:`rpn_loss`."""
        xp = logits.xp
        n, t = logits.shape
        labels, target_deltas, sampled = [], [], []
        for i, target in enumerate(targets):
            gt = xp.asarray(target["boxes"], dtype=anchors.dtype).reshape(-1, 4)  # (G, 4)
            crowd = target.get("is_crowd")
            matches = self.matcher.match_boxes(gt, anchors, is_crowd=crowd)  # (T,)
            lab = xp.where(matches >= 0, 1, 0).astype(xp.int64)
            lab[(matches == Matcher.BETWEEN_THRESHOLDS) | (matches == Matcher.IGNORE)] = -1
            # Only positive rows are read; with no GT, encode the anchors against themselves.
            matched = gt[xp.clip(matches, 0, None)] if len(gt) else anchors
            target_deltas.append(self.box_coder.encode(matched, anchors))  # (T, 4)
            pos, neg = self.sampler(lab, self.rng)
            sampled.append(xp.concatenate([pos, neg]) + i * t)
            labels.append(lab)
        return rpn_loss(
            logits.reshape(n * t),
            deltas.reshape(n * t, 4),
            xp.concatenate(labels),
            xp.concatenate(target_deltas),
            sampled=xp.concatenate(sampled),
            box_weight=self.config.rpn_box_weight,
        )
