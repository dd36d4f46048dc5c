"""Multi-scale RoIAlign: level mapping by hand, RoI order, and torchvision's MultiScaleRoIAlign."""

from collections import OrderedDict

import numpy as np
import pytest
from helpers import requires_torchvision, torch, torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from minimask.engine import Tensor
from minimask.ops.poolers import (
    MultiScaleRoIAlign,
    boxes_to_rois,
    infer_scale,
    map_levels,
    multiscale_roi_align,
)
from minimask.ops.roi_align import roi_align_forward


def square(side, x=0.0, y=0.0):
    return [x, y, x + side, y + side]


def test_map_levels_by_hand():
    # k = floor(4 + log2(side / 224) + 1e-6), clamped to [2, 5], counted from k_min = 2
    boxes = np.array(
        [
            square(224),  # 4 + log2(1) = 4
            square(112),  # 4 - 1 = 3 exactly: the eps keeps floor(3 - rounding) from giving 2
            square(111.9),  # just under 112: 2.99... -> 2
            square(448),  # 5
            square(2000),  # 7.2 -> clamped to 5
            square(8),  # 4 + log2(8/224) = -0.8 -> clamped to 2
            [0, 0, 0, 50],  # empty box: log2(0) = -inf -> clamped to 2
            [0, 0, 56, 224],  # sqrt(56 * 224) = 112 -> 3
        ]
    )
    np.testing.assert_array_equal(map_levels(boxes, 2, 5), np.array([4, 3, 2, 5, 5, 2, 2, 3]) - 2)
    # the canonical size and level move the boundaries
    np.testing.assert_array_equal(map_levels(boxes[:2], 2, 5, canonical_scale=112), [3, 2])


def test_infer_scale_and_boxes_to_rois():
    assert infer_scale(200, 800) == 1 / 4
    assert infer_scale(13, 800) == 1 / 64  # 13/800 = 2^-5.94, rounded to a power of two
    assert infer_scale(50, 801) == 1 / 16
    rois = boxes_to_rois([np.ones((2, 4)), np.zeros((0, 4)), 2 * np.ones((1, 4))])
    np.testing.assert_array_equal(rois[:, 0], [0, 0, 2])
    np.testing.assert_array_equal(rois[:, 1:], [[1] * 4, [1] * 4, [2] * 4])


def test_results_come_back_in_roi_order():
    rng = np.random.default_rng(0)
    levels = [rng.standard_normal((1, 2, 64 // 2**k, 64 // 2**k)) for k in range(3)]  # P2..P4
    scales = [1 / 4, 1 / 8, 1 / 16]
    rois = np.array([[0] + square(240), [0] + square(20), [0] + square(120, 5, 7)])  # P4, P2, P3
    out = multiscale_roi_align([Tensor(f) for f in levels], rois, scales, 3, 2)
    for row, level in zip(range(3), [2, 0, 1]):
        expected, _ = roi_align_forward(levels[level], rois[row : row + 1], 3, scales[level], 2)
        np.testing.assert_array_equal(out.data[row], expected[0])


def test_gradient_reaches_only_the_levels_used():
    rng = np.random.default_rng(0)
    levels = [
        Tensor(rng.standard_normal((1, 2, 32 // 2**k, 32 // 2**k)), requires_grad=True)
        for k in range(3)
    ]
    rois = np.array([[0] + square(10), [0] + square(12, 3, 3)])  # both small: level 0 only
    multiscale_roi_align(levels, rois, [1 / 4, 1 / 8, 1 / 16], 2, 2).sum().backward()
    assert levels[0].grad is not None and levels[0].grad.sum() != 0
    assert levels[1].grad is None and levels[2].grad is None


def test_empty_boxes():
    rng = np.random.default_rng(0)
    levels = [Tensor(rng.standard_normal((2, 3, 16 // 2**k, 16 // 2**k))) for k in range(2)]
    out = MultiScaleRoIAlign(7, 2)(levels, [np.zeros((0, 4)), np.zeros((0, 4))], [(64, 64)] * 2)
    assert out.shape == (0, 3, 7, 7)


@st.composite
def pyramids(draw):
    """Images of several sizes, 1-4 levels from stride 4 or 8, boxes from tiny to huge."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    N = draw(st.integers(1, 2))
    sizes = [(int(rng.integers(64, 300)), int(rng.integers(64, 300))) for _ in range(N)]
    tallest, widest = max(h for h, _ in sizes), max(w for _, w in sizes)
    first, L = draw(st.integers(2, 3)), draw(st.integers(1, 4))
    shapes = [(-(-tallest // 2 ** (first + k)), -(-widest // 2 ** (first + k))) for k in range(L)]
    features = [rng.standard_normal((N, 2) + s) for s in shapes]
    boxes = []
    for _ in range(N):
        K = int(rng.integers(0, 8))
        corner = rng.uniform(-20, 250, (K, 2))
        boxes.append(np.concatenate([corner, corner + np.exp(rng.uniform(0, 6.5, (K, 2)))], 1))
    return features, boxes, sizes


@requires_torchvision
@settings(max_examples=30)
@given(
    pyramid=pyramids(),
    output_size=st.sampled_from([1, 3, (7, 5), 14]),
    sampling_ratio=st.sampled_from([-1, 0, 2]),
)
def test_matches_torchvision_multiscale_roi_align(pyramid, output_size, sampling_ratio):
    features, boxes, sizes = pyramid
    names = [f"p{k}" for k in range(len(features))]
    torch_features = [torch.tensor(f, requires_grad=True) for f in features]
    reference = torchvision.ops.MultiScaleRoIAlign(names, output_size, sampling_ratio)
    expected = reference(
        OrderedDict(zip(names, torch_features)), [torch.tensor(b) for b in boxes], sizes
    )
    grad = np.random.default_rng(0).standard_normal(tuple(expected.shape))
    expected.backward(torch.tensor(grad))

    ours = [Tensor(f, requires_grad=True) for f in features]
    out = MultiScaleRoIAlign(output_size, sampling_ratio)(ours, boxes, sizes)
    out.backward(grad)
    np.testing.assert_allclose(out.data, expected.detach().numpy(), rtol=1e-6, atol=1e-12)
    for mine, theirs in zip(ours, torch_features):
        got = np.zeros_like(mine.data) if mine.grad is None else mine.grad
        want = np.zeros_like(mine.data) if theirs.grad is None else theirs.grad.numpy()
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)


@pytest.mark.gpu
def test_cpu_equals_gpu():
    import cupy  # noqa: PLC0415 - only with a GPU

    rng = np.random.default_rng(0)
    features = [rng.standard_normal((2, 4, 128 // 2**k, 96 // 2**k)) for k in range(4)]
    boxes = [rng.uniform(0, 300, (50, 2)) for _ in range(2)]
    boxes = [np.concatenate([b, b + rng.uniform(1, 250, (50, 2))], 1) for b in boxes]
    pooler = MultiScaleRoIAlign(7, 2)
    cpu = pooler([Tensor(f) for f in features], boxes, [(512, 384)] * 2)
    gpu = pooler(
        [Tensor(cupy.asarray(f)) for f in features],
        [cupy.asarray(b) for b in boxes],
        [(512, 384)] * 2,
    )
    np.testing.assert_allclose(gpu.data.get(), cpu.data, rtol=1e-9, atol=1e-12)
