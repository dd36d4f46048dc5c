"""Bad COCO data: each case gets a clear message naming the file and id, or a counted skip.

Fatal (the run cannot start): invalid JSON, JSON without ``images``, ``annotations`` or
``categories``. Everything else is a counted skip (or fix) with a summary, and never stops a
training or evaluation run part-way.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_coco import ann, rect, write_coco

from minimask.cli import main
from minimask.data.coco import BadImageError, CocoBatches, CocoDataset, CocoFormatError
from minimask.data.images import read_image
from minimask.data.subset import build_subset
from minimask.model.mask_rcnn import MaskRCNN
from minimask.nn import init
from minimask.workflow import CocoData, coco_model_config, evaluate


def images_of(folder, sizes):
    """Entries for PNG images of the given (width, height), written into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for k, (w, h) in enumerate(sizes, start=1):
        Image.new("RGB", (w, h), (30 * k, 60, 90)).save(folder / f"{k}.png")
        entries.append({"id": k, "file_name": f"{k}.png", "width": w, "height": h})
    return entries


# ---------------------------------------------------------------------------- fatal JSON
def test_invalid_json_is_fatal_and_names_the_file(tmp_path):
    path = tmp_path / "annotations" / "instances_val2017.json"
    path.parent.mkdir()
    path.write_text('{"images": [], "annotations": [')
    with pytest.raises(CocoFormatError, match=r"instances_val2017\.json is not valid JSON"):
        CocoDataset.from_root(tmp_path, "val2017")
    path.write_text("[1, 2]")
    with pytest.raises(CocoFormatError, match="holds a JSON list"):
        CocoDataset.from_root(tmp_path, "val2017")
    with pytest.raises(CocoFormatError, match="no COCO annotation file at .*instances_x.json"):
        CocoDataset.from_root(tmp_path, "x")


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_json_missing_a_key_is_fatal_and_names_the_key(tmp_path, key):
    path = write_coco(tmp_path)
    data = json.loads(path.read_text())
    del data[key]
    path.write_text(json.dumps(data))
    with pytest.raises(CocoFormatError, match=rf"instances_val2017\.json has no '{key}' key"):
        CocoDataset.from_root(tmp_path, "val2017")
    with pytest.raises(SystemExit, match=rf"minimask train: .*json has no '{key}' key"):
        main(["train", "--dataset", "coco", "--root", str(tmp_path), "--split", "val2017"])


def test_the_subset_builder_skips_missing_image_files(tmp_path):
    write_coco(tmp_path)
    (tmp_path / "val2017" / "a.png").unlink()
    logged = []
    counts = build_subset(str(tmp_path / "annotations" / "instances_val2017.json"),
                          str(tmp_path / "val2017"), str(tmp_path / "out"), progress=False,
                          log=logged.append)  # fmt: skip
    assert counts["images"] == 2 and counts["skipped"] == 1
    assert any("a.png (image id 1)" in line for line in logged)


# ---------------------------------------------------------------------------- annotations
def test_bad_annotations_are_counted_skips_with_a_warning(tmp_path):
    images = images_of(tmp_path / "val2017", [(40, 30), (40, 30)])
    good = ann(1, 1, 1, (2, 2, 10, 10), [rect(2, 2, 10, 10)])
    anns = [
        good,
        ann(2, 1, 1, (5, 5, 0, 8), [rect(5, 5, 0, 8)]),  # zero-area box
        ann(3, 1, 3, (5, 5, 8, 8), [[5, 5, 13, 5]]),  # a polygon of 2 points
        ann(4, 1, 1, (50, 40, 8, 8), [rect(50, 40, 8, 8)]),  # wholly outside the image
        ann(5, 1, 99, (5, 5, 8, 8), [rect(5, 5, 8, 8)]),  # unknown category id
        ann(6, 1, 1, (30, 20, 20, 20), [rect(30, 20, 10, 10)]),  # partly outside: clipped
        ann(7, 7, 1, (5, 5, 8, 8), [rect(5, 5, 8, 8)]),  # an image id that does not exist
        ann(8, 2, 1, (1, 1, 5, 5), [[1, 1, 6, 1, 6, 6], [1, 1]]),  # one good, one bad polygon
        {**good, "id": 9, "bbox": "2 2 10 10"},  # not a list of numbers
        {**good, "id": 10, "segmentation": [[1, 1, "6", 1, 6, 6]]},  # a string in a polygon
        "an annotation that is not an object",
    ]
    images.append({"id": 3, "file_name": "3.png"})  # no size
    write_coco(tmp_path, images=images, annotations=anns)
    with pytest.warns(UserWarning, match="data problems") as record:
        ds = CocoDataset.from_root(tmp_path, "val2017")
    message = str(record[0].message)
    assert "instances_val2017.json" in message
    counts = ds.problems.counts
    assert counts["zero-area box"] == 1 and "annotation 2 (image 1, 1.png)" in message
    assert counts["polygon of < 3 points"] == 2 and "annotation 3 (image 1, 1.png)" in message
    assert counts["box outside the image"] == 1 and "annotation 4" in message
    assert counts["unknown category id"] == 1 and "category 99" in message
    assert counts["box clipped to the image"] == 1
    assert counts["unknown image id"] == 1
    assert counts["malformed box"] == 1 and counts["bad segmentation"] == 1
    assert counts["annotation incomplete"] == 1 and counts["image entry incomplete"] == 1
    kept = {a["id"]: a for a in ds.coco.dataset["annotations"]}
    assert sorted(kept) == [1, 6, 8]
    assert kept[6]["bbox"] == [30.0, 20.0, 10.0, 10.0]  # clipped to the 40x30 image
    assert len(kept[8]["segmentation"]) == 1
    s = ds[0]
    np.testing.assert_allclose(s["boxes"], [[2, 2, 12, 12], [30, 20, 40, 30]])
    assert s["masks"].shape == (2, 30, 40)


def test_a_clean_file_gives_no_warning(tmp_path, recwarn):
    write_coco(tmp_path)
    CocoDataset.from_root(tmp_path, "val2017")
    assert not [w for w in recwarn if "data problems" in str(w.message)]


# ---------------------------------------------------------------------------- image files
def test_missing_unreadable_truncated_and_resized_images(tmp_path):
    images = images_of(tmp_path / "val2017", [(40, 30)] * 5)
    folder = tmp_path / "val2017"
    (folder / "2.png").unlink()  # missing
    (folder / "3.png").write_bytes(b"this is not an image")  # unreadable
    Image.new("RGB", (40, 30)).save(folder / "4.jpg", quality=95)
    images[3]["file_name"] = "4.jpg"
    data = (folder / "4.jpg").read_bytes()
    (folder / "4.jpg").write_bytes(data[: len(data) // 2])  # truncated JPEG
    Image.new("RGB", (30, 40)).save(folder / "5.png")  # 30x40 on disk, 40x30 in the JSON
    anns = [ann(k, k, 1, (2, 2, 10, 10), [rect(2, 2, 10, 10)]) for k in range(1, 6)]
    write_coco(tmp_path, images=images, annotations=anns)
    ds = CocoDataset.from_root(tmp_path, "val2017")
    assert ds[0]["image"].shape == (3, 30, 40)
    expected = [
        r"missing image file .*2\.png \(image id 2\)",
        r"cannot decode .*3\.png \(image id 3\)",
        r"cannot decode .*4\.jpg \(image id 4\).*(?i:truncated)",
        r"5\.png \(image id 5\) is 30x40 pixels but .*instances_val2017\.json says 40x30",
    ]
    for index, pattern in enumerate(expected, start=1):
        with pytest.raises(BadImageError, match=pattern):
            ds[index]

    # Training: the epoch goes on with the good image, and the skips are counted once each.
    batches = CocoBatches(ds, batch_size=2, seed=0)
    for i in range(6):  # more than two epochs of 5 images
        images_, targets = batches(i)
        assert [t["image_id"] for t in targets] == [1, 1]
    assert batches.problems.counts["bad image skipped"] == 4
    summary = batches.problems.summary()
    assert "4 data problems" in summary and "4 x bad image skipped" in summary
    assert ".png (image id" in summary or ".jpg (image id" in summary

    # Evaluation: the bad images are skipped and counted; the metrics cover the rest.
    assert_evaluation_skips(tmp_path, ds, read=1, skipped=4)


def assert_evaluation_skips(root, ds, read: int, skipped: int) -> None:
    """Evaluate an untrained tiny model on ROOT/val2017: ``read`` images scored, ``skipped``
    bad ones counted in metrics.json and named in the log."""
    init.manual_seed(0)
    model = MaskRCNN(coco_model_config("tiny", 2, 32, 64))
    logged = []
    meta = {"classes": ds.classes, "category_ids": ds.category_ids.tolist()}
    evaluate(model, meta, CocoData(str(root), "val2017"), str(root / "eval"), progress=False,
             log=logged.append)  # fmt: skip
    record = json.loads((root / "eval" / "metrics.json").read_text())
    assert record["images"] == read and record["skipped"] == skipped
    assert any(f"{skipped} x bad image skipped" in line for line in logged)


def test_every_pixel_format_converts_to_rgb_in_0_1(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_allclose(read_image(str(tmp_path / "rgb.png")), rgb.transpose(2, 0, 1) / 255)

    grey = rgb[:, :, 0]
    Image.fromarray(grey, mode="L").save(tmp_path / "grey.png")
    out = read_image(str(tmp_path / "grey.png"))
    assert out.shape == (3, 6, 8)
    for c in range(3):
        np.testing.assert_allclose(out[c], grey / 255)

    rgba = np.dstack([rgb, np.full((6, 8), 255, np.uint8)])
    rgba[0, :, 3] = 0  # the top row fully transparent: shown as white
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    out = read_image(str(tmp_path / "rgba.png"))
    np.testing.assert_allclose(out[:, 0], 1.0)
    np.testing.assert_allclose(out[:, 1:], rgb[1:].transpose(2, 0, 1) / 255, atol=1e-6)

    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    out = read_image(str(tmp_path / "cmyk.jpg"))
    assert np.abs(out - rgb.transpose(2, 0, 1) / 255).mean() < 0.03  # JPEG is lossy

    deep = (np.arange(48).reshape(6, 8) * 1365).astype(np.uint16)  # up to 64155, beyond 255
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    out = read_image(str(tmp_path / "deep.png"))
    np.testing.assert_allclose(out[0], deep / 65535, rtol=1e-6)  # not clipped at 255
    assert out.dtype == np.float32 and out.shape == (3, 6, 8)


def test_odd_pixel_formats_load_through_the_dataset(tmp_path):
    folder = tmp_path / "val2017"
    folder.mkdir()
    Image.new("L", (20, 10), 128).save(folder / "1.png")
    Image.new("RGBA", (20, 10), (0, 0, 255, 255)).save(folder / "2.png")
    Image.new("CMYK", (20, 10), (0, 255, 0, 0)).save(folder / "3.jpg")
    Image.fromarray(np.full((10, 20), 40000, np.uint16)).save(folder / "4.png")
    images = [{"id": k, "file_name": name, "width": 20, "height": 10}
              for k, name in enumerate(["1.png", "2.png", "3.jpg", "4.png"], start=1)]  # fmt: skip
    anns = [ann(k, k, 1, (2, 2, 5, 5), [rect(2, 2, 5, 5)]) for k in range(1, 5)]
    write_coco(tmp_path, images=images, annotations=anns)
    ds = CocoDataset.from_root(tmp_path, "val2017")
    means = [ds[i]["image"].mean(axis=(1, 2)) for i in range(4)]
    np.testing.assert_allclose(means[0], 128 / 255, atol=1e-6)
    np.testing.assert_allclose(means[1], [0, 0, 1], atol=1e-6)
    np.testing.assert_allclose(means[2], [1, 0, 1], atol=0.02)  # magenta = no green ink
    np.testing.assert_allclose(means[3], 40000 / 65535, atol=1e-6)
