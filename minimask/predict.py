"""``minimask predict``: run a checkpoint on image files and draw what it finds."""

from __future__ import annotations

import os


def predict_files(checkpoint: str, paths, out_dir: str, score_thresh: float = 0.5) -> list[str]:
    """Draw the detections of ``checkpoint`` on each image; returns the written PNG paths.

    A missing or undecodable image stops the command with a one-line error naming the file
    (``SystemExit``), after the images before it have been drawn.
    """
    from minimask.data.images import BadImageError, read_image  # noqa: PLC0415
    from minimask.data.transforms import (  # noqa: PLC0415
        detections_to_original,
        resize_image,
        resized_size,
    )
    from minimask.model.mask_rcnn import detections_to_host  # noqa: PLC0415
    from minimask.shapes_demo import model_from_checkpoint  # noqa: PLC0415
    from minimask.visualize import draw_detections, new_figure  # noqa: PLC0415

    model, meta = model_from_checkpoint(checkpoint)
    classes = meta.get("classes") or [str(k) for k in range(model.config.num_classes)]
    os.makedirs(out_dir, exist_ok=True)
    written = []
    c = model.config
    for path in paths:
        try:
            image = read_image(path)
        except BadImageError as e:
            raise SystemExit(f"minimask predict: {e}") from e
        height, width = image.shape[1:]
        # Predict at the size the model was trained at, then map back to the file's pixels.
        size = resized_size(height, width, c.min_size, c.max_size)
        (det,) = detections_to_host(model([resize_image(image, size)]))
        det = detections_to_original(det, size, (height, width))
        fig = new_figure((6, 6 * height / width))
        ax = fig.add_subplot()
        kept = int((det["scores"] >= score_thresh).sum())
        draw_detections(ax, image, det, classes, score_thresh,
                        title=f"{os.path.basename(path)}: {kept} detections")  # fmt: skip
        target = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + "_pred.png")
        fig.tight_layout()
        fig.savefig(target, dpi=110)
        written.append(target)
    return written
