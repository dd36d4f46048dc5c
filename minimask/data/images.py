"""Reading image files as the model's input: (3, H, W) float32 RGB in [0, 1].

Pillow decodes the file; the pixel values are then converted by mode, since Pillow's own
``convert("RGB")`` is not right for every one of them:

==========================  =================================================================
mode in the file            conversion
==========================  =================================================================
RGB                         / 255
L (grayscale), 1, P, CMYK,  Pillow's ``convert("RGB")`` (grey copied to 3 channels; CMYK via
YCbCr                       Pillow's own transform, including Adobe's inverted JPEG CMYK)
RGBA, LA, P + transparency  composited over white, as a viewer shows it (the colour under a
                            transparent pixel is arbitrary, so it must not reach the model)
I;16, I;16B, I (16-bit)     / 65535, grey copied to 3 channels (``convert`` would clip at 255)
F (32-bit float)            clipped to [0, 1], grey copied to 3 channels
==========================  =================================================================

No EXIF orientation is applied: pixels are used as stored, which is how COCO was annotated.
A file that is missing, not an image, or truncated raises :class:`BadImageError` naming it.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError


class BadImageError(ValueError):
    """An image that cannot be used; the message names the file and the image id."""


def read_image(path: str, image_id=None) -> np.ndarray:
    """The image file at ``path`` as a (3, H, W) float32 RGB array in [0, 1].

    Raises:
        BadImageError: the file is missing, unreadable or truncated (naming ``path`` and
            ``image_id``).
    """
    what = path if image_id is None else f"{path} (image id {image_id})"
    if not os.path.exists(path):
        raise BadImageError(f"missing image file {what}")
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later
            array = _to_rgb(im)  # (H, W, 3) float32
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadImageError(f"cannot decode {what}: {e}") from e
    return np.ascontiguousarray(array.transpose(2, 0, 1))  # (3, H, W)


def _to_rgb(im: Image.Image) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1] from any Pillow mode (table in the module docstring)."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        grey = np.asarray(im).astype(np.float32) / 65535.0  # (H, W)
        return np.repeat(np.clip(grey, 0.0, 1.0)[:, :, None], 3, axis=2)
    if mode == "F":
        return np.repeat(np.clip(np.asarray(im, np.float32), 0.0, 1.0)[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0  # (H, W, 4)
        alpha = rgba[:, :, 3:]
        return rgba[:, :, :3] * alpha + (1.0 - alpha)  # over white
    if mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.float32) / 255.0
