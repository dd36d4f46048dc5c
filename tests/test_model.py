"""Mask R-CNN end to end: it learns, its gradients are right, and its outputs keep their schema."""

import numpy as np
import pytest

from minimask.backend import rng
from minimask.data.shapes import CLASSES, ShapesConfig, make_sample, shapes_batches
from minimask.model.checkpoint import build_model
from minimask.model.config import get_config, r50_fpn, tiny
from minimask.model.mask_head import project_masks
from minimask.model.mask_rcnn import MaskRCNN, detections_to_host
from minimask.model.transform import paste_masks
from minimask.nn import SGD, clip_grad_norm, init
from minimask.train import total_loss
from tests.helpers import requires_torchvision, torchvision

SMALL = ShapesConfig(image_size=64, min_size=12, max_size=28, max_shapes=3)
LOSS_NAMES = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}


def small_model(seed=0, **changes):
    """The tiny preset at 64-pixel images (a fast test model)."""
    init.manual_seed(seed)
    return MaskRCNN(tiny().replace(min_size=64, max_size=64, **changes))


def test_training_returns_the_five_named_losses_and_all_are_finite():
    model = small_model()
    samples = [make_sample(0, i, SMALL) for i in range(2)]
    losses = model([s["image"] for s in samples], samples)
    assert set(losses) == LOSS_NAMES
    for name, value in losses.items():
        assert value.shape == () and np.isfinite(value.item()), name
    total_loss(losses).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and np.isfinite(g).all() for g in grads)


def test_one_image_overfits_to_near_zero_loss():
    model = small_model(seed=1)
    sample = make_sample(3, 0, SMALL)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = SGD(params, lr=0.01, momentum=0.9)
    first = None
    for step in range(60):
        opt.set_lr(0.01 * min(1.0, (step + 1) / 10))  # a short warm-up, as the trainer's
        model.rng = rng(step)
        loss = total_loss(model([sample["image"]], [sample]))
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        clip_grad_norm(params, 10.0)
        opt.step()
    assert loss.item() < 0.15 * first, (first, loss.item())


def test_loss_falls_in_a_short_shapes_run():
    model = small_model(seed=2)
    get_batch = shapes_batches(0, 2, SMALL)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = SGD(params, lr=0.01, momentum=0.9)
    totals = []
    for i in range(40):
        opt.set_lr(0.01 * min(1.0, (i + 1) / 10))
        images, targets = get_batch(i)
        model.rng = rng(i)
        loss = total_loss(model(images, targets))
        totals.append(loss.item())
        opt.zero_grad()
        loss.backward()
        clip_grad_norm(params, 10.0)
        opt.step()
    assert np.mean(totals[-10:]) < 0.6 * np.mean(totals[:5]), totals


def test_inference_schema_with_and_without_detections():
    model = small_model()
    model.eval()
    images = [make_sample(0, i, SMALL)["image"] for i in range(2)]
    images.append(np.zeros((3, 50, 40), dtype=np.float32))  # another size: padding path
    dets = detections_to_host(model(images))
    assert len(dets) == 3
    for det, im in zip(dets, images):
        d = len(det["boxes"])
        assert det["boxes"].shape == (d, 4) and det["scores"].shape == (d,)
        assert det["labels"].shape == (d,) and det["masks"].shape == (d, *im.shape[1:])
        assert det["masks"].dtype == np.uint8 and set(np.unique(det["masks"])) <= {0, 1}
        assert d <= model.config.detections_per_image
        assert ((det["labels"] >= 1) & (det["labels"] < 4)).all()
        assert (det["boxes"][:, 2] <= im.shape[2]).all() and (
            det["boxes"][:, 3] <= im.shape[1]
        ).all()
        assert (np.diff(det["scores"]) <= 0).all()  # sorted by score
    # A threshold no score reaches gives empty, well-formed detections.
    model.roi_heads.config = model.config.replace(box_score_thresh=1.1)
    empty = detections_to_host(model(images[:1]))[0]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 64, 64)


def test_images_without_objects_train_as_all_background():
    model = small_model()
    sample = make_sample(0, 0, SMALL)
    empty = {
        "boxes": np.zeros((0, 4), np.float32),
        "labels": np.zeros(0, np.int64),
        "masks": np.zeros((0, 64, 64), np.uint8),
    }
    losses = model([sample["image"], np.zeros_like(sample["image"])], [sample, empty])
    assert all(np.isfinite(v.item()) for v in losses.values())
    only_empty = model([np.zeros_like(sample["image"])], [empty])
    assert only_empty["loss_mask"].item() == 0.0 and only_empty["loss_box_reg"].item() == 0.0


def test_training_mode_needs_targets_and_checks_image_shape():
    model = small_model()
    with pytest.raises(ValueError, match="targets"):
        model([np.zeros((3, 64, 64), np.float32)])
    model.eval()
    with pytest.raises(ValueError, match="RGB"):
        model([np.zeros((64, 64), np.float32)])


def test_finite_differences_on_parameters_of_the_whole_model():
    """d(total loss)/d(param) by backprop equals central differences, in float64."""
    model = small_model(seed=4).to(dtype=np.float64)
    samples = [make_sample(1, 0, SMALL)]
    images = [s["image"].astype(np.float64) for s in samples]

    # Proposals are detached (as in torchvision): backprop ignores how they move with the
    # weights, while finite differences would see it. Hold them fixed to compare like with like.
    compute_proposals, cache = model.rpn._proposals, []

    def fixed_proposals(*args):
        if not cache:
            cache.append(compute_proposals(*args))
        return cache[0]

    model.rpn._proposals = fixed_proposals

    def loss():
        model.rng = rng(0)  # the same sampled anchors and RoIs every time
        return total_loss(model(images, samples))

    model.zero_grad()
    loss().backward()
    probes = {
        "backbone stem": model.backbone.stem[0].weight,
        "fpn smooth": model.fpn.smooth[1].weight,
        "rpn objectness": model.rpn.head.cls_logits.weight,
        "rpn deltas": model.rpn.head.bbox_pred.bias,
        "box fc6": model.roi_heads.head.fc6.weight,
        "box classes": model.roi_heads.predictor.cls_score.bias,
        "mask conv": model.mask_head.convs[0].weight,
        "mask logits": model.mask_head.logits.bias,
    }
    generator = np.random.default_rng(0)
    eps = 1e-5
    for name, p in probes.items():
        for _ in range(2):
            flat = p.data.reshape(-1)
            i = int(generator.integers(flat.size))
            old = flat[i]
            flat[i] = old + eps
            up = loss().item()
            flat[i] = old - eps
            down = loss().item()
            flat[i] = old
            numeric = (up - down) / (2 * eps)
            analytic = p.grad.reshape(-1)[i]
            assert abs(analytic - numeric) <= 1e-5 + 1e-4 * abs(numeric), (name, analytic, numeric)


def test_project_masks_and_paste_masks_on_a_box_shaped_mask():
    masks = np.zeros((1, 40, 60), np.uint8)
    masks[0, 10:30, 20:50] = 1  # a 30x20 rectangle, box (20, 10, 50, 30)
    box = np.array([[20.0, 10.0, 50.0, 30.0]])
    target = project_masks(masks, box, np.array([0]), 28)
    # aligned=False (torchvision's choice) samples half a pixel off, so only the last row and
    # column straddle the mask's edge; everything else is inside the mask.
    assert target.shape == (1, 28, 28) and target[0, :-1, :-1].min() == 1.0
    pasted = paste_masks(np.ones((1, 28, 28), np.float32), box, (40, 60), threshold=0.5)
    # The paste rounds the zero-bordered box to whole pixels (as torchvision): within a pixel.
    inter, union = (pasted[0] & masks[0]).sum(), (pasted[0] | masks[0]).sum()
    assert inter / union > 0.9 and pasted[0, 12:28, 22:48].all() and not pasted[0, :8].any()


@pytest.mark.parametrize("threshold", [None, 0.5])
def test_paste_masks_in_the_boxes_equals_the_whole_image_products(threshold):
    # The CPU pastes only each box's pixels; the whole-image products (the GPU's way, and the
    # formula of the docstring) must give the same image, boxes across the edges included.
    from minimask.model.transform import expand_boxes_to_int, paste_weights

    g = np.random.default_rng(4)
    probs = g.random((7, 28, 28)).astype(np.float32)
    boxes = np.array(
        [[5, 5, 30, 20], [-10, -4, 12, 9], [40, 30, 75, 60], [70, 50, 90, 70], [0, 0, 0.4, 0.4],
         [-20, 10, 100, 12], [10, 2, 11, 47]], np.float32,
    )  # fmt: skip
    pasted = paste_masks(probs, boxes, (45, 64), threshold, chunk=3)
    box = expand_boxes_to_int(boxes, 28)
    wy = paste_weights(box[:, 1], box[:, 3], 30, 45, np)  # (D, H, 30)
    wx = paste_weights(box[:, 0], box[:, 2], 30, 64, np)  # (D, W, 30)
    whole = wy @ np.pad(probs, ((0, 0), (1, 1), (1, 1))) @ wx.transpose(0, 2, 1)  # (D, H, W)
    if threshold is None:
        np.testing.assert_allclose(pasted, whole, rtol=1e-6, atol=1e-6)
    else:
        assert pasted.dtype == np.uint8
        np.testing.assert_array_equal(pasted, whole >= threshold)
    assert not pasted[3].any()  # (70, 50, 90, 70) lies outside the 64x45 image


@requires_torchvision
def test_project_masks_matches_torchvision():
    import torch
    from torchvision.models.detection.roi_heads import project_masks_on_boxes

    generator = np.random.default_rng(0)
    masks = (generator.random((3, 30, 40)) > 0.5).astype(np.uint8)
    xy = generator.uniform(0, 25, (6, 2))
    boxes = np.concatenate([xy, xy + generator.uniform(2, 15, (6, 2))], axis=1)
    matches = generator.integers(0, 3, 6)
    ours = project_masks(masks, boxes, matches, 28)
    theirs = project_masks_on_boxes(
        torch.from_numpy(masks), torch.from_numpy(boxes), torch.from_numpy(matches), 28
    ).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)  # both float64


def test_presets_and_config_errors():
    assert get_config("tiny").fpn_channels == 64
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("r101")
    with pytest.raises(ValueError, match="block"):
        MaskRCNN(tiny().replace(block="dense"))


@requires_torchvision
def test_r50_fpn_matches_torchvision_layer_for_layer():
    """The r50_fpn preset has torchvision's maskrcnn_resnet50_fpn's layers, name for name through
    the key mapping (minimask/model/weights.py), with equal shapes, and the same frozen stages."""
    from torchvision.models import resnet50
    from torchvision.models.detection import MaskRCNN as TorchMaskRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d

    from minimask.model.weights import to_torchvision

    ours = MaskRCNN(r50_fpn())
    # maskrcnn_resnet50_fpn as built for pre-trained weights: frozen BN, 3 trainable stages.
    body = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    theirs = TorchMaskRCNN(_resnet_fpn_extractor(body, 3), num_classes=91)
    mapped = {k: tuple(v.shape) for k, v in to_torchvision(ours.state_dict()).items()
              if not k.endswith("num_batches_tracked")}  # fmt: skip
    assert mapped == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert not any(not p.requires_grad for p in ours.parameters())  # from scratch: all train
    ours.backbone.freeze(ours.config.trainable_stages)  # what loading pre-trained weights does
    our_frozen = sum(p.size for p in ours.parameters() if not p.requires_grad)
    theirs_frozen = sum(p.numel() for p in theirs.parameters() if not p.requires_grad)
    assert our_frozen == theirs_frozen  # stem and C2 frozen, as trainable_layers=3
    assert torchvision is not None


def test_mask_targets_take_the_logits_size():
    """A mask head pooling 7x7 predicts 14x14 masks; its targets are 14x14 too, not 28x28."""
    model = small_model(mask_pool_size=7)
    samples = [make_sample(0, i, SMALL) for i in range(2)]
    loss = model([s["image"] for s in samples], samples)["loss_mask"]
    assert np.isfinite(loss.item())
    model.eval()
    dets = detections_to_host(model([samples[0]["image"]]))
    assert dets[0]["masks"].shape[1:] == (64, 64)


def test_roi_align_aligned_is_a_config_field():
    default, shifted = small_model(), small_model(roi_align_aligned=True)
    assert not default.roi_heads.pooler.aligned and not default.mask_head.pooler.aligned
    assert shifted.roi_heads.pooler.aligned and shifted.mask_head.pooler.aligned
    assert shifted.roi_heads.pooler.canonical_scale == 224  # the other settings untouched


@pytest.mark.gpu
def test_model_runs_on_cupy_like_on_numpy():
    import cupy as cp

    sample = make_sample(0, 0, SMALL)
    cpu = small_model(seed=5)
    gpu = small_model(seed=5).to("gpu")
    cpu.rng, gpu.rng = rng(0), rng(0, cp)
    a = cpu([sample["image"]], [sample])
    b = gpu([sample["image"]], [{k: cp.asarray(v) if hasattr(v, "shape") else v
                                  for k, v in sample.items()}])  # fmt: skip
    assert set(a) == set(b)
    for k in a:  # the GPU draws its own sampling order, so compare magnitudes only
        assert np.isfinite(float(b[k].item()))
    cpu.eval(), gpu.eval()
    det = detections_to_host(gpu([sample["image"]]))[0]
    assert set(det) == {"boxes", "scores", "labels", "masks"}


def test_demo_builds_models_from_seed_deterministically():
    a, b = build_model("tiny", 3, num_classes=len(CLASSES)), build_model("tiny", 3, num_classes=4)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and np.array_equal(pa.data, pb.data)


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["tiny", "tiny_c4", "r50_fpn"])
def test_one_training_step_on_the_gpu_equals_the_cpu_in_float64(preset):
    """The issue's GPU check: the same weights and batch at a fixed seed give the same five
    losses and gradients on CuPy as on NumPy, within 1e-4 relative, in float64. The samplers
    keep every candidate (batches of 10**6), so the two devices' different random streams
    cannot choose different minibatches."""
    import cupy as cp

    from minimask.backend import to_host

    size = 128 if preset.startswith("tiny") else 320
    shapes = ShapesConfig(image_size=size, min_size=size // 8, max_size=size // 3, max_shapes=3)
    samples = [make_sample(1, i, shapes) for i in range(2)]
    everything = {"rpn_batch_per_image": 10**6, "box_batch_per_image": 10**6,
                  "min_size": size, "max_size": size, "num_classes": len(CLASSES)}  # fmt: skip
    if preset == "r50_fpn":
        everything.update(rpn_pre_nms_top_n_train=500, rpn_post_nms_top_n_train=200)
    cpu = build_model(preset, seed=7, **everything).to(dtype=np.float64)
    gpu = build_model(preset, seed=7, **everything).to("gpu", dtype=np.float64)
    grads = {}
    for model, xp in ((cpu, np), (gpu, cp)):
        model.rng = rng(0, xp)
        losses = model([s["image"] for s in samples], samples)
        total_loss(losses).backward()
        grads[xp] = ({k: float(v.item()) for k, v in losses.items()},
                     {n: to_host(p.grad) for n, p in model.named_parameters()
                      if p.grad is not None})  # fmt: skip
    (loss_cpu, grad_cpu), (loss_gpu, grad_gpu) = grads[np], grads[cp]
    for k in loss_cpu:
        assert loss_gpu[k] == pytest.approx(loss_cpu[k], rel=1e-4), k
    assert grad_cpu.keys() == grad_gpu.keys()
    for name, g in grad_cpu.items():
        scale = max(float(np.abs(g).max()), 1e-12)
        assert float(np.abs(grad_gpu[name] - g).max()) <= 1e-4 * scale, name
