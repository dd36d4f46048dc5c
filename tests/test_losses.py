"""Tests of minimask.ops.losses: finite differences, torch/torchvision, plain-loop references from
the papers' formulas, and the edge cases detection training meets (huge logits, empty batches,
ignored anchors, the mask head's per-class selection)."""

from __future__ import annotations

import decimal
import math
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minimask.engine import Tensor, detect_anomaly
from minimask.ops import losses as L
from tests.helpers import check_gradients, requires_torch, requires_torchvision, torch

REDUCTIONS = ["mean", "sum", "none"]
BETAS = [0.0, 1.0 / 9.0, 0.5, 1.0]
KINK_GAP = (
    1e-2  # finite differences stay this far from smooth-L1's kinks (|d| = beta, and 0 for L1)
)


# ---------------------------------------------------------------------------- tools
def floats(shape, low=-3.0, high=3.0):
    return hnp.arrays(np.float64, shape, elements=st.floats(low, high, allow_nan=False))


def away_from_kinks(d: np.ndarray, beta: float) -> np.ndarray:
    """Move differences that sit on a kink of smooth-L1 (or of L1 when beta = 0) off it."""
    d = d.copy()
    near = np.abs(np.abs(d) - beta) < KINK_GAP
    d[near] += 3 * KINK_GAP
    return d


def t64(x, grad=False):
    return torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=grad)


def assert_close(actual, expected, rtol=1e-6, atol=1e-12):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------- plain-loop references
def ref_smooth_l1(x, y, beta):
    """Fast R-CNN eq. (3), elementwise, one Python float at a time."""
    out = np.zeros(x.size)
    for i, (a, b) in enumerate(zip(x.ravel(), y.ravel())):
        d = abs(a - b)
        out[i] = 0.5 * d * d / beta if d < beta else d - 0.5 * beta
    return out.reshape(x.shape)


def ref_bce(x, z):
    """-[z log σ(x) + (1 - z) log(1 - σ(x))], straight from the definition, in 200-digit decimal
    arithmetic: exact to float64 precision for any logit, however confident."""
    out = np.zeros(x.size)
    with decimal.localcontext() as ctx:
        ctx.prec = 200
        for i, (a, b) in enumerate(zip(x.ravel(), z.ravel())):
            a, b = decimal.Decimal(float(a)), decimal.Decimal(float(b))
            p = 1 / (1 + (-a).exp())
            out[i] = float(-(b * p.ln() + (1 - b) * (1 - p).ln()))
    return out.reshape(x.shape)


def ref_cross_entropy(logits, labels):
    """-log p_u with p = softmax(x), Fast R-CNN §2.3."""
    out = []
    for row, u in zip(logits, labels):
        total = sum(math.exp(v) for v in row)
        out.append(-math.log(math.exp(row[u]) / total))
    return np.array(out)


def ref_rpn(obj, deltas, labels, targets, sampled, lam=1.0):
    """Faster R-CNN eq. (1) with N_cls = N_reg = number of sampled anchors and beta = 1/9."""
    n = len(sampled)
    cls = sum(ref_bce(np.array([obj[i]]), np.array([float(labels[i])]))[0] for i in sampled)
    reg = 0.0
    for i in sampled:
        p_star = 1.0 if labels[i] == 1 else 0.0
        reg += p_star * ref_smooth_l1(deltas[i], targets[i], 1 / 9).sum()
    return cls / max(n, 1), lam * reg / max(n, 1)


def ref_fastrcnn(class_logits, box_deltas, labels, targets):
    r = len(labels)
    cls = ref_cross_entropy(class_logits, labels).sum() / max(r, 1)
    box = 0.0
    for i, u in enumerate(labels):
        if u >= 1:
            box += ref_smooth_l1(box_deltas[i, 4 * u : 4 * u + 4], targets[i], 1 / 9).sum()
    return cls, box / max(r, 1)


def ref_mask(mask_logits, labels, targets):
    """Average over RoIs and pixels of the BCE of the GT class's mask only (Mask R-CNN §3)."""
    r, _, m, _ = mask_logits.shape
    total = 0.0
    for i in range(r):
        for y in range(m):
            for x in range(m):
                total += ref_bce(
                    np.array([mask_logits[i, labels[i], y, x]]), np.array([targets[i, y, x]])
                )[0]
    return total / (r * m * m)


# ---------------------------------------------------------------------------- strategies
@st.composite
def regression_case(draw, max_side=4):
    """(input, target, beta, reduction) with every difference away from a kink."""
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=2, max_side=max_side))
    beta = draw(st.sampled_from(BETAS))
    x = draw(floats(shape))
    d = away_from_kinks(draw(floats(shape, -1.0, 1.0)), beta)
    return x, x - d, beta, draw(st.sampled_from(REDUCTIONS))


@st.composite
def bce_case(draw, max_side=4, logit_range=8.0):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=2, max_side=max_side))
    x = draw(floats(shape, -logit_range, logit_range))
    z = draw(floats(shape, 0.0, 1.0))
    weight = draw(st.none() | floats(shape[-1:], 0.0, 2.0))
    return x, z, weight, draw(st.sampled_from(REDUCTIONS))


@st.composite
def ce_case(draw, max_rois=5, max_classes=4):
    r = draw(st.integers(1, max_rois))
    k = draw(st.integers(1, max_classes))
    logits = draw(floats((r, k), -10.0, 10.0))
    labels = np.array(draw(st.lists(st.integers(0, k - 1), min_size=r, max_size=r)))
    return logits, labels, draw(st.sampled_from(REDUCTIONS))


@st.composite
def rpn_case(draw, max_anchors=8):
    a = draw(st.integers(1, max_anchors))
    obj = draw(floats((a,), -6.0, 6.0))
    deltas = draw(floats((a, 4), -1.0, 1.0))
    targets = deltas - away_from_kinks(draw(floats((a, 4), -0.5, 0.5)), 1 / 9)
    labels = np.array(draw(st.lists(st.sampled_from([-1, 0, 1]), min_size=a, max_size=a)))
    sampled = np.array(draw(st.lists(st.booleans(), min_size=a, max_size=a)))
    sampled &= labels >= 0  # a real sampler never picks ignored anchors (tested separately)
    return obj, deltas, labels, targets, sampled


@st.composite
def fastrcnn_case(draw, max_rois=4, max_classes=3):
    r = draw(st.integers(1, max_rois))
    k = draw(st.integers(1, max_classes))
    logits = draw(floats((r, k), -5.0, 5.0))
    deltas = draw(floats((r, 4 * k), -1.0, 1.0))
    labels = np.array(draw(st.lists(st.integers(0, k - 1), min_size=r, max_size=r)))
    # Targets away from the kink for the deltas that enter the loss (the GT class's).
    chosen = deltas.reshape(r, k, 4)[np.arange(r), labels]
    targets = chosen - away_from_kinks(draw(floats((r, 4), -0.5, 0.5)), 1 / 9)
    return logits, deltas, labels, targets


@st.composite
def mask_case(draw, max_rois=3, max_classes=3, max_side=3):
    r = draw(st.integers(1, max_rois))
    k = draw(st.integers(2, max_classes))
    m = draw(st.integers(1, max_side))
    logits = draw(floats((r, k, m, m), -6.0, 6.0))
    labels = np.array(draw(st.lists(st.integers(1, k - 1), min_size=r, max_size=r)))
    targets = draw(floats((r, m, m), 0.0, 1.0))
    return logits, labels, targets


# ---------------------------------------------------------------------------- smooth L1 and L1
@given(regression_case())
def test_smooth_l1_gradients_match_finite_differences(case):
    x, y, beta, reduction = case
    check_gradients(lambda a, b: L.smooth_l1_loss(a, b, beta, reduction), x, y)


@given(regression_case())
def test_smooth_l1_matches_loop_reference(case):
    x, y, beta, _ = case
    out = L.smooth_l1_loss(Tensor(x), y, beta=beta, reduction="none").data
    expected = np.abs(x - y) if beta == 0 else ref_smooth_l1(x, y, beta)
    assert_close(out, expected)


@requires_torch
@settings(max_examples=25)
@given(regression_case())
def test_smooth_l1_and_l1_match_torch(case):
    x, y, beta, reduction = case
    for ours, theirs in [
        (
            lambda a, b: L.smooth_l1_loss(a, b, beta, reduction),
            lambda a, b: torch.nn.functional.smooth_l1_loss(a, b, beta=beta, reduction=reduction),
        ),
        (
            lambda a, b: L.l1_loss(a, b, reduction),
            lambda a, b: torch.nn.functional.l1_loss(a, b, reduction=reduction),
        ),
    ]:
        a, b = Tensor(x, requires_grad=True), Tensor(y, requires_grad=True)
        ta, tb = t64(x, True), t64(y, True)
        out, tout = ours(a, b), theirs(ta, tb)
        w = np.linspace(-1, 1, out.size).reshape(out.shape)
        out.backward(w)
        tout.backward(t64(w))
        assert_close(out.data, tout.detach().numpy())
        assert_close(a.grad, ta.grad.numpy())
        assert_close(b.grad, tb.grad.numpy())


def test_smooth_l1_known_values():
    d = np.array([0.0, 0.5, 1.0, 3.0])
    out = L.smooth_l1_loss(Tensor(d), np.zeros(4), beta=1.0, reduction="none").data
    assert_close(out, [0.0, 0.125, 0.5, 2.5])
    assert L.smooth_l1_loss(Tensor(d), np.zeros(4), beta=0.0, reduction="sum").item() == 4.5


def test_unknown_reduction_is_an_error():
    with pytest.raises(ValueError, match="reduction"):
        L.l1_loss(Tensor(np.zeros(2)), np.zeros(2), reduction="avg")


# ---------------------------------------------------------------------------- BCE with logits
def bce_fn(weight, reduction):
    return lambda x, z: L.binary_cross_entropy_with_logits(x, z, weight, reduction)


@given(bce_case())
def test_bce_gradients_match_finite_differences(case):
    x, z, weight, reduction = case
    check_gradients(bce_fn(weight, reduction), x, z)  # z gets a gradient (-x) too


@given(bce_case(logit_range=200.0))
def test_bce_matches_exact_reference_even_for_large_logits(case):
    x, z, _, _ = case
    out = L.binary_cross_entropy_with_logits(Tensor(x), z, reduction="none").data
    # max(x, 0) - x z cancels when z is a hair from 0 or 1, so float64 can promise only an
    # absolute error of a few eps * |x| on top of the relative 1e-12 of the log1p term.
    atol = 4 * np.finfo(np.float64).eps * np.abs(x)
    np.testing.assert_array_less(np.abs(out - ref_bce(x, z)), 1e-12 * np.abs(ref_bce(x, z)) + atol)


@requires_torch
@settings(max_examples=25)
@given(bce_case(logit_range=120.0))
def test_bce_matches_torch_even_for_large_logits(case):
    x, z, weight, reduction = case
    a, b = Tensor(x, requires_grad=True), Tensor(z, requires_grad=True)
    ta, tb = t64(x, True), t64(z, True)
    out = L.binary_cross_entropy_with_logits(a, b, weight, reduction)
    tw = None if weight is None else t64(weight)
    tout = torch.nn.functional.binary_cross_entropy_with_logits(ta, tb, tw, reduction=reduction)
    w = np.linspace(-1, 1, out.size).reshape(out.shape)
    out.backward(w)
    tout.backward(t64(w))
    # torch forms (1 - z) x - log σ(x), which cancels for x << 0 (x = -22, z = 0: 2.789484e-10
    # against the exact 2.789468e-10), so compare values with an absolute floor of ~|x| eps.
    assert_close(out.data, tout.detach().numpy(), atol=1e-13)
    assert_close(a.grad, ta.grad.numpy())
    assert_close(b.grad, tb.grad.numpy())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bce_is_exact_at_logits_plus_minus_1000(dtype):
    x = Tensor(np.array([1000, 1000, -1000, -1000], dtype=dtype), requires_grad=True)
    z = np.array([1, 0, 0, 1], dtype=dtype)
    with detect_anomaly():  # no op sees an inf or NaN on the way, forward or backward
        out = L.binary_cross_entropy_with_logits(x, z, reduction="none")
        out.sum().backward()
    np.testing.assert_array_equal(out.data, [0, 1000, 0, 1000])
    np.testing.assert_array_equal(x.grad, [0, 1, 0, -1])
    assert out.dtype == dtype and x.grad.dtype == dtype


def test_bce_keeps_precision_of_confident_correct_predictions():
    # log(1 + e^-50) would round to 0; log1p keeps e^-50 (both signs of "confident and right").
    x = np.array([50.0, -50.0, 700.0])
    out = L.binary_cross_entropy_with_logits(Tensor(x), np.array([1.0, 0.0, 1.0]), reduction="none")
    assert_close(out.data, [math.exp(-50), math.exp(-50), math.exp(-700)], rtol=1e-14, atol=0)


# ---------------------------------------------------------------------------- cross-entropy
@given(ce_case())
def test_cross_entropy_gradients_match_finite_differences(case):
    logits, labels, reduction = case
    check_gradients(lambda x: L.cross_entropy(x, labels, reduction), logits)


@given(ce_case())
def test_cross_entropy_matches_loop_reference(case):
    logits, labels, _ = case
    out = L.cross_entropy(Tensor(logits), labels, reduction="none").data
    assert_close(out, ref_cross_entropy(logits, labels), rtol=1e-9, atol=1e-12)


@requires_torch
@settings(max_examples=25)
@given(ce_case())
def test_cross_entropy_matches_torch(case):
    logits, labels, reduction = case
    x, tx = Tensor(logits, requires_grad=True), t64(logits, True)
    out = L.cross_entropy(x, labels, reduction)
    tout = torch.nn.functional.cross_entropy(tx, torch.tensor(labels), reduction=reduction)
    w = np.linspace(-1, 1, out.size).reshape(out.shape)
    out.backward(w)
    tout.backward(t64(w))
    assert_close(out.data, tout.detach().numpy())
    assert_close(x.grad, tx.grad.numpy())


def test_cross_entropy_is_stable_for_huge_logits_and_checks_labels():
    x = Tensor(np.array([[1000.0, 0.0, -1000.0], [0.0, 1000.0, 0.0]]), requires_grad=True)
    out = L.cross_entropy(x, np.array([0, 0]), reduction="none")
    out.sum().backward()
    np.testing.assert_array_equal(out.data, [0.0, 1000.0])
    np.testing.assert_array_equal(x.grad, [[0, 0, 0], [-1, 1, 0]])
    with pytest.raises(ValueError, match="labels"):
        L.cross_entropy(x, np.array([0, -1]))
    with pytest.raises(TypeError, match="integer"):
        L.cross_entropy(x, np.array([0.0, 1.0]))


# ---------------------------------------------------------------------------- RPN
def rpn_values(obj, deltas, labels, targets, sampled, lam=1.0):
    out = L.rpn_loss(Tensor(obj), Tensor(deltas), labels, targets, sampled, box_weight=lam)
    return out["loss_objectness"].item(), out["loss_rpn_box_reg"].item()


@given(rpn_case(), st.sampled_from([0.5, 1.0, 10.0]))
def test_rpn_loss_gradients_match_finite_differences(case, lam):
    obj, deltas, labels, targets, sampled = case

    def total(o, d, t):
        out = L.rpn_loss(o, d, labels, t, sampled, box_weight=lam)
        return out["loss_objectness"] + out["loss_rpn_box_reg"]

    check_gradients(total, obj, deltas, targets)


@given(rpn_case(), st.sampled_from([1.0, 10.0]))
def test_rpn_loss_matches_paper_equation(case, lam):
    obj, deltas, labels, targets, sampled = case
    expected = ref_rpn(obj, deltas, labels, targets, np.flatnonzero(sampled), lam)
    assert_close(rpn_values(obj, deltas, labels, targets, sampled, lam), expected, rtol=1e-9)


@requires_torchvision
@settings(max_examples=25)
@given(rpn_case())
def test_rpn_loss_matches_torchvision(case):
    from torchvision.models.detection.rpn import RegionProposalNetwork  # noqa: PLC0415

    obj, deltas, labels, targets, sampled = case
    pos, neg = sampled & (labels == 1), sampled & (labels == 0)
    # compute_loss reads only self.fg_bg_sampler: hand it the sampler's answer.
    stub = SimpleNamespace(fg_bg_sampler=lambda _: ([torch.tensor(pos)], [torch.tensor(neg)]))
    to, td = t64(obj, True), t64(deltas, True)
    t_obj, t_box = RegionProposalNetwork.compute_loss(stub, to, td, [t64(labels)], [t64(targets)])
    o, d = Tensor(obj, requires_grad=True), Tensor(deltas, requires_grad=True)
    # torchvision samples positives first; ours takes them in anchor order (same sums).
    ours = L.rpn_loss(o, d, labels, targets, np.flatnonzero(sampled))
    if not sampled.any():  # torchvision divides by zero here; we promise a finite 0
        assert np.isnan(t_obj.item()) and ours["loss_objectness"].item() == 0
        return
    (ours["loss_objectness"] + 2 * ours["loss_rpn_box_reg"]).backward()
    (t_obj + 2 * t_box).backward()
    assert_close(ours["loss_objectness"].item(), t_obj.item())
    assert_close(ours["loss_rpn_box_reg"].item(), t_box.item())
    assert_close(o.grad, to.grad.numpy())
    assert_close(d.grad, td.grad.numpy())


@given(rpn_case())
def test_rpn_ignored_anchors_never_contribute(case):
    obj, deltas, labels, targets, sampled = case
    ignored = labels == -1
    base = rpn_values(obj, deltas, labels, targets, sampled)
    # Even when the caller lists ignored anchors as sampled, and whatever their predictions are.
    wild_obj, wild_deltas = obj.copy(), deltas.copy()
    wild_obj[ignored], wild_deltas[ignored] = 1e6, -1e6
    assert rpn_values(wild_obj, wild_deltas, labels, targets, sampled | ignored) == base
    o, d = Tensor(wild_obj, requires_grad=True), Tensor(wild_deltas, requires_grad=True)
    out = L.rpn_loss(o, d, labels, targets, sampled | ignored)
    (out["loss_objectness"] + out["loss_rpn_box_reg"]).backward()
    assert not o.grad[ignored].any() and not d.grad[ignored].any()


@given(rpn_case())
def test_rpn_sampled_as_mask_or_indices_or_default(case):
    obj, deltas, labels, targets, sampled = case
    base = rpn_values(obj, deltas, labels, targets, sampled)
    assert rpn_values(obj, deltas, labels, targets, np.flatnonzero(sampled)) == base
    everyone = labels >= 0
    assert rpn_values(obj, deltas, labels, targets, None) == rpn_values(
        obj, deltas, labels, targets, everyone
    )


def test_rpn_with_no_sampled_anchor_is_a_finite_zero():
    obj = Tensor(np.array([1.0, -2.0, np.inf]), requires_grad=True)
    deltas = Tensor(np.ones((3, 4)), requires_grad=True)
    labels = np.array([1, 0, -1])
    for sampled in [np.zeros(3, dtype=bool), np.array([], dtype=np.int64), np.array([2])]:
        out = L.rpn_loss(obj, deltas, labels, np.zeros((3, 4)), sampled)
        total = out["loss_objectness"] + out["loss_rpn_box_reg"]
        assert total.item() == 0.0 and total.requires_grad
        total.backward()
        assert not obj.grad.any() and not deltas.grad.any()
        obj.zero_grad()
        deltas.zero_grad()


def test_rpn_with_only_negatives_has_zero_box_loss():
    out = L.rpn_loss(Tensor(np.zeros(2)), Tensor(np.ones((2, 4))), [0, 0], np.zeros((2, 4)))
    assert out["loss_rpn_box_reg"].item() == 0.0
    assert out["loss_objectness"].item() == pytest.approx(math.log(2))


# ---------------------------------------------------------------------------- box head
@given(fastrcnn_case())
def test_fastrcnn_loss_gradients_match_finite_differences(case):
    logits, deltas, labels, targets = case

    def total(x, d, t):
        cls, box = L.fastrcnn_loss(x, d, labels, t)
        return cls + box

    check_gradients(total, logits, deltas, targets)


@given(fastrcnn_case())
def test_fastrcnn_loss_matches_paper_equation(case):
    logits, deltas, labels, targets = case
    cls, box = L.fastrcnn_loss(Tensor(logits), Tensor(deltas), labels, targets)
    assert_close([cls.item(), box.item()], ref_fastrcnn(logits, deltas, labels, targets))


@requires_torchvision
@settings(max_examples=25)
@given(fastrcnn_case())
def test_fastrcnn_loss_matches_torchvision(case):
    from torchvision.models.detection.roi_heads import fastrcnn_loss  # noqa: PLC0415

    logits, deltas, labels, targets = case
    tx, td = t64(logits, True), t64(deltas, True)
    t_cls, t_box = fastrcnn_loss(tx, td, [torch.tensor(labels)], [t64(targets)])
    x, d = Tensor(logits, requires_grad=True), Tensor(deltas, requires_grad=True)
    cls, box = L.fastrcnn_loss(x, d, labels, targets)
    (cls + 3 * box).backward()
    (t_cls + 3 * t_box).backward()
    assert_close([cls.item(), box.item()], [t_cls.item(), t_box.item()])
    assert_close(x.grad, tx.grad.numpy())
    assert_close(d.grad, td.grad.numpy())


def test_fastrcnn_box_gradient_only_on_gt_class_of_foreground_rois():
    rng = np.random.default_rng(0)
    labels = np.array([2, 0, 1])
    d = Tensor(rng.standard_normal((3, 12)), requires_grad=True)
    _, box = L.fastrcnn_loss(Tensor(rng.standard_normal((3, 3))), d, labels, np.zeros((3, 4)))
    box.backward()
    nonzero = d.grad.reshape(3, 3, 4).any(axis=2)
    np.testing.assert_array_equal(nonzero, [[0, 0, 1], [0, 0, 0], [0, 1, 0]])


def test_fastrcnn_loss_empty_inputs_are_finite_zeros():
    # Only background RoIs: no box loss.
    x = Tensor(np.zeros((2, 3)), requires_grad=True)
    d = Tensor(np.ones((2, 12)), requires_grad=True)
    cls, box = L.fastrcnn_loss(x, d, np.array([0, 0]), np.zeros((2, 4)))
    assert box.item() == 0.0 and cls.item() == pytest.approx(math.log(3))
    (cls + box).backward()
    assert not d.grad.any()
    # No RoI at all.
    x = Tensor(np.zeros((0, 3)), requires_grad=True)
    d = Tensor(np.zeros((0, 12)), requires_grad=True)
    cls, box = L.fastrcnn_loss(x, d, np.zeros(0, dtype=np.int64), np.zeros((0, 4)))
    assert cls.item() == 0.0 and box.item() == 0.0
    (cls + box).backward()
    assert x.grad.shape == (0, 3) and d.grad.shape == (0, 12)


# ---------------------------------------------------------------------------- mask head
@settings(max_examples=25)
@given(mask_case())
def test_mask_loss_gradients_match_finite_differences(case):
    logits, labels, targets = case
    check_gradients(lambda x, t: L.mask_loss(x, labels, t), logits, targets)


@given(mask_case())
def test_mask_loss_matches_paper_definition(case):
    logits, labels, targets = case
    out = L.mask_loss(Tensor(logits), labels, targets).item()
    assert out == pytest.approx(ref_mask(logits, labels, targets), rel=1e-9)


@given(mask_case())
def test_mask_loss_gradient_is_exactly_zero_off_the_gt_channel(case):
    logits, labels, targets = case
    x = Tensor(logits, requires_grad=True)
    L.mask_loss(x, labels, targets).backward()
    off = np.ones(logits.shape[:2], dtype=bool)
    off[np.arange(len(labels)), labels] = False
    assert np.all(x.grad[off] == 0.0)
    # The other classes' masks do not move the loss at all ("no competition among classes").
    shifted = logits.copy()
    shifted[off] += 5.0
    assert (
        L.mask_loss(Tensor(shifted), labels, targets).item()
        == L.mask_loss(Tensor(logits), labels, targets).item()
    )


@requires_torchvision
@settings(max_examples=15)
@given(mask_case(), st.integers(0, 2**31 - 1))
def test_mask_loss_matches_torchvision(case, seed):
    """Call torchvision's maskrcnn_loss itself: it crops the GT masks onto the proposals with
    RoIAlign, then takes the GT class's channel. We feed our loss the same crops."""
    from torchvision.models.detection.roi_heads import (  # noqa: PLC0415
        maskrcnn_loss,
        project_masks_on_boxes,
    )

    logits, labels, _ = case
    r, k, m, _ = logits.shape
    rng = np.random.default_rng(seed)
    gt_masks = t64(rng.random((2, 12, 12)) > 0.5)  # (G, H, W)
    gt_labels = torch.tensor(rng.integers(1, k, size=2))  # (G,)
    matched = torch.tensor(rng.integers(0, 2, size=r))  # (R,)
    corner = rng.uniform(0, 6, size=(r, 2))
    proposals = t64(np.concatenate([corner, corner + rng.uniform(2, 6, size=(r, 2))], axis=1))
    tx = t64(logits, True)
    expected = maskrcnn_loss(tx, [proposals], [gt_masks], [gt_labels], [matched])
    expected.backward()
    targets = project_masks_on_boxes(gt_masks, proposals, matched, m).numpy()  # (R, M, M)

    x = Tensor(logits, requires_grad=True)
    out = L.mask_loss(x, gt_labels[matched].numpy(), targets)
    out.backward()
    assert_close(out.item(), expected.item())
    assert_close(x.grad, tx.grad.numpy())


def test_mask_loss_with_no_roi_is_a_zero_connected_to_the_graph():
    x = Tensor(np.zeros((0, 3, 4, 4)), requires_grad=True)
    out = L.mask_loss(x, np.zeros(0, dtype=np.int64), np.zeros((0, 4, 4)))
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert x.grad.shape == (0, 3, 4, 4)


def test_mask_loss_rejects_bad_labels():
    with pytest.raises(ValueError, match="labels"):
        L.mask_loss(Tensor(np.zeros((1, 2, 2, 2))), np.array([2]), np.zeros((1, 2, 2)))


# ---------------------------------------------------------------------------- dtypes
def test_float32_in_float32_out():
    rng = np.random.default_rng(1)

    def f32(*shape):
        return Tensor(rng.standard_normal(shape).astype(np.float32), requires_grad=True)

    obj, deltas, logits, box, masks = f32(6), f32(6, 4), f32(3, 2), f32(3, 8), f32(3, 2, 2, 2)
    rpn = L.rpn_loss(obj, deltas, [1, 0, -1, 1, 0, 0], np.zeros((6, 4)))  # float64 targets
    cls, reg = L.fastrcnn_loss(logits, box, [1, 0, 1], np.zeros((3, 4)))
    mask = L.mask_loss(masks, [1, 1, 1], np.ones((3, 2, 2)))
    total = rpn["loss_objectness"] + rpn["loss_rpn_box_reg"] + cls + reg + mask
    assert total.dtype == np.float32
    total.backward()
    assert all(t.grad.dtype == np.float32 for t in (obj, deltas, logits, box, masks))


# ---------------------------------------------------------------------------- CPU == GPU
@pytest.mark.gpu
def test_losses_on_gpu_match_cpu():
    import cupy  # noqa: PLC0415

    rng = np.random.default_rng(0)
    a, r, k, m = 50, 6, 4, 5
    labels_a = rng.integers(-1, 2, size=a)
    labels_r = rng.integers(0, k, size=r)
    inputs = {
        "obj": rng.standard_normal(a) * 5,
        "deltas": rng.standard_normal((a, 4)),
        "logits": rng.standard_normal((r, k)),
        "box": rng.standard_normal((r, 4 * k)),
        "masks": rng.standard_normal((r, k, m, m)) * 4,
    }
    t_a, t_r, t_m = rng.standard_normal((a, 4)), rng.standard_normal((r, 4)), rng.random((r, m, m))
    sampled = rng.random(a) < 0.5

    def run(xp):
        ts = {name: Tensor(xp.asarray(v), requires_grad=True) for name, v in inputs.items()}
        rpn = L.rpn_loss(
            ts["obj"], ts["deltas"], xp.asarray(labels_a), xp.asarray(t_a), xp.asarray(sampled)
        )
        cls, box = L.fastrcnn_loss(ts["logits"], ts["box"], xp.asarray(labels_r), xp.asarray(t_r))
        mask = L.mask_loss(ts["masks"], xp.asarray(np.maximum(labels_r, 1)), xp.asarray(t_m))
        parts = [rpn["loss_objectness"], rpn["loss_rpn_box_reg"], cls, box, mask]
        sum(parts[1:], parts[0]).backward()
        return [p.item() for p in parts], {n: t.numpy() for n, t in ts.items()}

    cpu_values, cpu_grads = run(np)
    gpu_values, gpu_grads = run(cupy)
    assert_close(gpu_values, cpu_values, rtol=1e-10)
    for name in inputs:
        assert_close(gpu_grads[name], cpu_grads[name], rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------------- softmax mask loss
def ref_softmax_mask(logits, labels, targets):
    """Table 2b's multinomial loss, pixel by pixel: -log softmax over the K masks at the pixel's
    class (the RoI's class inside the GT mask, background 0 outside)."""
    r, k, m, _ = logits.shape
    total = 0.0
    for i in range(r):
        for y in range(m):
            for x in range(m):
                scores = [float(logits[i, c, y, x]) for c in range(k)]
                top = max(scores)
                log_z = top + math.log(sum(math.exp(s - top) for s in scores))
                c = int(labels[i]) if targets[i, y, x] >= 0.5 else 0
                total += log_z - scores[c]
    return total / (r * m * m)


@given(mask_case())
def test_mask_softmax_loss_gradients_match_finite_differences(case):
    logits, labels, targets = case
    check_gradients(lambda x: L.mask_softmax_loss(x, labels, targets), logits)


@given(mask_case())
def test_mask_softmax_loss_matches_its_pixel_loop_definition(case):
    logits, labels, targets = case
    out = L.mask_softmax_loss(Tensor(logits), labels, targets).item()
    assert out == pytest.approx(ref_softmax_mask(logits, labels, targets), rel=1e-9)


@given(mask_case())
def test_mask_softmax_loss_makes_masks_compete(case):
    """Unlike the sigmoid loss, every channel gets a gradient (the softmax couples them), and
    each pixel's gradient sums to zero over the channels."""
    logits, labels, targets = case
    x = Tensor(logits, requires_grad=True)
    L.mask_softmax_loss(x, labels, targets).backward()
    assert np.all(x.grad != 0.0)
    np.testing.assert_allclose(x.grad.sum(axis=1), 0.0, atol=1e-12)


@requires_torch
@settings(max_examples=15)
@given(mask_case())
def test_mask_softmax_loss_matches_torch_cross_entropy(case):
    logits, labels, targets = case
    tx = t64(logits, True)
    classes = torch.tensor(np.where(targets >= 0.5, labels[:, None, None], 0))  # (R, M, M)
    expected = torch.nn.functional.cross_entropy(tx, classes)  # class axis 1 of (R, K, M, M)
    expected.backward()
    x = Tensor(logits, requires_grad=True)
    out = L.mask_softmax_loss(x, labels, targets)
    out.backward()
    assert_close(out.item(), expected.item())
    assert_close(x.grad, tx.grad.numpy())


def test_mask_softmax_loss_edge_cases():
    empty = Tensor(np.zeros((0, 3, 4, 4)), requires_grad=True)
    out = L.mask_softmax_loss(empty, np.zeros(0, dtype=np.int64), np.zeros((0, 4, 4)))
    out.backward()
    assert out.item() == 0.0 and empty.grad.shape == (0, 3, 4, 4)
    logits = Tensor(np.zeros((2, 3, 4, 4)))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        L.mask_softmax_loss(logits, np.array([1, 3]), np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="mask_targets"):
        L.mask_softmax_loss(logits, np.array([1, 2]), np.zeros((2, 5, 5)))
    # Equal logits: every pixel is a uniform guess over K = 3 classes, log 3 whatever the target.
    assert L.mask_softmax_loss(logits, np.array([1, 2]), np.ones((2, 4, 4))).item() == (
        pytest.approx(math.log(3))
    )
