"""The synthetic shapes dataset: deterministic, disjoint splits, masks and boxes that agree."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from minimask.data.shapes import CLASSES, ShapesConfig, ShapesDataset, make_sample, masks_to_boxes


def test_same_seed_same_image_and_different_seed_differs():
    a, b = make_sample(7, 3), make_sample(7, 3)
    for key in ("image", "boxes", "labels", "masks"):
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["image"], make_sample(8, 3)["image"])


def test_train_and_val_splits_differ():
    train, val = make_sample(0, 0, split="train"), ShapesDataset(1, seed=0)[0]
    assert not np.array_equal(train["image"], val["image"])


@given(seed=st.integers(0, 2**16), index=st.integers(0, 10_000))
def test_masks_boxes_labels_agree(seed, index):
    s = make_sample(seed, index, ShapesConfig(image_size=64, min_size=8, max_size=24))
    g = len(s["labels"])
    assert s["image"].shape == (3, 64, 64) and s["image"].dtype == np.float32
    assert s["masks"].shape == (g, 64, 64) and s["boxes"].shape == (g, 4)
    assert set(s["labels"].tolist()) <= {1, 2, 3}
    # Occlusion: visible masks never overlap, and each one is non-empty.
    assert s["masks"].sum(axis=0).max(initial=0) <= 1
    assert (s["masks"].sum(axis=(1, 2)) > 0).all()
    # Boxes are the tight boxes of the masks, inside the image.
    np.testing.assert_array_equal(s["boxes"], masks_to_boxes(s["masks"].astype(bool)))
    assert (s["boxes"][:, 2:] > s["boxes"][:, :2]).all()
    assert (s["boxes"] >= 0).all() and (s["boxes"] <= 64).all()


def test_masks_to_boxes_known_answer_and_empty():
    m = np.zeros((1, 5, 6), dtype=bool)
    m[0, 1:3, 2:5] = True  # rows 1-2, columns 2-4
    np.testing.assert_array_equal(masks_to_boxes(m), [[2, 1, 5, 3]])
    assert masks_to_boxes(np.zeros((0, 5, 6), dtype=bool)).shape == (0, 4)


def test_every_class_occurs_and_dataset_indexing():
    ds = ShapesDataset(20, seed=1)
    labels = np.concatenate([s["labels"] for s in ds])
    assert set(labels.tolist()) == {1, 2, 3} and len(CLASSES) == 4
    try:
        ds[20]
    except IndexError as e:
        assert "20" in str(e)
    else:
        raise AssertionError("out-of-range index did not raise")
