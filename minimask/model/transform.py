"""The image-transform boundary: raw images in, detections in the raw images' pixels out.

Mask R-CNN §4: "images are resized such that their scale (shorter edge) is 800 pixels", with the
longer edge capped at 1333 (Detectron's rule). Everything about that lives here, so that
:class:`minimask.model.mask_rcnn.MaskRCNN` takes images of any size and answers in their own
coordinates, exactly as torchvision's ``GeneralizedRCNNTransform`` does:

1. **normalise** each image with the config's mean and std: ``(x - mean) / std``;
2. **resize** it: ``s = min(min_size / min(H, W), max_size / max(H, W))`` and
   ``(h, w) = (floor(s·H), floor(s·W))``, bilinear with half-pixel centres (``align_corners=False``,
   no antialiasing); training targets move with it (boxes scaled by ``(w/W, h/H)``, masks by the
   nearest source pixel ``floor(j · W/w)`` so they stay binary; keypoints scaled as boxes);
3. **pad** the batch with zeros to a multiple of ``size_divisible`` (the coarsest stride);

and after the heads,

4. **postprocess**: boxes (and keypoints) scaled back by ``(W/w, H/h)``, and the predicted
   class's soft M×M mask pasted **once** into the original image and thresholded there
   (:func:`paste_masks`).

Each step follows torchvision's arithmetic (floor of the scaled size, half-pixel bilinear sampling,
nearest = floor, the integer box of the paste), so that the same weights give the same detections.
Targets are validated here, where they enter the model (:func:`check_target`).

Shape letters: N images; H×W an input image, h×w after resizing; G ground-truth instances;
D detections; M the mask head's output size (28). Boxes are (x1, y1, x2, y2) in pixels.
"""

from __future__ import annotations

import numpy as np

from minimask.backend import get_array_module, to_host
from minimask.engine import Tensor, section
from minimask.engine.ops import sigmoid
from minimask.model.config import MaskRCNNConfig
from minimask.nn.pool import bilinear_taps, nearest_source_index
from minimask.ops.boxes import check_boxes


# ---------------------------------------------------------------------------- resizing
def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(h, w) after scaling the shorter side to ``min_size``, the longer capped at ``max_size``.

    The scaled sizes are floored, as torch's ``interpolate(scale_factor=s,
    recompute_scale_factor=True)`` does: 480×640 at 320/533 becomes 320×426.
    """
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return max(int(height * scale), 1), max(int(width * scale), 1)


def resize_image(image, size: tuple[int, int]):
    """(C, H, W) -> (C, h, w), bilinear with half-pixel centres, no antialiasing.

    Separable: first along the rows, then along the columns, each output pixel a blend of two
    neighbours (two gathers and a lerp per axis, O(C·h·W + C·h·w)), as torch's
    ``interpolate(mode="bilinear", align_corners=False)``.
    """
    xp = get_array_module(image)
    (h, w), (_, height, width) = size, image.shape
    if (h, w) == (height, width):
        return image
    dtype = image.dtype.type
    low, high, frac = bilinear_taps(height, h, xp, dtype)
    rows = image[:, low] * (1 - frac)[:, None] + image[:, high] * frac[:, None]  # (C, h, W)
    low, high, frac = bilinear_taps(width, w, xp, dtype)
    return rows[:, :, low] * (1 - frac) + rows[:, :, high] * frac  # (C, h, w)


def resize_masks(masks, size: tuple[int, int]):
    """(G, H, W) binary -> (G, h, w), each pixel the nearest source pixel (stays binary)."""
    xp = get_array_module(masks)
    (h, w), (height, width) = size, masks.shape[-2:]
    if (h, w) == (height, width):
        return masks
    # torch's "nearest": source pixel floor(j · H/h), the rule of nn.pool's upsampling
    rows, cols = nearest_source_index(height, h, xp=xp), nearest_source_index(width, w, xp=xp)
    return masks[:, rows][:, :, cols]  # (G, h, W) -> (G, h, w)


def resize_boxes(boxes, from_size: tuple[int, int], to_size: tuple[int, int]):
    """(G, 4) boxes of a ``from_size`` image -> the same boxes on a ``to_size`` image."""
    ry, rx = (to_size[0] / from_size[0]), (to_size[1] / from_size[1])
    resized = boxes.copy()
    resized[..., 0::2] *= rx  # x1, x2 (in the boxes' dtype)
    resized[..., 1::2] *= ry  # y1, y2
    return resized


# ---------------------------------------------------------------------------- mask pasting
def paste_weights(start, stop, m: int, pixels: int, xp):
    """(D, pixels, m) bilinear weights that stretch an m-cell mask over integer box extents.

    Detection d covers the image pixels ``start_d .. stop_d`` (both included, so ``n_d = stop_d -
    start_d + 1`` pixels, at least 1). Pixel ``p`` inside it is box pixel ``r = p - start_d``,
    which samples the mask at ``(r + 0.5)·m/n_d - 0.5`` by :func:`bilinear_taps`' rule; pixels
    outside the box (or the image) get weight 0.
    """
    dtype = xp.float32
    n = xp.maximum(stop - start + 1, 1).astype(dtype)  # (D,) box extent in pixels
    r = xp.arange(pixels)[None, :] - start[:, None]  # (D, pixels) position inside the box
    inside = (r >= 0) & (r < n[:, None])
    u = xp.maximum((r + 0.5).astype(dtype) * (m / n[:, None]) - 0.5, 0)  # (D, pixels)
    low = xp.minimum(xp.floor(u).astype(xp.int64), m - 1)
    high = xp.minimum(low + 1, m - 1)
    frac = (u - low) * inside
    weights = xp.zeros((len(start), pixels, m), dtype=dtype)
    d, p = xp.indices(low.shape)
    weights[d, p, low] = (1 - frac) * inside
    weights[d, p, high] += frac  # low == high at the last cell: the weights still sum to 1
    return weights


def expand_boxes_to_int(boxes, m: int, padding: int = 1):
    """Grow boxes by the zero border's fraction ``(m + 2·padding) / m`` and truncate to pixels.

    The mask gets a border of ``padding`` zero cells, so that it fades to 0 at the box edge; the
    box grows around its centre by the same fraction, then its corners are truncated toward
    zero (torchvision's ``expand_boxes(...).to(int64)``).
    """
    xp = get_array_module(boxes)
    scale = (m + 2 * padding) / m
    half = (boxes[:, 2:] - boxes[:, :2]) * 0.5 * scale  # (D, 2) half width, half height
    centre = (boxes[:, 2:] + boxes[:, :2]) * 0.5
    return xp.concatenate([centre - half, centre + half], axis=1).astype(xp.int64)  # (D, 4)


def paste_masks(probs, boxes, image_size: tuple[int, int], threshold: float | None = None,
                chunk: int = 16):  # fmt: skip
    """Paste (D, M, M) mask probabilities into (D, H, W) images, each stretched over its box.

    Mask R-CNN §3: "the m×m floating-number mask output is then resized to the RoI size, and
    binarized at a threshold of 0.5". The mask gains a border of zeros, the box grows to match
    and is rounded to whole pixels (:func:`expand_boxes_to_int`), and the mask is resized
    bilinearly onto those pixels. Bilinear resizing is separable, so each pasted mask is
    ``Wy (H×M') @ P (M'×M') @ Wx^T (M'×W)`` with M' = M + 2, the weights built for ``chunk``
    detections at a time. On a GPU these are two batched products over the whole image (no
    loop over detections, no sync). On the CPU only the box's rows of Wy and columns of Wx are
    multiplied, as the weights are 0 outside the box: the work is the box's area, not the
    image's (100 detections on an 800×1067 image: 20 ms instead of 160 ms of CPU time).

    Args:
        probs: (D, M, M) probabilities of each detection's class.
        boxes: (D, 4) boxes in the image's pixels.
        threshold: when given, return ``probs >= threshold`` as uint8; otherwise floats.

    Returns:
        (D, H, W) float (soft masks) or uint8 (binary masks).
    """
    xp = get_array_module(probs)
    height, width = image_size
    d, m = probs.shape[0], probs.shape[-1]
    out_dtype = probs.dtype if threshold is None else xp.uint8
    out = xp.zeros((d, height, width), dtype=out_dtype)
    if d == 0:
        return out
    padded = xp.pad(probs.astype(xp.float32), ((0, 0), (1, 1), (1, 1)))  # (D, M+2, M+2)
    box = expand_boxes_to_int(boxes, m)  # (D, 4) whole pixels
    if xp is np:  # each box's pixels, clipped to the image: rows top..bottom-1, cols left..right-1
        left, top = np.maximum(box[:, :2], 0).T.tolist()
        right, bottom = np.minimum(box[:, 2:] + 1, [width, height]).T.tolist()
    with section("paste masks"):  # a row of its own in a profile (engine/profiler.py)
        for s in range(0, d, chunk):
            b = box[s : s + chunk]
            wy = paste_weights(b[:, 1], b[:, 3], m + 2, height, xp)  # (c, H, M+2)
            wx = paste_weights(b[:, 0], b[:, 2], m + 2, width, xp)  # (c, W, M+2)
            if xp is not np:
                pasted = (wy @ padded[s : s + chunk]) @ wx.transpose(0, 2, 1)  # (c, H, W)
                out[s : s + chunk] = pasted if threshold is None else pasted >= threshold
                continue
            for i, k in enumerate(range(s, min(s + chunk, d))):
                rows, cols = slice(top[k], bottom[k]), slice(left[k], right[k])
                if rows.start >= rows.stop or cols.start >= cols.stop:
                    continue  # the box lies outside the image
                pasted = wy[i, rows] @ padded[k] @ wx[i, cols].T  # (h, w): the box's pixels
                out[k, rows, cols] = pasted if threshold is None else pasted >= threshold
    return out


# ---------------------------------------------------------------------------- targets
def check_target(target: dict, index: int, image_size: tuple[int, int], num_classes: int,
                 masks: bool = True, num_keypoints: int = 0):  # fmt: skip
    """Refuse a training target that would train on garbage, with a message naming it.

    Checks: ``boxes``, ``labels`` and (when the model has a mask head, ``masks``) ``masks`` are
    all given; boxes (G, 4) finite and not reversed (:func:`minimask.ops.boxes.check_boxes`),
    each touching its image; as many labels (and masks) as boxes; labels in 1..K-1; masks the
    size of their image. With ``num_keypoints`` K > 0 (a keypoint head), ``keypoints`` (G, K, 3)
    too: finite (x, y) and a visibility v in {0, 1, 2} (COCO's: not labelled, labelled but
    hidden, visible).
    """
    needed = ("boxes", "labels", "masks") if masks else ("boxes", "labels")
    if num_keypoints:
        needed += ("keypoints",)
    for key in needed:
        if target.get(key) is None:
            raise ValueError(
                f"targets[{index}] has no {key!r}: Mask R-CNN trains on "
                + ", ".join(_TARGET_SHAPES[k] for k in needed)
                + ", one per instance"
            )
    xp = get_array_module(target["boxes"])
    boxes = xp.asarray(target["boxes"]).reshape(-1, 4)
    check_boxes(boxes, f"targets[{index}]['boxes']")
    height, width = image_size
    outside = (boxes[:, 2] < 0) | (boxes[:, 3] < 0) | (boxes[:, 0] > width) | (boxes[:, 1] > height)
    if bool(outside.any()):
        row = int(xp.argmax(outside))  # the first one
        raise ValueError(
            f"targets[{index}]['boxes'][{row}] = {to_host(boxes[row])} lies wholly outside image "
            f"{index} ({height}x{width}): boxes are (x1, y1, x2, y2) in the image's own pixels"
        )
    labels = to_host(target["labels"])
    counts = {"boxes": len(boxes), "labels": len(labels)}
    bad = (labels < 1) | (labels >= num_classes)
    if bad.any():
        raise ValueError(
            f"targets[{index}]['labels'] holds {labels[bad][:5].tolist()}: labels must be in "
            f"1..{num_classes - 1} (0 is the background, num_classes={num_classes})"
        )
    if masks:
        counts["masks"] = len(target["masks"])
        if tuple(target["masks"].shape[-2:]) != tuple(image_size):
            raise ValueError(
                f"targets[{index}]['masks'] are {tuple(target['masks'].shape[-2:])} but image "
                f"{index} is {tuple(image_size)} (masks are given at the image's own size)"
            )
    if num_keypoints:
        counts["keypoints"] = len(target["keypoints"])
        check_keypoints(to_host(target["keypoints"]), num_keypoints, f"targets[{index}]")
    if target.get("is_crowd") is not None:
        counts["is_crowd"] = len(target["is_crowd"])
    if len(set(counts.values())) > 1:
        raise ValueError(f"targets[{index}] has different counts per key: {counts}")


_TARGET_SHAPES = {
    "boxes": "boxes (G, 4)",
    "labels": "labels (G,)",
    "masks": "masks (G, H, W)",
    "keypoints": "keypoints (G, K, 3)",
}


def check_keypoints(keypoints, num_keypoints: int, where: str) -> None:
    """Refuse keypoints that are not (G, K, 3) rows of finite (x, y) and v in {0, 1, 2}."""
    keypoints = np.asarray(keypoints)
    if keypoints.ndim != 3 or keypoints.shape[1:] != (num_keypoints, 3):
        raise ValueError(
            f"{where}['keypoints'] has shape {keypoints.shape}; expected (G, {num_keypoints}, 3): "
            f"(x, y, visibility) for each of the model's {num_keypoints} keypoints"
        )
    if not np.isfinite(keypoints).all():
        g, k, _ = np.argwhere(~np.isfinite(keypoints))[0]
        raise ValueError(f"{where}['keypoints'][{g}, {k}] = {keypoints[g, k]} is not finite")
    v = keypoints[..., 2]
    bad = ~np.isin(v, (0, 1, 2))
    if bad.any():
        g, k = np.argwhere(bad)[0]
        raise ValueError(
            f"{where}['keypoints'][{g}, {k}] has visibility {v[g, k]}: it must be 0 (not "
            "labelled), 1 (labelled, hidden) or 2 (visible)"
        )


def resize_keypoints(keypoints, from_size: tuple[int, int], to_size: tuple[int, int]):
    """(..., K, 3) keypoints of a ``from_size`` image -> the same on a ``to_size`` image: x and y
    scale as the boxes' corners do (:func:`resize_boxes`), the visibility stays."""
    ry, rx = (to_size[0] / from_size[0]), (to_size[1] / from_size[1])
    resized = keypoints.copy()
    resized[..., 0] *= rx
    resized[..., 1] *= ry
    return resized


VALUE_SLACK = 0.5  # how far outside [0, 1] an input image may stray before it is refused


def check_image(image, index: int) -> None:
    """Refuse an input image the model would misread: it must be a (3, H, W) float RGB array
    with values in [0, 1] (the model normalises it with the config's mean and std itself).

    The value check allows some slack (:data:`VALUE_SLACK`) for images resampled by the caller,
    and catches the usual slips: 0..255 pixels, or an image normalised before it was given.
    """
    if getattr(image, "ndim", 0) != 3 or image.shape[0] != 3:
        raise ValueError(
            f"image {index} has shape {getattr(image, 'shape', None)}; expected (3, H, W) RGB"
        )
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(
            f"image {index} is {image.dtype}: images are float RGB in [0, 1] "
            "(divide 8-bit pixels by 255)"
        )
    low, high = float(image.min()), float(image.max())
    if not (-VALUE_SLACK <= low and high <= 1 + VALUE_SLACK):  # also refuses NaN
        raise ValueError(
            f"image {index} has values in [{low:g}, {high:g}]: images are RGB in [0, 1] "
            "(divide 8-bit pixels by 255; do not normalise them, the model does)"
        )


# ---------------------------------------------------------------------------- the transform
class ImageTransform:
    """Normalise, resize and batch raw images (and their targets); map detections back.

    The model's counterpart of torchvision's ``GeneralizedRCNNTransform``, configured by the
    ``min_size``, ``max_size``, ``image_mean``, ``image_std``, ``size_divisible`` and
    ``mask_threshold`` fields of :class:`~minimask.model.config.MaskRCNNConfig`.
    """

    def __init__(self, config: MaskRCNNConfig):
        self.config = config

    def __call__(self, images, targets=None, xp=None, dtype=None):
        """Raw images (and targets at their size) -> the padded batch and resized targets.

        Args:
            images: N arrays (3, H_i, W_i), RGB in [0, 1], or one (N, 3, H, W) array.
            targets: N dicts (``boxes``, ``labels``, ``masks``, ``is_crowd``, ``keypoints``) or
                None.
            xp, dtype: where and in what precision the batch is built (the model's).

        Returns:
            ``(batch, image_sizes, original_sizes, targets)``: the batch Tensor (N, 3, Hp, Wp),
            each image's resized (h, w), each input's (H, W), and the resized targets.
        """
        c = self.config
        resized, image_sizes, original_sizes = [], [], []
        mean = xp.asarray(c.image_mean, dtype=dtype).reshape(3, 1, 1)
        std = xp.asarray(c.image_std, dtype=dtype).reshape(3, 1, 1)
        if len(images) == 0:
            raise ValueError("no images: give a list of (3, H, W) RGB arrays in [0, 1]")
        for i, image in enumerate(images):
            check_image(image, i)
            height, width = (int(s) for s in image.shape[1:])
            size = resized_size(height, width, c.min_size, c.max_size)
            image = (xp.asarray(image, dtype=dtype) - mean) / std  # normalise, then resize
            resized.append(resize_image(image, size))
            image_sizes.append(size)
            original_sizes.append((height, width))
        if targets is not None:
            targets = [
                self.resize_target(t, i, orig, size, xp, dtype)
                for i, (t, orig, size) in enumerate(zip(targets, original_sizes, image_sizes))
            ]
        d = c.size_divisible
        padded_h = -(-max(h for h, _ in image_sizes) // d) * d  # round up to a multiple of d
        padded_w = -(-max(w for _, w in image_sizes) // d) * d
        batch = xp.zeros((len(resized), 3, padded_h, padded_w), dtype=dtype)
        for i, (im, (h, w)) in enumerate(zip(resized, image_sizes)):
            batch[i, :, :h, :w] = im
        return Tensor(batch), image_sizes, original_sizes, targets

    def resize_target(self, target: dict, index: int, original_size, size, xp, dtype) -> dict:
        """Check ``target`` and move its boxes and masks to the resized image (a new dict).

        Everything the heads read is uploaded here, once per image, to the model's device.
        """
        c = self.config
        check_target(target, index, original_size, c.num_classes, c.has_masks, c.num_keypoints)
        out = dict(target)
        boxes = xp.asarray(target["boxes"], dtype=dtype).reshape(-1, 4)
        out["boxes"] = resize_boxes(boxes, original_size, size)
        out["labels"] = xp.asarray(target["labels"]).astype(np.int64)
        if target.get("masks") is not None:
            out["masks"] = resize_masks(xp.asarray(target["masks"]), size)
        if target.get("is_crowd") is not None:
            out["is_crowd"] = xp.asarray(target["is_crowd"], dtype=bool)
        if c.num_keypoints:
            keypoints = xp.asarray(target["keypoints"], dtype=dtype).reshape(-1, c.num_keypoints, 3)
            out["keypoints"] = resize_keypoints(keypoints, original_size, size)
        return out

    def postprocess(self, detections, image_sizes, original_sizes):
        """Detections on the resized images -> on the inputs, masks pasted and thresholded.

        Each detection dict holds ``boxes`` (D, 4) on the resized image and, from the mask head,
        ``mask_logits`` (D, M, M) of its class; it leaves with ``boxes`` on the input image and
        ``masks`` (D, H, W) uint8, the logits' sigmoid pasted once at the input's size and
        thresholded at ``mask_threshold``. Keypoints (from the keypoint head) scale back as boxes
        do.
        """
        for det, size, original in zip(detections, image_sizes, original_sizes):
            det["boxes"] = resize_boxes(det["boxes"], size, original)
            if "keypoints" in det:
                det["keypoints"] = resize_keypoints(det["keypoints"], size, original)
            logits = det.pop("mask_logits", None)
            if logits is not None:
                det["masks"] = paste_masks(
                    sigmoid(logits), det["boxes"], original, self.config.mask_threshold
                )
        return detections
