"""The hand-worked cases of lessons 06-11, as tests.

Each number here is worked by hand in a lesson (the markdown says how); if the library changes
so that one no longer holds, the lesson's text is wrong too. The lessons themselves run in
``test_lessons.py``; these run in milliseconds and name the case that broke.
"""

from __future__ import annotations

import matplotlib.figure
import numpy as np
import pytest

from minimask.engine import Tensor
from minimask.evaluate import coco_evaluate, detections_to_results, ground_truth_coco
from minimask.nn import Parameter, clip_grad_norm
from minimask.ops.anchors import base_anchors, grid_anchors
from minimask.ops.boxes import box_iou
from minimask.ops.losses import fastrcnn_loss, mask_loss
from minimask.ops.nms import nms
from minimask.ops.roi_align import roi_align_backward, roi_align_forward, roi_weights
from minimask.ops.roi_pool import roi_bins, roi_pool_forward
from minimask.train import TrainConfig, make_schedule
from minimask.visualize import cell_extent, draw_detections


# ------------------------------------------------------------- lessons 04-05: per-cell overlays
@pytest.mark.parametrize("grid, stride", [((16, 16), 8), ((4, 6), 32), ((3, 5), (16, 8))])
def test_each_anchor_centre_is_the_middle_of_its_drawn_cell(grid, stride):
    """The overlays of lessons 4 and 5 draw one value per cell with ``cell_extent``."""
    pair = (stride, stride) if np.ndim(stride) == 0 else stride
    anchors = grid_anchors(base_anchors((32,), (0.5, 1.0, 2.0)), grid, pair)  # (H*W*3, 4)
    centres = ((anchors[:, :2] + anchors[:, 2:]) / 2).reshape(grid[0], grid[1], 3, 2)
    values = np.zeros(grid)
    fig = matplotlib.figure.Figure()
    image = fig.add_subplot().imshow(values, extent=cell_extent(grid, stride))
    left, right, bottom, top = image.get_extent()
    width, height = (right - left) / grid[1], (bottom - top) / grid[0]  # one drawn cell
    middle_x = left + (np.arange(grid[1]) + 0.5) * width  # (W,)
    middle_y = top + (np.arange(grid[0]) + 0.5) * height  # (H,)
    np.testing.assert_allclose(
        centres[..., 0], np.broadcast_to(middle_x[None, :, None], grid + (3,))
    )
    np.testing.assert_allclose(
        centres[..., 1], np.broadcast_to(middle_y[:, None, None], grid + (3,))
    )
    assert (width, height) == (pair[1], pair[0])  # and a drawn cell is one stride wide
    # The old extent, (0, W * stride, H * stride, 0), puts each anchor centre on a cell corner.
    assert middle_x[0] - width / 2 == -pair[1] / 2


# ---------------------------------------------------------------------------- lesson 06: NMS
SIX_BOXES = np.array(
    [[10, 10, 50, 50], [16, 14, 56, 54], [24, 18, 64, 58], [60, 30, 92, 78], [57, 34, 95, 84],
     [4, 56, 40, 92]], dtype=np.float32,
)  # fmt: skip
SIX_SCORES = np.array([0.95, 0.90, 0.70, 0.85, 0.60, 0.50], dtype=np.float32)


@pytest.mark.parametrize(
    "threshold, kept", [(0.3, [0, 3, 5]), (0.5, [0, 3, 2, 5]), (0.7, [0, 1, 3, 2, 4, 5])]
)
def test_nms_six_boxes(threshold, kept):
    assert nms(SIX_BOXES, SIX_SCORES, threshold).tolist() == kept


def test_nms_a_suppressed_box_suppresses_nothing():
    iou = box_iou(SIX_BOXES, SIX_BOXES)
    # box 1 overlaps box 2 by more than 0.5 but is itself removed by box 0, so box 2 survives
    assert iou[1, 2] > 0.5 and iou[0, 1] > 0.5 and iou[0, 2] < 0.5
    assert 2 in nms(SIX_BOXES, SIX_SCORES, 0.5).tolist()
    # exercise 2: box 1 survives from t = IoU(0, 1) = 0.619... up
    assert 1 in nms(SIX_BOXES, SIX_SCORES, 0.62).tolist()
    assert 1 not in nms(SIX_BOXES, SIX_SCORES, 0.61).tolist()


# ---------------------------------------------------------------------------- lesson 07: RoIs
X4 = np.arange(16.0).reshape(1, 1, 4, 4)  # X[y, x] = 4y + x
F5 = np.arange(25.0).reshape(1, 1, 5, 5)  # F[y, x] = 5y + x


def test_roipool_4x4():
    rois = np.array([[0, 0.0, 0.0, 20.0, 20.0], [0, 0.0, 10.0, 30.0, 30.0]])
    out, _ = roi_pool_forward(X4, rois, 2, 0.1)
    np.testing.assert_array_equal(out[:, 0], [[[5, 6], [9, 10]], [[9, 11], [13, 15]]])
    y0, y1, x0, x1 = roi_bins(rois, (2, 2), 0.1, (4, 4), X4.dtype)
    assert list(zip(y0[1], y1[1])) == [(1, 3), (2, 4)]  # RoI 1's rows: 3 cells in bins of 1.5
    assert list(zip(x0[1], x1[1])) == [(0, 2), (2, 4)]
    out, _ = roi_pool_forward(X4, np.array([[0, 10.0, 0.0, 30.0, 20.0]]), 2, 0.1)  # exercise 1
    np.testing.assert_array_equal(out[0, 0], [[6, 7], [10, 11]])


def test_roialign_5x5():
    roi = np.array([[0, 1.0, 1.0, 3.0, 3.0]])
    out, saved = roi_align_forward(F5, roi, 2, 1.0, 1)
    np.testing.assert_allclose(out[0, 0], [[9, 10], [14, 15]])
    out, _ = roi_align_forward(F5, roi, 2, 1.0, 1, aligned=True)
    np.testing.assert_allclose(out[0, 0], [[6, 7], [11, 12]])
    out, _ = roi_align_forward(F5, np.array([[0, 1.0, 0.5, 3.0, 2.5]]), 2, 1.0, 1)  # exercise 2
    np.testing.assert_allclose(out[0, 0], [[6.5, 7.5], [11.5, 12.5]])
    # exercise 3: bin (0, 0) samples (1.5, 1.5), a quarter to each of its four neighbours
    grad_out = np.zeros((1, 1, 2, 2))
    grad_out[0, 0, 0, 0] = 1.0
    grad = roi_align_backward(grad_out, saved)[0, 0]
    expected = np.zeros((5, 5))
    expected[1:3, 1:3] = 0.25
    np.testing.assert_allclose(grad, expected)


def test_roipool_moves_in_steps_of_a_cell_and_roialign_smoothly():
    fmap = np.random.default_rng(2).standard_normal((1, 1, 24, 24))
    steps = np.arange(0, 96, 0.5)
    rois = np.array([[0, 40 + s, 60, 104 + s, 124] for s in steps])  # 64 px wide, stride 16
    pooled, _ = roi_pool_forward(fmap, rois, 7, 1 / 16)
    changed = np.any(np.diff(pooled.reshape(len(steps), -1), axis=0) != 0, axis=1)
    assert (np.diff(np.flatnonzero(changed)) * 0.5).max() == 16  # exercise 4
    aligned, _ = roi_align_forward(fmap, rois, 7, 1 / 16, 2)
    assert np.abs(np.diff(aligned, axis=0)).max() < 0.2  # no jumps at a half-pixel step


def test_misalignment_in_pixels():
    rng = np.random.default_rng(0)
    corner = rng.uniform(32, 400, (200, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(48, 300, (200, 2))], axis=1)
    d = rng.uniform(0, 32, 200)
    moved = boxes + np.stack([d, 0 * d, d, 0 * d], axis=1)

    def rois(b):
        return np.concatenate([np.zeros((len(b), 1)), b], axis=1)

    shape, f64 = (50, 50), np.dtype(np.float64)
    start0 = roi_bins(rois(boxes), (7, 7), 1 / 16, shape, f64)[2]
    start1 = roi_bins(rois(moved), (7, 7), 1 / 16, shape, f64)[2]
    pool_error = np.abs(16 * (start1 - start0) - d[:, None])
    assert pool_error.max() > 8 and pool_error.mean() > 3  # RoIPool lags by up to a cell

    cells = np.arange(shape[1])
    for aligned in (False, True):
        centres = []
        for b in (boxes, moved):
            Ax = roi_weights(rois(b), (7, 7), 1 / 16, 2, aligned, shape, f64)[1]
            centres.append((Ax * cells).sum(-1) / Ax.sum(-1))
        np.testing.assert_allclose(16 * (centres[1] - centres[0]), np.repeat(d[:, None], 7, 1))
        # the absolute offset: half a cell (8 px) without `aligned`, none with it
        true = boxes[:, :1] + (np.arange(7) + 0.5) * (boxes[:, 2:3] - boxes[:, :1]) / 7
        offset = (centres[0] + 0.5) * 16 - true
        np.testing.assert_allclose(offset, 0.0 if aligned else 8.0, atol=1e-9)


# ---------------------------------------------------------------------------- lesson 08: heads
def test_box_loss_trains_only_the_ground_truth_class_deltas():
    rng = np.random.default_rng(0)
    logits = Tensor(rng.normal(size=(3, 4)), requires_grad=True)
    deltas = Tensor(0.1 * rng.normal(size=(3, 16)), requires_grad=True)
    loss_cls, loss_box = fastrcnn_loss(logits, deltas, np.array([2, 0, 3]), rng.normal(size=(3, 4)))
    (loss_cls + loss_box).backward()
    trained = [np.flatnonzero(row).tolist() for row in deltas.grad]
    assert trained == [[8, 9, 10, 11], [], [12, 13, 14, 15]]
    assert (logits.grad != 0).all()


def test_mask_loss_gradient_is_zero_on_other_classes():
    logits = Tensor(np.random.default_rng(1).normal(size=(2, 4, 28, 28)), requires_grad=True)
    target = np.random.default_rng(2).random((2, 28, 28))
    mask_loss(logits, np.array([2, 1]), target).backward()
    touched = np.abs(logits.grad).reshape(2, 4, -1).max(-1) > 0
    assert touched.tolist() == [[False, False, True, False], [False, True, False, False]]


def test_mask_loss_by_hand_2x2():  # exercise 2
    x = np.array([[2.0, -1.0], [0.0, 3.0]])
    z = np.array([[1.0, 0.0], [1.0, 1.0]])
    sig = 1 / (1 + np.exp(-x))
    by_hand = np.mean(-(z * np.log(sig) + (1 - z) * np.log(1 - sig)))
    logits = np.zeros((1, 2, 2, 2))
    logits[0, 1] = x
    assert mask_loss(Tensor(logits), np.array([1]), z[None]).item() == pytest.approx(by_hand)


# ---------------------------------------------------------------------------- lesson 09: training
def test_warmup_and_clipping_by_hand():
    config = TrainConfig(iterations=150, optimizer="adamw", lr=5e-4, warmup_iters=10,
                         milestones=(120,))  # fmt: skip
    schedule = make_schedule(config)
    assert schedule(5) == pytest.approx(5e-4 * (0.001 + 0.999 * 0.5))
    assert schedule(120) == pytest.approx(5e-5)
    a, b = Parameter(np.zeros(2)), Parameter(np.zeros(2))
    a.grad, b.grad = np.array([3.0, 0.0]), np.array([0.0, 4.0])
    assert clip_grad_norm([a, b], 1.0) == pytest.approx(5.0)
    np.testing.assert_allclose([a.grad, b.grad], [[0.6, 0.0], [0.0, 0.8]], atol=1e-5)


# ---------------------------------------------------------------------------- lesson 10: AP
GT_BOXES = np.array([[10, 10, 50, 50], [60, 10, 100, 60], [110, 20, 150, 70], [20, 70, 70, 110],
                     [160, 60, 195, 110]], dtype=np.float32)  # fmt: skip
DET_BOXES = np.array(
    [[11, 11, 50, 52], [62, 18, 104, 64], [12, 8, 52, 48], [120, 85, 150, 112],
     [112, 22, 151, 68], [20, 74, 58, 118], [61, 12, 99, 63], [80, 75, 110, 112],
     [22, 72, 72, 114], [118, 30, 156, 76], [164, 70, 198, 116], [5, 112, 30, 118]],
    dtype=np.float32,
)  # fmt: skip
# Any decreasing scores will do: only their order counts.
DET_SCORES = np.linspace(0.95, 0.2, 12).astype(np.float32)


def _bbox_metrics(scores):
    masks = np.zeros((5, 120, 200), dtype=np.uint8)
    for m, (x1, y1, x2, y2) in zip(masks, GT_BOXES.astype(int)):
        m[y1:y2, x1:x2] = 1
    sample = {"image": np.zeros((3, 120, 200), np.float32), "boxes": GT_BOXES,
              "labels": np.ones(5, np.int64), "masks": masks, "image_id": 1}  # fmt: skip
    gt = ground_truth_coco([sample], ("__background__", "object"))
    det = {"boxes": DET_BOXES, "scores": scores, "labels": np.ones(12, np.int64)}
    return coco_evaluate(gt, detections_to_results(1, det), iou_types=("bbox",))["bbox"]


def test_ap_of_a_dozen_detections_by_hand():
    metrics = _bbox_metrics(DET_SCORES)
    # IoU 0.5: TP at ranks 0, 1, 4, 5, 10 of 12, five objects. The non-increasing precision is 1
    # up to recall 0.4 (41 of the 101 recall levels), 4/6 up to 0.8 (40 levels), 5/11 to 1 (20).
    assert metrics["AP50"] == pytest.approx((41 + 40 * 4 / 6 + 20 * 5 / 11) / 101)
    # IoU 0.75: TP at ranks 0, 4, 6, 8 (the tighter d6, d8 take G1, G3); recall stops at 0.8.
    assert metrics["AP75"] == pytest.approx((21 + 60 * 4 / 9) / 101)


def test_ap_rises_when_a_confident_false_positive_drops():  # exercise 2
    scores = DET_SCORES.copy()
    scores[3] = 0.1  # the background box d3 falls to the end of the list
    # TP at ranks 0, 1, 3, 4, 9: precision 1 to recall 0.4, 4/5 to 0.8, 5/10 to 1
    assert _bbox_metrics(scores)["AP50"] == pytest.approx((41 + 40 * 4 / 5 + 20 * 5 / 10) / 101)


# ---------------------------------------------------------------------------- lesson 09: colours
def test_draw_detections_by_class_gives_each_class_one_colour():
    masks = np.zeros((3, 20, 40), np.uint8)
    masks[0, :, :10], masks[1, :, 15:25], masks[2, :, 30:] = 1, 1, 1
    boxes = np.array([[0, 0, 10, 20], [15, 0, 25, 20], [30, 0, 40, 20]], np.float32)
    detections = {"boxes": boxes, "labels": np.array([2, 1, 2]), "masks": masks}
    axes = matplotlib.figure.Figure().subplots(1, 2)
    for ax, by_class in zip(axes, (True, False)):
        draw_detections(ax, np.zeros((3, 20, 40), np.float32), detections, ("bg", "a", "b"),
                        by_class=by_class)  # fmt: skip
    by_class, by_detection = (np.asarray(ax.images[0].get_array()) for ax in axes)
    assert np.allclose(by_class[5, 5], by_class[5, 35])  # the two class-2 masks: one colour
    assert not np.allclose(by_class[5, 5], by_class[5, 20])  # class 1: another
    assert not np.allclose(by_detection[5, 5], by_detection[5, 35])  # default: one per detection
