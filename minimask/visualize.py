"""Drawing detections: boxes, class names, scores, translucent masks and keypoint skeletons.

Used by ``minimask predict``, the demo's predictions figure and the lessons.
"""

from __future__ import annotations

import matplotlib
import numpy as np
from matplotlib.figure import Figure

# COCO's person skeleton (its categories' "skeleton", made 0-based): the lines between the 17
# keypoints nose, eyes, ears, shoulders, elbows, wrists, hips, knees, ankles (left before right).
COCO_PERSON_SKELETON = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8),
    (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)  # fmt: skip


def new_figure(figsize) -> Figure:
    """A bare matplotlib ``Figure`` for saving to a file: no pyplot, so the plotting backend of
    a notebook or a GUI session is never touched."""
    return Figure(figsize=figsize)


def colour(k: int) -> np.ndarray:
    """A distinct RGB colour in [0, 1] for index ``k`` (matplotlib's tab10 cycle)."""
    return np.asarray(matplotlib.colormaps["tab10"](k % 10)[:3])


def cell_extent(grid_size, stride) -> tuple[float, float, float, float]:
    """``imshow``'s extent for a per-cell map of one feature level, in image pixels.

    ``grid_anchors`` centres cell ``(y, x)``'s anchors on pixel ``(x * stride_x, y * stride_y)``
    (``minimask/ops/anchors.py``), so the drawn cell must be centred there too: it spans half a
    stride on either side. ``extent=(0, W * stride, H * stride, 0)`` would draw every cell half
    a cell off, down and to the right.

    Args:
        grid_size: ``(H, W)`` cells of the level.
        stride: ``(stride_y, stride_x)``, or one int for both, in image pixels per cell.

    Returns:
        ``(left, right, bottom, top)`` for ``ax.imshow(values, extent=...)`` on y-down axes.
    """
    h, w = grid_size
    sy, sx = (stride, stride) if np.ndim(stride) == 0 else stride
    return (-sx / 2, (w - 0.5) * sx, (h - 0.5) * sy, -sy / 2)


def draw_detections(ax, image, detections: dict, class_names, score_thresh: float = 0.5,
                    alpha: float = 0.45, title: str | None = None,
                    by_class: bool = False, skeleton=None):  # fmt: skip
    """Draw ``image`` (3, H, W) or (H, W, 3) in [0, 1] with its detections on a matplotlib axis.

    ``detections`` holds ``boxes`` (D, 4) (x1, y1, x2, y2), ``labels`` (D,), optionally
    ``scores`` (D,) (ground truth has none), ``masks`` (D, H, W) and ``keypoints`` (D, K, 3);
    detections scoring below ``score_thresh`` are skipped. Each detection gets its own colour, or
    with ``by_class`` one colour per class (``colour(label)``), so that a class reads the same in
    every panel. Keypoints are drawn as dots joined by the ``skeleton``'s lines (pairs of
    keypoint indices), those with visibility 0 left out.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3 and image.shape[0] == 3:
        image = image.transpose(1, 2, 0)  # (H, W, 3)
    canvas = image.copy()
    boxes = np.asarray(detections["boxes"]).reshape(-1, 4)
    labels = np.asarray(detections["labels"]).reshape(-1)
    scores = detections.get("scores")
    masks = detections.get("masks")
    shown = [i for i in range(len(boxes)) if scores is None or scores[i] >= score_thresh]
    colours = [colour(int(labels[i]) if by_class else n) for n, i in enumerate(shown)]
    for c, i in zip(colours, shown):  # blend masks first, so boxes and text stay on top
        if masks is not None:
            m = np.asarray(masks[i]).astype(bool)
            canvas[m] = (1 - alpha) * canvas[m] + alpha * c
    ax.imshow(np.clip(canvas, 0, 1))
    for c, i in zip(colours, shown):
        x1, y1, x2, y2 = boxes[i]
        ax.add_patch(_rectangle((x1, y1), x2 - x1, y2 - y1, c))
        name = class_names[int(labels[i])] if int(labels[i]) < len(class_names) else labels[i]
        text = f"{name}" if scores is None else f"{name} {float(scores[i]):.2f}"
        ax.text(x1, y1, text, fontsize=7, color="white", va="bottom",
                bbox={"facecolor": c, "alpha": 0.8, "pad": 1, "edgecolor": "none"})  # fmt: skip
        if detections.get("keypoints") is not None:
            draw_skeleton(ax, np.asarray(detections["keypoints"][i]), skeleton or (), c)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)


def draw_skeleton(ax, keypoints, skeleton, colour_rgb) -> None:
    """One instance's keypoints (K, 3) (x, y, v) pixels: the ``skeleton``'s lines between
    labelled keypoints, then a dot on each. Pixel ``j`` covers ``[j, j + 1)``; matplotlib centres
    it on ``j``, hence the half-pixel shift."""
    xy = keypoints[:, :2] - 0.5
    shown = keypoints[:, 2] > 0
    for a, b in skeleton:
        if shown[a] and shown[b]:
            ax.plot(xy[[a, b], 0], xy[[a, b], 1], color=colour_rgb, linewidth=1.5, alpha=0.9)
    ax.scatter(xy[shown, 0], xy[shown, 1], s=6, c="white", edgecolors=[colour_rgb], zorder=3)


def _rectangle(xy, width, height, edge):
    from matplotlib.patches import Rectangle  # noqa: PLC0415

    return Rectangle(xy, width, height, fill=False, edgecolor=edge, linewidth=1.5)


def save_predictions_figure(path: str, samples, detections, class_names, columns: int = 4,
                            score_thresh: float = 0.5, skeleton=None) -> None:  # fmt: skip
    """A grid of ground truth (top of each pair) and predictions (below) for a few samples;
    with keypoints, their ``skeleton`` drawn over each instance."""
    n = len(samples)
    cols = min(columns, n)
    rows = 2 * (-(-n // cols))
    fig = new_figure((3 * cols, 3 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for k, (s, det) in enumerate(zip(samples, detections)):
        r, c = 2 * (k // cols), k % cols
        draw_detections(axes[r, c], s["image"], s, class_names, title="ground truth",
                        skeleton=skeleton)  # fmt: skip
        draw_detections(axes[r + 1, c], s["image"], det, class_names, score_thresh,
                        title="prediction", skeleton=skeleton)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
