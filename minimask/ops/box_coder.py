"""The box coder: boxes <-> regression deltas ``(t_x, t_y, t_w, t_h)``.

The RPN and the box head do not predict box corners; they predict how to move and stretch a
known box (an anchor, or a proposal) onto the object (R-CNN, Girshick et al. 2014, appendix C;
Faster R-CNN, Ren et al. 2015, eq. (2)). With a proposal ``a`` (centre ``(x_a, y_a)``, size
``(w_a, h_a)``), a target box ``g`` (centre ``(x, y)``, size ``(w, h)``) and weights
``(w_x, w_y, w_w, w_h)``:

    t_x = w_x (x - x_a) / w_a        t_w = w_w log(w / w_a)
    t_y = w_y (y - y_a) / h_a        t_h = w_h log(h / h_a)

Centre offsets are measured in units of the proposal's size and sizes on a log scale, so the
same delta means the same relative change for a small box and for a large one. The weights only
rescale the targets to a comfortable range for the loss: (1, 1, 1, 1) for the RPN and
(10, 10, 5, 5) for the box head (torchvision's and Detectron's defaults).

The inverse (:meth:`BoxCoder.decode`) applies deltas to boxes:

    x = x_a + w_a t_x / w_x          w = w_a exp(min(t_w / w_w, clip))

and the law a test checks is ``decode(encode(g, a), a) == g`` (up to rounding), whenever
``|log(w / w_a)|`` and ``|log(h / h_a)|`` stay below ``clip``. ``clip = log(1000 / 16)`` keeps
``exp`` finite for wild predictions: no box grows more than 62.5 times its proposal in one step.

Boxes are ``(x1, y1, x2, y2)`` (see :mod:`minimask.ops.boxes`); the centre of a box is
``x1 + 0.5 * width``. Semantics are torchvision's ``models.detection._utils.BoxCoder``.

Shape letters:
    R  boxes (anchors or proposals)
    K  classes, for class-specific deltas: columns ``4k : 4k + 4`` belong to class ``k``
"""

from __future__ import annotations

import math

from minimask.backend import get_array_module

RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)  # the RPN's deltas are used as they are
BOX_HEAD_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # the box head's deltas are small: scale them up
DEFAULT_CLIP = math.log(1000.0 / 16)  # largest t_w, t_h applied when decoding


def _centres_and_sizes(boxes):
    """Centres and sizes of (R, 4) boxes, each of shape (R, 1) to broadcast over classes."""
    widths = boxes[:, 2:3] - boxes[:, 0:1]  # (R, 1)
    heights = boxes[:, 3:4] - boxes[:, 1:2]  # (R, 1)
    ctr_x = boxes[:, 0:1] + 0.5 * widths
    ctr_y = boxes[:, 1:2] + 0.5 * heights
    return ctr_x, ctr_y, widths, heights


class BoxCoder:
    """Encode boxes as deltas relative to proposals, and decode deltas back into boxes.

    Args:
        weights: ``(w_x, w_y, w_w, w_h)``; use :data:`RPN_WEIGHTS` or :data:`BOX_HEAD_WEIGHTS`.
        clip: the largest ``t_w / w_w`` and ``t_h / w_h`` that :meth:`decode` applies.
    """

    def __init__(self, weights=RPN_WEIGHTS, clip: float = DEFAULT_CLIP):
        if len(weights) != 4:
            raise ValueError(f"weights must be (w_x, w_y, w_w, w_h), got {weights}")
        self.weights = tuple(float(w) for w in weights)
        self.clip = float(clip)

    def __repr__(self) -> str:
        return f"BoxCoder(weights={self.weights}, clip={self.clip:.4f})"

    def encode(self, reference_boxes, proposals):
        """The deltas that move each proposal onto its reference (target) box.

        Args:
            reference_boxes: (R, 4) target boxes, or (R, 4K) one target box per class.
            proposals: (R, 4) anchors or proposals, with positive widths and heights.

        Returns:
            (R, 4) or (R, 4K) deltas ``(t_x, t_y, t_w, t_h)`` (per class), in the dtype of
            ``reference_boxes``.
        """
        xp = get_array_module(reference_boxes, proposals)
        if reference_boxes.dtype.kind != "f":  # integer pixel boxes: deltas are fractions
            reference_boxes = reference_boxes.astype(xp.float32)
        proposals = proposals.astype(reference_boxes.dtype, copy=False)
        wx, wy, ww, wh = self.weights
        ex_x, ex_y, ex_w, ex_h = _centres_and_sizes(proposals)  # each (R, 1)
        gt_w = reference_boxes[:, 2::4] - reference_boxes[:, 0::4]  # (R, K)
        gt_h = reference_boxes[:, 3::4] - reference_boxes[:, 1::4]  # (R, K)
        gt_x = reference_boxes[:, 0::4] + 0.5 * gt_w
        gt_y = reference_boxes[:, 1::4] + 0.5 * gt_h

        deltas = xp.empty_like(reference_boxes)  # (R, 4K), columns interleaved per class
        deltas[:, 0::4] = wx * (gt_x - ex_x) / ex_w
        deltas[:, 1::4] = wy * (gt_y - ex_y) / ex_h
        deltas[:, 2::4] = ww * xp.log(gt_w / ex_w)
        deltas[:, 3::4] = wh * xp.log(gt_h / ex_h)
        return deltas

    def decode(self, deltas, boxes):
        """Apply deltas to boxes: the inverse of :meth:`encode`.

        Args:
            deltas: (R, 4) deltas, or (R, 4K) one set of deltas per class.
            boxes: (R, 4) anchors or proposals the deltas are relative to.

        Returns:
            (R, 4) or (R, 4K) boxes ``(x1, y1, x2, y2)`` (per class), in the dtype of ``deltas``.
            ``t_w / w_w`` and ``t_h / w_h`` are clamped at ``clip`` before ``exp``.
        """
        xp = get_array_module(deltas, boxes)
        boxes = boxes.astype(deltas.dtype, copy=False)
        wx, wy, ww, wh = self.weights
        ctr_x, ctr_y, widths, heights = _centres_and_sizes(boxes)  # each (R, 1)
        dx = deltas[:, 0::4] / wx  # (R, K)
        dy = deltas[:, 1::4] / wy
        dw = xp.minimum(deltas[:, 2::4] / ww, self.clip)
        dh = xp.minimum(deltas[:, 3::4] / wh, self.clip)

        pred_x = dx * widths + ctr_x  # (R, K)
        pred_y = dy * heights + ctr_y
        half_w = 0.5 * (xp.exp(dw) * widths)
        half_h = 0.5 * (xp.exp(dh) * heights)

        pred = xp.empty_like(deltas)  # (R, 4K)
        pred[:, 0::4] = pred_x - half_w
        pred[:, 1::4] = pred_y - half_h
        pred[:, 2::4] = pred_x + half_w
        pred[:, 3::4] = pred_y + half_h
        return pred
