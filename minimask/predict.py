"""``minimask predict``: run a checkpoint on image files and draw what it finds."""

from __future__ import annotations

import os

import numpy as np


def read_image(path: str) -> np.ndarray:
    """An image file as a (3, H, W) float32 RGB array in [0, 1].

    Raises:
        FileNotFoundError / ValueError naming ``path`` when it is missing or not an image.
    """
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    if not os.path.exists(path):
        raise FileNotFoundError(f"no image file at {path}")
    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read {path} as an image: {e}") from e
    return array.transpose(2, 0, 1)  # (3, H, W)


def predict_files(checkpoint: str, paths, out_dir: str, score_thresh: float = 0.5) -> list[str]:
    """Draw the detections of ``checkpoint`` on each image; returns the written PNG paths."""
    from minimask.data.transforms import (  # noqa: PLC0415
        detections_to_original,
        resize_image,
        resized_size,
    )
    from minimask.model.mask_rcnn import detections_to_host  # noqa: PLC0415
    from minimask.shapes_demo import model_from_checkpoint  # noqa: PLC0415
    from minimask.visualize import _pyplot, draw_detections  # noqa: PLC0415

    model, meta = model_from_checkpoint(checkpoint)
    classes = meta.get("classes") or [str(k) for k in range(model.config.num_classes)]
    os.makedirs(out_dir, exist_ok=True)
    plt = _pyplot()
    written = []
    c = model.config
    for path in paths:
        image = read_image(path)
        height, width = image.shape[1:]
        # Predict at the size the model was trained at, then map back to the file's pixels.
        size = resized_size(height, width, c.min_size, c.max_size)
        (det,) = detections_to_host(model([resize_image(image, size)]))
        det = detections_to_original(det, size, (height, width))
        fig, ax = plt.subplots(figsize=(6, 6 * height / width))
        kept = int((det["scores"] >= score_thresh).sum())
        draw_detections(ax, image, det, classes, score_thresh,
                        title=f"{os.path.basename(path)}: {kept} detections")  # fmt: skip
        target = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + "_pred.png")
        fig.tight_layout()
        fig.savefig(target, dpi=110)
        plt.close(fig)
        written.append(target)
    return written
