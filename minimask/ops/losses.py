"""The losses of Mask R-CNN, as free functions on engine Tensors.

Mask R-CNN trains five losses at once (He et al. 2017, §3; Faster R-CNN, Ren et al. 2015, eq. (1)):

    L = L_objectness + L_rpn_box  +  L_cls + L_box  +  L_mask
        \\_____ RPN (rpn_loss) ___/   \\ fastrcnn_loss /  mask_loss

plus, with a keypoint head (§5), ``L_keypoint`` (:func:`keypoint_loss`, a softmax over each
heatmap's cells). They are built from three elementwise pieces: :func:`smooth_l1_loss` for box
deltas, :func:`binary_cross_entropy_with_logits` for objectness and mask pixels, and
:func:`cross_entropy` for the class of each RoI (and the cell of each keypoint). Every function
takes Tensors (or plain arrays for targets), returns a Tensor that ``backward()`` can start
from, and runs unchanged on NumPy or CuPy.

The normalisations follow torchvision (``rpn.py`` and ``roi_heads.py``), so the numbers can be
compared one to one; where they differ from the papers, the docstring says so. One deliberate
difference: a loss over nothing (no anchor sampled, no positive RoI) is a finite 0 connected to the
graph, never torch's NaN from a mean over zero elements. Detection batches are empty often enough
that a NaN here would stop training.

Shape letters:
    A  anchors of one image (or of a batch, flattened)
    R  RoIs (proposals sampled for the box and mask heads)
    P  the positive (foreground) ones among them
    K  classes, background (0) included
    M  side of the mask head's output (28 in the paper)
"""

from __future__ import annotations

import numpy as np

from minimask.backend import get_array_module
from minimask.engine import Function, Tensor, where
from minimask.engine.ops import sigmoid

# torchvision's box-regression smooth-L1 uses beta = 1/9 in both the RPN and the box head: a
# quadratic zone of |d| < 1/9, so the loss is close to L1 for all but very accurate deltas.
BOX_BETA = 1.0 / 9.0

_REDUCTIONS = ("mean", "sum", "none")


# ---------------------------------------------------------------------------- helpers
def _as_like(x, like: Tensor) -> Tensor:
    """``x`` as a Tensor of ``like``'s dtype and device. Plain arrays become constants."""
    if isinstance(x, Tensor):
        return x.astype(like.dtype)
    return Tensor(like.xp.asarray(x, dtype=like.dtype))


def _array(x, xp):
    """The raw array of ``x`` (a Tensor or array-like) on ``xp``'s device."""
    return xp.asarray(x.data if isinstance(x, Tensor) else x)


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    """Apply ``reduction`` to elementwise losses. A mean over zero elements is 0, not NaN."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() * (1.0 / max(loss.size, 1))
    raise ValueError(f"reduction={reduction!r}; use one of {_REDUCTIONS}")


def _check_labels(labels, num_classes: int, what: str) -> None:
    """Labels must be integers in [0, K): a negative index would silently wrap around."""
    if labels.dtype.kind not in "iu":
        raise TypeError(f"{what} needs integer labels, got {labels.dtype}")
    # One sync on a device (both bounds in one test): a wrong label would pick another class's
    # score without any error, so the check is worth its wait.
    if labels.size and bool(((labels < 0) | (labels >= num_classes)).any()):
        raise ValueError(
            f"{what}: labels must lie in [0, {num_classes}), got {int(labels.min())}.."
            f"{int(labels.max())}"
        )


def _check_same_shape(a: Tensor, b: Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: input has shape {a.shape} but target has shape {b.shape}")


# ---------------------------------------------------------------------------- box regression
def l1_loss(input, target, reduction: str = "mean") -> Tensor:
    """Elementwise ``|input - target|``, then reduced.

    Args:
        input: Tensor of any shape.
        target: Tensor or array of the same shape.
        reduction: ``"mean"`` (default, as torch), ``"sum"`` or ``"none"``.
    """
    target = _as_like(target, input)
    _check_same_shape(input, target, "l1_loss")
    return _reduce((input - target).abs(), reduction)


def smooth_l1_loss(input, target, beta: float = 1.0, reduction: str = "mean") -> Tensor:
    """The Huber-like loss of Fast R-CNN (Girshick 2015, eq. (3)), elementwise, then reduced.

    With ``d = input - target``::

        smooth_l1(d) = 0.5 d² / beta     if |d| < beta
                       |d| - 0.5 beta    otherwise

    Quadratic near zero (a gradient that shrinks with the error), linear further out (a gradient
    of ±1, so outliers cannot blow up training). The paper's form is ``beta = 1``;
    ``beta = 0`` is plain L1 (as in torch). Built from engine primitives, so it needs no
    backward of its own.

    Args:
        input: Tensor of any shape, e.g. predicted deltas (P, 4).
        target: Tensor or array of the same shape.
        beta: where the quadratic zone ends (>= 0).
        reduction: ``"mean"`` (default, as torch), ``"sum"`` or ``"none"``.
    """
    if beta < 0:
        raise ValueError(f"smooth_l1_loss needs beta >= 0, got {beta}")
    if beta == 0:
        return l1_loss(input, target, reduction)
    target = _as_like(target, input)
    _check_same_shape(input, target, "smooth_l1_loss")
    diff = input - target
    size = diff.abs()
    quadratic = diff * diff * (0.5 / beta)
    linear = size - 0.5 * beta
    loss = where(size.data < beta, quadratic, linear)
    return _reduce(loss, reduction)


# ---------------------------------------------------------------------------- classification
class BinaryCrossEntropyWithLogits(Function):
    """Elementwise ``-[z log σ(x) + (1 - z) log(1 - σ(x))]`` in the overflow-free form

        max(x, 0) - x z + log1p(exp(-|x|)),

    with the analytic gradients ``σ(x) - z`` for ``x`` and ``-x`` for ``z``.

    A fused op rather than a composite of primitives: the engine has no ``log1p``, and
    ``log(1 + exp(-|x|))`` rounds to 0 once ``exp(-|x|)`` drops below float epsilon (|x| > 37 in
    float64), so a confident, correct prediction would get a loss of exactly 0 instead of
    ``exp(-|x|)``, losing all relative precision. The backward is one subtraction instead of
    the six nodes the composite would leave in the graph.
    """

    def forward(self, x, z):
        xp = get_array_module(x)
        self.x, self.z = x, z
        return xp.maximum(x, 0) - x * z + xp.log1p(xp.exp(-xp.abs(x)))

    def backward(self, g):
        x = self.x
        gx = g * (sigmoid(x) - self.z) if self.wants(0) else None
        gz = -g * x if self.wants(1) else None
        return gx, gz


def binary_cross_entropy_with_logits(
    logits, targets, weight=None, reduction: str = "mean"
) -> Tensor:
    """Binary cross-entropy on raw scores, ``L = -[z log σ(x) + (1 - z) log(1 - σ(x))]``.

    The RPN's objectness loss (Faster R-CNN §3.1.2) and Mask R-CNN's per-pixel mask loss (§3).
    Stable for any |x| (see :class:`BinaryCrossEntropyWithLogits`): ``x = ±1000`` gives exact,
    finite losses and gradients.

    Args:
        logits: Tensor ``x`` of any shape.
        targets: Tensor or array ``z`` of the same shape, values in [0, 1] (soft targets allowed).
        weight: optional Tensor or array broadcastable to ``x``, multiplying each element's loss
            (``"mean"`` still divides by the number of elements, as torch).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
    """
    targets = _as_like(targets, logits)
    _check_same_shape(logits, targets, "binary_cross_entropy_with_logits")
    loss = BinaryCrossEntropyWithLogits.apply(logits, targets)
    if weight is not None:
        loss = loss * _as_like(weight, logits)
    return _reduce(loss, reduction)


class SoftmaxCrossEntropy(Function):
    """Row-wise ``-log softmax(x)[y]`` for logits (R, K) and integer labels (R,).

    Forward uses the stable log-softmax ``x - max(x) - log Σ exp(x - max(x))``; backward is the
    classic ``softmax(x) - onehot(y)``. Fused, because the composite (max, exp, sum, log,
    gather) would keep five arrays of (R, K) alive for a gradient this simple.
    """

    def forward(self, logits, labels=None):
        xp = get_array_module(logits)
        shifted = logits - logits.max(axis=1, keepdims=True)  # (R, K), largest entry 0
        log_probs = shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))  # (R, K)
        self.rows = xp.arange(logits.shape[0])
        self.labels = labels
        self.probs = xp.exp(log_probs)
        return -log_probs[self.rows, labels]  # (R,)

    def backward(self, g):
        grad = self.probs * g[:, None]  # (R, K)
        grad[self.rows, self.labels] -= g  # rows are distinct, so no scatter-add is needed
        return (grad,)


def cross_entropy(logits, labels, reduction: str = "mean") -> Tensor:
    """Softmax cross-entropy ``L_i = -log softmax(x_i)[y_i]``: the classifier loss of each RoI
    (Fast R-CNN §2.3, ``L_cls(p, u) = -log p_u``).

    Args:
        logits: Tensor (R, K) of raw class scores.
        labels: integer array or Tensor (R,), each in ``[0, K)``; 0 is background.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (then (R,)).
    """
    if logits.ndim != 2:
        raise ValueError(f"cross_entropy needs logits of shape (R, K), got {logits.shape}")
    xp = logits.xp
    labels = _array(labels, xp)
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy: labels {labels.shape} for logits {logits.shape}")
    _check_labels(labels, logits.shape[1], "cross_entropy")
    return _reduce(SoftmaxCrossEntropy.apply(logits, labels=labels), reduction)


# ---------------------------------------------------------------------------- the RPN
def rpn_loss(
    objectness_logits,
    pred_deltas,
    labels,
    target_deltas,
    sampled=None,
    box_weight: float = 1.0,
) -> dict[str, Tensor]:
    """The RPN's loss, Faster R-CNN eq. (1), with torchvision's normalisation.

    The paper writes::

        L({p_i}, {t_i}) = 1/N_cls Σ_i L_cls(p_i, p*_i)  +  λ 1/N_reg Σ_i p*_i L_reg(t_i, t*_i)

    with N_cls = 256 (the sampled anchors), N_reg ≈ 2400 (anchor locations) and λ = 10. Like
    torchvision, this uses N_cls = N_reg = the number of sampled anchors, λ = ``box_weight`` = 1,
    L_cls = binary cross-entropy on one objectness logit per anchor, and L_reg = smooth-L1 with
    beta = 1/9 summed over the 4 deltas. ``p*_i`` keeps only the positive anchors in L_reg.

    Args:
        objectness_logits: Tensor (A,) (or (A, 1)), one score per anchor.
        pred_deltas: Tensor (A, 4), predicted (tx, ty, tw, th).
        labels: integer array (A,): 1 object, 0 background, -1 ignored (between the IoU
            thresholds). Ignored anchors never contribute, even if listed in ``sampled``.
        target_deltas: array or Tensor (A, 4), the encoded matched ground-truth boxes ``t*``;
            only rows of positive anchors are read.
        sampled: the anchors the sampler picked (Faster R-CNN: 256, half positive at most), as
            integer indices or a boolean mask (A,). None: every anchor whose label is not -1.
        box_weight: λ.

    Returns:
        ``{"loss_objectness": Tensor (), "loss_rpn_box_reg": Tensor ()}``, both 0 (not NaN) when
        no anchor is sampled.
    """
    objectness_logits = objectness_logits.reshape(-1)  # (A,)
    xp = objectness_logits.xp
    labels = _array(labels, xp).reshape(-1)  # (A,)
    if sampled is None:
        index = xp.nonzero(labels >= 0)[0]
    else:
        sampled = _array(sampled, xp).reshape(-1)
        index = xp.nonzero(sampled)[0] if sampled.dtype == bool else sampled.astype(xp.int64)
        index = index[labels[index] >= 0]  # an ignored anchor has no target: drop it
    positive = index[labels[index] == 1]  # (P,)
    normaliser = 1.0 / max(int(index.size), 1)

    target_deltas = _as_like(target_deltas, pred_deltas)
    objectness = binary_cross_entropy_with_logits(
        objectness_logits[index], labels[index], reduction="sum"
    )
    box = smooth_l1_loss(
        pred_deltas[positive], target_deltas[positive], beta=BOX_BETA, reduction="sum"
    )
    return {
        "loss_objectness": objectness * normaliser,
        "loss_rpn_box_reg": box * (box_weight * normaliser),
    }


# ---------------------------------------------------------------------------- the box head
def fastrcnn_loss(class_logits, box_deltas, labels, regression_targets) -> tuple[Tensor, Tensor]:
    """The box head's two losses (Fast R-CNN §2.3, eq. (1)), normalised as torchvision.

    ``L_cls``: softmax cross-entropy over the K classes, averaged over the R RoIs.
    ``L_box``: smooth-L1 (beta = 1/9) on the 4 deltas *of the ground-truth class only*
    (``[u ≥ 1] L_loc(t^u, v)`` in the paper: background RoIs have no box), summed over the
    foreground RoIs and divided by R (all RoIs, not only the foreground ones).

    Args:
        class_logits: Tensor (R, K).
        box_deltas: Tensor (R, 4K), class-specific deltas; columns ``4k:4k+4`` belong to class k.
        labels: integer array (R,), 0 = background.
        regression_targets: array or Tensor (R, 4), encoded matched boxes; only foreground rows
            are read.

    Returns:
        ``(classifier_loss, box_loss)``, scalar Tensors; both 0 (not NaN) when R = 0.
    """
    num_rois, num_classes = class_logits.shape
    if box_deltas.shape != (num_rois, 4 * num_classes):
        raise ValueError(
            f"fastrcnn_loss: box_deltas {box_deltas.shape} for class_logits {class_logits.shape}; "
            f"expected {(num_rois, 4 * num_classes)}"
        )
    xp = class_logits.xp
    labels = _array(labels, xp)
    classifier = cross_entropy(class_logits, labels)

    positive = xp.nonzero(labels > 0)[0]  # (P,)
    deltas = box_deltas.reshape(num_rois, num_classes, 4)  # (R, K, 4)
    pred = deltas[positive, labels[positive]]  # (P, 4): the GT class's deltas only
    target = _as_like(regression_targets, box_deltas)[positive]  # (P, 4)
    box = smooth_l1_loss(pred, target, beta=BOX_BETA, reduction="sum")
    return classifier, box * (1.0 / max(num_rois, 1))


# ---------------------------------------------------------------------------- the mask head
def mask_loss(mask_logits, labels, mask_targets) -> Tensor:
    """Mask R-CNN's L_mask (§3): the average per-pixel binary cross-entropy on the M×M mask of
    each positive RoI's ground-truth class.

    The head predicts K masks per RoI, but only the k-th, for the RoI's class k, enters the loss:
    "the other mask outputs do not contribute", so masks do not compete across classes (unlike a
    per-pixel softmax). The channel is picked by integer-array indexing, so the gradient of every
    other channel is exactly 0.

    Args:
        mask_logits: Tensor (R, K, M, M), raw mask scores of the positive RoIs.
        labels: integer array (R,), the ground-truth class of each RoI (>= 1).
        mask_targets: array or Tensor (R, M, M) in [0, 1]: the ground-truth mask cropped to the
            RoI and resized to M×M (RoIAlign of the binary mask, so edge pixels may be fractional).

    Returns:
        A scalar Tensor: the mean over R·M·M pixels, or 0 connected to the graph when R = 0
        (torchvision returns ``mask_logits.sum() * 0``).
    """
    num_rois = mask_logits.shape[0]
    if num_rois == 0:
        return mask_logits.sum() * 0.0
    xp = mask_logits.xp
    labels = _array(labels, xp)
    if labels.shape != (num_rois,):
        raise ValueError(f"mask_loss: labels {labels.shape} for mask_logits {mask_logits.shape}")
    _check_labels(labels, mask_logits.shape[1], "mask_loss")
    selected = mask_logits[xp.arange(num_rois), labels]  # (R, M, M)
    return binary_cross_entropy_with_logits(selected, mask_targets)


def mask_softmax_loss(mask_logits, labels, mask_targets) -> Tensor:
    """The "multinomial" mask loss of Mask R-CNN's Table 2b: a per-pixel softmax over the K masks.

    Where :func:`mask_loss` trains only the mask of the RoI's class with a sigmoid, here every
    pixel is one K-way classification, as in semantic segmentation (FCN): the target class of a
    pixel is the RoI's class k where the ground-truth mask is 1, and background 0 where it is 0.
    The K masks compete, so a mask must also decide the class, which the paper found worse
    (24.8 against 30.3 mask AP on ResNet-50-C4). With ``x`` the (K,) logits of one pixel::

        L_pixel = -log softmax(x)[c],    c = k if target >= 0.5 else 0

    averaged over the R·M·M pixels. The fractional edge pixels of the RoIAligned targets are
    thresholded at 0.5. Built from :func:`cross_entropy` on the pixels as rows, so the gradient
    ``softmax(x) - onehot(c)`` reaches every channel (unlike :func:`mask_loss`, where only
    channel k gets one). At inference the mask of a detection is the softmax probability of its
    class.

    Args:
        mask_logits: Tensor (R, K, M, M), raw mask scores of the positive RoIs.
        labels: integer array (R,), the ground-truth class of each RoI (>= 1).
        mask_targets: array or Tensor (R, M, M) in [0, 1].

    Returns:
        A scalar Tensor: the mean over R·M·M pixels, or 0 connected to the graph when R = 0.
    """
    num_rois, num_classes = mask_logits.shape[:2]
    if num_rois == 0:
        return mask_logits.sum() * 0.0
    xp = mask_logits.xp
    labels = _array(labels, xp)
    if labels.shape != (num_rois,):
        raise ValueError(
            f"mask_softmax_loss: labels {labels.shape} for mask_logits {mask_logits.shape}"
        )
    _check_labels(labels, num_classes, "mask_softmax_loss")
    targets = _array(mask_targets, xp)
    if targets.shape != (num_rois, *mask_logits.shape[2:]):
        raise ValueError(
            f"mask_softmax_loss: mask_targets {targets.shape} for mask_logits {mask_logits.shape}"
        )
    pixel_classes = xp.where(targets >= 0.5, labels[:, None, None], 0)  # (R, M, M)
    rows = mask_logits.permute(0, 2, 3, 1).reshape(-1, num_classes)  # (R·M·M, K)
    return cross_entropy(rows, pixel_classes.reshape(-1).astype(xp.int64))


# ---------------------------------------------------------------------------- the keypoint head
def keypoint_loss(keypoint_logits, heatmap_targets, valid) -> Tensor:
    """Mask R-CNN's keypoint loss (§5): for each labelled keypoint of each RoI, the softmax
    cross-entropy over the M² cells of its heatmap, whose target is the one cell it falls in;
    averaged over the labelled keypoints (torchvision's ``keypointrcnn_loss``).

    Args:
        keypoint_logits: Tensor (R, K, M, M), one heatmap per keypoint type.
        heatmap_targets: integer array (R, K), each keypoint's cell ``y·M + x`` in ``[0, M²)``.
        valid: bool array (R, K): the keypoint is labelled and inside its RoI.

    Returns:
        A scalar Tensor, 0 connected to the graph when nothing is valid (as torchvision).
    """
    num_rois, k, h, w = keypoint_logits.shape
    if h != w:
        raise ValueError(f"keypoint_loss needs square heatmaps, got {h}x{w}")
    xp = keypoint_logits.xp
    targets = _array(heatmap_targets, xp).reshape(-1)  # (R·K,)
    valid = _array(valid, xp).reshape(-1).astype(bool)
    if targets.shape != (num_rois * k,) or valid.shape != targets.shape:
        raise ValueError(
            f"keypoint_loss: targets {np.shape(heatmap_targets)} and valid {np.shape(valid)} "
            f"for logits {keypoint_logits.shape}; expected ({num_rois}, {k})"
        )
    rows = xp.flatnonzero(valid)  # (V,) the labelled keypoints
    if rows.size == 0:
        return keypoint_logits.sum() * 0.0
    flat = keypoint_logits.reshape(num_rois * k, h * w)  # (R·K, M²): one row per heatmap
    return cross_entropy(flat[rows], targets[rows])
