"""Keypoint data: the stick figures, COCO person keypoints (coco-mini), flipping, resizing, OKS AP
through the evaluation path, and a short training run on the figures that lowers the loss."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from minimask.data import figures
from minimask.data.coco import CocoDataset, flip_index
from minimask.data.transforms import horizontal_flip, resize
from minimask.evaluate import coco_evaluate, detections_to_results, ground_truth_coco
from minimask.model.config import get_config
from minimask.model.mask_rcnn import MaskRCNN
from minimask.model.transform import ImageTransform
from minimask.nn import init
from minimask.train import TrainConfig, fit

COCO_MINI = os.path.join("..", "shared", "data", "coco-mini")
KEYPOINTS_JSON = os.path.join(COCO_MINI, "annotations", "person_keypoints_train2017.json")
needs_coco_mini = pytest.mark.skipif(
    not os.path.exists(KEYPOINTS_JSON), reason=f"coco-mini keypoints not at {KEYPOINTS_JSON}"
)


# ---------------------------------------------------------------------------- the stick figures
def test_figures_are_deterministic_and_well_formed():
    a, b = figures.make_sample(3, 17), figures.make_sample(3, 17)
    np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(a["image"], figures.make_sample(3, 18)["image"])
    for i in range(30):
        s = figures.make_sample(0, i, split="val")
        g = len(s["boxes"])
        assert 1 <= g <= 3 and s["keypoints"].shape == (g, 7, 3) and s["masks"].shape[0] == g
        assert set(np.unique(s["keypoints"][..., 2])) <= {1.0, 2.0}  # every joint labelled
        x, y = s["keypoints"][..., 0], s["keypoints"][..., 1]
        boxes = s["boxes"][:, None, :]
        assert ((x >= boxes[..., 0]) & (x <= boxes[..., 2])).all()  # joints inside their box
        assert ((y >= boxes[..., 1]) & (y <= boxes[..., 3])).all()
        np.testing.assert_allclose(
            s["areas"],
            (s["boxes"][:, 2] - s["boxes"][:, 0]) * (s["boxes"][:, 3] - s["boxes"][:, 1]),
        )
        # the figure's left hand and foot lie right of its right ones (before the tilt turns
        # them, by at most 25°: the left hand is still further right than the right one)
        assert (s["keypoints"][:, 3, 0] > s["keypoints"][:, 4, 0]).all()


def test_a_joint_painted_over_is_hidden():
    hidden = [
        (s, g, k)
        for s in (figures.make_sample(0, i) for i in range(300))
        for g, k in zip(*np.nonzero(s["keypoints"][..., 2] == 1))
    ]
    assert hidden, "no occluded joint in 300 images"
    for s, g, k in hidden[:10]:
        x, y = s["keypoints"][g, k, :2].astype(int)
        assert not s["masks"][g, y, x]  # its pixel is not in its own (visible) mask ...
        assert s["masks"][g + 1 :, y, x].any()  # ... but in a later figure's


def test_figure_flip_index_swaps_left_and_right():
    assert figures.FLIP_INDEX == flip_index(figures.KEYPOINT_NAMES)
    assert [figures.FLIP_INDEX[k] for k in figures.FLIP_INDEX] == list(range(7))  # an involution


# ---------------------------------------------------------------------------- flipping, resizing
def test_horizontal_flip_moves_and_relabels_keypoints():
    s = figures.make_sample(0, 5)
    s["keypoints"][0, 2] = [7.0, 9.0, 0.0]  # one unlabelled keypoint
    flipped = horizontal_flip(s, figures.FLIP_INDEX)
    w = s["image"].shape[2]
    for k, source in enumerate(figures.FLIP_INDEX):
        if s["keypoints"][0, source, 2] > 0:
            np.testing.assert_allclose(
                flipped["keypoints"][0, k, 0], w - s["keypoints"][0, source, 0]
            )
            np.testing.assert_allclose(
                flipped["keypoints"][0, k, 1:], s["keypoints"][0, source, 1:]
            )
    np.testing.assert_array_equal(flipped["keypoints"][0, 2], [0, 0, 0])  # stays unlabelled
    twice = horizontal_flip(flipped, figures.FLIP_INDEX)
    s["keypoints"][0, 2] = 0
    np.testing.assert_allclose(twice["keypoints"], s["keypoints"], atol=1e-4)
    # still the figure's left hand on the right of its right hand, seen in the mirror
    assert (flipped["keypoints"][:, 3, 0] > flipped["keypoints"][:, 4, 0]).all()
    with pytest.raises(ValueError, match="flip_index"):
        horizontal_flip(s)


def test_keypoints_resize_as_boxes_in_the_model_transform_and_back():
    s = figures.make_sample(1, 2)
    config = get_config("tiny_keypoints", min_size=200, max_size=300)
    transform = ImageTransform(config)
    _, sizes, original, (t,) = transform([s["image"]], [s], np, np.float32)
    assert sizes == [(200, 200)]
    np.testing.assert_allclose(
        t["keypoints"][..., :2], s["keypoints"][..., :2] * 200 / 128, rtol=1e-6
    )
    np.testing.assert_array_equal(t["keypoints"][..., 2], s["keypoints"][..., 2])
    np.testing.assert_allclose(resize(s, 200, 300)["keypoints"], t["keypoints"], rtol=1e-6)
    (back,) = transform.postprocess(
        [{"boxes": t["boxes"], "keypoints": t["keypoints"]}], sizes, original
    )
    np.testing.assert_allclose(back["keypoints"], s["keypoints"], rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------- COCO keypoints
@needs_coco_mini
def test_coco_keypoints_load_as_stored_and_flip_with_cocos_names():
    data = CocoDataset.from_root(COCO_MINI, "train2017", keypoints=True)
    with open(KEYPOINTS_JSON) as f:
        raw = json.load(f)
    person = raw["categories"][0]
    assert data.keypoint_names == tuple(person["keypoints"]) and len(data.keypoint_names) == 17
    assert data.skeleton == tuple((a - 1, b - 1) for a, b in person["skeleton"])
    names = data.keypoint_names
    for k, j in enumerate(data.flip_index):  # left_eye <-> right_eye ..., nose stays
        assert names[j] == names[k].replace("left", "#").replace("right", "left").replace(
            "#", "right"
        )
    sample = data[0]
    anns = [a for a in raw["annotations"] if a["image_id"] == sample["image_id"]]
    expected = np.array([a["keypoints"] for a in anns], np.float32).reshape(-1, 17, 3)
    order = np.argsort([a["id"] for a in anns])  # the dataset keeps the file's order
    assert sample["keypoints"].shape == (len(anns), 17, 3)
    np.testing.assert_array_equal(
        np.sort(sample["keypoints"], axis=0), np.sort(expected[order], axis=0)
    )
    flipped = horizontal_flip(sample, data.flip_index)
    left_eye, right_eye = names.index("left_eye"), names.index("right_eye")
    w = sample["image"].shape[2]
    labelled = sample["keypoints"][:, right_eye, 2] > 0
    np.testing.assert_allclose(
        flipped["keypoints"][labelled, left_eye, 0], w - sample["keypoints"][labelled, right_eye, 0]
    )


@needs_coco_mini
def test_bad_coco_keypoints_are_dropped_and_counted(tmp_path):
    with open(KEYPOINTS_JSON) as f:
        raw = json.load(f)
    raw["annotations"][0]["keypoints"] = raw["annotations"][0]["keypoints"][:-3]  # 16 triples
    raw["annotations"][1]["keypoints"][2] = 5  # a visibility of 5
    path = tmp_path / "person_keypoints_train2017.json"
    path.write_text(json.dumps(raw))
    with pytest.warns(UserWarning, match="2 x bad keypoints"):
        data = CocoDataset(str(path), os.path.join(COCO_MINI, "train2017"))
    assert data.problems.counts["bad keypoints"] == 2


# ---------------------------------------------------------------------------- OKS AP
def perfect_results(samples, jitter=0.0, seed=0):
    rng = np.random.default_rng(seed)
    results = []
    for s in samples:
        kp = s["keypoints"].copy()
        kp[..., :2] += jitter * rng.standard_normal(kp[..., :2].shape)
        det = {"boxes": s["boxes"], "scores": np.ones(len(kp)), "labels": s["labels"],
               "keypoints": kp}  # fmt: skip
        results += detections_to_results(s["image_id"], det)
    return results


def test_oks_ap_of_perfect_keypoints_is_one_and_of_noisy_ones_less():
    samples = list(figures.FiguresDataset(12))
    gt = ground_truth_coco(samples, figures.CLASSES, figures.KEYPOINT_NAMES, figures.SKELETON)
    perfect = coco_evaluate(gt, perfect_results(samples), ("bbox", "keypoints"),
                            sigmas=figures.OKS_SIGMAS)  # fmt: skip
    assert perfect["keypoints"]["AP"] == pytest.approx(1.0)
    assert perfect["bbox"]["AP"] == pytest.approx(1.0)
    noisy = coco_evaluate(gt, perfect_results(samples, jitter=2.0), ("keypoints",),
                          sigmas=figures.OKS_SIGMAS)  # fmt: skip
    assert 0.1 < noisy["keypoints"]["AP"] < 0.95
    # COCO's 17 sigmas do not fit 7 keypoints: pycocotools refuses rather than guess
    with pytest.raises(ValueError):
        coco_evaluate(gt, perfect_results(samples), ("keypoints",))


@needs_coco_mini
def test_oks_ap_of_perfect_coco_keypoints_is_one():
    data = CocoDataset.from_root(COCO_MINI, "train2017", keypoints=True)
    samples = [{**data.target(i), "labels": None} for i in data.image_ids[:20]]
    results = []
    for s in samples:
        # only the persons with labelled keypoints: the others are ignored by the keypoint AP,
        # and a detection of one would need keypoints made up to match it
        keep = ~s["is_crowd"] & (s["keypoints"][..., 2] > 0).any(axis=1)
        det = {"boxes": s["boxes"][keep], "scores": np.ones(keep.sum()),
               "labels": np.ones(keep.sum(), int), "keypoints": s["keypoints"][keep]}  # fmt: skip
        results += detections_to_results(s["image_id"], det)
    ids = [s["image_id"] for s in samples]
    metrics = coco_evaluate(data.coco, results, ("keypoints",), image_ids=ids)
    assert metrics["keypoints"]["AP"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------- a short training run
@pytest.mark.slow
def test_a_short_run_on_the_figures_lowers_the_keypoint_loss(tmp_path):
    init.manual_seed(0)
    model = MaskRCNN(get_config("tiny_keypoints", num_keypoints=7))
    config = TrainConfig(iterations=40, lr=0.02, warmup_iters=5, checkpoint_every=1000)
    records = fit(model, figures.figures_batches(0, 2), config, str(tmp_path), progress=False,
                  log=lambda line: None)  # fmt: skip
    losses = np.array([r["loss_keypoint"] for r in records])
    assert losses[:5].mean() > 7.5  # about log(56²) = 8.05 at the start
    assert losses[-10:].mean() < losses[:5].mean() - 1.0


def test_figures_give_a_cpu_preset_a_small_keypoint_head():
    """``--dataset figures --preset tiny`` builds tiny_keypoints' head, not eight 512-wide convs."""
    from minimask.model.config import get_config  # noqa: PLC0415
    from minimask.workflow import FiguresData  # noqa: PLC0415

    small = get_config("tiny_keypoints").keypoint_conv_channels
    assert FiguresData().model_config("tiny").keypoint_conv_channels == small
    assert FiguresData().model_config("tiny").num_keypoints == len(figures.KEYPOINT_NAMES)
    assert FiguresData().model_config("r50_fpn").keypoint_conv_channels == (512,) * 8
