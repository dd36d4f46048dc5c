"""The box head (Fast R-CNN §2), Mask R-CNN's "box branch": classify each RoI, refine its box.

Training (Fast R-CNN §2.3): the ground-truth boxes join the proposals; each proposal is matched to
a GT box (foreground at IoU >= 0.5, background below); 512 per image are sampled, at most 25%
foreground; each sampled RoI is pooled to 7×7 by multi-scale RoIAlign, passed through two FC
layers, and scored over K classes with K class-specific box deltas. Inference: softmax scores,
per-class decoding, a score threshold, per-class NMS and the top detections.

The C4 layout (:mod:`minimask.model.c4`) swaps the pooler (14×14 from C4) and the head (res5);
the sampling, the predictor and the post-processing are the same.

Shape letters: R RoIs (all images), K classes including background 0, S the pool size, D the FC
width. Boxes are (x1, y1, x2, y2) in pixels.
"""

from __future__ import annotations

from minimask.backend import get_array_module, rng
from minimask.engine import Tensor, no_grad
from minimask.model.config import MaskRCNNConfig
from minimask.nn import Linear, Module
from minimask.ops.box_coder import BoxCoder
from minimask.ops.boxes import clip_boxes_to_image, remove_small_boxes
from minimask.ops.losses import fastrcnn_loss
from minimask.ops.matcher import Matcher
from minimask.ops.nms import batched_nms
from minimask.ops.poolers import MultiScaleRoIAlign
from minimask.ops.sampler import BalancedPositiveNegativeSampler


def make_pooler(config: MaskRCNNConfig, output_size: int) -> MultiScaleRoIAlign:
    """The model's pooler at ``output_size``: the config's op (RoIAlign or RoIPool), sampling
    ratio and ``aligned``; multi-scale over the FPN levels, or single-scale on C4."""
    return MultiScaleRoIAlign(
        output_size, config.pool_sampling_ratio, aligned=config.roi_align_aligned, op=config.pooler
    )


class TwoMLPHead(Module):
    """Flatten (R, C, S, S) and apply two FC + ReLU layers: -> (R, D)."""

    def __init__(self, in_features: int, width: int):
        super().__init__()
        self.fc6 = Linear(in_features, width)
        self.fc7 = Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], -1)  # (R, C*S*S)
        return self.fc7(self.fc6(x).relu()).relu()


class BoxPredictor(Module):
    """(R, D) -> class logits (R, K) and class-specific deltas (R, 4K).

    (R, D, h, w) maps (the C4 layout's res5 output) are first global-average pooled to (R, D),
    as ResNet's own classifier does.
    """

    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.cls_score = Linear(width, num_classes)
        self.bbox_pred = Linear(width, 4 * num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.ndim == 4:  # C4: res5 maps (R, D, 7, 7)
            x = x.mean(axis=(2, 3))  # (R, D)
        return self.cls_score(x), self.bbox_pred(x)


class RoIHeads(Module):
    """Proposal targets, the box head and its loss, and box post-processing."""

    def __init__(self, config: MaskRCNNConfig, channels: int, head=None, width=None):
        """``channels`` of the pooled maps; ``head`` (R, C, S, S) -> (R, width) or maps (R,
        width, h, w): FPN's :class:`TwoMLPHead` unless given (C4 gives its res5)."""
        super().__init__()
        self.config = config
        self.pooler = make_pooler(config, config.box_pool_size)
        if head is None:
            head = TwoMLPHead(channels * config.box_pool_size**2, config.box_fc_dim)
            width = config.box_fc_dim
        self.head = head
        self.predictor = BoxPredictor(width, config.num_classes)
        self.box_coder = BoxCoder(config.box_coder_weights)
        self.matcher = Matcher(config.box_fg_iou, config.box_bg_iou)
        self.sampler = BalancedPositiveNegativeSampler(
            config.box_batch_per_image, config.box_positive_fraction
        )
        self.rng = rng(0)  # the sampler's generator; the trainer sets one per iteration

    # ------------------------------------------------------------------ training targets
    @no_grad()
    def sample_proposals(self, proposals, targets):
        """Add the GT boxes, match, and sample each image's minibatch of RoIs.

        Returns, per image: sampled boxes (R_i, 4), labels (R_i,) (0 = background), the matched
        GT index (R_i,) (meaningful where label > 0), and regression targets (R_i, 4).
        """
        out = []
        for boxes, target in zip(proposals, targets):
            xp = get_array_module(boxes)
            gt = xp.asarray(target["boxes"], dtype=boxes.dtype).reshape(-1, 4)  # (G, 4)
            gt_labels = xp.asarray(target["labels"]).astype(xp.int64)
            crowd = target.get("is_crowd")
            not_crowd = gt if crowd is None else gt[~xp.asarray(crowd, dtype=bool)]
            boxes = xp.concatenate([boxes, not_crowd])  # the GT boxes are proposals too
            matches = self.matcher.match_boxes(gt, boxes, is_crowd=crowd)  # (P,)
            safe = xp.clip(matches, 0, None)  # outcome codes -> GT 0, masked out just below
            labels = xp.where(matches >= 0, gt_labels[safe] if len(gt) else 0, 0)
            labels[(matches == Matcher.IGNORE) | (matches == Matcher.BETWEEN_THRESHOLDS)] = -1
            pos, neg = self.sampler(labels, self.rng)
            keep = xp.concatenate([pos, neg])
            boxes, labels, matches = boxes[keep], labels[keep], xp.clip(matches[keep], 0, None)
            matched = gt[matches] if len(gt) else boxes
            out.append((boxes, labels, matches, self.box_coder.encode(matched, boxes)))
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, features, proposals, image_sizes, padded_size, targets=None):
        """Box losses (training) or detections (inference).

        Args:
            features: [P2..P5] (the pooler's levels), each (N, C, Hl, Wl).
            proposals: N arrays (P_i, 4) from the RPN.
            image_sizes: N (height, width) before padding; padded_size: the batch's (H, W).
            targets: N dicts with ``boxes``, ``labels`` (and ``is_crowd``), or None.

        Returns:
            Training: ``(losses, sampled)`` where ``sampled`` is what :meth:`sample_proposals`
            returned (the mask head trains on its foreground RoIs).
            Inference: ``(detections, None)``, N dicts with ``boxes`` (D, 4), ``scores`` (D,),
            ``labels`` (D,).
        """
        if targets is not None:
            sampled = self.sample_proposals(proposals, targets)
            x = self.box_features(features, [s[0] for s in sampled], padded_size)
            return self.loss(x, sampled), sampled
        logits, deltas = self.predictor(self.box_features(features, proposals, padded_size))
        return self.postprocess(logits.data, deltas.data, proposals, image_sizes), None

    def box_features(self, features, boxes, padded_size) -> Tensor:
        """The head's output for per-image ``boxes``: (R, D) vectors, or (R, D, h, w) maps (C4's
        res5, which the mask branch reuses)."""
        pooled = self.pooler(features, boxes, [padded_size])  # (R, C, S, S)
        return self.head(pooled)

    def loss(self, box_features: Tensor, sampled) -> dict:
        """L_cls and L_box of the sampled RoIs, from their :meth:`box_features`."""
        logits, deltas = self.predictor(box_features)
        xp = logits.xp
        labels = xp.concatenate([s[1] for s in sampled])
        regression = xp.concatenate([s[3] for s in sampled])
        loss_cls, loss_box = fastrcnn_loss(logits, deltas, labels, regression)
        return {"loss_classifier": loss_cls, "loss_box_reg": loss_box}

    @no_grad()
    def postprocess(self, logits, deltas, proposals, image_sizes):
        """Scores, per-class boxes, threshold, per-class NMS and the top detections per image."""
        c = self.config
        xp = get_array_module(logits)
        k = logits.shape[1]
        probs = logits - logits.max(axis=1, keepdims=True)
        probs = xp.exp(probs)
        probs /= probs.sum(axis=1, keepdims=True)  # (R, K) softmax
        counts = [len(p) for p in proposals]
        all_boxes = xp.concatenate(proposals) if proposals else xp.zeros((0, 4), logits.dtype)
        decoded = self.box_coder.decode(deltas, all_boxes).reshape(-1, k, 4)  # (R, K, 4)
        detections, start = [], 0
        for count, size in zip(counts, image_sizes):
            boxes = clip_boxes_to_image(decoded[start : start + count], size)[:, 1:]  # (P, K-1, 4)
            scores = probs[start : start + count, 1:]  # (P, K-1): background dropped
            start += count
            labels = xp.broadcast_to(xp.arange(1, k), scores.shape)
            boxes, scores, labels = boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)
            keep = xp.flatnonzero(scores > c.box_score_thresh)
            keep = keep[remove_small_boxes(boxes[keep], 1e-2)]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = batched_nms(boxes, scores, labels, c.box_nms_iou)[: c.detections_per_image]
            detections.append(
                {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
            )
        return detections
