"""RoIAlign: torchvision, a nested-loop reference from the paper, finite differences, invariants."""

import math

import numpy as np
import pytest
from helpers import check_gradients, requires_torchvision, torch, torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

import minimask.ops.roi_align as roi_align_module
from minimask.engine import Tensor
from minimask.ops.roi_align import roi_align, roi_align_backward, roi_align_forward


# ---------------------------------------------------------------------------- the slow reference
def reference_terms(shape, rois, output_size, scale, sampling_ratio, aligned):
    """RoIAlign as Mask R-CNN §3 describes it, one term at a time (with torchvision's borders).

    Each bin of the RoI is sampled at the centres of a regular sub-grid; each sample is a bilinear
    interpolation of the four nearest cells; the bin is the average of its samples. Yields
    ``(k, ph, pw, n, y, x, weight)``: bin (ph, pw) of RoI k gives ``weight`` (its share of the
    average included) to cell (y, x) of image n, for every term of non-zero weight.
    """
    N, C, H, W = shape
    PH, PW = output_size
    for k, (n, x1, y1, x2, y2) in enumerate(rois):
        shift = 0.5 if aligned else 0.0
        x1, y1, x2, y2 = (v * scale - shift for v in (x1, y1, x2, y2))
        width, height = x2 - x1, y2 - y1
        if not aligned:
            width, height = max(width, 1.0), max(height, 1.0)
        bin_w, bin_h = width / PW, height / PH
        gy = sampling_ratio if sampling_ratio > 0 else math.ceil(height / PH)
        gx = sampling_ratio if sampling_ratio > 0 else math.ceil(width / PW)
        for ph in range(PH):
            for pw in range(PW):
                for iy in range(gy):
                    y = y1 + ph * bin_h + (iy + 0.5) * bin_h / gy
                    for ix in range(gx):
                        x = x1 + pw * bin_w + (ix + 0.5) * bin_w / gx
                        for cy, cx, weight in bilinear(H, W, y, x):
                            yield k, ph, pw, int(n), cy, cx, weight / (gy * gx)


def bilinear(H, W, y, x):
    """The cells that interpolate (y, x) (in cell units) and their weights, the zero ones left
    out: none beyond one cell outside the map."""
    if y < -1 or y > H or x < -1 or x > W:
        return []
    y, x = min(max(y, 0.0), H - 1), min(max(x, 0.0), W - 1)  # clamp onto the last cell centres
    y0, x0 = int(y), int(x)
    y1, x1 = min(y0 + 1, H - 1), min(x0 + 1, W - 1)
    dy, dx = y - y0, x - x0
    terms = [(y0, x0, (1 - dy) * (1 - dx)), (y0, x1, (1 - dy) * dx),
             (y1, x0, dy * (1 - dx)), (y1, x1, dy * dx)]  # fmt: skip
    return [term for term in terms if term[2] != 0]


def reference_roi_align(features, rois, output_size, scale, sampling_ratio, aligned):
    """The output: each bin the sum of its terms."""
    out = np.zeros((len(rois), features.shape[1], *output_size))
    terms = reference_terms(features.shape, rois, output_size, scale, sampling_ratio, aligned)
    for k, ph, pw, n, y, x, weight in terms:
        out[k, :, ph, pw] += weight * features[n, :, y, x]
    return out


def reference_gradient(shape, rois, output_size, scale, sampling_ratio, aligned, grad):
    """The gradient of the features: each term sends weight * (its bin's gradient) to its cell."""
    grad_features = np.zeros(shape)
    for k, ph, pw, n, y, x, weight in reference_terms(
        shape, rois, output_size, scale, sampling_ratio, aligned
    ):
        grad_features[n, :, y, x] += weight * grad[k, :, ph, pw]
    return grad_features


# ---------------------------------------------------------------------------- random cases
@st.composite
def cases(draw, max_side=12, max_rois=6, adaptive=True):
    """Feature maps, several images, RoIs of every size, partly or fully outside, zero-width."""
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    N, C = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    H, W = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    K = draw(st.integers(0, max_rois))
    scale = draw(st.sampled_from([1.0, 0.5, 0.25, 1 / 3]))
    corner = rng.uniform(-0.5, 1.2, (K, 2)) * [W / scale, H / scale]  # some start outside
    size = np.exp(rng.uniform(-3, 3.5, (K, 2)))  # from a tenth of a pixel to ~30 pixels
    size[rng.random((K, 2)) < 0.15] = 0  # zero-width or zero-height boxes
    boxes = np.concatenate([corner, corner + size], axis=1)
    if draw(st.booleans()):  # on the half-pixel grid: samples land exactly on cells and edges
        boxes = np.round(boxes * 2) / 2
    rois = np.concatenate([rng.integers(0, N, (K, 1)), boxes], axis=1)
    ratios = [-1, 0, 1, 2, 3] if adaptive else [1, 2, 3]
    return dict(
        features=rng.standard_normal((N, C, H, W)),
        rois=rois,
        output_size=(draw(st.integers(1, 5)), draw(st.integers(1, 5))),
        scale=scale,
        sampling_ratio=draw(st.sampled_from(ratios)),
        aligned=draw(st.booleans()),
        grad=rng.standard_normal((K, C, 5, 5)),
    )


def run_ours(case):
    out, saved = roi_align_forward(
        case["features"],
        case["rois"],
        case["output_size"],
        case["scale"],
        case["sampling_ratio"],
        case["aligned"],
    )
    PH, PW = case["output_size"]
    grad = case["grad"][:, :, :PH, :PW]
    return out, roi_align_backward(grad, saved), grad


def run_torchvision(case, grad):
    x = torch.tensor(case["features"], requires_grad=True)
    out = torchvision.ops.roi_align(
        x,
        torch.tensor(case["rois"]),
        case["output_size"],
        case["scale"],
        case["sampling_ratio"],
        case["aligned"],
    )
    out.backward(torch.tensor(grad))
    return out.detach().numpy(), x.grad.numpy()


# (RoIs per block, cost of an own-window value): shared windows always, own windows always, or
# the cost estimate's choice.
BLOCKINGS = [
    (1, 10**9),
    (3, 10**9),
    (16, 10**9),
    (1, -(10**9)),
    (4, -(10**9)),
    (16, -(10**9)),
    (16, 64),
]


@requires_torchvision
@pytest.mark.parametrize("block_rois, own_value_cost", BLOCKINGS)
@settings(max_examples=40)
@given(case=cases())
def test_matches_torchvision_values_and_gradients(case, block_rois, own_value_cost):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(roi_align_module, "BLOCK_ROIS", block_rois)
        patch.setattr(roi_align_module, "OWN_VALUE_COST", own_value_cost)
        out, grad_features, grad = run_ours(case)
    expected_out, expected_grad = run_torchvision(case, grad)
    np.testing.assert_allclose(out, expected_out, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(grad_features, expected_grad, rtol=1e-6, atol=1e-12)


@settings(max_examples=25)
@given(case=cases(max_side=7, max_rois=3))
def test_matches_nested_loop_reference(case):
    out, _, _ = run_ours(case)
    expected = reference_roi_align(
        case["features"],
        case["rois"],
        case["output_size"],
        case["scale"],
        case["sampling_ratio"],
        case["aligned"],
    )
    np.testing.assert_allclose(out, expected, rtol=1e-9, atol=1e-12)


@settings(max_examples=10)
@given(case=cases(max_side=5, max_rois=3))
def test_gradients_match_finite_differences(case):
    def fn(x):
        return roi_align(
            x,
            case["rois"],
            case["output_size"],
            case["scale"],
            case["sampling_ratio"],
            case["aligned"],
        )

    check_gradients(fn, case["features"])


# ---------------------------------------------------------------------------- NaN and inf
def poison(a, rng, fraction):
    """A copy of ``a`` with about ``fraction`` of its values replaced by NaN, +inf or -inf."""
    a = a.copy()
    where = rng.random(a.shape) < fraction
    a[where] = rng.choice([np.nan, np.inf, -np.inf], int(where.sum()))
    return a


@st.composite
def poisoned_cases(draw, **kwargs):
    """A case whose features and output gradient hold some NaN and infinities."""
    case = draw(cases(**kwargs))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    fraction = draw(st.sampled_from([0.02, 0.1, 0.3]))
    return dict(case, features=poison(case["features"], rng, fraction),
                grad=poison(case["grad"], rng, fraction))  # fmt: skip


@pytest.mark.parametrize("block_rois, own_value_cost", [(3, 10**9), (4, -(10**9)), (16, 64)])
@settings(max_examples=25)
@given(case=poisoned_cases(max_side=7, max_rois=3))
def test_nan_and_inf_reach_only_the_bins_that_sample_them(case, block_rois, own_value_cost):
    # The reference adds only the terms of non-zero weight, as the definition reads: a bin is
    # NaN (or inf) only when one of the cells its samples interpolate is.
    with pytest.MonkeyPatch.context() as patch:  # shared windows, own windows, the estimate's
        patch.setattr(roi_align_module, "BLOCK_ROIS", block_rois)
        patch.setattr(roi_align_module, "OWN_VALUE_COST", own_value_cost)
        out, grad_features, grad = run_ours(case)
    options = [case[k] for k in ("rois", "output_size", "scale", "sampling_ratio", "aligned")]
    with np.errstate(invalid="ignore"):  # inf - inf in the reference's sums
        expected = reference_roi_align(case["features"], *options)
        expected_grad = reference_gradient(case["features"].shape, *options, grad)
    np.testing.assert_allclose(out, expected, rtol=1e-9, atol=1e-12)  # NaN and inf in place
    np.testing.assert_allclose(grad_features, expected_grad, rtol=1e-9, atol=1e-12)


def test_a_nan_outside_a_bins_samples_leaves_it_finite():
    # Two bins of 5 columns, one sample each, at x = 2.5 and 7.5: they interpolate columns 2, 3
    # and 7, 8. Column 5 lies between them, inside the RoI but read by neither.
    F = np.arange(10.0).reshape(1, 1, 1, 10)
    F[0, 0, 0, 5] = np.nan
    rois = np.array([[0, 0.0, 0.0, 10.0, 1.0]])
    out, saved = roi_align_forward(F, rois, (1, 2), 1.0, 1)
    np.testing.assert_array_equal(out[0, 0, 0], [F[..., 2:4].mean(), F[..., 7:9].mean()])
    # Backward: a NaN gradient of the first bin reaches its cells only.
    grad_out = np.array([np.nan, 1.0]).reshape(1, 1, 1, 2)
    grad = roi_align_backward(grad_out, saved)[0, 0, 0]
    np.testing.assert_array_equal(np.isnan(grad), np.isin(np.arange(10), [2, 3]))
    np.testing.assert_array_equal(grad[~np.isnan(grad)], [0, 0, 0, 0, 0, 0.5, 0.5, 0])
    if torchvision is not None:
        x = torch.tensor(F, requires_grad=True)
        theirs = torchvision.ops.roi_align(x, torch.tensor(rois), (1, 2), 1.0, 1)
        theirs.backward(torch.tensor(grad_out))
        np.testing.assert_array_equal(out, theirs.detach().numpy())
        np.testing.assert_array_equal(grad, x.grad.numpy()[0, 0, 0])


@requires_torchvision
@settings(max_examples=40)
@given(case=poisoned_cases())
def test_nan_and_inf_like_torchvision_where_it_weighs_what_it_reads(case):
    # torchvision also reads cells with weight 0 (module docstring), where 0 * NaN spreads the
    # NaN further. So: wherever torchvision is finite, the same number; wherever minimask is not
    # finite, torchvision is not either.
    out, grad_features, grad = run_ours(case)
    expected_out, expected_grad = run_torchvision(case, grad)
    for ours, theirs in ((out, expected_out), (grad_features, expected_grad)):
        finite = np.isfinite(theirs)
        np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-6, atol=1e-12)
        assert not (~np.isfinite(ours) & finite).any()


# ---------------------------------------------------------------------------- invariants
def test_hand_worked_5x5():
    F = np.arange(25.0).reshape(1, 1, 5, 5)  # F[y, x] = 5y + x: bilinear interpolation is exact
    rois = np.array([[0, 1.0, 1.0, 3.0, 3.0]])  # x1 = y1 = 1, x2 = y2 = 3

    # aligned=False, 2×2 bins, 1 sample per bin: the box is 2 cells wide, bins are 1 cell wide,
    # and the samples sit at the bin centres x, y in {1 + 0.5, 2 + 0.5} = {1.5, 2.5}:
    #   (y, x) = (1.5, 1.5): 5 * 1.5 + 1.5 = 9      (1.5, 2.5): 7.5 + 2.5 = 10
    #            (2.5, 1.5): 12.5 + 1.5 = 14        (2.5, 2.5): 12.5 + 2.5 = 15
    out, _ = roi_align_forward(F, rois, 2, 1.0, 1, aligned=False)
    np.testing.assert_allclose(out[0, 0], [[9, 10], [14, 15]])

    # aligned=True shifts the box by half a cell: x1 = y1 = 0.5, samples at {1.0, 2.0}:
    #   (1, 1): 5 + 1 = 6   (1, 2): 5 + 2 = 7   (2, 1): 10 + 1 = 11   (2, 2): 10 + 2 = 12
    out, _ = roi_align_forward(F, rois, 2, 1.0, 1, aligned=True)
    np.testing.assert_allclose(out[0, 0], [[6, 7], [11, 12]])

    # Border rules. Box (3, 3, 6, 6), aligned=False, 1 bin, 2×2 samples: the bin is 3 cells,
    # samples at 3 + 0.75 = 3.75 and 3 + 2.25 = 5.25. 5.25 > H = 5 is outside the map and counts
    # as 0, so only (3.75, 3.75) is non-zero: 5 * 3.75 + 3.75 = 22.5, averaged over 4: 5.625.
    out, _ = roi_align_forward(F, np.array([[0, 3.0, 3.0, 6.0, 6.0]]), 1, 1.0, 2)
    np.testing.assert_allclose(out[0, 0], [[5.625]])
    # Box (4, 4, 5, 5), 1 sample at 4.5: inside [-1, 5] but past the last cell centre 4, so it is
    # clamped to 4: F[4, 4] = 24.
    out, _ = roi_align_forward(F, np.array([[0, 4.0, 4.0, 5.0, 5.0]]), 1, 1.0, 1)
    np.testing.assert_allclose(out[0, 0], [[24.0]])
    # The limits themselves are inside: box (4, -2, 6, 0) samples (y, x) = (-1, 5); y = -1 is
    # clamped to row 0 and x = 5 = W to column 4: F[0, 4] = 4.
    out, _ = roi_align_forward(F, np.array([[0, 4.0, -2.0, 6.0, 0.0]]), 1, 1.0, 1)
    np.testing.assert_allclose(out[0, 0], [[4.0]])


@settings(max_examples=25)
@given(
    a=st.floats(-3, 3),
    b=st.floats(-3, 3),
    c=st.floats(-3, 3),
    corner=st.tuples(st.floats(2, 10), st.floats(2, 10)),
    size=st.tuples(st.floats(1, 12), st.floats(1, 12)),
    sampling_ratio=st.integers(1, 3),
)
def test_resize_equivariance(a, b, c, corner, size, sampling_ratio):
    """Half the image with half the box gives the same output.

    Where it holds exactly: a feature map that is a linear function of the position, sampled at
    the cell centres, f(u, v) = a*u + b*v + c with the centre of cell i at u = i + 1/2 (the
    ``aligned=True`` convention). Its half-resolution map, the 2×2 average, is the same function
    sampled at the coarse centres u = 2j + 1. With ``aligned=True`` a box maps to the same
    continuous points on both maps, bilinear interpolation reproduces a linear function exactly,
    and a fixed sampling ratio puts the samples at the same points. (Adaptive sampling would use
    twice the samples on the fine map; ``aligned=False`` puts cell centres on integers, which the
    2×2 average does not preserve; samples clamped at the border break linearity.)
    """
    side = 32
    v, u = np.mgrid[0:side, 0:side] + 0.5  # fine cell centres
    fine = (a * u + b * v + c)[None, None]
    coarse = fine.reshape(1, 1, side // 2, 2, side // 2, 2).mean(axis=(3, 5))
    box = np.array([corner[0], corner[1], corner[0] + size[0], corner[1] + size[1]])
    out_fine, _ = roi_align_forward(fine, np.r_[0, box][None], 4, 1.0, sampling_ratio, True)
    out_coarse, _ = roi_align_forward(coarse, np.r_[0, box / 2][None], 4, 1.0, sampling_ratio, True)
    np.testing.assert_allclose(out_fine, out_coarse, rtol=1e-9, atol=1e-9)


def test_empty_roi_list():
    F = np.random.default_rng(0).standard_normal((2, 3, 6, 6))
    out, saved = roi_align_forward(F, np.zeros((0, 5)), (7, 5), 0.5, 2, True)
    assert out.shape == (0, 3, 7, 5)
    grad = roi_align_backward(np.zeros((0, 3, 7, 5)), saved)
    np.testing.assert_array_equal(grad, np.zeros_like(F))
    x = Tensor(F, requires_grad=True)
    roi_align(x, np.zeros((0, 5)), 2).sum().backward()
    np.testing.assert_array_equal(x.grad, 0)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_zero_width_boxes_are_finite(aligned, sampling_ratio):
    F = np.random.default_rng(0).standard_normal((1, 2, 6, 6))
    rois = np.array([[0, 2.0, 2.0, 2.0, 4.0], [0, 1.0, 3.0, 5.0, 3.0], [0, 3.0, 3.0, 3.0, 3.0]])
    out, saved = roi_align_forward(F, rois, 3, 1.0, sampling_ratio, aligned)
    grad = roi_align_backward(np.ones_like(out), saved)
    assert np.isfinite(out).all() and np.isfinite(grad).all()


def test_inverted_boxes_do_not_crash():
    """x2 < x1 breaks the box convention; with a fixed sampling ratio torchvision still answers."""
    F = np.random.default_rng(0).standard_normal((1, 2, 6, 6))
    rois = np.array([[0, 4.0, 4.0, 1.0, 2.0]])
    for aligned in (False, True):
        out, _ = roi_align_forward(F, rois, 2, 1.0, 2, aligned)
        assert np.isfinite(out).all()
        if torchvision is not None:
            expected = torchvision.ops.roi_align(
                torch.tensor(F), torch.tensor(rois), 2, 1.0, 2, aligned
            )
            np.testing.assert_allclose(out, expected.numpy(), rtol=1e-9, atol=1e-12)


def test_rois_fully_outside_give_zeros():
    F = np.random.default_rng(0).standard_normal((1, 2, 5, 5))
    rois = np.array(
        [[0, 7.0, 7.0, 9.0, 9.0], [0, -9.0, -9.0, -2.5, -3.0], [0, 20.0, 0.0, 30.0, 4.0]]
    )
    for aligned in (False, True):
        out, saved = roi_align_forward(F, rois, 3, 1.0, -1, aligned)
        np.testing.assert_array_equal(out, 0)
        np.testing.assert_array_equal(roi_align_backward(np.ones_like(out), saved), 0)


def test_tensor_op_float32_and_bad_rois():
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((2, 4, 10, 10)).astype(np.float32), requires_grad=True)
    rois = np.array([[1, 0.0, 0.0, 30.0, 20.0], [0, 5.0, 5.0, 10.0, 10.0]], dtype=np.float32)
    out = roi_align(x, rois, 3, spatial_scale=0.25, sampling_ratio=2)
    assert out.shape == (2, 4, 3, 3) and out.dtype == np.float32
    out.sum().backward()
    assert x.grad.dtype == np.float32 and x.grad.shape == x.shape
    with pytest.raises(ValueError, match="image indices"):
        roi_align(x, np.array([[2, 0.0, 0.0, 1.0, 1.0]]), 2)
    with pytest.raises(ValueError, match=r"\(K, 5\)"):
        roi_align(x, np.zeros((3, 4)), 2)


@pytest.mark.gpu
def test_cpu_equals_gpu():
    import cupy  # noqa: PLC0415 - only with a GPU

    rng = np.random.default_rng(0)
    F = rng.standard_normal((2, 8, 40, 50))
    xy = rng.uniform(-20, 200, (300, 2))
    rois = np.concatenate([rng.integers(0, 2, (300, 1)), xy, xy + rng.uniform(0, 120, (300, 2))], 1)
    grad = rng.standard_normal((300, 8, 7, 7))
    for sampling_ratio, aligned, own_value_cost in [(2, False, 10**9), (-1, True, -(10**9))]:
        with pytest.MonkeyPatch.context() as patch:  # shared windows, then own windows
            patch.setattr(roi_align_module, "OWN_VALUE_COST", own_value_cost)
            out, saved = roi_align_forward(F, rois, 7, 0.25, sampling_ratio, aligned)
            gpu_out, gpu_saved = roi_align_forward(
                cupy.asarray(F), cupy.asarray(rois), 7, 0.25, sampling_ratio, aligned
            )
        np.testing.assert_allclose(gpu_out.get(), out, rtol=1e-9, atol=1e-12)
        gpu_grad = roi_align_backward(cupy.asarray(grad), gpu_saved)
        np.testing.assert_allclose(
            gpu_grad.get(), roi_align_backward(grad, saved), rtol=1e-9, atol=1e-12
        )
