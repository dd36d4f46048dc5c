"""More bad data, each a named, counted skip that loses nothing else.

RLE masks whose runs do not cover the image, empty segmentations and ``iscrowd`` values other
than 0 and 1.
"""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from test_coco import ann, crowd_rle, rect, write_coco
from test_coco_bad_input import images_of

from minimask.data.coco import CocoDataset, rle_problem, rle_string_runs

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def compressed(mask: np.ndarray) -> dict:
    """The compressed COCO RLE of a (H, W) binary mask, as it is stored in JSON."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


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
