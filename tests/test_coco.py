"""COCO loading, transforms, crowd regions, results JSON, the subset builder and the CLI.

Every test here builds a small COCO dataset of its own in ``tmp_path`` (images written with
Pillow, JSON in the official layout), so they always run; ``test_coco_mini.py`` repeats the
key checks on real COCO photos.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from minimask.cli import main
from minimask.data.coco import CocoBatches, CocoDataset
from minimask.data.subset import build_subset
from minimask.data.transforms import (
    horizontal_flip,
    random_horizontal_flip,
    resize,
    resized_size,
)
from minimask.evaluate import (
    coco_evaluate,
    detections_to_results,
    save_pr_curves,
    write_results_json,
)
from minimask.model.mask_rcnn import MaskRCNN
from minimask.nn import init
from minimask.ops.matcher import BELOW_LOW_THRESHOLD, IGNORE
from minimask.workflow import coco_model_config

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
]  # COCO's ids have gaps: labels must come out contiguous (1, 2, 3)


def rect(x, y, w, h):
    """A polygon (flat list) tracing the rectangle [x, x+w] x [y, y+h]."""
    return [x, y, x + w, y, x + w, y + h, x, y + h]


def crowd_rle(height, width, x, y, w, h):
    """An uncompressed (crowd-style) RLE of a rectangle, as COCO stores crowd regions."""
    m = np.zeros((height, width), np.uint8)
    m[y : y + h, x : x + w] = 1
    flat = m.flatten(order="F")  # RLE runs go down the columns, starting with zeros
    starts = np.flatnonzero(np.diff(flat)) + 1  # where the value changes
    runs = np.diff(np.concatenate([[0], starts, [flat.size]])).tolist()
    return {"counts": ([0] if flat[0] else []) + runs, "size": [height, width]}


def ann(aid, image_id, cat, bbox, segmentation, crowd=0):
    return {"id": aid, "image_id": image_id, "category_id": cat, "bbox": list(bbox),
            "segmentation": segmentation, "area": float(bbox[2] * bbox[3]),
            "iscrowd": crowd}  # fmt: skip


def write_coco(root, split="val2017", images=None, annotations=None, categories=None):
    """A small dataset in the official layout under ``root``; returns the JSON path.

    Image 1 (64x48 PNG): a person (triangle polygon), a car (box polygon) and a crowd of
    people (uncompressed RLE, far from both). Image 2 (40x30 JPEG): a dog in two polygon parts
    and a car as compressed RLE. Image 3 (32x32): no annotation. Image 4 (48x40): a dog.
    """
    rng = np.random.default_rng(0)
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    if images is None:
        images = [
            {"id": 1, "file_name": "a.png", "width": 64, "height": 48},
            {"id": 2, "file_name": "b.jpg", "width": 40, "height": 30},
            {"id": 3, "file_name": "c.png", "width": 32, "height": 32},
            {"id": 4, "file_name": "d.png", "width": 48, "height": 40},
        ]
        for im in images:
            pixels = rng.integers(0, 256, (im["height"], im["width"], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / im["file_name"])
    if annotations is None:
        car_rle = mask_utils.encode(np.asfortranarray(np.pad(np.ones((8, 10), np.uint8),
                                                             ((20, 2), (28, 2)))))  # fmt: skip
        car_rle["counts"] = car_rle["counts"].decode("ascii")
        annotations = [
            ann(1, 1, 1, (4, 6, 14, 20), [[4, 26, 18, 26, 11, 6]]),
            ann(2, 1, 3, (22, 8, 12, 10), [rect(22, 8, 12, 10)]),
            ann(3, 1, 1, (40, 20, 20, 24), crowd_rle(48, 64, 40, 20, 20, 24), crowd=1),
            ann(4, 2, 18, (2, 2, 20, 14), [rect(2, 2, 8, 14), rect(12, 4, 10, 8)]),
            ann(5, 2, 3, (28, 20, 10, 8), car_rle),
            ann(6, 4, 18, (10, 10, 16, 12), [rect(10, 10, 16, 12)]),
        ]
    data = {"info": {"description": "test"}, "licenses": [], "images": images,
            "annotations": annotations, "categories": categories or CATEGORIES}  # fmt: skip
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(data))
    return path


def quiet_coco(path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def tight_box(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


@pytest.fixture
def coco_root(tmp_path):
    write_coco(tmp_path)
    return tmp_path


# ---------------------------------------------------------------------------- loading
def test_samples_are_in_the_model_format_and_masks_match_pycocotools(coco_root):
    ds = CocoDataset.from_root(coco_root, "val2017")
    ref = quiet_coco(coco_root / "annotations" / "instances_val2017.json")
    assert ds.classes == ["__background__", "person", "car", "dog"]
    assert ds.category_ids.tolist() == [1, 3, 18] and ds.num_classes == 4
    assert ds.image_ids == [1, 2, 4]  # image 3 has no annotation: not for training
    for i in range(len(ds)):
        s = ds[i]
        anns = ref.loadAnns(ref.getAnnIds(imgIds=s["image_id"]))
        h, w = s["orig_size"]
        assert s["image"].shape == (3, h, w) and s["image"].dtype == np.float32
        assert 0 <= s["image"].min() and s["image"].max() <= 1
        assert s["masks"].shape == (len(anns), h, w) and s["masks"].dtype == np.uint8
        for g, a in enumerate(anns):
            np.testing.assert_array_equal(s["masks"][g], ref.annToMask(a))
            x, y, bw, bh = a["bbox"]
            np.testing.assert_allclose(s["boxes"][g], [x, y, x + bw, y + bh])
            assert s["labels"][g] == ds.cat_id_to_label[a["category_id"]]
            assert s["is_crowd"][g] == bool(a["iscrowd"])
    first = ds[0]
    assert first["labels"].tolist() == [1, 2, 1] and first["is_crowd"].tolist() == [0, 0, 1]
    assert first["masks"][2].sum() == 20 * 24  # the crowd RLE decoded
    assert ds[1]["labels"].tolist() == [3, 2]  # dog (two polygons), car (compressed RLE)


def test_category_subset_maps_to_contiguous_labels(coco_root):
    ds = CocoDataset.from_root(coco_root, "val2017", categories="dog,person")
    assert ds.classes == ["__background__", "person", "dog"]
    assert ds.category_ids.tolist() == [1, 18]
    assert ds.image_ids == [1, 2, 4]
    assert ds[0]["labels"].tolist() == [1, 1] and ds[1]["labels"].tolist() == [2]
    assert {c["id"] for c in ds.coco.dataset["categories"]} == {1, 18}
    by_id = CocoDataset.from_root(coco_root, "val2017", categories=[18])
    assert by_id.classes == ["__background__", "dog"] and by_id.image_ids == [2, 4]
    with pytest.raises(ValueError, match="no category 'cat'.*person"):
        CocoDataset.from_root(coco_root, "val2017", categories="cat")


def test_images_without_annotations_are_skipped_for_training_and_kept_for_evaluation(coco_root):
    assert 3 not in CocoDataset.from_root(coco_root, "val2017").image_ids
    ds = CocoDataset.from_root(coco_root, "val2017", keep_empty=True)
    assert ds.image_ids == [1, 2, 3, 4]
    empty = ds[2]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 32, 32)
    assert empty["labels"].shape == (0,) and empty["is_crowd"].shape == (0,)
    only_crowd = CocoDataset.from_root(coco_root, "val2017", categories="person")
    assert only_crowd.image_ids == [1]  # image 1 has a real person besides the crowd


# ---------------------------------------------------------------------------- transforms
def test_resized_size_follows_the_shorter_side_with_a_cap():
    assert resized_size(480, 640, 320, 533) == (320, 426)  # floored, as torch's interpolate
    assert resized_size(640, 480, 800, 1333) == (1066, 800)
    assert resized_size(100, 1000, 320, 533) == (53, 533)  # the longer side caps the scale


def test_resize_and_flip_move_boxes_and_masks_together(coco_root):
    s = CocoDataset.from_root(coco_root, "val2017")[2]  # image 4: one 16x12 box-shaped dog
    np.testing.assert_array_equal(tight_box(s["masks"][0]), s["boxes"][0])
    big = resize(s, 80, 200)  # 40x48 -> 80x96: scale 2
    assert big["image"].shape == (3, 80, 96) and big["masks"].shape == (1, 80, 96)
    np.testing.assert_allclose(big["boxes"][0], [20, 20, 52, 44])
    np.testing.assert_array_equal(tight_box(big["masks"][0]), big["boxes"][0])
    assert big["orig_size"] == (40, 48)
    odd = resize(s, 27, 1000)  # a non-integer scale: the mask's box is within a pixel
    assert np.abs(tight_box(odd["masks"][0]) - odd["boxes"][0]).max() <= 1.0

    flipped = horizontal_flip(big)
    np.testing.assert_allclose(flipped["boxes"][0], [96 - 52, 20, 96 - 20, 44])
    np.testing.assert_array_equal(tight_box(flipped["masks"][0]), flipped["boxes"][0])
    np.testing.assert_array_equal(flipped["image"], big["image"][:, :, ::-1])
    twice = horizontal_flip(flipped)
    for key in ("image", "boxes", "masks"):
        np.testing.assert_array_equal(twice[key], big[key])
    coin = [random_horizontal_flip(big, np.random.default_rng(k)) is big for k in range(20)]
    again = [random_horizontal_flip(big, np.random.default_rng(k)) is big for k in range(20)]
    assert coin == again and 0 < sum(coin) < 20  # seeded, and both outcomes occur


# ---------------------------------------------------------------------------- crowd
def test_crowd_regions_are_never_positive_or_negative(coco_root):
    s = CocoDataset.from_root(coco_root, "val2017")[0]  # person, car, crowd at [40,20,60,44]
    init.manual_seed(0)
    model = MaskRCNN(coco_model_config("tiny", 4, 64, 64))
    anchors = np.array([
        [40, 20, 60, 44],  # exactly the crowd box: IoU 1, yet no positive
        [44, 24, 54, 34],  # inside the crowd: ignored, not background
        [0, 40, 8, 48],  # far from everything: background
        [4, 6, 18, 26],  # the person: matched to GT 0
    ], np.float32)  # fmt: skip
    for matcher in (model.rpn.matcher, model.roi_heads.matcher):
        matches = matcher.match_boxes(s["boxes"], anchors, is_crowd=s["is_crowd"])
        assert matches.tolist() == [IGNORE, IGNORE, BELOW_LOW_THRESHOLD, 0]
        assert not (matches == 2).any()  # the crowd GT (index 2) is never matched
    # The box head's sampled minibatch: no RoI inside the crowd, as foreground or background.
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 56, (400, 2))
    proposals = np.concatenate([xy, xy + rng.uniform(4, 20, (400, 2))], 1).astype(np.float32)
    boxes, labels, matches, _ = model.roi_heads.sample_proposals([proposals], [s])[0]
    inside = (
        (np.minimum(boxes[:, 2], 60) - np.maximum(boxes[:, 0], 40)).clip(0)
        * (np.minimum(boxes[:, 3], 44) - np.maximum(boxes[:, 1], 20)).clip(0)
        / ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    )
    assert len(boxes) > 0 and not (inside[labels == 0] >= 0.5).any()
    assert not (matches[labels > 0] == 2).any()


# ---------------------------------------------------------------------------- results JSON
def test_results_json_loads_with_pycocotools_and_ground_truth_scores_ap_1(coco_root, tmp_path):
    ds = CocoDataset.from_root(coco_root, "val2017", keep_empty=True)
    results = []
    for i in range(len(ds)):
        s, real = ds[i], ~ds[i]["is_crowd"]
        det = {"boxes": s["boxes"][real], "scores": np.linspace(1, 0.5, real.sum()),
               "labels": ds.category_ids[s["labels"][real] - 1],  # real COCO ids
               "masks": s["masks"][real]}  # fmt: skip
        results += detections_to_results(s["image_id"], det)
    path = tmp_path / "results.json"
    write_results_json(str(path), results)
    with contextlib.redirect_stdout(io.StringIO()):
        loaded = ds.coco.loadRes(str(path))
    assert len(loaded.anns) == 5 and {a["category_id"] for a in loaded.anns.values()} == {1, 3, 18}
    evals = {}
    metrics = coco_evaluate(ds.coco, json.loads(path.read_text()), evals=evals)
    for task in ("bbox", "segm"):
        assert metrics[task]["AP"] == pytest.approx(1.0), task
    save_pr_curves(evals, str(tmp_path / "pr.png"))
    assert (tmp_path / "pr.png").stat().st_size > 0


# ---------------------------------------------------------------------------- subset builder
def test_subset_builder_writes_a_dataset_pycocotools_loads(coco_root, tmp_path):
    out = tmp_path / "subset"
    ann_file = coco_root / "annotations" / "instances_val2017.json"
    counts = build_subset(str(ann_file), str(coco_root / "val2017"), str(out),
                          categories="person,dog", min_area=100, progress=False,
                          log=lambda *_: None)  # fmt: skip
    coco = quiet_coco(out / "annotations" / "instances_val2017.json")
    assert sorted(coco.getImgIds()) == [1, 2, 4]
    assert sorted(c["name"] for c in coco.loadCats(coco.getCatIds())) == ["dog", "person"]
    assert sorted(coco.anns) == [1, 3, 4, 6]  # cars dropped; the crowd kept
    assert counts["images"] == 3 and counts["annotations"] == 4
    for im in coco.loadImgs(coco.getImgIds()):
        assert (out / "val2017" / im["file_name"]).is_file()
    ds = CocoDataset.from_root(out, "val2017")
    np.testing.assert_array_equal(ds[0]["masks"][0], coco.annToMask(coco.anns[1]))

    main(["data", "subset", "--annotations", str(ann_file), "--images",
          str(coco_root / "val2017"), "--categories", "dog", "--max-images", "1",
          "--min-area", "150", "--out", str(tmp_path / "one"), "--no-progress"])  # fmt: skip
    one = quiet_coco(tmp_path / "one" / "annotations" / "instances_val2017.json")
    assert one.getImgIds() == [2] and sorted(one.anns) == [4]  # dog 6 is under 150 px²
    assert sorted(p.name for p in (tmp_path / "one" / "val2017").iterdir()) == ["b.jpg"]


# ---------------------------------------------------------------------------- training stream
def test_batches_are_deterministic_and_cover_each_epoch(coco_root):
    ds = CocoDataset.from_root(coco_root, "val2017")
    batches = CocoBatches(ds, batch_size=2, seed=3)
    ids = [s["image_id"] for i in range(3) for s in batches(i)[1]]
    assert sorted(ids[:3]) == [1, 2, 4] and sorted(ids[3:6]) == [1, 2, 4]
    again = CocoBatches(ds, batch_size=2, seed=3)
    images, targets = again(1)
    np.testing.assert_array_equal(images[0], batches(1)[0][0])
    assert [t["image_id"] for t in targets] == ids[2:4]
    for image, t in zip(images, targets):
        assert image.shape[1:] == tuple(t["orig_size"])  # stored size: the model resizes
        assert t["masks"].shape[1:] == image.shape[1:]


def test_train_then_eval_through_the_cli(coco_root, tmp_path, capsys):
    out = tmp_path / "run"
    main(["train", "--dataset", "coco", "--root", str(coco_root), "--split", "val2017",
          "--iterations", "2", "--batch-size", "2", "--min-size", "48", "--max-size", "64",
          "--warmup", "1", "--lr", "0.001", "--out", str(out), "--no-progress"])  # fmt: skip
    meta = json.loads(str(np.load(out / "checkpoint.npz")["meta"]))
    assert meta["dataset"] == "coco" and meta["classes"][1:] == ["person", "car", "dog"]
    assert meta["category_ids"] == [1, 3, 18] and meta["model_config"]["num_classes"] == 4
    main(["eval", "--checkpoint", str(out / "checkpoint.npz"), "--dataset", "coco",
          "--root", str(coco_root), "--split", "val2017", "--no-progress"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "AP50" in printed and "AR100" in printed and "segm" in printed
    results = json.loads((out / "results_val2017.json").read_text())
    assert isinstance(results, list)
    record = json.loads((out / "metrics.json").read_text())
    assert record["images"] == 4 and set(record["bbox"]) >= {"AP", "AP50", "AP75", "ARl"}
    with pytest.raises(SystemExit, match="--root"):
        main(["eval", "--checkpoint", str(out / "checkpoint.npz"), "--dataset", "coco"])
