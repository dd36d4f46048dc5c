"""Parity with torchvision, end to end: the same weights and image give the same numbers.

torchvision's ``maskrcnn_resnet50_fpn`` is built with a fixed seed and randomised BatchNorm
statistics, its state dict is loaded into minimask's ``r50_fpn``, and both run the same raw
427×640 image. Every stage is compared (``minimask.bench.parity`` extracts them; ``python -m
minimask.bench parity`` prints the same comparison as a table):

- inference in float32 at 800 px: batch, P2..P6, RPN head, proposals, box head, postprocess,
  mask head, final detections and pasted masks (each head also on torchvision's inputs to it);
- inference in float64 at 224 px, where the two agree to float64 rounding, which shows that
  the float32 gaps are rounding and not a difference of method;
- one training step at 256 px: the five losses, the sampled RoIs and every parameter's gradient;
- the other direction: a minimask model exported to ``.pth`` loads strictly into torchvision and
  gives the same detections;
- the glue between the networks, on constructed inputs: proposal filtering, training-sample
  selection and detection post-processing. Mask pasting is compared with torchvision's
  ``paste_masks_in_image`` in ``test_transform.py``.

Float32 tolerances. The two frameworks sum convolutions in different orders (torch's own
kernels, minimask's im2col GEMMs), so each of the ~60 layers rounds differently: differences of a
few float32 epsilons (6e-8) times sqrt(K) for K-term sums (K up to 4608), compounding through the
depth. Measured, every tensor stage agrees to about 1e-5 of its largest value; the bound is 1e-4
(:data:`RTOL32`). A real mistake (an eps, a swapped channel or anchor order, padding, a level
mapped one off) moves values by O(1) of that scale. In float64 the same comparison agrees to
about 1e-14 (:data:`RTOL64` = 1e-10).

torch and torchvision are test references only: the module is skipped when either is not
installed, and fails loudly when one is installed but broken.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

if importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchvision") is None:
    pytest.skip(
        "torch or torchvision is not installed (pip install -e .[reference])",
        allow_module_level=True,
    )

import torch  # noqa: E402 - after the skip: an installed but broken torch must fail loudly
import torchvision  # noqa: E402, F401 - imported so that a broken install fails here

from minimask.bench import parity  # noqa: E402
from minimask.model.config import get_config  # noqa: E402
from minimask.model.mask_rcnn import MaskRCNN  # noqa: E402
from minimask.model.roi_heads import RoIHeads  # noqa: E402
from minimask.model.rpn import RPN  # noqa: E402
from minimask.model.weights import export_weights, to_minimask  # noqa: E402
from minimask.nn import init  # noqa: E402
from minimask.nn.norm import FrozenBatchNorm2d  # noqa: E402
from minimask.ops.anchors import AnchorGenerator  # noqa: E402

RTOL32 = 1e-4  # float32, relative to each stage's largest value (see the module docstring)
RTOL64 = 1e-10  # float64: ~1e-14 measured; 1e-10 leaves room for other BLAS builds
BIG = 10**6  # a sampler batch larger than any candidate count: every candidate is kept


def assert_close(ours, theirs, rtol: float, what: str) -> None:
    """``max |ours - theirs| <= rtol * max |theirs|``, with the numbers in the message."""
    diff, rel = parity.differences(ours, theirs)
    assert rel <= rtol, f"{what}: max |Δ| = {diff:.3g}, {rel:.3g} of its scale (bound {rtol:g})"


def assert_same_order_up_to_near_ties(ours, theirs, scores, tie: float, rtol: float, what: str):
    """The same boxes (within ``rtol`` of the largest coordinate) in the same order, except that
    boxes whose reference ``scores`` differ by at most ``tie`` may trade places (rounding of the
    scores can reorder those, and nothing else); returns the positions that moved."""
    assert ours.shape == theirs.shape, f"{what}: {len(ours)} boxes, torchvision {len(theirs)}"
    match, distance = parity.match_boxes(ours, theirs)  # ours[i] is theirs[match[i]]
    assert (distance <= rtol * float(np.abs(theirs).max())).all(), f"{what}: boxes differ"
    assert len(set(match.tolist())) == len(match), f"{what}: not one-to-one"
    moved = np.flatnonzero(match != np.arange(len(match)))
    gaps = np.abs(scores[match[moved]] - scores[moved])
    assert (gaps <= tie).all(), f"{what}: {moved[gaps > tie][:5]} moved, score gaps {gaps.max()}"
    return moved


def assert_masks_agree(ours, theirs) -> None:
    """Binary (D, H, W) masks: IoU >= 0.99 each, or two pixels apart for masks under 100 pixels.

    A pixel whose pasted probability lies within rounding of the 0.5 threshold can land on
    either side, and the box it is pasted into moves by the boxes' rounding. Random weights give
    many masks under 100 pixels, where one pixel is already more than 1% of the union, and
    saturated mask logits (probabilities of 0 or 1) make pixels exactly half way between two
    cells, at 0.5 itself. Measured: one mask of 67 pixels with 2 pixels flipped, both pasted by
    minimask at exactly 0.5 (1 pixel before the paste was limited to each box's pixels, which
    sums the same terms in another order).
    """
    iou = parity.mask_ious(ours, theirs)
    union = (ours.astype(bool) | theirs.astype(bool)).sum(axis=(1, 2))
    flipped = (ours != theirs).sum(axis=(1, 2))
    ok = (iou >= 0.99) | ((union < 100) & (flipped <= 2))
    assert ok.all(), f"masks {np.flatnonzero(~ok)}: IoU {iou[~ok]}, {flipped[~ok]} pixels differ"


# ---------------------------------------------------------------------------- float32, 800 px
@pytest.fixture(scope="module")
def image():
    return parity.smooth_image(*parity.IMAGE_SIZE)


@pytest.fixture(scope="module")
def stages32(image):
    """Both models' stages in float32 at the default 800 px: ``(minimask, torchvision)``."""
    reference, ours = parity.parity_models()
    theirs = parity.torchvision_stages(reference, [image])
    return parity.minimask_stages(ours, [image], reference=theirs), theirs


@pytest.mark.slow
def test_batch_and_every_fpn_level(stages32):
    ours, theirs = stages32
    assert ours["image_sizes"] == theirs["image_sizes"] == [(800, 1199)]  # not already 800 px
    assert_close(ours["batch"], theirs["batch"], RTOL32, "batch")
    assert len(ours["features"]) == len(theirs["features"]) == 5
    for level, (a, b) in enumerate(zip(ours["features"], theirs["features"]), start=2):
        assert_close(a, b, RTOL32, f"P{level}")


@pytest.mark.slow
def test_rpn_head_in_anchor_order(stages32):
    ours, theirs = stages32
    assert_close(ours["objectness"], theirs["objectness"], RTOL32, "objectness")
    assert_close(ours["rpn_deltas"], theirs["rpn_deltas"], RTOL32, "RPN deltas")


@pytest.mark.slow
def test_proposals_same_boxes_same_order(stages32):
    ours, theirs = stages32
    a, b = ours["proposals"][0], theirs["proposals"][0]
    assert len(b) == 1000  # rpn_post_nms_top_n_test: a full set to compare
    # Ranking is by score, and scores that differ by less than their rounding can come out in
    # either order (measured: 6 adjacent pairs of 1000). torchvision ranks sigmoid(logit), whose
    # slope is at most 1/4, so two of its scores can swap only when they differ by at most
    # 2 · 1/4 · max |Δ logit|.
    logit_error = np.abs(ours["objectness"] - theirs["objectness"]).max()
    moved = assert_same_order_up_to_near_ties(
        a, b, theirs["proposal_scores"][0], 0.5 * logit_error, RTOL32, "proposals"
    )
    assert len(moved) <= 20  # a handful of near ties, not a different ranking


@pytest.mark.slow
def test_box_head_on_the_same_proposals(stages32):
    ours, theirs = stages32
    assert_close(ours["class_logits"], theirs["class_logits"], RTOL32, "class logits")
    assert_close(ours["box_deltas"], theirs["box_deltas"], RTOL32, "box deltas")


@pytest.mark.slow
def test_postprocess_on_the_same_head_outputs(stages32):
    ours, theirs = stages32
    a, b = ours["detections"][0], theirs["detections"][0]
    assert len(b["boxes"]) == 100  # detections_per_image: the cap is reached
    np.testing.assert_array_equal(a["labels"], b["labels"])
    assert_close(a["boxes"], b["boxes"], RTOL32, "postprocessed boxes")
    assert_close(a["scores"], b["scores"], RTOL32, "postprocessed scores")


@pytest.mark.slow
def test_mask_head_on_the_same_detections(stages32):
    ours, theirs = stages32
    assert ours["mask_logits"].shape == (100, 28, 28)
    assert_close(ours["mask_logits"], theirs["mask_logits"], RTOL32, "mask logits")


@pytest.mark.slow
def test_final_detections_end_to_end(stages32):
    ours, theirs = stages32
    a, b = ours["final"][0], theirs["final"][0]
    assert len(a["boxes"]) == len(b["boxes"]) == 100
    np.testing.assert_array_equal(a["labels"], b["labels"])
    assert_close(a["boxes"], b["boxes"], RTOL32, "final boxes")
    assert_close(a["scores"], b["scores"], RTOL32, "final scores")
    assert b["scores"][0] - b["scores"][-1] > 0.1  # scores are spread, not 100 near-ties


@pytest.mark.slow
def test_final_masks_end_to_end(stages32, image):
    ours, theirs = stages32
    a, b = ours["final"][0]["masks"], theirs["final"][0]["masks"]
    assert a.shape == b.shape == (100, *image.shape[1:])
    assert a.dtype == np.uint8 and b.sum() > 0
    assert_masks_agree(a, b)


# ---------------------------------------------------------------------------- float64, 224 px
@pytest.fixture(scope="module")
def stages64(image):
    """Both models in float64 (a small size: this only has to show the gap is rounding)."""
    reference, ours = parity.parity_models(dtype=np.float64, min_size=224)
    theirs = parity.torchvision_stages(reference, [image])
    return parity.minimask_stages(ours, [image], reference=theirs), theirs


@pytest.mark.slow
def test_float64_every_stage_agrees_to_rounding(stages64):
    ours, theirs = stages64
    assert ours["batch"].dtype == np.float64 and theirs["batch"].dtype == np.float64
    assert ours["image_sizes"] == theirs["image_sizes"] == [(224, 335)]
    assert_close(ours["batch"], theirs["batch"], RTOL64, "batch")
    for level, (a, b) in enumerate(zip(ours["features"], theirs["features"]), start=2):
        assert_close(a, b, RTOL64, f"P{level}")
    for key in ("objectness", "rpn_deltas", "class_logits", "box_deltas", "mask_logits"):
        assert_close(ours[key], theirs[key], RTOL64, key)
    # No near ties at this precision: the proposals come in exactly torchvision's order.
    assert_close(ours["proposals"][0], theirs["proposals"][0], RTOL64, "proposals")
    for stage in ("detections", "final"):
        a, b = ours[stage][0], theirs[stage][0]
        assert len(b["boxes"]) == 100
        np.testing.assert_array_equal(a["labels"], b["labels"])
        assert_close(a["scores"], b["scores"], RTOL64, f"{stage} scores")
    assert_close(ours["detections"][0]["boxes"], theirs["detections"][0]["boxes"], RTOL64, "boxes")
    # torchvision scales boxes back to the input with float32 ratios (resize_boxes builds them
    # with dtype=torch.float32) even in a float64 model: float32 rounding, 6e-8, is the bound.
    assert_close(ours["final"][0]["boxes"], theirs["final"][0]["boxes"], 1e-6, "final boxes")
    # The pasted masks are not compared here: minimask pastes in float32 whatever the model's
    # dtype (transform.paste_masks), and these saturated masks (logits of ±100) put many pixels
    # exactly half way between a 0 and a 1 cell, where float32 and float64 round to either side
    # of 0.5 (torchvision's own float32 and float64 pastes of them differ as much: IoU 0.33).
    # Their logits agree above; the float32 tests compare the pasted masks.


# ---------------------------------------------------------------------------- one training step
def training_batch():
    """Two images of different sizes (256×383 and 256×341 after resizing), 3 and 2 objects."""
    sizes = [(427, 640), (360, 480)]
    images = [parity.smooth_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    targets = [parity.mask_targets(h, w, 3 - i, seed=10 + i) for i, (h, w) in enumerate(sizes)]
    return images, targets


@pytest.fixture(scope="module")
def training_step():
    """One training step of each model from the same weights, on torchvision's proposals.

    Both samplers keep every candidate (a batch of 10^6 per image), so neither draws anything
    random. Both box heads get torchvision's proposals: which 2000 proposals survive top-k and
    NMS is compared at inference and in the glue tests below; here it would only let a near tie
    at the 2000th place change the sampled RoIs. Random weights propose almost nothing on the
    objects, so boxes jittered around each GT box join the proposals: the box and mask losses
    then cover dozens of foreground RoIs, not only the GT boxes themselves.
    """
    changes = {"min_size": 256}
    reference = parity.torchvision_maskrcnn(
        frozen_bn=True, rpn_batch_size_per_image=BIG, box_batch_size_per_image=BIG, **changes
    ).train()
    ours = parity.minimask_from(
        parity.torchvision_state(reference),
        rpn_batch_per_image=BIG,
        box_batch_per_image=BIG,
        **changes,
    ).train()
    images, targets = training_batch()

    # torchvision: GeneralizedRCNN.forward, one submodule at a time to keep the proposals.
    batch, their_targets = reference.transform(
        [torch.from_numpy(im) for im in images],
        [{k: torch.from_numpy(v) for k, v in t.items()} for t in targets],
    )
    features = reference.backbone(batch.tensors)
    proposals, theirs = reference.rpn(batch, features, their_targets)
    rng = np.random.default_rng(3)
    for i, t in enumerate(their_targets):
        near = np.repeat(t["boxes"].numpy(), 16, axis=0)  # GT boxes are at least 32 px wide
        near += rng.normal(0, 3, near.shape).astype(np.float32)
        proposals[i] = torch.cat([proposals[i].detach(), torch.from_numpy(near)])
    _, head_losses = reference.roi_heads(features, proposals, batch.image_sizes, their_targets)
    theirs.update(head_losses)
    sum(theirs.values()).backward()
    with torch.no_grad():
        their_samples = reference.roi_heads.select_training_samples(proposals, their_targets)

    # minimask: MaskRCNN.forward in training mode, with torchvision's proposals for the heads.
    x, sizes, _, our_targets = ours.preprocess(images, targets)
    padded = tuple(x.shape[-2:])
    levels = ours.fpn(ours.backbone(x))
    _, losses = ours.rpn(levels, sizes, padded, our_targets)
    their_proposals = [p.numpy() for p in proposals]
    box_losses, sampled = ours.roi_heads(levels[:4], their_proposals, sizes, padded, our_targets)
    losses.update(box_losses)
    losses["loss_mask"] = ours.mask_head.loss(levels[:4], sampled, our_targets, padded)
    total = losses["loss_objectness"]
    for name in ("loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"):
        total = total + losses[name]
    total.backward()

    their_grads = to_minimask(
        {k: p.grad.numpy() for k, p in reference.named_parameters() if p.grad is not None},
        kind="maskrcnn",
    )
    our_grads = {k: p.grad for k, p in ours.named_parameters()}
    return {
        "losses": (
            {k: float(v.data) for k, v in losses.items()},
            {k: float(v.detach()) for k, v in theirs.items()},
        ),
        "samples": (sampled, their_samples),
        "grads": (our_grads, their_grads),
    }


@pytest.mark.slow
def test_training_losses_match(training_step):
    ours, theirs = training_step["losses"]
    assert (
        set(ours)
        == set(theirs)
        == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
    )
    for name, value in theirs.items():
        assert value > 0, name  # every loss has terms (positives exist for each)
        # Means over up to 10^5 float32 terms, summed in different orders: measured within
        # 5e-7 relative; a wrongly sampled anchor or RoI would move them by ~1e-5 (one term).
        np.testing.assert_allclose(ours[name], value, rtol=5e-6, err_msg=name)


@pytest.mark.slow
def test_training_samples_the_same_rois(training_step):
    sampled, (their_boxes, their_matches, their_labels, their_targets) = training_step["samples"]
    assert len(sampled) == 2
    for i, (boxes, labels, matches, regression) in enumerate(sampled):
        tb, tm, tl = (their_boxes[i].numpy(), their_matches[i].numpy(), their_labels[i].numpy())
        tr = their_targets[i].numpy()
        assert len(boxes) == len(tb) > 2000  # every proposal and GT box is kept
        assert (labels > 0).sum() == (tl > 0).sum() > 20
        # Both keep all candidates, in different orders: compare rows sorted by their box.
        ours_order, their_order = np.lexsort(boxes.T[::-1]), np.lexsort(tb.T[::-1])
        np.testing.assert_array_equal(boxes[ours_order], tb[their_order])
        np.testing.assert_array_equal(labels[ours_order], tl[their_order])
        np.testing.assert_array_equal(matches[ours_order], tm[their_order])
        # Encoded in float32 with different operation orders: a few ulps of deltas up to ~10.
        np.testing.assert_allclose(regression[ours_order], tr[their_order], rtol=1e-5, atol=1e-5)


# One layer of each part, asserted among the compared gradients (all of them are compared), so
# that a name mapping that lost a part could not shrink the comparison unnoticed.
GRADIENT_LAYERS = (
    "mask_head.logits.weight",
    "roi_heads.predictor.cls_score.weight",
    "roi_heads.predictor.bbox_pred.weight",
    "rpn.head.bbox_pred.weight",
    "fpn.smooth.0.weight",
    "backbone.stages.3.2.conv2.0.weight",  # a C5 conv
    "backbone.stem.0.weight",
)


@pytest.mark.slow
def test_training_gradients_match(training_step):
    ours, theirs = training_step["grads"]
    assert set(ours) == set(theirs)  # every parameter trains in both (FrozenBN has none)
    assert set(GRADIENT_LAYERS) <= set(theirs)
    for name, g in theirs.items():
        assert ours[name] is not None, name
        # Gradients carry the forward's rounding plus discrete flips: a ReLU input within
        # rounding of 0 (or a RoIAlign sample on a pixel edge) passes the gradient in one
        # framework and not in the other. A C5 weight gradient sums only ~200 positions (8×12
        # per image), so one flip moves one output channel's row by ~1/200: measured up to 5e-3
        # of the largest entry with single-threaded BLAS. The norm of the whole difference is
        # steadier: measured at most 9e-4 of the gradient's norm (2e-4 with two threads), and
        # the same step in float64 agreed to 2e-7 (what is left there being torchvision scaling
        # GT boxes by float32 ratios). A missing or wrong term would be O(1): every loss also
        # reaches layers of its own (its head's), so none can hide under this bound.
        a, b = np.asarray(ours[name], np.float64), np.asarray(g, np.float64)
        rel = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert rel <= 1e-2, f"gradient of {name}: |Δ| / |g| = {rel:.3g}"


# ---------------------------------------------------------------------------- the other direction
@pytest.mark.slow
def test_exported_minimask_weights_give_the_same_detections_in_torchvision(tmp_path, image):
    init.manual_seed(7)  # minimask's own random initialisation
    ours = MaskRCNN(get_config("r50_fpn", min_size=320, box_score_thresh=parity.SCORE_THRESH))
    norms = [m for _, m in ours.named_modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(norms) == 53  # ResNet-50's
    rng = np.random.default_rng(7)  # not the identity, drawn as parity.randomize_norms does
    for m in norms:
        c = m.num_features
        m.running_mean.data[...] = 0.1 * rng.standard_normal(c)
        m.running_var.data[...] = 0.5 + 1.5 * rng.random(c)
        m.weight.data[...] = 0.5 + rng.random(c)
        m.bias.data[...] = 0.1 * rng.standard_normal(c)
    ours.eval()
    path = tmp_path / "minimask_r50.pth"
    export_weights(ours, path)

    from torchvision.models.detection import maskrcnn_resnet50_fpn

    theirs = maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=320, box_score_thresh=parity.SCORE_THRESH
    )
    theirs.load_state_dict(torch.load(path, weights_only=True), strict=True)
    theirs.eval()
    with torch.no_grad():
        (b,) = theirs([torch.from_numpy(image)])
    (a,) = ours([image])
    assert len(b["boxes"]) == 100 and len(a["boxes"]) == len(b["boxes"])
    np.testing.assert_array_equal(a["labels"], b["labels"].numpy())
    assert_close(a["boxes"], b["boxes"].numpy(), RTOL32, "boxes")
    assert_close(a["scores"], b["scores"].numpy(), RTOL32, "scores")
    assert_masks_agree(a["masks"], (b["masks"][:, 0] >= 0.5).numpy().astype(np.uint8))

    # The stage extraction of minimask.bench.parity reproduces each model's own forward, so the
    # stage tests above compare what the models really compute.
    their_stages = parity.torchvision_stages(theirs, [image])
    our_stages = parity.minimask_stages(ours, [image])
    for key in ("boxes", "scores", "labels"):
        np.testing.assert_array_equal(their_stages["final"][0][key], b[key].numpy())
        np.testing.assert_array_equal(our_stages["final"][0][key], a[key])
    np.testing.assert_array_equal(their_stages["final"][0]["masks"], b["masks"][:, 0] >= 0.5)
    np.testing.assert_array_equal(our_stages["final"][0]["masks"], a["masks"])


# ---------------------------------------------------------------------------- the glue
def _levels_and_anchors(padded, strides=(4, 8, 16, 32, 64)):
    """Feature sizes, anchors (T, 4) and level of each anchor (T,) of a padded batch size."""
    sizes = [(-(-padded[0] // s), -(-padded[1] // s)) for s in strides]
    generator = AnchorGenerator.fpn((32, 64, 128, 256, 512), (0.5, 1.0, 2.0))
    per_level = generator.per_level(padded, sizes)
    level_of = np.concatenate([np.full(len(a), i) for i, a in enumerate(per_level)])
    return [len(a) for a in per_level], np.concatenate(per_level), level_of


PRE_NMS = {"training": 150, "testing": 100}  # top-k per level in the RPN glue tests
POST_NMS = {"training": 200, "testing": 120}  # top-N per image


def _filter_both(logits, deltas, anchors, level_of, counts, sizes, training: bool):
    """``(minimask's proposals, torchvision's, torchvision's scores)`` from the same logits (N, T)
    and deltas (N, T, 4): ``RPN._proposals``, and ``filter_proposals`` after its decoding."""
    from torchvision.models.detection.rpn import RegionProposalNetwork

    config = get_config(
        "r50_fpn",
        rpn_pre_nms_top_n_train=PRE_NMS["training"],
        rpn_post_nms_top_n_train=POST_NMS["training"],
        rpn_pre_nms_top_n_test=PRE_NMS["testing"],
        rpn_post_nms_top_n_test=POST_NMS["testing"],
    )
    got = RPN(config, 8).train(training)._proposals(logits, deltas, anchors, level_of, sizes)
    theirs = RegionProposalNetwork(
        None, None, 0.7, 0.3, 256, 0.5, PRE_NMS, POST_NMS, nms_thresh=0.7
    ).train(training)
    n = len(sizes)
    decoded = theirs.box_coder.decode(
        torch.from_numpy(deltas).reshape(-1, 4), [torch.from_numpy(anchors)] * n
    ).view(n, -1, 4)
    expected, scores = theirs.filter_proposals(
        decoded, torch.from_numpy(logits).reshape(-1, 1), sizes, counts
    )
    return got, [e.numpy() for e in expected], [s.numpy() for s in scores]


@pytest.mark.parametrize("training", [False, True])
def test_rpn_proposal_filtering_matches_filter_proposals(training):
    """``RPN._proposals`` against torchvision's ``filter_proposals`` for three images of
    different sizes in one padded batch: top-k per level (some levels have fewer anchors than
    k), clipping, tiny boxes removed, per-level NMS, top-N."""
    padded, sizes = (192, 256), [(192, 256), (170, 230), (128, 200)]
    counts, anchors, level_of = _levels_and_anchors(padded)
    rng = np.random.default_rng(3)
    n, t = len(sizes), len(anchors)
    # Well-separated logits (a shuffled grid), so that no two scores tie (see the next test).
    logits = rng.permuted(np.tile(np.linspace(-4, 4, t), (n, 1)), axis=1).astype(np.float32)
    deltas = (0.3 * rng.standard_normal((n, t, 4))).astype(np.float32)
    deltas[:, ::50, 2:] = -12.0  # width and height x e^-12: below min_size 1e-3, removed
    mode = "training" if training else "testing"
    pre, post = PRE_NMS[mode], POST_NMS[mode]
    assert min(counts) < pre < max(counts)
    # Some tiny boxes are among the top-k candidates, so both must remove them.
    tiny = np.zeros(t, bool)
    tiny[::50] = True
    top = [np.argsort(-logits[:, level_of == lv], axis=1)[:, :pre] for lv in range(5)]
    assert any(tiny[level_of == lv][idx].any() for lv, idx in enumerate(top))

    got, expected, _ = _filter_both(logits, deltas, anchors, level_of, counts, sizes, training)
    assert [len(b) for b in expected].count(post) >= 1  # the top-N cut is reached
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.shape == b.shape and 0 < len(b) <= post, f"image {i}"
        # The same decoding in float32 (exp rounds differently in NumPy and torch): coordinates
        # up to ~1000 px agree to a few of their ulps (6e-5 at 1000).
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-3, err_msg=f"image {i}")
        assert ((a[:, 2:] - a[:, :2]) >= 1e-3).all()


def test_rpn_saturated_objectness_gives_the_same_proposals_in_another_order():
    """A known, accepted difference. torchvision ranks float32 sigmoid(logit), and every logit
    above ~17 rounds to probability 1.0; it orders those ties by position (level by level, or,
    for more than 1000 boxes, as its unstable sort leaves them), while minimask ranks the logits
    themselves. The same proposals come out, in another order among the saturated ones, unless
    such ties straddle the top-N cut."""
    padded, sizes = (192, 256), [(192, 256)]
    counts, anchors, level_of = _levels_and_anchors(padded)
    rng = np.random.default_rng(0)
    t = len(anchors)
    logits = rng.standard_normal((1, t)).astype(np.float32)
    saturated = rng.choice(t, 40, replace=False)
    logits[0, saturated] = rng.uniform(17, 25, 40)
    deltas = (0.3 * rng.standard_normal((1, t, 4))).astype(np.float32)
    (a,), (b,), (scores,) = _filter_both(logits, deltas, anchors, level_of, counts, sizes, False)
    assert a.shape == b.shape == (POST_NMS["testing"], 4)
    match, distance = parity.match_boxes(a, b)
    assert (distance <= 1e-3).all() and len(set(match.tolist())) == len(a)  # the same boxes
    moved = np.flatnonzero(match != np.arange(len(a)))
    assert len(moved) > 0  # reordered ...
    assert (scores[moved] == 1.0).all() and (scores[match[moved]] == 1.0).all()  # ... ties only


def _candidates(rng, gt, count, size):
    """Proposals around each GT box (jittered) and elsewhere, float32 (count, 4)."""
    h, w = size
    near = gt[rng.integers(0, len(gt), count // 2)] + rng.normal(0, 12, (count // 2, 4))
    xy = rng.uniform(0, [w, h], (count - count // 2, 2))
    wh = rng.uniform(8, 120, (count - count // 2, 2))
    boxes = np.concatenate([near, np.concatenate([xy, xy + wh], axis=1)])
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    return boxes.astype(np.float32)


def _torchvision_roi_heads(batch_size: int, score_thresh=0.05, detections=100):
    from torchvision.models.detection.roi_heads import RoIHeads as TorchRoIHeads

    return TorchRoIHeads(
        None,
        None,
        None,
        0.5,
        0.5,
        batch_size,
        0.25,
        (10.0, 10.0, 5.0, 5.0),
        score_thresh,
        0.5,
        detections,
    )


def test_training_sample_selection_matches_select_training_samples():
    """``RoIHeads.sample_proposals`` against the deterministic part of torchvision's
    ``select_training_samples``: GT boxes added to the proposals, matching at 0.5, labels,
    matched indices and regression targets; both samplers keep everything (batch 10^6)."""
    rng = np.random.default_rng(5)
    size = (300, 400)
    gts = [
        np.array([[20, 30, 120, 200], [200, 50, 380, 150], [150, 180, 260, 290]], np.float32),
        np.array([[50, 60, 300, 280]], np.float32),
    ]
    labels = [np.array([3, 7, 3]), np.array([9])]
    proposals = [_candidates(rng, g, 300, size) for g in gts]
    targets = [{"boxes": g, "labels": lab} for g, lab in zip(gts, labels)]

    ours = RoIHeads(get_config("r50_fpn", box_batch_per_image=BIG), 8)
    got = ours.sample_proposals(proposals, targets)
    theirs = _torchvision_roi_heads(BIG)
    t_props, t_matches, t_labels, t_regression = theirs.select_training_samples(
        [torch.from_numpy(p) for p in proposals],
        [
            {"boxes": torch.from_numpy(g), "labels": torch.from_numpy(lab)}
            for g, lab in zip(gts, labels)
        ],
    )
    for i, (boxes, lab, matches, regression) in enumerate(got):
        tb = t_props[i].numpy()
        assert len(boxes) == len(tb) == len(proposals[i]) + len(gts[i])
        o, t = np.lexsort(boxes.T[::-1]), np.lexsort(tb.T[::-1])
        np.testing.assert_array_equal(boxes[o], tb[t])
        np.testing.assert_array_equal(lab[o], t_labels[i].numpy()[t])
        np.testing.assert_array_equal(matches[o], t_matches[i].numpy()[t])
        assert 0 < (lab > 0).sum() < len(lab)  # foreground and background both present
        # float32 encoding with different operation orders: a few ulps of values up to ~20.
        np.testing.assert_allclose(regression[o], t_regression[i].numpy()[t], atol=1e-5, rtol=1e-5)

    # With the paper's 512 per image, 25% positive: the same counts (the subsets are random).
    ours = RoIHeads(get_config("r50_fpn", box_batch_per_image=64), 8)
    theirs = _torchvision_roi_heads(64)
    got = ours.sample_proposals(proposals, targets)
    _, _, t_labels, _ = theirs.select_training_samples(
        [torch.from_numpy(p) for p in proposals],
        [
            {"boxes": torch.from_numpy(g), "labels": torch.from_numpy(lab)}
            for g, lab in zip(gts, labels)
        ],
    )
    for (_, lab, _, _), tl in zip(got, t_labels):
        assert len(lab) == len(tl) == 64
        assert (lab > 0).sum() == (tl > 0).sum() == 16  # int(64 · 0.25), enough positives


def test_detection_postprocess_matches_postprocess_detections():
    """``RoIHeads.postprocess`` against torchvision's ``postprocess_detections``: softmax,
    per-class decoding, clipping, score threshold, tiny boxes, per-class NMS, top detections,
    for three images (one with no proposals)."""
    rng = np.random.default_rng(11)
    k, sizes = 11, [(300, 400), (200, 260), (250, 250)]
    proposals = [
        _candidates(rng, np.array([[40, 40, 200, 220]], np.float32), 400, sizes[0]),
        _candidates(rng, np.array([[10, 20, 150, 190]], np.float32), 250, sizes[1]),
        np.zeros((0, 4), np.float32),
    ]
    r = sum(len(p) for p in proposals)
    logits = (2.5 * rng.standard_normal((r, k))).astype(np.float32)
    deltas = rng.standard_normal((r, 4 * k)).astype(np.float32)
    deltas[::40, 2::4] = -60.0  # tiny boxes (sides e^-12 of the proposal's): removed at 1e-2
    config = get_config("r50_fpn", num_classes=k, detections_per_image=60)
    got = RoIHeads(config, 8).postprocess(logits, deltas, proposals, sizes)
    boxes, scores, labels = _torchvision_roi_heads(512, detections=60).postprocess_detections(
        torch.from_numpy(logits),
        torch.from_numpy(deltas),
        [torch.from_numpy(p) for p in proposals],
        sizes,
    )
    assert [len(d["boxes"]) for d in got] == [len(b) for b in boxes]
    assert [len(b) for b in boxes][:2] == [60, 60] and len(boxes[2]) == 0
    for d, b, s, lab in zip(got, boxes, scores, labels):
        np.testing.assert_array_equal(d["labels"], lab.numpy())
        # Softmax and decoding in float32 in both, in different operation orders.
        np.testing.assert_allclose(d["scores"], s.numpy(), rtol=1e-5)
        np.testing.assert_allclose(d["boxes"], b.numpy(), rtol=0, atol=1e-3)
