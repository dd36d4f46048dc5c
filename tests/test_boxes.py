"""Box geometry: the convention check, area, IoU, IoA, clipping and small-box removal.

Checked against torchvision.ops on hypothesis boxes, a hand-worked case, and the invariants of
IoU (symmetric, in [0, 1], 1 on the diagonal, 0 and no NaN for empty boxes).
"""

import numpy as np
import pytest
from helpers import requires_torchvision, torch, torchvision
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minimask.ops.boxes import (
    box_area,
    box_ioa,
    box_iou,
    check_boxes,
    clip_boxes_to_image,
    remove_small_boxes,
)


@st.composite
def boxes(draw, max_n=12, dtype=np.float32, low=-50.0, high=150.0):
    """(N, 4) valid boxes; hypothesis likes repeated values, so empty boxes come up often."""
    n = draw(st.integers(0, max_n))
    corners = draw(
        hnp.arrays(dtype, (n, 4), elements=st.floats(low, high, width=np.dtype(dtype).itemsize * 8))
    )
    return np.concatenate(
        [np.minimum(corners[:, :2], corners[:, 2:]), np.maximum(corners[:, :2], corners[:, 2:])],
        axis=1,
    )


def t(x):
    return torch.from_numpy(np.ascontiguousarray(x))


# ---------------------------------------------------------------------------- check_boxes
def test_check_boxes_accepts_valid_and_empty_boxes():
    good = np.array([[0, 0, 10, 5], [3, 3, 3, 3]], dtype=np.float32)  # an empty box is legal
    assert check_boxes(good) is good
    assert check_boxes(np.zeros((0, 4))).shape == (0, 4)


@pytest.mark.parametrize(
    "bad, message",
    [
        ([[0, 0, 10, 10], [10, 5, 2, 8]], r"gt_boxes\[1\] = .*x2 < x1"),
        ([[0, 6, 10, 5]], r"gt_boxes\[0\] = .*y2 < y1"),
        ([[0, 0, 1, 1], [0, 0, 1, 1], [0, np.nan, 1, 1]], r"gt_boxes\[2\] = .*not finite"),
        ([[0, 0, np.inf, 1]], r"gt_boxes\[0\] = .*not finite"),
    ],
)
def test_check_boxes_names_argument_and_first_bad_row(bad, message):
    with pytest.raises(ValueError, match=message):
        check_boxes(np.array(bad, dtype=np.float32), "gt_boxes")


@pytest.mark.parametrize("shape", [(4,), (3, 5), (2, 4, 1)])
def test_check_boxes_rejects_wrong_shapes(shape):
    with pytest.raises(ValueError, match=r"proposals must have shape \(N, 4\)"):
        check_boxes(np.zeros(shape), "proposals")


# ---------------------------------------------------------------------------- IoU
def test_iou_hand_worked():
    a = np.array([[0, 0, 2, 2]], dtype=np.float64)  # area 4
    b = np.array([[1, 1, 3, 3], [2, 0, 4, 2], [0, 0, 2, 2], [0, 0, 1, 1]], dtype=np.float64)
    # overlaps: 1 / (4 + 4 - 1); touching edge: 0; identical: 1; inside: 1 / 4
    np.testing.assert_allclose(box_iou(a, b), [[1 / 7, 0.0, 1.0, 0.25]])
    np.testing.assert_allclose(box_ioa(a, b), [[1 / 4, 0.0, 1.0, 1.0]])


@requires_torchvision
@given(boxes(), boxes())
def test_iou_area_matches_torchvision(b1, b2):
    expected = torchvision.ops.box_iou(t(b1), t(b2)).numpy()
    np.testing.assert_allclose(box_iou(b1, b2), np.nan_to_num(expected, nan=0.0), rtol=1e-6)
    np.testing.assert_array_equal(box_area(b1), torchvision.ops.box_area(t(b1)).numpy())


@given(boxes(dtype=np.float64), boxes(dtype=np.float64))
def test_iou_invariants(b1, b2):
    iou = box_iou(b1, b2)
    assert iou.shape == (len(b1), len(b2))
    assert np.isfinite(iou).all() and (iou >= 0).all() and (iou <= 1 + 1e-12).all()
    np.testing.assert_allclose(iou, box_iou(b2, b1).T)
    self_iou = np.diag(box_iou(b1, b1))
    non_empty = box_area(b1) > 0
    np.testing.assert_allclose(self_iou[non_empty], 1.0)
    assert (self_iou[~non_empty] == 0).all()  # empty boxes overlap nothing, not even themselves
    ioa = box_ioa(b2, b1)
    assert (ioa >= iou.T - 1e-12).all() and (ioa <= 1 + 1e-12).all()  # IoA >= IoU always


def test_iou_of_degenerate_boxes_is_zero_without_warnings():
    empty = np.array([[5, 5, 5, 5], [1, 2, 1, 9], [5, 5, 5, 5]], dtype=np.float32)
    with np.errstate(all="raise"):
        assert (box_iou(empty, empty) == 0).all()
        assert (box_ioa(empty, empty) == 0).all()


def test_empty_inputs():
    none, some = np.zeros((0, 4), np.float32), np.ones((3, 4), np.float32)
    assert box_iou(none, some).shape == (0, 3) and box_iou(some, none).shape == (3, 0)
    assert box_area(none).shape == (0,)
    assert remove_small_boxes(none, 1.0).dtype == np.int64
    assert clip_boxes_to_image(none, (10, 10)).shape == (0, 4)


# ---------------------------------------------------------------------------- clip, small boxes
@requires_torchvision
@given(boxes(low=-300.0, high=300.0), st.integers(1, 200), st.integers(1, 200))
def test_clip_matches_torchvision(b, height, width):
    got = clip_boxes_to_image(b, (height, width))
    np.testing.assert_array_equal(got, torchvision.ops.clip_boxes_to_image(t(b), (height, width)))
    assert got.dtype == b.dtype
    check_boxes(got)  # still valid boxes


def test_clip_hand_worked_boxes_outside_the_image():
    b = np.array([[-10, -5, 30, 50], [120, 10, 150, 20], [-9, -9, -1, -1]], dtype=np.float32)
    np.testing.assert_array_equal(
        clip_boxes_to_image(b, (40, 100)),  # height 40, width 100
        [[0, 0, 30, 40], [100, 10, 100, 20], [0, 0, 0, 0]],
    )


@requires_torchvision
@given(boxes(), st.floats(0, 50))
def test_remove_small_boxes_matches_torchvision(b, min_size):
    got = remove_small_boxes(b, min_size)
    np.testing.assert_array_equal(got, torchvision.ops.remove_small_boxes(t(b), min_size).numpy())
    assert got.dtype == np.int64
