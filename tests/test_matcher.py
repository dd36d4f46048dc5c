"""The matcher: torchvision's Matcher without crowd (ties included), crowd regions, edge cases."""

import numpy as np
import pytest
from helpers import requires_torchvision, torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minimask.ops.boxes import box_ioa, box_iou
from minimask.ops.matcher import (
    BELOW_LOW_THRESHOLD,
    BETWEEN_THRESHOLDS,
    IGNORE,
    Matcher,
)

THRESHOLDS = st.sampled_from([(0.7, 0.3), (0.5, 0.5), (0.5, 0.4), (0.6, 0.2)])


def test_outcomes_are_distinct_negative_named_constants():
    assert len({BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, IGNORE}) == 3
    assert max(BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, IGNORE) < 0
    assert Matcher.IGNORE == IGNORE and Matcher.BELOW_LOW_THRESHOLD == BELOW_LOW_THRESHOLD


def test_hand_worked_thresholds_and_low_quality_ties():
    iou = np.array(
        [  # 2 GTs x 5 anchors
            [0.8, 0.5, 0.1, 0.4, 0.0],
            [0.1, 0.2, 0.2, 0.6, 0.6],  # GT 1's best (0.6) is below high and tied
        ]
    )
    below, between = BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS
    plain = Matcher(0.7, 0.3)(iou)
    np.testing.assert_array_equal(plain, [0, between, below, between, between])
    low_quality = Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou)
    np.testing.assert_array_equal(low_quality, [0, between, below, 1, 1])
    assert low_quality.dtype == np.int64


@requires_torchvision
@given(
    hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 5), st.integers(1, 30)),
        elements=st.integers(1, 10).map(lambda v: v / 10),
    ),
    THRESHOLDS,
    st.booleans(),
)
def test_equals_torchvision_matcher(quality, thresholds, low_quality):
    # Quality on a grid of tenths: many ties, every GT touches some anchor (best IoU > 0).
    from torchvision.models.detection._utils import Matcher as TorchMatcher

    high, low = thresholds
    expected = TorchMatcher(high, low, low_quality)(torch.from_numpy(quality)).numpy()
    np.testing.assert_array_equal(Matcher(high, low, low_quality)(quality), expected)


def test_gt_overlapping_nothing_gets_no_low_quality_match():
    # torchvision would call every anchor GT 1's "best" (IoU 0) and make them all positives.
    iou = np.array([[0.9, 0.1, 0.0], [0.0, 0.0, 0.0]])
    got = Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou)
    np.testing.assert_array_equal(got, [0, BELOW_LOW_THRESHOLD, BELOW_LOW_THRESHOLD])


def test_no_gt_means_all_background_and_no_anchor_means_empty():
    matcher = Matcher(0.7, 0.3, allow_low_quality_matches=True)
    np.testing.assert_array_equal(matcher(np.zeros((0, 4))), [BELOW_LOW_THRESHOLD] * 4)
    assert matcher(np.zeros((3, 0))).shape == (0,)
    with pytest.raises(ValueError, match="low_threshold"):
        Matcher(0.3, 0.7)


# ---------------------------------------------------------------------------- crowd
GT = np.array(
    [
        [0, 0, 10, 10],  # 0: a person
        [50, 50, 150, 150],  # 1: a crowd region
    ],
    dtype=np.float64,
)
ANCHORS = np.array(
    [
        [0, 0, 10, 10],  # 0: exactly the person -> positive
        [60, 60, 70, 70],  # 1: small, fully inside the crowd (IoU 0.01) -> IGNORE
        [140, 140, 160, 160],  # 2: a quarter inside the crowd -> negative
        [200, 200, 210, 210],  # 3: far from everything -> negative
        [50, 50, 150, 150],  # 4: exactly the crowd box -> IGNORE, never a match
        [0, 0, 60, 60],  # 5: 100 / 3600 inside the crowd (IoA 0.03) -> negative
    ],
    dtype=np.float64,
)


@pytest.mark.parametrize("low_quality", [False, True])
def test_crowd_is_never_matched_and_anchors_inside_are_ignored(low_quality):
    matcher = Matcher(0.7, 0.3, allow_low_quality_matches=low_quality)
    got = matcher.match_boxes(GT, ANCHORS, is_crowd=np.array([False, True]))
    expected = [0, IGNORE, BELOW_LOW_THRESHOLD, BELOW_LOW_THRESHOLD, IGNORE, BELOW_LOW_THRESHOLD]
    np.testing.assert_array_equal(got, expected)
    assert box_iou(GT, ANCHORS)[1, 1] < 0.3  # IoU would not have caught anchor 1


def test_positive_inside_a_crowd_stays_positive():
    gt = np.array([[0, 0, 100, 100], [10, 10, 20, 20]], dtype=np.float64)  # crowd, then person
    anchors = np.array([[10, 10, 20, 20], [30, 30, 40, 40]], dtype=np.float64)
    got = Matcher(0.7, 0.3).match_boxes(gt, anchors, is_crowd=np.array([True, False]))
    np.testing.assert_array_equal(got, [1, IGNORE])  # index 1: GT indices are not renumbered


def test_only_crowd_gts():
    got = Matcher(0.7, 0.3, True).match_boxes(GT[1:], ANCHORS, is_crowd=np.array([True]))
    assert (got < 0).all()
    np.testing.assert_array_equal(got == IGNORE, [False, True, False, False, True, False])


@given(
    hnp.arrays(
        np.float64,
        st.tuples(st.integers(1, 5), st.integers(1, 20)),
        elements=st.integers(0, 10).map(lambda v: v / 10),
    ),
    st.data(),
    st.booleans(),
)
def test_crowd_rows_equal_dropping_them_except_ignores(quality, data, low_quality):
    crowd = data.draw(hnp.arrays(bool, quality.shape[0]))
    ioa = data.draw(hnp.arrays(np.float64, quality.shape, elements=st.floats(0, 1)))
    matcher = Matcher(0.6, 0.3, low_quality)
    got = matcher(quality, is_crowd=crowd, crowd_ioa=ioa)
    real = np.flatnonzero(~crowd)
    alone = matcher(quality[real])
    renumbered = alone.copy()
    renumbered[alone >= 0] = real[alone[alone >= 0]]
    ignored = (ioa[crowd] >= 0.5).any(axis=0) & (renumbered < 0)
    np.testing.assert_array_equal(got, np.where(ignored, IGNORE, renumbered))
    assert not np.isin(got, np.flatnonzero(crowd)).any()


def test_crowd_needs_ioa():
    with pytest.raises(ValueError, match="crowd_ioa"):
        Matcher(0.7, 0.3)(np.ones((2, 3)), is_crowd=np.array([True, False]))
    assert box_ioa(GT, ANCHORS).shape == (2, 6)
