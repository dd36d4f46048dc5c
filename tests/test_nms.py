"""NMS: identical to torchvision and to a plain greedy loop, its invariants, ties, edge cases, GPU.

The blocked algorithm in ``nms.py`` claims to keep exactly the boxes of greedy NMS; the reference
here is that greedy loop written from the paper, and torchvision.ops.nms is the third opinion.
"""

from unittest import mock

import numpy as np
import pytest
from helpers import requires_torchvision, torch, torchvision
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import minimask.ops.nms as nms_module
from minimask.ops.boxes import box_iou
from minimask.ops.nms import batched_nms, nms

THRESHOLDS = st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0])


def greedy_reference(boxes, scores, threshold, idxs=None):
    """Greedy NMS, one box at a time (Faster R-CNN §3.3): slow and obviously right."""
    idxs = np.zeros(len(boxes), dtype=np.int64) if idxs is None else idxs
    order = sorted(range(len(boxes)), key=lambda i: (-scores[i], i))  # ties: lower index first
    kept = []
    for j in order:
        overlaps = [
            idxs[i] == idxs[j] and box_iou(boxes[i : i + 1], boxes[j : j + 1])[0, 0] > threshold
            for i in kept
        ]
        if not any(overlaps):
            kept.append(j)
    return np.array(kept, dtype=np.int64)


@st.composite
def crowded_boxes(draw, max_n=60, dtype=np.float32, integer=False):
    """Boxes in a small 30 x 30 area, so that many overlap; distinct scores."""
    n = draw(st.integers(0, max_n))
    elements = st.integers(0, 30) if integer else st.floats(0, 30, width=32)
    corners = draw(hnp.arrays(dtype, (n, 4), elements=elements))
    boxes = np.concatenate(
        [np.minimum(corners[:, :2], corners[:, 2:]), np.maximum(corners[:, :2], corners[:, 2:])],
        axis=1,
    ).astype(dtype)
    ranks = draw(st.permutations(range(n)))
    scores = (np.array(ranks, dtype=dtype) + 1) / (n + 1)  # distinct
    return boxes, scores


def t(x):
    return torch.from_numpy(np.ascontiguousarray(x))


def random_boxes(n, seed):
    """``n`` boxes of sides 0 to 60 (some empty) in a 200 x 200 image, and scores."""
    g = np.random.default_rng(seed)
    centres = g.uniform(0, 200, (n, 2))
    sizes = g.uniform(0, 60, (n, 2)) * (g.random((n, 1)) > 0.05)  # 5% empty boxes
    boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1)
    return boxes.astype(np.float32), g.random(n).astype(np.float32)


# ---------------------------------------------------------------------------- vs references
@requires_torchvision
@given(crowded_boxes(), THRESHOLDS)
def test_identical_to_torchvision_nms(data, threshold):
    boxes, scores = data
    expected = torchvision.ops.nms(t(boxes), t(scores), threshold).numpy()
    got = nms(boxes, scores, threshold)
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == np.int64


@requires_torchvision
@given(crowded_boxes(integer=True), THRESHOLDS, st.data())
def test_identical_to_torchvision_batched_nms(data, threshold, draw):
    # Integer coordinates: torchvision's offset trick is then exact, so both are per-class NMS.
    boxes, scores = data
    idxs = draw.draw(hnp.arrays(np.int64, len(boxes), elements=st.integers(0, 3)))
    expected = torchvision.ops.batched_nms(t(boxes), t(scores), t(idxs), threshold).numpy()
    np.testing.assert_array_equal(batched_nms(boxes, scores, idxs, threshold), expected)


@given(crowded_boxes(max_n=40, dtype=np.float64), THRESHOLDS, st.sampled_from([1, 3, 128]))
def test_blocks_equal_the_greedy_loop(data, threshold, block):
    boxes, scores = data
    with (
        mock.patch.object(nms_module, "BLOCK", block),
        mock.patch.object(nms_module, "MAX_PAIRS", 7),
    ):
        got = nms(boxes, scores, threshold)  # tiny blocks and chunks: every seam is crossed
    np.testing.assert_array_equal(got, greedy_reference(boxes, scores, threshold))


@given(crowded_boxes(max_n=40, dtype=np.float64), THRESHOLDS, st.sampled_from([0, 1, 4]))
def test_walk_and_fixed_point_steps_equal_the_greedy_loop(data, threshold, steps):
    # steps=0: every block is solved by the box-by-box walk; 1: most fall through to it.
    boxes, scores = data
    with (
        mock.patch.object(nms_module, "BLOCK", 16),
        mock.patch.object(nms_module, "FIXED_POINT_STEPS", steps),
    ):
        got = nms(boxes, scores, threshold)
    np.testing.assert_array_equal(got, greedy_reference(boxes, scores, threshold))


@given(hnp.arrays(bool, st.tuples(st.integers(1, 70), st.just(70)), elements=st.booleans()))
def test_block_walk_solves_the_rule(dense):
    # keep[j] = not any(keep[i] and S[i, j] for i < j), checked one j at a time.
    b = dense.shape[0]
    hits = np.triu(dense[:, :b], k=1)
    keep = nms_module._walk_block(hits)
    for j in range(b):
        assert keep[j] == (not (keep[:j] & hits[:j, j]).any())
    np.testing.assert_array_equal(nms_module._solve_block(hits), keep)


@given(crowded_boxes(max_n=30, dtype=np.float64), st.sampled_from([-1.0, -0.1]))
def test_negative_threshold_suppresses_disjoint_boxes_too(data, threshold):
    # IoU 0 > -0.1: the best box removes every other (the proximity test must not skip them)
    boxes, scores = data
    boxes = boxes + 100 * np.arange(len(boxes))[:, None]  # far apart: no two overlap
    boxes[:, 2:] += 1  # none empty (two empty boxes have IoU 0/0 = NaN, which suppresses nothing)
    np.testing.assert_array_equal(
        nms(boxes, scores, threshold), greedy_reference(boxes, scores, threshold)
    )


def test_long_suppression_chain_inside_and_across_blocks():
    # Box i overlaps i + 1 (IoU 0.67) but not i + 2 (IoU 0.43): greedy keeps every other box,
    # and the fixed-point iteration needs about one step per link of the chain.
    n = 300
    x = 2.0 * np.arange(n)
    boxes = np.stack([x, np.zeros(n), x + 10, np.full(n, 10.0)], axis=1).astype(np.float32)
    scores = np.linspace(1, 0, n, dtype=np.float32)
    np.testing.assert_array_equal(nms(boxes, scores, 0.5), np.arange(0, n, 2))


# ---------------------------------------------------------------------------- invariants
@given(crowded_boxes(), THRESHOLDS, st.data())
def test_invariants(data, threshold, draw):
    boxes, scores = data
    idxs = draw.draw(hnp.arrays(np.int64, len(boxes), elements=st.integers(0, 2)))
    kept = batched_nms(boxes, scores, idxs, threshold)
    assert len(np.unique(kept)) == len(kept) and np.isin(kept, np.arange(len(boxes))).all()
    assert (np.diff(scores[kept]) < 0).all()  # by decreasing score
    iou = box_iou(boxes[kept], boxes[kept])
    same_class = idxs[kept][:, None] == idxs[kept][None, :]
    np.fill_diagonal(same_class, False)
    assert not (iou[same_class] > threshold).any()  # no two kept boxes of a class overlap
    removed = np.setdiff1d(np.arange(len(boxes)), kept)
    for j in removed:  # each removed box was suppressed by a better kept box of its class
        better = kept[(scores[kept] > scores[j]) & (idxs[kept] == idxs[j])]
        assert (box_iou(boxes[better], boxes[j : j + 1]) > threshold).any()


def test_batched_is_nms_per_class_merged():
    g = np.random.default_rng(0)
    centres = g.uniform(0, 100, (500, 2))
    boxes = np.concatenate([centres - 10, centres + 10], axis=1).astype(np.float32)
    scores = g.random(500).astype(np.float32)
    idxs = g.integers(0, 4, 500)
    merged = np.concatenate(
        [np.flatnonzero(idxs == c)[nms(boxes[idxs == c], scores[idxs == c], 0.5)] for c in range(4)]
    )
    expected = merged[np.argsort(-scores[merged], kind="stable")]
    np.testing.assert_array_equal(batched_nms(boxes, scores, idxs, 0.5), expected)


# ---------------------------------------------------------------------------- ties and edges
def test_ties_are_broken_by_index():
    box = [0.0, 0.0, 10.0, 10.0]
    same = np.array([box, box, box], dtype=np.float32)
    assert nms(same, np.full(3, 0.5, np.float32), 0.5).tolist() == [0]  # first one wins
    apart = np.array([[0, 0, 1, 1], [5, 5, 6, 6], [9, 9, 10, 10], [20, 20, 21, 21]], np.float32)
    scores = np.array([0.2, 0.5, 0.5, 0.2], np.float32)
    assert nms(apart, scores, 0.5).tolist() == [1, 2, 0, 3]  # equal scores: input order


@requires_torchvision
@given(crowded_boxes(), THRESHOLDS, st.data())
def test_ties_like_torchvision_cpu(data, threshold, draw):
    boxes, _ = data
    scores = draw.draw(hnp.arrays(np.float32, len(boxes), elements=st.sampled_from([0.1, 0.5])))
    expected = torchvision.ops.nms(t(boxes), t(scores), threshold).numpy()
    np.testing.assert_array_equal(nms(boxes, scores, threshold), expected)


def with_nan_scores(data, draw):
    """``data`` (boxes, scores) with some scores, chosen by hypothesis, replaced by NaN."""
    boxes, scores = data
    nan = draw.draw(hnp.arrays(bool, len(scores)))
    return boxes, np.where(nan, np.nan, scores).astype(scores.dtype)


def test_nan_scores_come_first_in_input_order():
    apart = np.array([[0, 0, 1, 1], [5, 5, 6, 6], [9, 9, 10, 10], [20, 20, 21, 21]], np.float32)
    scores = np.array([0.2, np.nan, 0.9, np.nan], np.float32)
    assert nms(apart, scores, 0.5).tolist() == [1, 3, 2, 0]
    same = np.repeat(apart[:1], 3, axis=0)
    assert nms(same, np.array([0.5, np.nan, 0.9], np.float32), 0.5).tolist() == [1]


@given(crowded_boxes(max_n=40, dtype=np.float64), THRESHOLDS, st.data())
def test_nan_scores_rank_above_every_number(data, threshold, draw):
    # torch's order: a NaN score is above every number, and NaNs keep their input order, which is
    # what one score larger than all the others (they are in (0, 1]) gives in the greedy loop.
    boxes, scores = with_nan_scores(data, draw)
    expected = greedy_reference(boxes, np.where(np.isnan(scores), 2.0, scores), threshold)
    np.testing.assert_array_equal(nms(boxes, scores, threshold), expected)


@requires_torchvision
@given(crowded_boxes(integer=True), THRESHOLDS, st.data())
def test_nan_scores_like_torchvision(data, threshold, draw):
    boxes, scores = with_nan_scores(data, draw)
    expected = torchvision.ops.nms(t(boxes), t(scores), threshold).numpy()
    np.testing.assert_array_equal(nms(boxes, scores, threshold), expected)
    idxs = draw.draw(hnp.arrays(np.int64, len(boxes), elements=st.integers(0, 3)))
    expected = torchvision.ops.batched_nms(t(boxes), t(scores), t(idxs), threshold).numpy()
    np.testing.assert_array_equal(batched_nms(boxes, scores, idxs, threshold), expected)


@requires_torchvision
def test_threshold_compared_like_torchvision():
    # IoU 3 / 10 rounds to float32(0.3) = 0.30000001 > 0.3: torchvision compares in float64 and
    # suppresses; a float32 comparison with 0.3 would not. IoU exactly 0.5 is not > 0.5.
    boxes = np.array([[0, 0, 10, 1], [0, 0, 3, 1], [20, 0, 22, 1], [20, 0, 21, 1]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    for threshold, expected in [(0.3, [0, 2]), (0.5, [0, 1, 2, 3]), (0.49, [0, 1, 2])]:
        assert nms(boxes, scores, threshold).tolist() == expected
        assert torchvision.ops.nms(t(boxes), t(scores), threshold).tolist() == expected


def test_empty_input_gives_empty_int64():
    kept = nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5)
    assert kept.shape == (0,) and kept.dtype == np.int64
    kept = batched_nms(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64), 0.5)
    assert kept.shape == (0,) and kept.dtype == np.int64


def test_degenerate_and_outside_boxes():
    boxes = np.array(
        [[5, 5, 5, 5], [5, 5, 5, 5], [0, 3, 9, 3], [-50, -50, -40, -40], [-51, -50, -40, -40]],
        dtype=np.float32,
    )
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5], np.float32)
    with np.errstate(all="raise"):  # no warning escapes for 0 / 0
        kept = nms(boxes, scores, 0.5)
    assert kept.tolist() == [0, 1, 2, 3]  # empty boxes suppress nothing; the last overlaps 3


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        nms(np.zeros((3, 5)), np.zeros(3), 0.5)
    with pytest.raises(ValueError, match="scores"):
        nms(np.zeros((3, 4)), np.zeros(2), 0.5)


# ---------------------------------------------------------------------------- GPU kernel
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 1000, 5000])
def test_cuda_kernel_equals_cpu(dtype, n):
    import cupy

    boxes, _ = random_boxes(n, seed=n)
    boxes = boxes.astype(dtype)
    g = np.random.default_rng(n)
    scores = g.integers(0, max(n // 3, 1), n).astype(dtype)  # many ties
    idxs = g.integers(0, 3, n)
    for threshold in (0.3, 0.7):
        got = nms(cupy.asarray(boxes), cupy.asarray(scores), threshold)
        assert isinstance(got, cupy.ndarray) and got.dtype == cupy.int64
        np.testing.assert_array_equal(got.get(), nms(boxes, scores, threshold))
        got = batched_nms(cupy.asarray(boxes), cupy.asarray(scores), cupy.asarray(idxs), threshold)
        np.testing.assert_array_equal(got.get(), batched_nms(boxes, scores, idxs, threshold))


@pytest.mark.gpu
def test_xp_version_on_cupy_equals_the_kernel():
    import cupy

    boxes, scores = random_boxes(3000, seed=1)
    order = np.argsort(-scores, kind="stable")
    sorted_boxes = cupy.asarray(boxes[order])
    bound = nms_module._suppression_bound(0.5, np.float32)
    by_kernel = nms_module._greedy_cuda(sorted_boxes, None, bound)
    by_blocks = nms_module._greedy_blocks(sorted_boxes, None, bound)
    np.testing.assert_array_equal(by_kernel.get(), by_blocks.get())
