"""The box coder: the inverse law, class-specific deltas, the clip, and torchvision's BoxCoder."""

import math

import numpy as np
import pytest
from helpers import requires_torchvision, torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minimask.ops.box_coder import BOX_HEAD_WEIGHTS, DEFAULT_CLIP, RPN_WEIGHTS, BoxCoder

WEIGHTS = st.sampled_from([RPN_WEIGHTS, BOX_HEAD_WEIGHTS, (2.0, 3.0, 0.5, 7.0)])


@st.composite
def proper_boxes(draw, n, k=1, dtype=np.float64):
    """(n, 4k) boxes with sides in [1, 50] pixels, so sizes differ by at most 50x (< the clip)."""
    width = np.dtype(dtype).itemsize * 8
    corner = hnp.arrays(dtype, (n, k, 2), elements=st.floats(-100, 100, width=width))
    side = hnp.arrays(dtype, (n, k, 2), elements=st.floats(1, 50, width=width))
    top_left, size = draw(corner), draw(side)
    return np.concatenate([top_left, top_left + size], axis=2).reshape(n, 4 * k)  # (n, 4k)


@given(st.data(), st.integers(0, 10), st.integers(1, 3), WEIGHTS)
def test_decode_inverts_encode(data, n, k, weights):
    anchors = data.draw(proper_boxes(n))
    targets = data.draw(proper_boxes(n, k))  # (n, 4k): class-specific targets
    coder = BoxCoder(weights)
    deltas = coder.encode(targets, anchors)
    assert deltas.shape == targets.shape and deltas.dtype == np.float64
    np.testing.assert_allclose(coder.decode(deltas, anchors), targets, rtol=1e-9, atol=1e-9)


def test_encode_hand_worked():
    anchor = np.array([[0.0, 0.0, 10.0, 20.0]])  # centre (5, 10), size 10 x 20
    target = np.array([[5.0, 0.0, 15.0, 40.0]])  # centre (10, 20), size 10 x 40
    deltas = BoxCoder(BOX_HEAD_WEIGHTS).encode(target, anchor)
    np.testing.assert_allclose(deltas, [[10 * 5 / 10, 10 * 10 / 20, 0.0, 5 * math.log(2)]])


def test_class_specific_columns_are_independent():
    rng = np.random.default_rng(0)
    anchors = np.array([[0, 0, 10, 10], [5, 5, 25, 15]], dtype=np.float32)
    deltas = rng.normal(size=(2, 4 * 3)).astype(np.float32)  # (R, 4K), K = 3
    coder = BoxCoder(BOX_HEAD_WEIGHTS)
    all_classes = coder.decode(deltas, anchors)
    for k in range(3):
        one = coder.decode(deltas[:, 4 * k : 4 * k + 4], anchors)
        np.testing.assert_array_equal(all_classes[:, 4 * k : 4 * k + 4], one)
    assert all_classes.dtype == np.float32


def test_decode_clamps_size_deltas_at_the_clip():
    anchor = np.array([[0.0, 0.0, 16.0, 16.0]])
    huge = np.array([[0.0, 0.0, 100.0, -100.0]])  # t_w way above the clip, t_h way below
    box = BoxCoder(RPN_WEIGHTS).decode(huge, anchor)
    assert np.isfinite(box).all()
    np.testing.assert_allclose(box[0, 2] - box[0, 0], 16 * math.exp(DEFAULT_CLIP))  # 1000 px
    assert box[0, 3] - box[0, 1] < 1e-30  # no clamp from below, as torchvision


def test_empty_and_bad_weights():
    coder = BoxCoder()
    assert coder.encode(np.zeros((0, 4)), np.zeros((0, 4))).shape == (0, 4)
    assert coder.decode(np.zeros((0, 8)), np.zeros((0, 4))).shape == (0, 8)
    with pytest.raises(ValueError, match="weights"):
        BoxCoder((1.0, 1.0))


@requires_torchvision
@given(st.data(), st.integers(1, 10), st.integers(1, 3), WEIGHTS, st.sampled_from(["f4", "f8"]))
def test_matches_torchvision_box_coder(data, n, k, weights, dtype):
    from torchvision.models.detection._utils import BoxCoder as TorchBoxCoder

    dtype = np.dtype(dtype)
    anchors = data.draw(proper_boxes(n, dtype=dtype))
    targets = data.draw(proper_boxes(n, dtype=dtype))
    deltas = data.draw(
        hnp.arrays(dtype, (n, 4 * k), elements=st.floats(-6, 6, width=dtype.itemsize * 8))
    )
    ours, theirs = BoxCoder(weights), TorchBoxCoder(weights)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    expected = theirs.encode_single(torch.from_numpy(targets), torch.from_numpy(anchors))
    np.testing.assert_allclose(
        ours.encode(targets, anchors), expected.numpy(), rtol=rtol, atol=rtol
    )
    expected = theirs.decode(torch.from_numpy(deltas), [torch.from_numpy(anchors)])  # (n, k, 4)
    np.testing.assert_allclose(
        ours.decode(deltas, anchors), expected.numpy().reshape(n, 4 * k), rtol=rtol, atol=1e-3
    )
