"""More bad data, each a named, counted skip that loses nothing else, and large images.

Images over Pillow's pixel limit, RLE masks whose runs do not cover the image, empty
segmentations and ``iscrowd`` values other than 0 and 1; then the reduced decode of large JPEGs
for the model, and the memory ``read_image`` needs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
import warnings

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from test_coco import ann, crowd_rle, rect, write_coco
from test_coco_bad_input import assert_evaluation_skips, images_of

import minimask
from minimask.cli import main
from minimask.data.coco import (
    BadImageError,
    CocoBatches,
    CocoDataset,
    rle_problem,
    rle_string_runs,
)
from minimask.data.images import read_image, read_image_for_model, to_file_pixels

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def compressed(mask: np.ndarray) -> dict:
    """The compressed COCO RLE of a (H, W) binary mask, as it is stored in JSON."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


# ---------------------------------------------------------------------------- pixel limit
def test_an_image_over_the_pixel_limit_is_a_counted_skip_naming_it(tmp_path, monkeypatch):
    # 40x30 = 1,200 pixels, under the limit; 50x40 = 2,000 where Pillow would only warn (over
    # the limit, under twice it); 80x60 = 4,800 where Pillow refuses (over twice the limit).
    images = images_of(tmp_path / "val2017", [(40, 30), (50, 40), (80, 60)])
    anns = [ann(k, k, 1, (2, 2, 10, 10), [rect(2, 2, 10, 10)]) for k in (1, 2, 3)]
    write_coco(tmp_path, images=images, annotations=anns)
    ds = CocoDataset.from_root(tmp_path, "val2017")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may go by as a mere warning
        assert ds[0]["image"].shape == (3, 30, 40)
        for index, name in ((1, "2.png"), (2, "3.png")):
            with pytest.raises(BadImageError) as info:
                ds[index]
            message = str(info.value)
            assert f"{name} (image id {index + 1}) has more than 1,500 pixels" in message
            assert "MINIMASK_MAX_IMAGE_PIXELS" in message

        # Training goes on with the image it can read, and counts each skip once.
        batches = CocoBatches(ds, batch_size=2, seed=0, flip=False)
        for i in range(4):
            _, targets = batches(i)
            assert [t["image_id"] for t in targets] == [1, 1]
        assert batches.problems.counts["bad image skipped"] == 2
        summary = batches.problems.summary()
        assert "2.png (image id 2)" in summary and "3.png (image id 3)" in summary

    # Evaluation scores the image it can read and counts the other two.
    assert_evaluation_skips(tmp_path, ds, read=1, skipped=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--iterations", "1", "--batch-size", "1", "--warmup", "1",
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    return str(out / "checkpoint.npz")


def test_predict_names_an_image_over_the_pixel_limit(checkpoint, tmp_path, monkeypatch, capsys):
    small, large = tmp_path / "small.png", tmp_path / "large.png"
    Image.new("RGB", (40, 30), (200, 100, 50)).save(small)
    Image.new("RGB", (80, 60), (200, 100, 50)).save(large)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)
    pred = tmp_path / "pred"
    capsys.readouterr()
    status = main(["predict", "--checkpoint", checkpoint, str(large), str(small),
                   "--out", str(pred)])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 1  # some files failed
    assert f"{large} has more than 1,500 pixels" in err and "1 of 2 files" in err
    assert (pred / "small_pred.png").exists()  # the image after it was still predicted


def test_the_pixel_limit_is_set_by_an_environment_variable(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("RGB", (80, 60)).save(path)  # 4,800 pixels
    script = (
        "from PIL import Image\n"
        "from minimask.data.images import BadImageError, read_image\n"
        "print(Image.MAX_IMAGE_PIXELS)\n"
        "try:\n"
        f"    print(read_image({str(path)!r}, 7).shape)\n"
        "except BadImageError as e:\n"
        "    print(e)\n"
    )

    root = os.path.dirname(os.path.dirname(minimask.__file__))  # this copy of minimask

    def run(value):
        env = {**os.environ, "MINIMASK_MAX_IMAGE_PIXELS": value, "PYTHONPATH": root}
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True)  # fmt: skip
        return done.returncode, done.stdout + done.stderr

    code, out = run("1000")
    assert code == 0 and out.splitlines()[0] == "1000"
    assert "photo.png (image id 7) has more than 1,000 pixels" in out
    code, out = run("5_000")
    assert code == 0 and out.splitlines() == ["5000", "(3, 60, 80)"]
    code, out = run("lots")
    assert code != 0 and "MINIMASK_MAX_IMAGE_PIXELS='lots'" in out


# ---------------------------------------------------------------------------- annotations
H, W = 30, 40  # the test images' size
GOOD = ann(1, 1, 1, (2, 2, 10, 10), [rect(2, 2, 10, 10)])


def load_with(tmp_path, bad: dict):
    """A dataset of one 40x30 image holding GOOD and ``bad``; returns it and the warning text."""
    images = images_of(tmp_path / "val2017", [(W, H)])
    write_coco(tmp_path, images=images, annotations=[GOOD, bad])
    with pytest.warns(UserWarning, match="data problems") as record:
        ds = CocoDataset.from_root(tmp_path, "val2017")
    return ds, str(record[0].message)


def assert_only_good_kept(ds):
    """GOOD alone survives, and the sample (mask included) loads."""
    assert [a["id"] for a in ds.coco.dataset["annotations"]] == [1]
    sample = ds[0]
    np.testing.assert_array_equal(sample["boxes"], [[2, 2, 12, 12]])
    expected = np.zeros((1, H, W), np.uint8)
    expected[0, 2:12, 2:12] = 1
    np.testing.assert_array_equal(sample["masks"], expected)


def rle_cases():
    runs = crowd_rle(H, W, 20, 10, 8, 6)["counts"]  # a valid uncompressed RLE of the image
    good = compressed(np.pad(np.ones((6, 8)), ((10, 14), (20, 12))))["counts"]
    return {
        "list too short": {"counts": runs[:-1], "size": [H, W]},
        "list too long": {"counts": [*runs[:-1], runs[-1] + 5], "size": [H, W]},
        "list, fractions": {"counts": [runs[0] + 0.5, *runs[1:-1], runs[-1] - 0.5], "size": [H, W]},
        "list, strings": {"counts": [str(r) for r in runs], "size": [H, W]},
        "list, negative run": {"counts": [H * W + 10, -10], "size": [H, W]},
        "string too short": {"counts": good[:-1], "size": [H, W]},
        "string too long": {"counts": good + "3", "size": [H, W]},
        "string of garbage": {"counts": "hello world!!", "size": [H, W]},
        "empty string": {"counts": "", "size": [H, W]},
        "string, unfinished number": {"counts": good + "P", "size": [H, W]},
        "counts a number": {"counts": 1200, "size": [H, W]},
        "no counts": {"size": [H, W]},
        "size a number": {"counts": runs, "size": 1200},
        "size of strings": {"counts": runs, "size": [str(H), str(W)]},
        "size transposed": {"counts": runs, "size": [W, H]},
    }


@pytest.mark.parametrize("case", list(rle_cases()))
def test_an_rle_that_does_not_cover_the_image_is_dropped_and_named(tmp_path, case):
    bad = ann(2, 1, 3, (20, 10, 8, 6), rle_cases()[case], crowd=1)
    ds, message = load_with(tmp_path, bad)
    assert ds.problems.counts == {"bad RLE": 1}
    assert "instances_val2017.json" in message
    assert "annotation 2 (image 1, 1.png): RLE" in message
    assert_only_good_kept(ds)


def test_valid_rles_are_kept_exactly():
    rng = np.random.default_rng(0)
    for trial in range(200):
        h, w = rng.integers(1, 40, size=2)
        mask = rng.random((h, w)) < rng.random()  # all empty to all full, and between
        flat = mask.flatten(order="F").astype(np.int8)
        starts = np.flatnonzero(np.diff(flat)) + 1
        runs = np.diff(np.concatenate([[0], starts, [flat.size]])).tolist()
        runs = ([0] if flat[0] else []) + runs  # the runs start with 0s
        rle = compressed(mask)
        assert rle_string_runs(rle["counts"]) == runs, trial
        assert rle_problem(rle, int(h), int(w)) is None
        assert rle_problem({"counts": runs, "size": [int(h), int(w)]}, int(h), int(w)) is None


def test_an_empty_segmentation_is_dropped_and_named(tmp_path):
    ds, message = load_with(tmp_path, ann(2, 1, 3, (20, 10, 8, 6), []))
    assert ds.problems.counts == {"empty segmentation": 1}
    assert "annotation 2 (image 1, 1.png): segmentation []" in message
    assert_only_good_kept(ds)


@pytest.mark.parametrize("crowd", ["no", "1", 2, -1, 0.5, None, [1]])
def test_an_iscrowd_other_than_0_or_1_is_dropped_and_named(tmp_path, crowd):
    ds, message = load_with(tmp_path, ann(2, 1, 3, (20, 10, 8, 6), [rect(20, 10, 8, 6)], crowd))
    assert ds.problems.counts == {"iscrowd not 0 or 1": 1}
    assert f"annotation 2 (image 1, 1.png): iscrowd {crowd!r}" in message
    assert_only_good_kept(ds)


def test_iscrowd_0_1_false_true_or_absent_are_kept(tmp_path, recwarn):
    images = images_of(tmp_path / "val2017", [(W, H)])
    crowd = {"counts": crowd_rle(H, W, 20, 10, 8, 6)["counts"], "size": [H, W]}
    anns = [ann(1, 1, 1, (2, 2, 10, 10), [rect(2, 2, 10, 10)], 0),
            ann(2, 1, 1, (2, 2, 10, 10), [rect(2, 2, 10, 10)], False),
            ann(3, 1, 1, (20, 10, 8, 6), crowd, 1),
            ann(4, 1, 1, (20, 10, 8, 6), crowd, True),
            {k: v for k, v in GOOD.items() if k != "iscrowd"} | {"id": 5}]  # fmt: skip
    write_coco(tmp_path, images=images, annotations=anns)
    ds = CocoDataset.from_root(tmp_path, "val2017")
    assert not ds.problems
    assert ds[0]["is_crowd"].tolist() == [False, False, True, True, False]


# ---------------------------------------------------------------------------- large images
def smooth_photo(height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 of smooth colour gradients, which JPEG keeps well at any reduction."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    rgb = np.stack([0.5 + 0.4 * np.sin(5 * x), 0.5 + 0.4 * np.cos(4 * y), 0.3 + 0.5 * x * y])
    return (rgb.transpose(1, 2, 0) * 255).astype(np.uint8)


def test_a_large_jpeg_is_decoded_reduced_for_the_model(tmp_path):
    pixels = smooth_photo(750, 1001)  # sizes that 2, 4 and 8 do not divide
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", quality=95)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    full = read_image(str(tmp_path / "photo.jpg"))
    assert full.shape == (3, 750, 1001) and full.dtype == np.float32
    # The largest reduction whose longer side stays >= max_side: ceil(1001 / s) >= max_side.
    for max_side, scale in ((100, 8), (126, 8), (127, 4), (251, 4), (252, 2), (501, 2),
                            (502, 1), (1333, 1), (None, 1)):  # fmt: skip
        image, got, file_size = read_image_for_model(str(tmp_path / "photo.jpg"), max_side)
        assert (got, file_size) == (scale, (750, 1001)), max_side
        assert image.shape == (3, -(-750 // scale), -(-1001 // scale)) and image.dtype == np.float32
        # Each decoded pixel is (close to) the mean of the file's scale x scale block under it.
        blocks = full[:, : 750 // scale * scale, : 1001 // scale * scale]
        blocks = blocks.reshape(3, 750 // scale, scale, 1001 // scale, scale).mean(axis=(2, 4))
        assert np.abs(image[:, : 750 // scale, : 1001 // scale] - blocks).mean() < 0.01
    image, scale, _ = read_image_for_model(str(tmp_path / "photo.png"), 100)
    assert scale == 1 and image.shape == (3, 750, 1001)  # PNG has no reduced decode
    jpeg = str(tmp_path / "photo.jpg")
    reduced = read_image_for_model(jpeg, 252).image
    np.testing.assert_array_equal(read_image(jpeg, max_side=252), reduced)


def test_detections_map_back_to_the_file_pixels():
    # A 1001x750 file decoded at 1/4 is 251x188; decoded pixel (y, x) covers file rows 4y..4y+3
    # and columns 4x..4x+3, and the last decoded row and column cover what is left.
    masks = np.zeros((2, 188, 251), np.uint8)
    masks[0, 10:20, 30:40] = 1
    masks[1, 187, 250] = 1  # the bottom-right corner
    det = {"boxes": np.array([[30, 10, 40, 20], [250, 187, 251, 188]], np.float32),
           "scores": np.array([0.9, 0.8], np.float32), "labels": np.array([1, 2])}  # fmt: skip
    out = to_file_pixels({**det, "masks": masks}, 4, (750, 1001))
    np.testing.assert_array_equal(out["boxes"], [[120, 40, 160, 80], [1000, 748, 1001, 750]])
    assert out["masks"].shape == (2, 750, 1001) and out["masks"].dtype == np.uint8
    expected = np.zeros((2, 750, 1001), np.uint8)
    expected[0, 40:80, 120:160] = 1
    expected[1, 748:750, 1000:1001] = 1  # 4 x 4 pixels in the decode, 2 x 1 left in the file
    np.testing.assert_array_equal(out["masks"], expected)
    np.testing.assert_array_equal(out["scores"], det["scores"])  # the rest as it was
    np.testing.assert_array_equal(out["labels"], det["labels"])
    assert to_file_pixels(det, 1, (188, 251)) is det  # a full-size decode maps to itself


def test_read_image_makes_one_float32_copy(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    read_image(str(tmp_path / "rgb.png"))  # warm up: imports and caches
    tracemalloc.start()  # NumPy reports its arrays' memory to tracemalloc
    try:
        image = read_image(str(tmp_path / "rgb.png"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(image, rgb.transpose(2, 0, 1) / np.float32(255))
    # The float32 result (12 bytes a pixel) and the uint8 pixels (3 bytes), not several float
    # copies; Pillow's own buffers are not traced.
    assert peak < 1.5 * image.nbytes, peak / image.nbytes
