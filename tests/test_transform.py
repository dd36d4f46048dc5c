"""The image-transform boundary: resize, targets, postprocess and mask pasting.

Each piece is checked against a plain loop written from its definition and, when installed,
against torchvision's own functions (``GeneralizedRCNNTransform``, ``paste_masks_in_image``).
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minimask.data.shapes import ShapesConfig, make_sample
from minimask.model.config import tiny
from minimask.model.mask_rcnn import MaskRCNN, detections_to_host
from minimask.model.transform import (
    ImageTransform,
    paste_masks,
    resize_image,
    resize_masks,
    resized_size,
)
from minimask.nn import init
from tests.helpers import requires_torchvision


# ---------------------------------------------------------------------------- plain references
def bilinear_loop(image, size):
    """Half-pixel bilinear resize written pixel by pixel (align_corners=False, no antialias)."""
    c, height, width = image.shape
    h, w = size
    out = np.zeros((c, h, w))
    for i in range(h):
        y = max((i + 0.5) * height / h - 0.5, 0.0)
        y0 = min(int(np.floor(y)), height - 1)
        y1, fy = min(y0 + 1, height - 1), y - y0
        for j in range(w):
            x = max((j + 0.5) * width / w - 0.5, 0.0)
            x0 = min(int(np.floor(x)), width - 1)
            x1, fx = min(x0 + 1, width - 1), x - x0
            top = (1 - fx) * image[:, y0, x0] + fx * image[:, y0, x1]
            bottom = (1 - fx) * image[:, y1, x0] + fx * image[:, y1, x1]
            out[:, i, j] = (1 - fy) * top + fy * bottom
    return out


def paste_loop(prob, box, image_size):
    """One mask pasted as the paper says: zero border, box grown to match and made whole pixels,
    then the mask resized bilinearly onto those pixels (written with :func:`bilinear_loop`)."""
    m = prob.shape[-1]
    padded = np.pad(prob, 1)
    scale = (m + 2) / m
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    hw, hh = (box[2] - box[0]) / 2 * scale, (box[3] - box[1]) / 2 * scale
    x0, y0, x1, y1 = (int(v) for v in (cx - hw, cy - hh, cx + hw, cy + hh))  # toward zero
    w, h = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
    resized = bilinear_loop(padded[None].astype(np.float64), (h, w))[0]
    out = np.zeros(image_size)
    for y in range(max(y0, 0), min(y0 + h, image_size[0])):
        for x in range(max(x0, 0), min(x0 + w, image_size[1])):
            out[y, x] = resized[y - y0, x - x0]
    return out


# ---------------------------------------------------------------------------- resize
@settings(max_examples=25, deadline=None)
@given(
    height=st.integers(1, 12),
    width=st.integers(1, 12),
    h=st.integers(1, 20),
    w=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)
def test_resize_image_matches_the_pixel_loop(height, width, h, w, seed):
    image = np.random.default_rng(seed).random((2, height, width))
    np.testing.assert_allclose(resize_image(image, (h, w)), bilinear_loop(image, (h, w)),
                               atol=1e-12)  # fmt: skip


def test_resized_size_and_identity():
    assert resized_size(480, 640, 800, 1333) == (800, 1066)
    assert resized_size(100, 1000, 800, 1333) == (133, 1333)  # the longer side caps the scale
    image = np.random.default_rng(0).random((3, 5, 7)).astype(np.float32)
    assert resize_image(image, (5, 7)) is image


def test_resize_masks_takes_the_floor_source_pixel():
    masks = np.arange(12, dtype=np.uint8).reshape(1, 3, 4)
    out = resize_masks(masks, (6, 2))
    np.testing.assert_array_equal(out[0], masks[0][[0, 0, 1, 1, 2, 2]][:, [0, 2]])


@requires_torchvision
def test_transform_matches_torchvision_generalized_rcnn_transform():
    import torch
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    config = tiny().replace(min_size=40, max_size=70, image_mean=(0.4, 0.5, 0.6),
                            image_std=(0.2, 0.3, 0.25))  # fmt: skip
    generator = np.random.default_rng(1)
    images = [generator.random((3, 27, 33)).astype(np.float32),
              generator.random((3, 50, 19)).astype(np.float32)]  # fmt: skip
    masks = [(generator.random((2, *im.shape[1:])) > 0.5).astype(np.uint8) for im in images]
    boxes = [np.array([[1, 2, 10, 20], [3.5, 4, 15, 9]], np.float32) for _ in images]
    targets = [{"boxes": b, "labels": np.array([1, 2]), "masks": m} for b, m in zip(boxes, masks)]
    ours, sizes, originals, our_targets = ImageTransform(config)(images, targets, np, np.float32)

    theirs = GeneralizedRCNNTransform(40, 70, list(config.image_mean), list(config.image_std))
    theirs.eval()  # a fixed min_size, no random choice
    batch, their_targets = theirs(
        [torch.from_numpy(im) for im in images],
        [
            {
                "boxes": torch.from_numpy(t["boxes"]),
                "labels": torch.from_numpy(t["labels"]),
                "masks": torch.from_numpy(t["masks"]),
            }
            for t in targets
        ],  # fmt: skip
    )
    assert sizes == [tuple(s) for s in batch.image_sizes]
    assert originals == [(27, 33), (50, 19)]
    # float32 resampling: the two differ only in rounding (a few ulp of values ~1)
    np.testing.assert_allclose(ours.data, batch.tensors.numpy(), atol=1e-5)
    for a, b in zip(our_targets, their_targets):
        np.testing.assert_allclose(a["boxes"], b["boxes"].numpy(), rtol=1e-6)
        np.testing.assert_array_equal(a["masks"], b["masks"].numpy())


# ---------------------------------------------------------------------------- paste
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), d=st.integers(0, 4))
def test_paste_masks_matches_the_loop(seed, d):
    generator = np.random.default_rng(seed)
    probs = generator.random((d, 6, 6)).astype(np.float32)
    xy = generator.uniform(-8, 30, (d, 2))
    boxes = np.concatenate([xy, xy + generator.uniform(0, 20, (d, 2))], axis=1).astype(np.float32)
    ours = paste_masks(probs, boxes, (25, 31), chunk=3)
    assert ours.shape == (d, 25, 31)
    for k in range(d):
        np.testing.assert_allclose(ours[k], paste_loop(probs[k], boxes[k], (25, 31)), atol=1e-5)
    binary = paste_masks(probs, boxes, (25, 31), threshold=0.5)
    assert binary.dtype == np.uint8
    np.testing.assert_array_equal(binary, ours >= 0.5)


@requires_torchvision
def test_paste_masks_matches_torchvision_with_non_trivial_masks():
    import torch
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    generator = np.random.default_rng(7)
    probs = generator.random((12, 28, 28)).astype(np.float32)
    probs[:4] = probs[:4] > 0.5  # some hard-edged masks too
    # torchvision's paste fails on boxes wholly outside the image: keep each one partly inside
    xy = generator.uniform(-10, 70, (12, 2))
    boxes = np.concatenate([xy, xy + generator.uniform(11, 60, (12, 2))], axis=1)
    boxes = boxes.astype(np.float32)
    boxes[0] = [10, 10, 10, 10]  # a degenerate box
    ours = paste_masks(probs, boxes, (80, 100))
    theirs = paste_masks_in_image(
        torch.from_numpy(probs)[:, None], torch.from_numpy(boxes), (80, 100)
    )[:, 0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


# ---------------------------------------------------------------------------- targets
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"boxes": np.array([[5.0, 5, 2, 9]])}, r"x2 < x1"),
        ({"boxes": np.array([[np.nan, 5, 8, 9]])}, r"not finite"),
        ({"boxes": np.array([[0, 0, np.inf, 9]])}, r"not finite"),
        ({"labels": np.array([0])}, r"labels must be in 1\.\.3"),
        ({"labels": np.array([-1])}, r"holds \[-1\]: labels must be in 1\.\.3"),
        ({"labels": np.array([4])}, r"labels must be in 1\.\.3"),
        ({"labels": np.array([1, 2])}, r"different counts"),
        ({"masks": np.zeros((1, 10, 10), np.uint8)}, r"\['masks'\] are \(10, 10\) but image 0"),
        ({"masks": np.zeros((2, 32, 32), np.uint8)}, r"different counts"),
        ({"masks": None}, r"targets\[0\] has no 'masks': Mask R-CNN trains on"),
        ({"labels": None}, r"targets\[0\] has no 'labels'"),
        ({"boxes": np.array([[1.0, 1, 9, 9], [40, 2, 50, 9]]), "labels": np.array([1, 2]),
          "masks": np.ones((2, 32, 32), np.uint8)},
         r"\['boxes'\]\[1\] = \[40\. +2\. +50\. +9\.\] lies wholly outside image 0 \(32x32\)"),
        ({"boxes": np.array([[-9.0, -9, -1, -1]])}, r"\['boxes'\]\[0\] .* wholly outside"),
    ],
)  # fmt: skip
def test_bad_targets_are_refused_where_they_enter_the_model(change, message):
    init.manual_seed(0)
    model = MaskRCNN(tiny().replace(min_size=32, max_size=32))
    image = np.zeros((3, 32, 32), np.float32)
    target = {"boxes": np.array([[1.0, 1, 9, 9]]), "labels": np.array([1]),
              "masks": np.ones((1, 32, 32), np.uint8), **change}  # fmt: skip
    with pytest.raises(ValueError, match=message):
        model([image], [target])


def test_a_box_partly_outside_its_image_is_kept():
    """Only a box with no point on the image is refused: one that overhangs an edge trains."""
    init.manual_seed(0)
    model = MaskRCNN(tiny().replace(min_size=32, max_size=32))
    target = {"boxes": np.array([[-5.0, 20, 9, 40]]), "labels": np.array([1]),
              "masks": np.ones((1, 32, 32), np.uint8)}  # fmt: skip
    losses = model([np.zeros((3, 32, 32), np.float32)], [target])
    assert all(np.isfinite(float(v.item())) for v in losses.values())


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ([], r"no images"),
        ([np.full((3, 32, 32), 200, np.uint8)], r"image 0 is uint8: images are float RGB in "
                                                 r"\[0, 1\] \(divide 8-bit pixels by 255\)"),
        ([np.zeros((3, 32, 32), np.float32), np.full((3, 8, 8), 255.0, np.float32)],
         r"image 1 has values in \[255, 255\]: images are RGB in \[0, 1\]"),
        ([np.full((3, 8, 8), -2.1, np.float32)], r"image 0 has values in \[-2\.1, -2\.1\]"),
        ([np.full((3, 8, 8), np.nan, np.float32)], r"image 0 has values in \[nan, nan\]"),
        ([np.zeros((32, 32, 3), np.float32)], r"image 0 has shape \(32, 32, 3\)"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("training", [False, True])
def test_bad_images_are_refused_where_they_enter_the_model(images, message, training):
    init.manual_seed(0)
    model = MaskRCNN(tiny().replace(min_size=32, max_size=32))
    model.train(training)
    box = {"boxes": np.array([[1.0, 1, 5, 5]]), "labels": np.array([1])}
    targets = [{**box, "masks": np.ones((1, *np.shape(im)[-2:]), np.uint8)} for im in images]
    with pytest.raises(ValueError, match=message):
        model(images, targets if training else None)


# ---------------------------------------------------------------------------- end to end
def test_model_answers_in_the_input_images_pixels():
    """A model at 64 px, fed 96-px and 40×50 images: detections come back at the input sizes,
    and training targets given at the input size equal those the model sees after resizing."""
    init.manual_seed(0)
    model = MaskRCNN(tiny().replace(min_size=64, max_size=64, box_score_thresh=0.0))
    model.eval()
    big = make_sample(0, 0, ShapesConfig(image_size=96))["image"]
    odd = np.random.default_rng(0).random((3, 40, 50)).astype(np.float32)
    dets = detections_to_host(model([big, odd]))
    for det, (h, w) in zip(dets, [(96, 96), (40, 50)]):
        assert det["masks"].shape[1:] == (h, w) and det["masks"].dtype == np.uint8
        assert len(det["boxes"]) > 0
        assert (det["boxes"][:, [0, 2]] <= w + 1e-3).all()
        assert (det["boxes"][:, [1, 3]] <= h + 1e-3).all()
        assert "mask_logits" not in det
