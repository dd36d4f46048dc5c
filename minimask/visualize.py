"""Drawing detections: boxes, class names, scores and translucent masks on an image.

Used by ``minimask predict``, the demo's predictions figure and the lessons.
"""

from __future__ import annotations

import matplotlib
import numpy as np
from matplotlib.figure import Figure


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
                    by_class: bool = False):  # fmt: skip
    """Draw ``image`` (3, H, W) or (H, W, 3) in [0, 1] with its detections on a matplotlib axis.

    ``detections`` holds ``boxes`` (D, 4) (x1, y1, x2, y2), ``labels`` (D,), optionally
    ``scores`` (D,) (ground truth has none) and ``masks`` (D, H, W); detections scoring below
    ``score_thresh`` are skipped. Each detection gets its own colour, or with ``by_class`` one
    colour per class (``colour(label)``), so that a class reads the same in every panel.
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
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)


def _rectangle(xy, width, height, edge):
    from matplotlib.patches import Rectangle  # noqa: PLC0415

    return Rectangle(xy, width, height, fill=False, edgecolor=edge, linewidth=1.5)


def save_predictions_figure(path: str, samples, detections, class_names, columns: int = 4,
                            score_thresh: float = 0.5) -> None:  # fmt: skip
    """A grid of ground truth (top of each pair) and predictions (below) for a few samples."""
    n = len(samples)
    cols = min(columns, n)
    rows = 2 * (-(-n // cols))
    fig = new_figure((3 * cols, 3 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for k, (s, det) in enumerate(zip(samples, detections)):
        r, c = 2 * (k // cols), k % cols
        draw_detections(axes[r, c], s["image"], s, class_names, title="ground truth")
        draw_detections(
            axes[r + 1, c], s["image"], det, class_names, score_thresh, title="prediction"
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
