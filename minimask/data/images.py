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
A file that is missing, not an image, truncated or too large raises :class:`BadImageError`
naming it.

**Size limit.** An image of more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (Pillow's guard
against decompression bombs, 89,478,485 by default, about 9,460 × 9,460) is refused before it is
decoded. Pillow itself only warns up to twice that, without naming the file; here both are a
:class:`BadImageError` naming it. To read larger images, set the environment variable
``MINIMASK_MAX_IMAGE_PIXELS`` (read when this module is imported) or call
:func:`set_max_image_pixels`; either sets Pillow's guard for the whole process.

**Large images for the model.** A float32 image takes 12 bytes a pixel: 576 MB for an
8000×6000 photo that the model then shrinks to at most ``max_size`` (1333) pixels.
:func:`read_image_for_model` lets a JPEG decode straight to 1/2, 1/4 or 1/8 of its size (JPEG
stores 8×8 blocks of frequencies, so a reduced decode is cheaper than the full one), and
:func:`to_file_pixels` maps the detections back onto the file's pixels.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_PIXELS_VARIABLE = "MINIMASK_MAX_IMAGE_PIXELS"
JPEG_REDUCTIONS = (8, 4, 2)  # the reduced decodes a JPEG decoder offers, largest first


class BadImageError(ValueError):
    """An image that cannot be used; the message names the file and the image id."""


def set_max_image_pixels(pixels: int | None) -> None:
    """Refuse images of more than ``pixels`` pixels (None: no limit), process-wide.

    This is Pillow's own guard, ``PIL.Image.MAX_IMAGE_PIXELS``, so it applies to every image
    Pillow opens in this process.
    """
    if pixels is not None and (isinstance(pixels, bool) or not isinstance(pixels, int)
                               or pixels <= 0):  # fmt: skip
        raise ValueError(f"the image pixel limit must be a positive whole number, not {pixels!r}")
    Image.MAX_IMAGE_PIXELS = pixels


def _limit_from_environment() -> None:
    """Apply ``$MINIMASK_MAX_IMAGE_PIXELS`` when it is set (a positive whole number)."""
    value = os.environ.get(MAX_PIXELS_VARIABLE, "").strip().replace("_", "")
    if not value:
        return
    if not value.isdigit() or int(value) == 0:
        raise ValueError(
            f"{MAX_PIXELS_VARIABLE}={os.environ[MAX_PIXELS_VARIABLE]!r}: give the largest "
            "number of pixels (width x height) an image may have, e.g. 200000000"
        )
    set_max_image_pixels(int(value))


_limit_from_environment()


def read_image(path: str, image_id=None, max_side: int | None = None) -> np.ndarray:
    """The image file at ``path`` as a (3, H, W) float32 RGB array in [0, 1].

    With ``max_side``, a large JPEG is decoded reduced by 2, 4 or 8 (the largest reduction that
    keeps its longer side >= ``max_side``); other formats are decoded at full size. Use
    :func:`read_image_for_model` to learn the reduction.

    Raises:
        BadImageError: the file is missing, unreadable, truncated or over the size limit
            (naming ``path`` and ``image_id``).
    """
    return read_image_for_model(path, max_side, image_id=image_id).image


class ModelImage(NamedTuple):
    """An image as decoded for the model, and how its pixels relate to the file's."""

    image: np.ndarray  # (3, h, w) float32 RGB in [0, 1]
    scale: int  # file pixels per decoded pixel along each axis: 1, 2, 4 or 8
    file_size: tuple[int, int]  # (H, W) of the image stored in the file


def read_image_for_model(path: str, max_side: int | None, image_id=None) -> ModelImage:
    """``path`` decoded no smaller than needed for a model that resizes to ``max_side``.

    The model resizes every image so that its longer side is at most ``max_side`` (its config's
    ``max_size``), so a JPEG may be decoded reduced by ``scale`` = 8, 4 or 2, the largest that
    keeps the longer side >= ``max_side``; the model then resizes the rest of the way exactly as
    before. Decoded pixel ``(y, x)`` covers the file's pixels ``[y·scale, (y+1)·scale)`` ×
    ``[x·scale, (x+1)·scale)`` (the last row and column may cover fewer), so detections on the
    decoded image map back by :func:`to_file_pixels`. Other formats, and ``max_side=None``,
    decode at full size (``scale`` 1).

    Raises:
        BadImageError: as :func:`read_image`.
    """
    what = path if image_id is None else f"{path} (image id {image_id})"
    if not os.path.exists(path):
        raise BadImageError(f"missing image file {what}")
    try:
        pixels, scale, file_size = _decode(path, max_side)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(
            f"{what} has more than {Image.MAX_IMAGE_PIXELS:,} pixels, the most Pillow decodes "
            f"(a guard against decompression bombs): {e} Set {MAX_PIXELS_VARIABLE} to a "
            "larger number of pixels to read it."
        ) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadImageError(f"cannot decode {what}: {e}") from e
    return ModelImage(_channels_first_float(pixels), scale, file_size)


def _decode(path: str, max_side: int | None):
    """Pillow's decode of ``path``: ``(pixels, scale, (H, W))``, pixels (h, w, 3) as ``_to_rgb``.

    Pillow checks the size when it reads the header: above ``MAX_IMAGE_PIXELS`` it warns, above
    twice that it raises; the warning is raised here too. (The warnings filter is process-wide
    state; minimask reads images on one thread at a time, so this does not race with itself.)
    Pillow's copy of the pixels is freed when this returns, before the float32 one is made.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            width, height = im.size
            scale = _reduce_jpeg(im, max_side)
            im.load()  # decode now: a truncated file fails here, not later
            return _to_rgb(im), scale, (height, width)


def _reduce_jpeg(im: Image.Image, max_side: int | None) -> int:
    """Ask a JPEG's decoder for a reduced decode (before ``load``); returns the reduction."""
    if max_side is None or im.format not in ("JPEG", "MPO"):
        return 1
    width, height = im.size
    wanted = next((s for s in JPEG_REDUCTIONS
                   if max(math.ceil(width / s), math.ceil(height / s)) >= max_side), 1)  # fmt: skip
    if wanted == 1:
        return 1
    # Pillow picks the largest reduction that keeps the image at least the size asked for, and
    # returns the file's extent in the reduced image's pixels: (0, 0, width / s, height / s).
    drafted = im.draft(im.mode, (max(width // wanted, 1), max(height // wanted, 1)))
    if drafted is None:  # the decoder cannot reduce this file
        return 1
    _, box = drafted
    return round(width / box[2])


def _to_rgb(im: Image.Image) -> np.ndarray:
    """(h, w, 3) RGB from any Pillow mode (table in the module docstring).

    8-bit images come back as uint8 (0..255), converted to float32 later in one pass; the others
    as float32 in [0, 1].
    """
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        grey = np.asarray(im).astype(np.float32) / np.float32(65535)  # (h, w)
        return np.repeat(np.clip(grey, 0.0, 1.0)[:, :, None], 3, axis=2)
    if mode == "F":
        return np.repeat(np.clip(np.asarray(im, np.float32), 0.0, 1.0)[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / np.float32(255)  # (h, w, 4)
        alpha = rgba[:, :, 3:]
        return rgba[:, :, :3] * alpha + (1.0 - alpha)  # over white
    if mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im)  # (h, w, 3) uint8


def _channels_first_float(pixels: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 or float32 -> (3, h, w) float32 in [0, 1], with one float32 allocation.

    ``uint8 / 255.0`` would be float64 (8 bytes a pixel and channel), and ``astype`` then
    ``/ 255`` then a transposed copy would make three float32 arrays; dividing straight into
    the channels-first output makes one.
    """
    out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
    if pixels.dtype == np.uint8:
        np.divide(pixels.transpose(2, 0, 1), np.float32(255), out=out)
    else:
        out[:] = pixels.transpose(2, 0, 1)
    return out


def to_file_pixels(detections: dict, scale: int, file_size: tuple[int, int]) -> dict:
    """Detections on an image from :func:`read_image_for_model` -> on the file's pixels.

    ``boxes`` (D, 4) are multiplied by ``scale`` and clipped to the file's (W, H); ``masks``
    (D, h, w), when present, are enlarged by repeating each pixel ``scale`` times along both
    axes and cut to the file's (H, W). The result holds D·H·W bytes of masks. ``keypoints``
    (D, K, 3), when present, have x and y multiplied by ``scale``. Other entries are kept.
    With ``scale`` 1 the detections are returned as they are.
    """
    if scale == 1:
        return detections
    height, width = file_size
    boxes = np.asarray(detections["boxes"], dtype=np.float32) * np.float32(scale)
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, width)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, height)
    out = {**detections, "boxes": boxes}
    if "keypoints" in detections:  # (D, K, 3): x and y scale, the visibility stays
        keypoints = np.array(detections["keypoints"], dtype=np.float32)
        keypoints[..., :2] *= np.float32(scale)
        out["keypoints"] = keypoints
    if "masks" in detections:
        masks = np.asarray(detections["masks"])
        rows = np.arange(height) // scale  # the decoded pixel each file pixel lies in
        cols = np.arange(width) // scale
        out["masks"] = masks[:, rows[:, None], cols[None, :]]  # (D, H, W)
    return out
