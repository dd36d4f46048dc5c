"""The keypoint branch (Mask R-CNN §5): bilinear upsampling, heatmap targets, the loss, decoding.

Each piece three ways where it applies: finite differences in float64, a plain-loop reference
written from the definition, and torch/torchvision (``F.interpolate``, ``keypoints_to_heatmap``,
``keypointrcnn_loss``, ``heatmaps_to_keypoints``). Then the head's shapes and the model's
keypoint targets.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minimask.engine import Tensor
from minimask.model.config import get_config
from minimask.model.keypoint_head import KeypointHead, heatmaps_to_keypoints, keypoints_to_heatmap
from minimask.model.mask_rcnn import MaskRCNN
from minimask.nn import init, upsample_bilinear
from minimask.nn.pool import resize_bicubic, upsample_bilinear_forward
from minimask.ops.losses import keypoint_loss
from tests.helpers import check_gradients, requires_torch, requires_torchvision, torch


# ---------------------------------------------------------------------------- bilinear upsampling
def bilinear_reference(x, scale):
    """Nested loops from the definition: output pixel (i, j) at source ((i + 0.5)/s - 0.5, ...),
    clamped at 0, blending its four neighbours (the last row/column repeats)."""
    n, c, h, w = x.shape
    ho, wo = math.floor(h * scale), math.floor(w * scale)
    out = np.zeros((n, c, ho, wo))
    for i in range(ho):
        u = max((i + 0.5) / scale - 0.5, 0.0)
        i0 = min(int(u), h - 1)
        i1, fu = min(i0 + 1, h - 1), u - i0
        for j in range(wo):
            v = max((j + 0.5) / scale - 0.5, 0.0)
            j0 = min(int(v), w - 1)
            j1, fv = min(j0 + 1, w - 1), v - j0
            out[:, :, i, j] = (
                (1 - fu) * ((1 - fv) * x[:, :, i0, j0] + fv * x[:, :, i0, j1])
                + fu * ((1 - fv) * x[:, :, i1, j0] + fv * x[:, :, i1, j1])
            )  # fmt: skip
    return out


@st.composite
def bilinear_cases(draw, max_side=5):
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    h, w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    scale = draw(st.sampled_from([2.0, 3.0, 1.5, 0.5]))
    seed = draw(st.integers(0, 2**16))
    x = np.random.default_rng(seed).standard_normal((n, c, h, w))
    if math.floor(h * scale) < 1 or math.floor(w * scale) < 1:
        scale = 2.0
    return x, scale


@settings(max_examples=60)
@given(bilinear_cases(max_side=4))
def test_upsample_bilinear_gradients_match_finite_differences(case):
    x, scale = case
    check_gradients(lambda t: upsample_bilinear(t, scale), x)


@settings(max_examples=60)
@given(bilinear_cases(max_side=6))
def test_upsample_bilinear_matches_nested_loops(case):
    x, scale = case
    out, _ = upsample_bilinear_forward(x, scale)
    np.testing.assert_allclose(out, bilinear_reference(x, scale), rtol=1e-12, atol=1e-12)


@requires_torch
@settings(max_examples=60)
@given(bilinear_cases(max_side=9))
def test_upsample_bilinear_matches_torch(case):
    x, scale = case
    t = Tensor(x, requires_grad=True)
    out = upsample_bilinear(t, scale)
    grad = np.random.default_rng(0).standard_normal(out.shape)
    out.backward(grad)
    ref_x = torch.tensor(x, requires_grad=True)
    ref = torch.nn.functional.interpolate(
        ref_x, scale_factor=scale, mode="bilinear", align_corners=False,
        recompute_scale_factor=False,
    )  # fmt: skip
    ref.backward(torch.tensor(grad))
    np.testing.assert_allclose(out.data, ref.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(t.grad, ref_x.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_upsample_bilinear_keeps_a_constant_and_its_sum_of_gradients():
    x = np.full((1, 2, 28, 28), 3.25)
    t = Tensor(x, requires_grad=True)
    out = upsample_bilinear(t, 2.0)
    assert out.shape == (1, 2, 56, 56)
    np.testing.assert_allclose(out.data, 3.25)
    out.sum().backward()  # each output pixel's weights sum to 1: the input gradients sum to 56²
    np.testing.assert_allclose(t.grad.sum(axis=(2, 3)), 56 * 56)


@requires_torch
@pytest.mark.parametrize("size", [(56, 56), (37, 91), (20, 13), (1, 1), (130, 60), (56, 200)])
def test_resize_bicubic_matches_torch(size):
    x = np.random.default_rng(1).standard_normal((3, 56, 56))
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(x)[:, None], size=size, mode="bicubic", align_corners=False
    )[:, 0]
    np.testing.assert_allclose(resize_bicubic(x, size), expected.numpy(), rtol=1e-10, atol=1e-12)


def test_resize_bicubic_keeps_a_constant():
    np.testing.assert_allclose(resize_bicubic(np.full((2, 5, 7), -1.5), (11, 3)), -1.5)


# ---------------------------------------------------------------------------- heatmap targets
def keypoint_case(seed, rois=6, k=5):
    """RoIs, keypoints around them (some outside, some on the far edges, some unlabelled)."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 200, (rois, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 90, (rois, 2))], axis=1).astype(np.float32)
    t = rng.uniform(-0.2, 1.2, (rois, k, 2))
    kp = np.zeros((rois, k, 3), np.float32)
    kp[..., 0] = boxes[:, None, 0] + t[..., 0] * (boxes[:, None, 2] - boxes[:, None, 0])
    kp[..., 1] = boxes[:, None, 1] + t[..., 1] * (boxes[:, None, 3] - boxes[:, None, 1])
    kp[0, 0, 0], kp[0, 1, 1] = boxes[0, 2], boxes[0, 3]  # exactly on the right / bottom edge
    kp[..., 2] = rng.choice([0, 1, 2], (rois, k), p=[0.2, 0.3, 0.5])
    kp[0, :2, 2] = 2
    return boxes, kp


def test_keypoints_to_heatmap_by_hand():
    boxes = np.array([[10, 20, 30, 60]], np.float32)  # 20 wide, 40 high, heatmap 4x4
    kp = np.array(
        [[[10, 20, 2], [29.9, 59.9, 1], [30, 60, 2], [15, 40, 0], [9, 30, 2]]], np.float32
    )
    cells, valid = keypoints_to_heatmap(kp, boxes, 4)
    # (0, 0) -> cell 0; (19.9/5, 39.9/10) -> (3, 3); on both far edges -> (3, 3);
    # unlabelled -> invalid; left of the box -> invalid. Invalid cells read 0.
    np.testing.assert_array_equal(valid, [[True, True, True, False, False]])
    np.testing.assert_array_equal(cells, [[0, 15, 15, 0, 0]])


@requires_torchvision
@pytest.mark.parametrize("seed", range(4))
def test_keypoints_to_heatmap_matches_torchvision(seed):
    from torchvision.models.detection.roi_heads import keypoints_to_heatmap as reference

    boxes, kp = keypoint_case(seed)
    cells, valid = keypoints_to_heatmap(kp, boxes, 56)
    t_cells, t_valid = reference(torch.from_numpy(kp), torch.from_numpy(boxes), 56)
    np.testing.assert_array_equal(valid, t_valid.numpy().astype(bool))
    np.testing.assert_array_equal(cells, t_cells.numpy())
    assert 0 < valid.sum() < valid.size


# ---------------------------------------------------------------------------- the loss
def keypoint_loss_reference(logits, cells, valid):
    """Plain loops: the mean over labelled keypoints of -log softmax(heatmap)[target cell]."""
    terms = []
    for r in range(logits.shape[0]):
        for k in range(logits.shape[1]):
            if valid[r, k]:
                z = logits[r, k].reshape(-1)
                log_sum = z.max() + math.log(np.exp(z - z.max()).sum())
                terms.append(log_sum - z[cells[r, k]])
    return sum(terms) / len(terms) if terms else 0.0


def loss_case(seed, rois=4, k=3, m=6):
    rng = np.random.default_rng(seed)
    logits = 2 * rng.standard_normal((rois, k, m, m))
    cells = rng.integers(0, m * m, (rois, k))
    valid = rng.random((rois, k)) < 0.6
    valid[0, 0] = True
    return logits, cells * valid, valid


@pytest.mark.parametrize("seed", range(3))
def test_keypoint_loss_matches_plain_loops_and_finite_differences(seed):
    logits, cells, valid = loss_case(seed)
    loss = keypoint_loss(Tensor(logits), cells, valid)
    assert loss.item() == pytest.approx(keypoint_loss_reference(logits, cells, valid), rel=1e-12)
    grad = check_gradients(lambda t: keypoint_loss(t, cells, valid), logits)[0]
    assert (grad[~valid] == 0).all()  # an unlabelled keypoint's heatmap gets no gradient


def test_keypoint_loss_of_nothing_is_zero_and_connected():
    logits = Tensor(np.ones((2, 3, 4, 4)), requires_grad=True)
    loss = keypoint_loss(logits, np.zeros((2, 3), int), np.zeros((2, 3), bool))
    loss.backward()
    assert loss.item() == 0.0 and (logits.grad == 0).all()
    empty = Tensor(np.ones((0, 3, 4, 4)), requires_grad=True)
    assert keypoint_loss(empty, np.zeros((0, 3), int), np.zeros((0, 3), bool)).item() == 0.0


def test_keypoint_loss_refuses_mismatched_targets():
    with pytest.raises(ValueError, match=r"expected \(2, 3\)"):
        keypoint_loss(Tensor(np.ones((2, 3, 4, 4))), np.zeros((2, 4), int), np.ones((2, 4), bool))


@requires_torchvision
@pytest.mark.parametrize("seed", range(3))
def test_keypoint_loss_matches_keypointrcnn_loss(seed):
    """Targets built by :func:`keypoints_to_heatmap` from RoIs of two images, loss and gradient
    against torchvision's ``keypointrcnn_loss`` (which builds its own targets)."""
    from torchvision.models.detection.roi_heads import keypointrcnn_loss

    rng = np.random.default_rng(seed)
    boxes, kp = zip(keypoint_case(seed, rois=5, k=4), keypoint_case(seed + 10, rois=3, k=4))
    matched = [rng.permutation(len(b)) for b in boxes]  # RoI i matches GT matched[i]
    logits = rng.standard_normal((8, 4, 56, 56))
    cells, valid = zip(*(keypoints_to_heatmap(g[m], b, 56) for g, b, m in zip(kp, boxes, matched)))
    ours = Tensor(logits, requires_grad=True)
    loss = keypoint_loss(ours, np.concatenate(cells), np.concatenate(valid))
    loss.backward()
    theirs = torch.tensor(logits, requires_grad=True)
    reference = keypointrcnn_loss(
        theirs,
        [torch.from_numpy(b) for b in boxes],
        [torch.from_numpy(g) for g in kp],
        [torch.from_numpy(m) for m in matched],
    )
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-12)
    np.testing.assert_allclose(ours.grad, theirs.grad.numpy(), rtol=1e-10, atol=1e-15)


# ---------------------------------------------------------------------------- decoding
def test_heatmaps_to_keypoints_finds_a_peak_at_its_pixel():
    """A heatmap peaked at one cell decodes to that cell of the box, at a pixel centre."""
    boxes = np.array([[100, 50, 156, 162]], np.float32)  # 56 x 112 pixels: 1 and 2 per cell
    maps = np.zeros((1, 2, 56, 56), np.float32)
    maps[0, 0, 10, 30] = 5.0
    maps[0, 1, 55, 0] = 7.0
    keypoints, scores = heatmaps_to_keypoints(maps, boxes)
    assert keypoints.shape == (1, 2, 3) and (keypoints[..., 2] == 1).all()
    np.testing.assert_allclose(keypoints[0, 0, :2], [100 + 30.5, 50 + 2 * 10 + 1.5 - 1], atol=1)
    assert keypoints[0, 1, 0] < 101 and keypoints[0, 1, 1] > 160  # the bottom-left cell
    assert scores[0, 0] == pytest.approx(5.0, rel=0.2) and scores[0, 1] > 5


def test_heatmaps_to_keypoints_of_nothing():
    keypoints, scores = heatmaps_to_keypoints(np.zeros((0, 3, 56, 56)), np.zeros((0, 4)))
    assert keypoints.shape == (0, 3, 3) and scores.shape == (0, 3)


@requires_torchvision
@pytest.mark.parametrize("seed", range(3))
def test_heatmaps_to_keypoints_matches_torchvision(seed):
    from torchvision.models.detection.roi_heads import heatmaps_to_keypoints as reference

    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 300, (6, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0.5, 150, (6, 2))], axis=1)  # some < 1 px
    boxes = boxes.astype(np.float32)
    maps = rng.standard_normal((6, 17, 56, 56)).astype(np.float32)  # rough: no near ties
    keypoints, scores = heatmaps_to_keypoints(maps, boxes)
    t_keypoints, t_scores = reference(torch.from_numpy(maps), torch.from_numpy(boxes))
    np.testing.assert_allclose(keypoints, t_keypoints.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(scores, t_scores.numpy(), rtol=1e-5, atol=1e-5)


def test_target_cell_decodes_back_inside_that_cell():
    """keypoints_to_heatmap, then a heatmap with a peak at that cell: the decoded keypoint lies
    within one cell (box size / 56) of the original."""
    boxes, kp = keypoint_case(7, rois=4, k=6)
    kp[..., 2] = 2
    cells, valid = keypoints_to_heatmap(kp, boxes, 56)
    maps = np.zeros((4, 6, 56, 56), np.float32)
    r, k = np.nonzero(valid)
    maps[r, k, cells[r, k] // 56, cells[r, k] % 56] = 10.0
    decoded, _ = heatmaps_to_keypoints(maps, boxes)
    cell = ((boxes[:, 2:] - boxes[:, :2]) / 56)[:, None, :]  # (R, 1, 2) pixels per cell
    error = np.abs(decoded[..., :2] - kp[..., :2])
    assert (error[valid] <= np.broadcast_to(cell + 1, error.shape)[valid]).all()


# ---------------------------------------------------------------------------- the head, the model
def test_head_shapes_and_empty_rois():
    config = get_config("tiny_keypoints", keypoint_conv_channels=(8, 8))
    init.manual_seed(0)
    head = KeypointHead(config, 16)
    rng = np.random.default_rng(0)
    features = [Tensor(rng.standard_normal((2, 16, 32 // 2**i, 32 // 2**i))) for i in range(4)]
    boxes = [np.array([[4, 4, 60, 90], [10, 0, 30, 20]], np.float32), np.zeros((0, 4), np.float32)]
    assert head(features, boxes, (128, 128)).shape == (2, 7, 56, 56)
    empty = [np.zeros((0, 4), np.float32)] * 2
    assert head(features, empty, (128, 128)).shape == (0, 7, 56, 56)
    assert head.m == 56 and head.k == 7


def tiny_sample(seed=0):
    rng = np.random.default_rng(seed)
    kp = np.zeros((2, 7, 3), np.float32)
    kp[..., :2] = rng.uniform(30, 90, (2, 7, 2))
    kp[..., 2] = 2
    kp[1, 3:, 2] = 0
    return rng.random((3, 128, 128)).astype(np.float32), {
        "boxes": np.array([[20, 20, 100, 100], [40, 30, 110, 120]], np.float32),
        "labels": np.array([1, 1]),
        "keypoints": kp,
    }


def test_model_without_mask_head_trains_and_predicts_keypoints():
    init.manual_seed(0)
    model = MaskRCNN(get_config("tiny_keypoints", min_size=96, max_size=96))
    assert not any(k.startswith("mask_head.") for k in model.state_dict())
    image, target = tiny_sample()
    model.train()
    losses = model([image], [target])
    assert set(losses) == {
        "loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_keypoint"
    }  # fmt: skip
    assert losses["loss_keypoint"].item() == pytest.approx(math.log(56 * 56), rel=0.2)
    model.eval()
    (det,) = model([image])
    assert "masks" not in det
    assert det["keypoints"].shape == (len(det["boxes"]), 7, 3)
    assert det["keypoints_scores"].shape == (len(det["boxes"]), 7)
    # back in the input's pixels (128, not 96): inside the boxes, which are the input's
    x, y = det["keypoints"][..., 0], det["keypoints"][..., 1]
    assert (x >= det["boxes"][:, None, 0] - 1e-3).all() and (x <= det["boxes"][:, None, 2]).all()
    assert (y >= det["boxes"][:, None, 1] - 1e-3).all() and (y <= det["boxes"][:, None, 3]).all()


def test_an_image_without_labelled_keypoints_trains_with_a_zero_keypoint_loss():
    """COCO has persons without keypoints (and images with no person labelled at all): their
    RoIs are not trained by the keypoint head, and the step runs."""
    init.manual_seed(0)
    model = MaskRCNN(get_config("tiny_keypoints", min_size=96, max_size=96)).train()
    image, target = tiny_sample()
    target["keypoints"][..., 2] = 0
    losses = model([image], [target])
    assert losses["loss_keypoint"].item() == 0.0
    sum(losses.values(), start=losses["loss_keypoint"]).backward()
    assert model.keypoint_head.logits.weight.grad is None  # not run: nothing to learn
    assert model.roi_heads.predictor.cls_score.weight.grad is not None


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.pop("keypoints"), "has no 'keypoints'"),
        (lambda t: t.update(keypoints=t["keypoints"][:, :5]), r"expected \(G, 7, 3\)"),
        (lambda t: t["keypoints"].__setitem__((1, 2, 2), 3), r"\[1, 2\] has visibility 3"),
        (lambda t: t["keypoints"].__setitem__((0, 4, 0), np.nan), r"\[0, 4\] .* not finite"),
        (lambda t: t.update(keypoints=t["keypoints"][:1]), "different counts"),
    ],
)
def test_bad_keypoint_targets_are_refused_by_name(change, message):
    model = MaskRCNN(get_config("tiny_keypoints")).train()
    image, target = tiny_sample()
    change(target)
    with pytest.raises(ValueError, match=message):
        model([image], [target])
