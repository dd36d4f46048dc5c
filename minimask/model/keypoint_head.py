"""The keypoint branch of Mask R-CNN (§5, "Mask R-CNN for Human Pose Estimation").

"We model a keypoint's location as a one-hot mask, and adopt Mask R-CNN to predict K masks, one
for each of K keypoint types." Each foreground RoI is pooled to 14×14 by multi-scale RoIAlign,
goes through eight 3×3 convs of 512 channels, a 4×4 stride-2 deconvolution to K channels (28×28)
and a 2× bilinear upsampling to m×m = 56×56 heatmap logits. The target of each visible keypoint
is the single cell it falls in (:func:`keypoints_to_heatmap`), and the loss is a softmax
cross-entropy over the m² cells (:func:`minimask.ops.losses.keypoint_loss`): unlike masks, the
cells of one keypoint *do* compete, since it sits in exactly one of them.

At inference every detection gets K keypoints: its heatmaps are resized (bicubic) to the box's
size in pixels, and each keypoint lands at the centre of its heatmap's highest pixel, scored by
that logit (:func:`heatmaps_to_keypoints`). The layers, the targets and the decoding follow
torchvision's ``keypointrcnn_resnet50_fpn`` (``KeypointRCNNHeads``, ``KeypointRCNNPredictor``,
``keypoints_to_heatmap``, ``heatmaps_to_keypoints``), so its weights load and give its keypoints.

Shape letters: R RoIs, K keypoints, M = 56 the heatmap side, G GT instances, D detections.
Keypoints are (x, y, v) in pixels of the (resized) image; v = 0 means not labelled, v > 0
labelled (COCO's 1 "occluded" and 2 "visible" count alike). Boxes are (x1, y1, x2, y2) pixels.
"""

from __future__ import annotations

import numpy as np

from minimask.backend import get_array_module, to_host
from minimask.engine import Tensor, no_grad
from minimask.model.config import MaskRCNNConfig
from minimask.nn import Conv2d, ConvTranspose2d, Module, ModuleList, init, upsample_bilinear
from minimask.nn.pool import resize_bicubic
from minimask.ops.losses import keypoint_loss
from minimask.ops.poolers import MultiScaleRoIAlign


class KeypointHead(Module):
    """(R, C, 14, 14) pooled features -> (R, K, 56, 56) keypoint heatmap logits."""

    def __init__(self, config: MaskRCNNConfig, channels: int):
        super().__init__()
        self.pooler = MultiScaleRoIAlign(
            config.keypoint_pool_size, config.pool_sampling_ratio, aligned=config.roi_align_aligned
        )
        convs, c_in = [], channels
        for width in config.keypoint_conv_channels:
            convs.append(Conv2d(c_in, width, 3, padding=1))
            c_in = width
        self.convs = ModuleList(convs)
        # 14 -> 28: (14 - 1)·2 - 2·1 + 4 = 28, torchvision's kps_score_lowres
        self.logits = ConvTranspose2d(c_in, config.num_keypoints, 4, stride=2, padding=1)
        for layer in [*self.convs, self.logits]:  # torchvision's keypoint head init
            init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            init.zeros_(layer.bias)

    def forward(self, features, boxes, padded_size) -> Tensor:
        """Heatmap logits (R, K, 56, 56) for per-image boxes (a list of (R_i, 4) arrays)."""
        x = self.pooler(features, boxes, [padded_size])  # (R, C, 14, 14)
        for conv in self.convs:
            x = conv(x).relu()
        return upsample_bilinear(self.logits(x), 2.0)  # (R, K, 28, 28) -> (R, K, 56, 56)

    def loss(self, features, sampled, targets, padded_size) -> Tensor:
        """L_keypoint on the foreground RoIs of the box head's sampled minibatch whose GT instance
        has a labelled keypoint (the others have no target; torchvision's loss skips them too)."""
        boxes, heatmaps, valid = [], [], []
        for (rois, labels, matches, _), target in zip(sampled, targets):
            xp = get_array_module(labels)
            gt = xp.asarray(target["keypoints"], dtype=rois.dtype).reshape(-1, self.k, 3)
            labelled = (gt[:, :, 2] > 0).any(axis=1)  # (G,)
            keep = xp.flatnonzero((labels > 0) & (labelled[matches] if len(gt) else False))
            heat, ok = keypoints_to_heatmap(gt[matches[keep]], rois[keep], self.m)
            boxes.append(rois[keep])
            heatmaps.append(heat)
            valid.append(ok)
        if sum(len(b) for b in boxes) == 0:  # no person with keypoints here (COCO has many):
            # nothing to learn, and nothing to run the head on. 0, as keypoint_loss of nothing.
            return Tensor(features[0].xp.zeros((), dtype=features[0].dtype))
        logits = self.forward(features, boxes, padded_size)  # (R, K, M, M)
        xp = logits.xp
        return keypoint_loss(logits, xp.concatenate(heatmaps), xp.concatenate(valid))

    @property
    def k(self) -> int:
        return self.logits.out_channels

    @property
    def m(self) -> int:
        """The heatmap side: the pool size, doubled by the deconvolution and the upsampling."""
        return 4 * self.pooler.output_size[0]

    @no_grad()
    def predict(self, features, detections, padded_size) -> None:
        """Add ``keypoints`` (D, K, 3) and ``keypoints_scores`` (D, K) to each detection, in
        place, in the pixels of the resized image."""
        boxes = [d["boxes"] for d in detections]
        logits = self.forward(features, boxes, padded_size).data  # (D, K, M, M)
        start = 0
        for det in detections:
            d = len(det["boxes"])
            det["keypoints"], det["keypoints_scores"] = heatmaps_to_keypoints(
                logits[start : start + d], det["boxes"]
            )
            start += d


def keypoints_to_heatmap(keypoints, rois, size: int):
    """Each keypoint's target cell in its RoI's size×size heatmap, and whether it has one.

    Keypoint ``(x, y)`` of a RoI ``(x1, y1, x2, y2)`` falls in cell ``(floor((x - x1)·size/w),
    floor((y - y1)·size/h))``; a keypoint exactly on the right (bottom) edge goes to the last
    cell. It has a target when it is labelled (v > 0) and inside the heatmap. As torchvision's
    ``keypoints_to_heatmap``, in the same arithmetic.

    Args:
        keypoints: (R, K, 3) the matched GT instance's keypoints of each RoI.
        rois: (R, 4) boxes.

    Returns:
        ``(cells (R, K) int64, valid (R, K) bool)``: ``cells = y·size + x`` (0 where not valid).
    """
    xp = get_array_module(rois)
    x1, y1 = rois[:, 0:1], rois[:, 1:2]  # (R, 1)
    scale_x = size / (rois[:, 2:3] - x1)
    scale_y = size / (rois[:, 3:4] - y1)
    x, y = keypoints[..., 0], keypoints[..., 1]  # (R, K)
    on_right, on_bottom = x == rois[:, 2:3], y == rois[:, 3:4]
    cx = xp.floor((x - x1) * scale_x).astype(xp.int64)
    cy = xp.floor((y - y1) * scale_y).astype(xp.int64)
    cx[on_right] = size - 1
    cy[on_bottom] = size - 1
    inside = (cx >= 0) & (cy >= 0) & (cx < size) & (cy < size)
    valid = inside & (keypoints[..., 2] > 0)
    return (cy * size + cx) * valid, valid


def heatmaps_to_keypoints(maps, boxes):
    """Keypoints (D, K, 3) and their scores (D, K) from heatmap logits (D, K, M, M).

    Each RoI's heatmaps are resized bicubically to ``ceil(w) × ceil(h)`` pixels of its box (w and
    h at least 1); each keypoint is the centre of its resized map's highest pixel, ``x = x1 + (i +
    0.5)·w/ceil(w)`` (Heckbert's ``c = d + 0.5``, the inverse of :func:`keypoints_to_heatmap`'s
    floor), with v = 1 and the map's value there as its score. As torchvision's
    ``heatmaps_to_keypoints``: one RoI at a time, since each has its own size.
    """
    xp = get_array_module(maps)
    d, k = maps.shape[:2]
    dtype = maps.dtype.type
    keypoints = xp.zeros((d, k, 3), dtype=maps.dtype)
    scores = xp.zeros((d, k), dtype=maps.dtype)
    if d == 0:
        return keypoints, scores
    boxes = xp.asarray(boxes, dtype=maps.dtype)
    widths = xp.maximum(boxes[:, 2] - boxes[:, 0], 1)  # (D,)
    heights = xp.maximum(boxes[:, 3] - boxes[:, 1], 1)
    sizes = to_host(xp.stack([xp.ceil(heights), xp.ceil(widths)], axis=1)).astype(np.int64)
    kk = xp.arange(k)
    for i in range(d):  # each RoI's maps have their own size: a loop over detections
        h, w = (int(s) for s in sizes[i])
        roi_map = resize_bicubic(maps[i], (h, w))  # (K, h, w)
        best = roi_map.reshape(k, -1).argmax(axis=1)  # (K,) the first maximum, row-major
        col, row = best % w, best // w
        x1, y1 = boxes[i, 0], boxes[i, 1]
        keypoints[i, :, 0] = (col.astype(dtype) + dtype(0.5)) * (widths[i] / dtype(w)) + x1
        keypoints[i, :, 1] = (row.astype(dtype) + dtype(0.5)) * (heights[i] / dtype(h)) + y1
        keypoints[i, :, 2] = 1
        scores[i] = roi_map[kk, row, col]
    return keypoints, scores
