"""Parity with torchvision's Keypoint R-CNN: the same weights and image give the same keypoints.

torchvision's ``keypointrcnn_resnet50_fpn`` is built with a fixed seed and randomised BatchNorm
statistics, its state dict is loaded into minimask's ``r50_fpn_keypoints`` through the weight
table (:data:`minimask.model.weights.RULES`), and both run one small image (192×288, kept at
that size) in float32. The backbone, RPN and box head are the Mask R-CNN's, compared stage by
stage in ``test_parity.py``; here the detections are compared end to end, then the keypoint head
on torchvision's detections (its 56×56 logits), the decoding on torchvision's logits (keypoints
and scores), and the final keypoints end to end. The other direction: minimask's keypoint model
exported under torchvision's names loads strictly into torchvision.

Float32 tolerances are those of ``test_parity.py`` (1e-4 of each stage's scale). The decoded
keypoints are an argmax over a bicubic resize: where two pixels of a heatmap agree to rounding,
either may win (the two resizes sum the same terms in other orders), which moves that keypoint by
a pixel or so; such near ties are allowed, and counted.
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

import torch  # noqa: E402
import torchvision  # noqa: E402, F401

from minimask.bench import parity  # noqa: E402
from minimask.engine import no_grad  # noqa: E402
from minimask.model.config import get_config  # noqa: E402
from minimask.model.keypoint_head import heatmaps_to_keypoints  # noqa: E402
from minimask.model.mask_rcnn import MaskRCNN  # noqa: E402
from minimask.model.weights import load_weights, to_minimask, to_torchvision  # noqa: E402

RTOL32 = 1e-4
SIZE = (192, 288)  # the image, already at the model's size (min_size 192, max_size 288)
CHANGES = {"min_size": 192, "max_size": 288, "box_score_thresh": 0.01, "detections_per_image": 20}


def torchvision_keypointrcnn():
    from torchvision.models.detection import keypointrcnn_resnet50_fpn  # noqa: PLC0415

    torch.manual_seed(parity.SEED)
    model = keypointrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=2,
        num_keypoints=17,
        min_size=CHANGES["min_size"],
        max_size=CHANGES["max_size"],
        box_score_thresh=CHANGES["box_score_thresh"],
        box_detections_per_img=CHANGES["detections_per_image"],
    )
    parity.randomize_norms(model, parity.SEED + 1)
    return model.eval()


@pytest.fixture(scope="module")
def models():
    reference = torchvision_keypointrcnn()
    ours = MaskRCNN(get_config("r50_fpn_keypoints", **CHANGES))
    report = load_weights(ours, parity.torchvision_state(reference), log=lambda line: None)
    assert report.kind == "keypointrcnn" and not report.fresh and not report.unused
    return reference, ours.eval()


@pytest.fixture(scope="module")
def stages(models):
    """torchvision's detections and keypoint stages, and minimask's on the same inputs."""
    reference, ours = models
    image = parity.smooth_image(*SIZE)
    heads = reference.roi_heads
    with torch.no_grad():
        batch, _ = reference.transform([torch.from_numpy(image)])
        features = reference.backbone(batch.tensors)
        proposals, _ = reference.rpn(batch, features)
        detections, _ = heads(features, proposals, batch.image_sizes)
        boxes = [d["boxes"] for d in detections]
        pooled = heads.keypoint_roi_pool(features, boxes, batch.image_sizes)
        logits = heads.keypoint_predictor(heads.keypoint_head(pooled))  # (D, 17, 56, 56)
        final = reference([torch.from_numpy(image)])[0]
    theirs = {
        "boxes": boxes[0].numpy(),
        "logits": logits.numpy(),
        "keypoints": detections[0]["keypoints"].numpy(),
        "keypoints_scores": detections[0]["keypoints_scores"].numpy(),
        "final": {k: v.numpy() for k, v in final.items()},
    }
    with no_grad():
        x, sizes, _, _ = ours.preprocess([image])
        padded = tuple(x.shape[-2:])
        assert sizes == [SIZE] and batch.image_sizes == [SIZE]
        levels = ours.fpn(ours.backbone(x))[:4]
        logits = ours.keypoint_head(levels, [theirs["boxes"]], padded).data
        keypoints, scores = heatmaps_to_keypoints(theirs["logits"], theirs["boxes"])
        final = ours([image])[0]
    return {"logits": logits, "keypoints": keypoints, "scores": scores, "final": final}, theirs


def assert_close(ours, theirs, rtol, what):
    diff, rel = parity.differences(ours, theirs)
    assert rel <= rtol, f"{what}: max |Δ| = {diff:.3g}, {rel:.3g} of its scale (bound {rtol:g})"


def assert_keypoints_agree(ours, theirs, boxes, what, max_ties=0.02):
    """The same keypoints, except near ties that moved by at most a few pixels of the box."""
    assert ours.shape == theirs.shape
    moved = np.abs(ours[..., :2] - theirs[..., :2]).max(axis=2)  # (D, K)
    assert (ours[..., 2] == 1).all() and (theirs[..., 2] == 1).all()
    tie = moved > 1e-3 * np.abs(theirs).max()
    assert tie.mean() <= max_ties, f"{what}: {tie.sum()} of {tie.size} keypoints moved"
    side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])[:, None]
    assert (moved <= np.maximum(0.1 * side, 3)).all(), f"{what}: a keypoint moved far"
    return int(tie.sum())


@pytest.mark.slow
def test_detections_end_to_end(stages):
    ours, theirs = stages
    a, b = ours["final"], theirs["final"]
    assert len(b["boxes"]) == CHANGES["detections_per_image"]  # the cap is reached
    np.testing.assert_array_equal(a["labels"], b["labels"])
    assert_close(a["boxes"], b["boxes"], RTOL32, "boxes")
    assert_close(a["scores"], b["scores"], RTOL32, "scores")


@pytest.mark.slow
def test_keypoint_logits_on_the_same_detections(stages):
    ours, theirs = stages
    assert ours["logits"].shape == (CHANGES["detections_per_image"], 17, 56, 56)
    assert_close(ours["logits"], theirs["logits"], RTOL32, "keypoint logits")


@pytest.mark.slow
def test_decoding_on_the_same_logits(stages):
    ours, theirs = stages
    assert_keypoints_agree(ours["keypoints"], theirs["keypoints"], theirs["boxes"], "decoded")
    same = np.abs(ours["keypoints"] - theirs["keypoints"]).max(axis=2) < 1e-3
    assert_close(ours["scores"][same], theirs["keypoints_scores"][same], RTOL32, "scores")


@pytest.mark.slow
def test_final_keypoints_end_to_end(stages):
    ours, theirs = stages
    a, b = ours["final"], theirs["final"]
    assert a["keypoints"].shape == b["keypoints"].shape == (CHANGES["detections_per_image"], 17, 3)
    assert_keypoints_agree(a["keypoints"], b["keypoints"], b["boxes"], "final keypoints")
    same = np.abs(a["keypoints"] - b["keypoints"]).max(axis=2) < 1e-3
    assert same.mean() > 0.9
    assert_close(a["keypoints_scores"][same], b["keypoints_scores"][same], 1e-3, "final scores")


def test_export_loads_strictly_into_torchvision():
    """minimask's keypoint model under torchvision's names: a strict load, equal values."""
    from torchvision.models.detection import keypointrcnn_resnet50_fpn  # noqa: PLC0415

    ours = MaskRCNN(get_config("r50_fpn_keypoints"))
    exported = to_torchvision({k: np.asarray(v) for k, v in ours.state_dict().items()})
    reference = keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2)
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    back = to_minimask(parity.torchvision_state(reference), kind="keypointrcnn")
    for key, value in ours.state_dict().items():
        np.testing.assert_array_equal(back[key], np.asarray(value), err_msg=key)
