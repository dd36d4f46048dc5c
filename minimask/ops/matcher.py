"""The matcher: which ground-truth box, if any, each anchor (or proposal) is responsible for.

Faster R-CNN §3.1.2 labels an anchor by its IoU with the ground-truth (GT) boxes:

* positive, matched to its best GT, when that IoU >= ``high`` (0.7 for the RPN, 0.5 for the box
  head); and, with ``allow_low_quality_matches`` (RPN only), also the anchor(s) of highest IoU
  for each GT, so that every GT has at least one positive even when no anchor reaches ``high``;
* negative (:data:`BELOW_LOW_THRESHOLD`) when its best IoU < ``low`` (0.3 RPN, 0.5 box head);
* neither (:data:`BETWEEN_THRESHOLDS`) in between: too ambiguous to train on either way.

Crowd regions (COCO's ``iscrowd``: one box around many people, with no box per person) are never
positives or negatives. A crowd GT is never matched, and an anchor that lies mostly inside a
crowd region is marked :data:`IGNORE` instead of negative (or in between), because the
unannotated objects there make "background" a wrong label. "Mostly inside" is measured as
*intersection over the anchor's area* (IoA) >= ``crowd_ioa_threshold`` (0.5), not IoU: a crowd
box is often many times larger than an anchor, so even an anchor entirely inside it has a tiny
IoU, and a threshold on IoU would ignore almost nothing. A positive (a clear match to a real
GT) stays positive inside a crowd region: its label is right whatever else is there.

Without crowd, the output equals torchvision's ``Matcher`` (ties included: each anchor takes the
first best GT, and every tied best anchor of a GT gets a low-quality match), except in one case:
a GT whose best IoU is 0 (it overlaps no anchor at all, e.g. an empty box) gets no low-quality
match. torchvision would then treat *every* anchor as that GT's "best" and turn them all into
positives.

Shape letters:
    G  ground-truth boxes of one image
    N  anchors or proposals of that image
"""

from __future__ import annotations

from minimask.backend import get_array_module
from minimask.ops.boxes import box_ioa, box_iou

# Outcomes for an anchor that is not matched to a GT (matched ones hold the GT's index >= 0).
BELOW_LOW_THRESHOLD = -1  # best IoU < low: a negative (background)
BETWEEN_THRESHOLDS = -2  # low <= best IoU < high: not used for training
IGNORE = -3  # inside a crowd region (and not a positive): not used for training


class Matcher:
    """Match anchors to GT boxes by IoU thresholds (Faster R-CNN §3.1.2).

    Args:
        high_threshold: IoU at or above which an anchor is a positive (matched).
        low_threshold: IoU below which an anchor is a negative; ``low <= high``.
        allow_low_quality_matches: also match each GT's best anchors (all ties), even below
            ``high`` (the RPN's rule (i) in Faster R-CNN §3.1.2).
        crowd_ioa_threshold: an anchor whose area lies at least this much inside a crowd region
            is :data:`IGNORE` (unless positive).
    """

    BELOW_LOW_THRESHOLD = BELOW_LOW_THRESHOLD
    BETWEEN_THRESHOLDS = BETWEEN_THRESHOLDS
    IGNORE = IGNORE

    def __init__(
        self,
        high_threshold: float,
        low_threshold: float,
        allow_low_quality_matches: bool = False,
        crowd_ioa_threshold: float = 0.5,
    ):
        if low_threshold > high_threshold:
            raise ValueError(f"low_threshold {low_threshold} > high_threshold {high_threshold}")
        self.high_threshold = high_threshold
        self.low_threshold = low_threshold
        self.allow_low_quality_matches = allow_low_quality_matches
        self.crowd_ioa_threshold = crowd_ioa_threshold

    def __repr__(self) -> str:
        return (
            f"Matcher(high={self.high_threshold}, low={self.low_threshold}, "
            f"allow_low_quality_matches={self.allow_low_quality_matches})"
        )

    def __call__(self, match_quality_matrix, is_crowd=None, crowd_ioa=None):
        """Match each of N anchors to one of G GT boxes.

        Args:
            match_quality_matrix: (G, N) IoU of every (GT, anchor) pair.
            is_crowd: optional (G,) booleans; crowd GTs are never matched.
            crowd_ioa: (G, N) intersection over anchor area (:func:`~minimask.ops.boxes.box_ioa`),
                needed when some GT is crowd; only the crowd rows are read.

        Returns:
            (N,) int64: the matched GT index in [0, G), or :data:`BELOW_LOW_THRESHOLD`,
            :data:`BETWEEN_THRESHOLDS` or :data:`IGNORE`. With no GT at all, every anchor is
            :data:`BELOW_LOW_THRESHOLD` (the image is all background).
        """
        quality = match_quality_matrix
        xp = get_array_module(quality)
        num_gt = quality.shape[0]
        crowd = None
        if is_crowd is not None:
            crowd = xp.asarray(is_crowd, dtype=bool).reshape(-1)  # (G,)
            if crowd.shape[0] != num_gt:
                raise ValueError(f"is_crowd has {crowd.shape[0]} entries for {num_gt} GT boxes")
            if not bool(crowd.any()):
                crowd = None

        if crowd is None:
            matches = self._match(quality)
        else:
            real = xp.flatnonzero(~crowd)  # (G_real,) the GTs that can be matched
            sub = self._match(quality[real])  # (N,) indices into `real`, or outcomes
            matches = sub.copy()
            matched = sub >= 0
            matches[matched] = real[sub[matched]]  # back to indices into all G GTs
            if crowd_ioa is None:
                raise ValueError("is_crowd marks crowd GTs, so crowd_ioa (G, N) is needed")
            inside = (crowd_ioa[crowd] >= self.crowd_ioa_threshold).any(axis=0)  # (N,)
            matches[inside & (matches < 0)] = IGNORE
        return matches

    def _match(self, quality):
        """torchvision's matching on a (G, N) matrix without crowd; returns (N,) int64."""
        xp = get_array_module(quality)
        num_gt, num_anchors = quality.shape
        if num_gt == 0:
            return xp.full(num_anchors, BELOW_LOW_THRESHOLD, dtype=xp.int64)
        if num_anchors == 0:
            return xp.zeros(0, dtype=xp.int64)

        best_gt = xp.argmax(quality, axis=0)  # (N,) the first best GT of each anchor
        best_iou = quality[best_gt, xp.arange(num_anchors)]  # (N,)
        matches = best_gt.astype(xp.int64)
        matches[best_iou < self.low_threshold] = BELOW_LOW_THRESHOLD
        between = (best_iou >= self.low_threshold) & (best_iou < self.high_threshold)
        matches[between] = BETWEEN_THRESHOLDS

        if self.allow_low_quality_matches:
            # Every anchor whose IoU equals its GT's best (all ties), for GTs that touch an anchor.
            best_per_gt = quality.max(axis=1, keepdims=True)  # (G, 1)
            is_best = (quality == best_per_gt) & (best_per_gt > 0)  # (G, N)
            promoted = is_best.any(axis=0)  # (N,)
            matches = xp.where(promoted, best_gt, matches)  # (no mask gather: no size to read)
        return matches

    def match_boxes(self, gt_boxes, anchors, is_crowd=None):
        """:meth:`__call__` from boxes: computes the IoU (and the crowd IoA) first.

        Args:
            gt_boxes: (G, 4) GT boxes; anchors: (N, 4); is_crowd: optional (G,) booleans.
        """
        xp = get_array_module(gt_boxes, anchors)
        iou = box_iou(gt_boxes, anchors)  # (G, N)
        ioa = None
        if is_crowd is not None and bool(xp.asarray(is_crowd).any()):
            ioa = box_ioa(gt_boxes, anchors)  # (G, N); only the crowd rows will be read
        return self(iou, is_crowd=is_crowd, crowd_ioa=ioa)
