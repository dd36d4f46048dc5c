"""RoIPool: torchvision, a nested-loop reference from Fast R-CNN, finite differences, invariants."""

import math
from decimal import ROUND_HALF_UP, Decimal

import numpy as np
import pytest
from helpers import check_gradients, requires_torchvision, torch, torchvision
from hypothesis import example, given, settings
from hypothesis import strategies as st

import minimask.ops.roi_pool as roi_pool_module
from minimask.engine import Tensor
from minimask.ops.roi_pool import (
    float32_rank,
    roi_pool,
    roi_pool_backward,
    roi_pool_forward,
    roi_pool_plain,
)


# ---------------------------------------------------------------------------- the slow reference
def c_round(v: float) -> int:
    """C's ``round`` of a Python float: the nearest integer, halves away from zero."""
    whole = math.floor(abs(v))
    return int(math.copysign(whole + (abs(v) - whole >= 0.5), v))


def reference_roi_pool(features, rois, output_size, scale):
    """RoIPool as Fast R-CNN §2.1 describes it (with the Caffe rounding), one cell at a time.

    The RoI is rounded to whole cells and split into PH×PW sub-windows of about (h/PH)×(w/PW)
    cells; each output is the max over its sub-window, scanned row by row (the first maximum wins).
    Returns the outputs and the argmax cells (flat in the input, -1 for empty bins).
    """
    N, C, H, W = features.shape
    PH, PW = output_size
    out = np.zeros((len(rois), C, PH, PW))
    argmax = np.full((len(rois), C, PH, PW), -1)
    for k, (n, *box) in enumerate(rois):
        x1, y1, x2, y2 = (c_round(v * scale) for v in box)
        width, height = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)  # counted inclusively
        for ph in range(PH):
            top = min(max(y1 + math.floor(ph * height / PH), 0), H)
            bottom = min(max(y1 + math.ceil((ph + 1) * height / PH), 0), H)
            for pw in range(PW):
                left = min(max(x1 + math.floor(pw * width / PW), 0), W)
                right = min(max(x1 + math.ceil((pw + 1) * width / PW), 0), W)
                for c in range(C):
                    best, where = -math.inf, -1
                    for y in range(top, bottom):
                        for x in range(left, right):
                            if features[int(n), c, y, x] > best:
                                best, where = features[int(n), c, y, x], y * W + x
                    if where >= 0:
                        out[k, c, ph, pw] = best
                        argmax[k, c, ph, pw] = (int(n) * C + c) * H * W + where
    return out, argmax


# ---------------------------------------------------------------------------- random cases
@st.composite
def cases(draw, max_side=14, max_rois=6, ties=False):
    """Tie-free maps (a shuffled linspace), several images, RoIs of every size, some outside."""
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    N, C = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    H, W = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    K = draw(st.integers(0, max_rois))
    scale = draw(st.sampled_from([1.0, 0.5, 0.25, 1 / 3]))
    features = rng.permutation(N * C * H * W).reshape(N, C, H, W) / (N * C * H * W) - 0.5
    if ties:  # few distinct values, so that most bins hold several maxima
        features = np.round(features * 4)
    corner = rng.uniform(-0.5, 1.2, (K, 2)) * [W / scale, H / scale]
    size = np.exp(rng.uniform(-2, 3.5, (K, 2)))
    size[rng.random((K, 2)) < 0.15] = 0
    boxes = np.concatenate([corner, corner + size], axis=1)
    if draw(st.booleans()):  # on the half-pixel grid: exercises the rounding of halves
        boxes = np.round(boxes * 2) / 2
    rois = np.concatenate([rng.integers(0, N, (K, 1)), boxes], axis=1)
    output_size = (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    grad = rng.standard_normal((K, C) + output_size)
    return dict(features=features, rois=rois, output_size=output_size, scale=scale, grad=grad)


def run_ours(case):
    out, saved = roi_pool_forward(
        case["features"], case["rois"], case["output_size"], case["scale"]
    )
    return out, saved, roi_pool_backward(case["grad"], saved)


def run_torchvision(case):
    x = torch.tensor(case["features"], requires_grad=True)
    out = torchvision.ops.roi_pool(
        x, torch.tensor(case["rois"]), case["output_size"], case["scale"]
    )
    out.backward(torch.tensor(case["grad"]))
    return out.detach().numpy(), x.grad.numpy()


@requires_torchvision
@pytest.mark.parametrize("block_outputs", [1, 2**16])
@settings(max_examples=50)
@given(case=cases())
def test_matches_torchvision_values_and_gradients(case, block_outputs):
    with pytest.MonkeyPatch.context() as patch:  # one RoI per block, or many
        patch.setattr(roi_pool_module, "BLOCK_OUTPUTS", block_outputs)
        out, _, grad = run_ours(case)
    expected_out, expected_grad = run_torchvision(case)
    np.testing.assert_allclose(out, expected_out, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-6, atol=1e-12)


@requires_torchvision
@settings(max_examples=30)
@given(case=cases(ties=True))
def test_ties_go_to_the_first_maximum_in_scan_order_as_torchvision(case):
    out, _, grad = run_ours(case)
    expected_out, expected_grad = run_torchvision(case)
    np.testing.assert_array_equal(out, expected_out)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-12, atol=1e-12)


@settings(max_examples=25)
@given(case=cases(max_side=8, max_rois=3))
def test_matches_nested_loop_reference(case):
    out, saved, _ = run_ours(case)
    expected, expected_argmax = reference_roi_pool(
        case["features"], case["rois"], case["output_size"], case["scale"]
    )
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(saved.argmax, expected_argmax)


@settings(max_examples=10)
@given(case=cases(max_side=6, max_rois=3))
def test_gradients_match_finite_differences(case):
    # Tie-free maps: the values are at least 1/(N*C*H*W) apart, far more than eps = 1e-6.
    def fn(x):
        return roi_pool(x, case["rois"], case["output_size"], case["scale"])

    check_gradients(fn, case["features"])


@settings(max_examples=30)
@given(case=cases(ties=True), dtype=st.sampled_from([np.float64, np.float32]))
def test_fast_form_equals_the_plain_definition_in_the_module(case, dtype):
    features = case["features"].astype(dtype)
    out, _ = roi_pool_forward(features, case["rois"], case["output_size"], case["scale"])
    expected = roi_pool_plain(features, case["rois"], case["output_size"], case["scale"])
    assert out.dtype == expected.dtype == dtype
    np.testing.assert_array_equal(out, expected)


def float32_poisoned(case, rng):
    """The case in float32 with ties, some zeros made -0.0 and a few NaNs."""
    features = case["features"].astype(np.float32)
    zeros = features == 0
    features[zeros & (rng.random(features.shape) < 0.5)] = -0.0
    features[rng.random(features.shape) < 0.05] = np.nan
    return features


@requires_torchvision
@settings(max_examples=40)
@given(case=cases(ties=True), seed=st.integers(0, 2**31 - 1))
def test_float32_keys_match_torchvision_with_ties_signed_zeros_and_nan(case, seed):
    # float32 maps take the sort-free keys (the value's bits as its rank): ties must still go to
    # the first cell, -0.0 must tie with 0.0 and NaN must lose to every number.
    features = float32_poisoned(case, np.random.default_rng(seed))
    grad = case["grad"].astype(np.float32)
    out, saved = roi_pool_forward(features, case["rois"], case["output_size"], case["scale"])
    all_nan = np.isnan(out)  # torchvision gives -FLT_MAX there (module docstring)
    grad[all_nan] = 0  # so that those bins' gradients do not count on either side
    x = torch.tensor(features, requires_grad=True)
    rois = torch.tensor(case["rois"], dtype=torch.float32)
    theirs = torchvision.ops.roi_pool(x, rois, case["output_size"], case["scale"])
    theirs.backward(torch.tensor(grad))
    np.testing.assert_array_equal(out[~all_nan], theirs.detach().numpy()[~all_nan])
    ours = roi_pool_backward(grad, saved)
    np.testing.assert_allclose(ours, x.grad.numpy(), rtol=1e-6, atol=1e-6)


def test_float32_rank_orders_like_the_floats():
    values = np.array(
        [np.inf, 3.5, 1e-40, 0.0, -0.0, -1e-40, -2.0, -np.inf, np.nan, -np.nan], np.float32
    )
    rank = float32_rank(values)
    assert (np.diff(rank[:4]) > 0).all() and rank[3] == rank[4]  # -0.0 ties with 0.0
    assert (np.diff(rank[4:8]) > 0).all() and rank[8] == rank[9] > rank[7]  # NaN last
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(1000) * 10.0 ** rng.integers(-30, 30, 1000)).astype(np.float32)
    a, b = rng.integers(0, 1000, (2, 5000))
    np.testing.assert_array_equal(x[a] > x[b], float32_rank(x)[a] < float32_rank(x)[b])


# ---------------------------------------------------------------------------- invariants
def test_hand_worked_4x4():
    """The d2l example: X = arange(16) as a 4×4 map, two RoIs at spatial_scale 0.1, 2×2 output."""
    X = np.arange(16.0).reshape(1, 1, 4, 4)  # X[y, x] = 4y + x
    rois = np.array([[0, 0.0, 0.0, 20.0, 20.0], [0, 0.0, 10.0, 30.0, 30.0]])
    out, saved = roi_pool_forward(X, rois, (2, 2), 0.1)
    # RoI 1: corners round(0) = 0, round(2) = 2, so 3×3 cells (inclusive); bins of 1.5 cells:
    # rows/cols [floor(0), ceil(1.5)) = [0, 2) and [floor(1.5), ceil(3)) = [1, 3).
    #   max X[0:2, 0:2] = 5   max X[0:2, 1:3] = 6   max X[1:3, 0:2] = 9   max X[1:3, 1:3] = 10
    # RoI 2: x in [0, 3] (4 cells, bins of 2: [0, 2), [2, 4)), y in [round(1), round(3)] = [1, 3]
    # (3 cells, bins of 1.5: [1 + 0, 1 + 2) = [1, 3), [1 + 1, 1 + 3) = [2, 4)):
    #   max X[1:3, 0:2] = 9   max X[1:3, 2:4] = 11   max X[2:4, 0:2] = 13   max X[2:4, 2:4] = 15
    np.testing.assert_array_equal(out[:, 0], [[[5, 6], [9, 10]], [[9, 11], [13, 15]]])
    # The gradient goes to the cell of each max, which is the value itself here (X[y, x] = 4y + x).
    np.testing.assert_array_equal(saved.argmax[:, 0], out[:, 0])


def test_rounding_goes_half_away_from_zero():
    # 2.5 cells rounds to 3 (C's round), not 2 (NumPy's round half to even): the RoI is then the
    # single column 3, whose max is X[:, 3].max() = 15.
    X = np.arange(16.0).reshape(1, 1, 4, 4)
    out, _ = roi_pool_forward(X, np.array([[0, 2.5, 0.0, 3.0, 3.0]]), (1, 1), 1.0)
    assert out[0, 0, 0, 0] == 15


@settings(max_examples=200)
@given(
    v=st.one_of(
        st.floats(-1e6, 1e6),
        st.integers(-1000, 1000).map(lambda n: n / 2),  # the halves themselves
        st.integers(-1000, 1000).map(lambda n: np.nextafter(n / 2, n / 2 + 1.0)),  # around them
        st.integers(-1000, 1000).map(lambda n: np.nextafter(n / 2, n / 2 - 1.0)),
    ),
    dtype=st.sampled_from([np.float64, np.float32]),
)
@example(v=np.nextafter(0.5, 0.0), dtype=np.float64)  # 1/2 - 2^-54: |x| + 0.5 rounds to 1
@example(v=-np.nextafter(0.5, 0.0), dtype=np.float64)
@example(v=np.nextafter(np.float32(0.5), np.float32(0.0)), dtype=np.float32)  # 1/2 - 2^-25
def test_rounding_is_c_round_of_the_exact_value(v, dtype):
    # Decimal rounds the exact binary value with no intermediate rounding: the independent answer.
    v = dtype(v)
    expected = Decimal(float(v)).quantize(Decimal(1), rounding=ROUND_HALF_UP)
    assert roi_pool_module._round_half_away(np.array([v])) == float(expected)
    assert c_round(float(v)) == int(expected)


def test_just_below_one_half_rounds_down_as_in_c():
    # 0.49999999999999994 (the largest double below 1/2) + 0.5 rounds to 1.0 in float64, so
    # floor(|x| + 0.5) would round it up; C's round gives 0. The RoI is then row 0 alone.
    below_half = np.nextafter(0.5, 0.0)
    X = np.array([1.0, 2.0]).reshape(1, 1, 2, 1)
    rois = np.array([[0, 0.0, below_half, 0.0, below_half]])
    out, saved = roi_pool_forward(X, rois, (1, 1), 1.0)
    expected, expected_argmax = reference_roi_pool(X, rois, (1, 1), 1.0)
    assert out[0, 0, 0, 0] == X[0, 0, 0, 0] == expected[0, 0, 0, 0]
    assert saved.argmax[0, 0, 0, 0] == 0 == expected_argmax[0, 0, 0, 0]
    if torchvision is not None:
        theirs = torchvision.ops.roi_pool(torch.tensor(X), torch.tensor(rois), (1, 1), 1.0)
        np.testing.assert_array_equal(out, theirs.numpy())


def test_values_below_minus_flt_max_keep_their_true_max():
    # Documented difference: torchvision starts each max at -FLT_MAX, so in float64 a bin whose
    # values are all below it gives -FLT_MAX and no gradient. minimask gives the true max.
    X = np.array([[-3e300, -1e300], [-2e300, -5e300]]).reshape(1, 1, 2, 2)
    rois = np.array([[0, 0.0, 0.0, 1.0, 1.0]])
    out, saved = roi_pool_forward(X, rois, (1, 1), 1.0)
    assert out[0, 0, 0, 0] == X.max() == -1e300
    grad = roi_pool_backward(np.ones_like(out), saved)
    np.testing.assert_array_equal(grad, X == X.max())  # all of it at the max's cell
    np.testing.assert_array_equal(out, reference_roi_pool(X, rois, (1, 1), 1.0)[0])
    if torchvision is not None:
        flt_max = float(np.finfo(np.float32).max)
        theirs = torchvision.ops.roi_pool(torch.tensor(X), torch.tensor(rois), (1, 1), 1.0)
        assert theirs.item() == -flt_max  # the difference the module docstring states


def test_empty_roi_list():
    F = np.random.default_rng(0).standard_normal((2, 3, 6, 6))
    out, saved = roi_pool_forward(F, np.zeros((0, 5)), (7, 5), 0.5)
    assert out.shape == (0, 3, 7, 5)
    np.testing.assert_array_equal(roi_pool_backward(np.zeros((0, 3, 7, 5)), saved), 0)


def test_zero_width_and_outside_rois():
    F = np.random.default_rng(0).permutation(50).reshape(1, 2, 5, 5) / 50.0
    rois = np.array(
        [
            [0, 2.0, 2.0, 2.0, 2.0],  # zero-size: one cell (counted inclusively)
            [0, 7.0, 7.0, 9.0, 9.0],  # fully outside: every bin is empty
            [0, -9.0, -9.0, -3.0, -2.0],
        ]
    )
    out, saved = roi_pool_forward(F, rois, (2, 3), 1.0)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[0], np.broadcast_to(F[0, :, 2:3, 2:3], (2, 2, 3)))
    np.testing.assert_array_equal(out[1:], 0)
    np.testing.assert_array_equal(saved.argmax[1:], -1)
    grad = roi_pool_backward(np.ones_like(out), saved)
    assert grad.sum() == 12  # the 2 channels × 6 bins of the first RoI, all on cell (2, 2)


def test_tensor_op_float32_and_bad_rois():
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((2, 4, 10, 10)).astype(np.float32), requires_grad=True)
    rois = np.array([[1, 0.0, 0.0, 30.0, 20.0], [0, 5.0, 5.0, 10.0, 10.0]], dtype=np.float32)
    out = roi_pool(x, rois, 3, spatial_scale=0.25)
    assert out.shape == (2, 4, 3, 3) and out.dtype == np.float32
    out.sum().backward()
    assert x.grad.dtype == np.float32 and x.grad.sum() == 2 * 4 * 9
    with pytest.raises(ValueError, match="image indices"):
        roi_pool(x, np.array([[-1, 0.0, 0.0, 1.0, 1.0]]), 2)


@pytest.mark.gpu
def test_cpu_equals_gpu():
    import cupy  # noqa: PLC0415 - only with a GPU

    rng = np.random.default_rng(0)
    F = rng.permutation(2 * 8 * 40 * 50).reshape(2, 8, 40, 50).astype(np.float32)
    xy = rng.uniform(-20, 200, (300, 2))
    rois = np.concatenate([rng.integers(0, 2, (300, 1)), xy, xy + rng.uniform(0, 120, (300, 2))], 1)
    rois = rois.astype(np.float32)
    grad = rng.standard_normal((300, 8, 7, 7)).astype(np.float32)
    out, saved = roi_pool_forward(F, rois, 7, 0.25)
    gpu_out, gpu_saved = roi_pool_forward(cupy.asarray(F), cupy.asarray(rois), 7, 0.25)
    np.testing.assert_array_equal(gpu_out.get(), out)
    np.testing.assert_array_equal(gpu_saved.argmax.get(), saved.argmax)
    gpu_grad = roi_pool_backward(cupy.asarray(grad), gpu_saved)
    np.testing.assert_allclose(gpu_grad.get(), roi_pool_backward(grad, saved), rtol=1e-6)
