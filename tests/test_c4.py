"""The C4 layout (Mask R-CNN Fig. 4 left), the ResNet-101 presets and the ablation switches.

Each head's output shapes at both layouts, the C4 anchors against torchvision's, a short tiny_c4
run that lowers every loss, ImageNet weights reaching res5 in the box head, the three module
groups of 4-step training, and every switch of Table 2: it builds, trains a step, and really
changes the op or layer it names.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from minimask.backend import rng
from minimask.data.shapes import CLASSES, ShapesConfig, make_sample, shapes_batches
from minimask.engine import Tensor
from minimask.model.c4 import Res5Head
from minimask.model.checkpoint import build_model, model_from_checkpoint, save_checkpoint
from minimask.model.config import PRESETS, get_config
from minimask.model.mask_head import MLPMaskHead, softmax_log_odds
from minimask.model.mask_rcnn import MaskRCNN, detections_to_host
from minimask.nn import SGD, clip_grad_norm, init
from minimask.ops import poolers
from minimask.ops.anchors import AnchorGenerator
from minimask.train import total_loss
from tests.helpers import requires_torchvision, torch

SMALL = ShapesConfig(image_size=64, min_size=12, max_size=28, max_shapes=3)
LOSSES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask")


def small_model(preset="tiny_c4", seed=0, **changes):
    """A tiny preset at 64-pixel images (a fast test model)."""
    init.manual_seed(seed)
    return MaskRCNN(get_config(preset, min_size=64, max_size=64, **changes))


def samples(n=2, seed=0):
    return [make_sample(seed, i, SMALL) for i in range(n)]


def fg_sampled(model, batch):
    """The seams of one training step: (features, sampled RoIs, box features, padded size)."""
    x, sizes, _, targets = model.preprocess([s["image"] for s in batch], batch)
    padded = tuple(x.shape[-2:])
    rpn_features, head_features = model.features(x)
    proposals, _ = model.rpn(rpn_features, sizes, padded, targets)
    sampled = model.roi_heads.sample_proposals(proposals, targets)
    boxes = [s[0] for s in sampled]
    return head_features, sampled, model.roi_heads.box_features(head_features, boxes, padded), x


# ---------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("preset", ["tiny", "tiny_c4"])
def test_every_head_has_the_layout_shapes_in_training_and_inference(preset):
    model = small_model(preset)
    c, k = model.config, len(CLASSES)
    batch = samples()
    x, sizes, _, targets = model.preprocess([s["image"] for s in batch], batch)
    padded = tuple(x.shape[-2:])  # (64, 64)
    rpn_features, head_features = model.features(x)
    if preset == "tiny_c4":  # one map, C4 at stride 16, for both
        assert [f.shape for f in rpn_features] == [(2, 64, 4, 4)]
        assert [f.shape for f in head_features] == [(2, 64, 4, 4)]
        anchors = 4 * 4 * len(c.anchor_sizes) * 3
    else:  # P2..P6 and P2..P5
        assert [f.shape[-1] for f in rpn_features] == [16, 8, 4, 2, 1]
        assert len(head_features) == 4
        anchors = (16**2 + 8**2 + 4**2 + 2**2 + 1) * 3
    logits, deltas = model.rpn.head(rpn_features)
    assert logits.shape == (2, anchors) and deltas.shape == (2, anchors, 4)
    proposals, rpn_losses = model.rpn(rpn_features, sizes, padded, targets)
    assert len(proposals) == 2 and all(p.shape[1] == 4 for p in proposals)
    assert set(rpn_losses) == {"loss_objectness", "loss_rpn_box_reg"}

    sampled = model.roi_heads.sample_proposals(proposals, targets)
    r = sum(len(s[0]) for s in sampled)
    feats = model.roi_heads.box_features(head_features, [s[0] for s in sampled], padded)
    if preset == "tiny_c4":  # res5's maps: 14x14 pooled, halved by its stride-2 first block
        assert feats.shape == (r, 128, 7, 7)
    else:
        assert feats.shape == (r, c.box_fc_dim)
    cls, box = model.roi_heads.predictor(feats)
    assert cls.shape == (r, k) and box.shape == (r, 4 * k)
    m = 14 if preset == "tiny_c4" else 28
    fg = [s[0][s[1] > 0] for s in sampled]
    assert model.mask_head(head_features, fg, padded).shape == (sum(map(len, fg)), k, m, m)
    losses = model.detector_losses(head_features, proposals, sizes, padded, targets)
    assert set(losses) == set(LOSSES[2:])

    model.eval()
    proposals, _ = model.rpn(rpn_features, sizes, padded)
    detections = model.detect(head_features, proposals, sizes, padded)
    for det in detections:
        d = len(det["boxes"])
        assert det["scores"].shape == (d,) and det["labels"].shape == (d,)
        assert det["mask_logits"].shape == (d, m, m)
    out = detections_to_host(model([s["image"] for s in batch]))
    assert all(o["masks"].shape[1:] == (64, 64) for o in out)


@pytest.mark.parametrize("preset", ["tiny", "tiny_c4"])
def test_a_model_that_detects_nothing_returns_empty_detections(preset):
    """No detection above the threshold: the C4 mask branch runs res5 on zero RoIs."""
    model = small_model(preset, box_score_thresh=1.0)
    model.eval()
    out = detections_to_host(model([s["image"] for s in samples()]))
    for det in out:
        assert det["boxes"].shape == (0, 4) and det["masks"].shape == (0, 64, 64)


def test_the_c5_layout_runs_rpn_and_heads_on_c5_at_stride_32():
    """Table 2d's ablation: one stride-32 map for the RPN and the FPN layout's two heads."""
    model = small_model("tiny", layout="c5", anchor_sizes=(16, 32, 64))
    batch = samples()
    x, sizes, _, targets = model.preprocess([s["image"] for s in batch], batch)
    padded = tuple(x.shape[-2:])  # (64, 64)
    rpn_features, head_features = model.features(x)
    assert [f.shape for f in rpn_features] == [(2, 128, 2, 2)] == [f.shape for f in head_features]
    logits, _ = model.rpn.head(rpn_features)
    assert logits.shape == (2, 2 * 2 * 3 * 3)
    proposals, _ = model.rpn(rpn_features, sizes, padded, targets)
    losses = model.detector_losses(head_features, proposals, sizes, padded, targets)
    assert set(losses) == set(LOSSES[2:]) and all(np.isfinite(v.item()) for v in losses.values())
    assert model.mask_head.pooler.scales(head_features, [padded]) == [1 / 32]
    assert [type(m).__name__ for m in model.shared_modules()] == ["ResNet"]
    model.eval()
    out = detections_to_host(model([s["image"] for s in batch]))
    assert all(o["masks"].shape[1:] == (64, 64) for o in out)


@pytest.mark.parametrize("preset", ["tiny", "tiny_c4"])
def test_the_module_groups_of_alternating_training_cover_the_model_once(preset):
    model = small_model(preset)
    groups = [model.shared_modules(), model.rpn_modules(), model.detector_modules()]
    ids = [id(p) for group in groups for m in group for p in m.parameters()]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    shared = {id(p) for m in model.shared_modules() for p in m.parameters()}
    res5 = {id(p) for p in model.roi_heads.head.parameters()}
    if preset == "tiny_c4":  # res5 is the box head, a detector part, not shared
        assert isinstance(model.roi_heads.head, Res5Head) and not res5 & shared
        assert model.shared_modules() == [model.backbone] and len(model.backbone.stages) == 3
    else:
        assert model.shared_modules() == [model.backbone, model.fpn]


def test_training_reuses_res5_for_the_masks_and_inference_recomputes_it():
    """The mask branch's loss from the box head's res5 maps equals the one from pooling the
    foreground RoIs again (what inference does), so reusing them changes nothing but time."""
    model = small_model(seed=3).to(dtype=np.float64)
    batch = samples(seed=1)
    features, sampled, box_features, x = fg_sampled(model, batch)
    padded = tuple(x.shape[-2:])
    _, _, _, targets = model.preprocess([s["image"] for s in batch], batch)
    assert sum(int((s[1] > 0).sum()) for s in sampled) > 0
    reused = model.mask_head.loss(features, sampled, targets, padded, box_features).item()
    again = model.mask_head.loss(features, sampled, targets, padded).item()
    assert reused == pytest.approx(again, rel=1e-10)


# ---------------------------------------------------------------------------- anchors
@requires_torchvision
@pytest.mark.parametrize("image, grid", [((64, 64), (4, 4)), ((800, 1216), (50, 76))])
def test_c4_anchors_equal_torchvisions_single_level_generator(image, grid):
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchAnchors
    from torchvision.models.detection.image_list import ImageList

    sizes = (32, 64, 128, 256, 512)
    ours = AnchorGenerator.c4(sizes)(image, [grid])
    theirs = TorchAnchors((sizes,), ((0.5, 1.0, 2.0),))
    images = ImageList(torch.zeros(1, 3, *image), [image])
    expected = theirs(images, [torch.zeros(1, 8, *grid)])[0].numpy()
    assert ours.shape == (grid[0] * grid[1] * 15, 4)
    np.testing.assert_array_equal(ours, expected)


# ---------------------------------------------------------------------------- training
def test_a_short_tiny_c4_run_lowers_every_loss(seed=2):
    """tiny_c4 on one batch of two 128-pixel shapes images, 80 SGD steps: each of the five
    losses ends (mean of the last 10 steps) below where it began (mean of the first 5).

    A box minibatch of 8 RoIs (2 foreground at most, which the GT boxes, always proposals, fill
    from the first step) keeps the box losses' foreground count steady: with the preset's 64,
    a better RPN brings more foreground RoIs, and the box losses, summed over them, rise.
    """
    start = time.perf_counter()
    init.manual_seed(seed)
    model = MaskRCNN(get_config("tiny_c4", box_batch_per_image=8))
    images, targets = shapes_batches(0, 2)(0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = SGD(params, lr=0.02, momentum=0.9)
    history = {name: [] for name in LOSSES}
    for i in range(80):
        opt.set_lr(0.02 * min(1.0, (i + 1) / 10))
        model.rng = rng(i)
        losses = model(images, targets)
        for name in LOSSES:
            history[name].append(losses[name].item())
        opt.zero_grad()
        total_loss(losses).backward()
        clip_grad_norm(params, 10.0)
        opt.step()
    for name, values in history.items():
        assert np.mean(values[-10:]) < np.mean(values[:5]), (name, np.round(values, 3))
    assert time.perf_counter() - start < 60


def test_a_c4_model_does_not_export_to_torchvision_names(tmp_path):
    from minimask.model.weights import WeightsError, export_weights

    with pytest.raises(WeightsError, match="no torchvision counterpart"):
        export_weights(small_model(), tmp_path / "c4.pth")
    assert not (tmp_path / "c4.pth").exists()


def test_a_c4_checkpoint_rebuilds_its_model(tmp_path):
    model = small_model()
    meta = {"model_config": dict(vars(model.config)), "classes": list(CLASSES)}
    save_checkpoint(str(tmp_path / "c.npz"), model, None, 0, meta)
    again, _ = model_from_checkpoint(str(tmp_path / "c.npz"))
    assert again.config.layout == "c4"
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_a_checkpoint_from_before_the_switches_still_loads(tmp_path):
    """A checkpoint whose stored config predates the ablation and keypoint fields (as the
    lessons' tiny_shapes.npz) rebuilds the same model: every new field defaults to the old one."""
    model = small_model("tiny")
    old = dict(vars(model.config))
    for name in ("layout", "pooler", "mask_head", "mask_deconv_channels", "mask_mlp_dim",
                 "mask_class_agnostic", "mask_loss", "num_keypoints", "keypoint_pool_size",
                 "keypoint_conv_channels"):  # fmt: skip
        old.pop(name)
    save_checkpoint(str(tmp_path / "old.npz"), model, None, 0, {"model_config": old})
    again, _ = model_from_checkpoint(str(tmp_path / "old.npz"))
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        np.testing.assert_array_equal(a, b, err_msg=name)


# ---------------------------------------------------------------------------- presets
def test_presets_build_their_layouts():
    assert {"tiny", "tiny_c4", "r50_fpn", "r101_fpn", "r50_c4", "r101_c4"} <= set(PRESETS)
    assert (
        get_config("r101_c4").stage_blocks == (3, 4, 23, 3) == get_config("r101_fpn").stage_blocks
    )
    assert get_config("r50_c4").layout == "c4" and get_config("r101_fpn").layout == "fpn"


def _resnet_shapes(state: dict) -> dict:
    """{torchvision resnet name: shape} of a C4 or FPN model's ResNet (its res5 as layer4)."""
    from minimask.model.weights import to_torchvision

    resnet = {
        k.replace("roi_heads.head.res5.", "backbone.stages.3."): v
        for k, v in state.items()
        if k.startswith(("backbone.", "roi_heads.head.res5."))
    }
    return {
        k.removeprefix("backbone.body."): tuple(v.shape)
        for k, v in to_torchvision(resnet).items()
        if not k.endswith("num_batches_tracked")
    }


@requires_torchvision
@pytest.mark.slow
@pytest.mark.parametrize("preset", ["r101_fpn", "r101_c4"])
def test_r101_presets_hold_torchvisions_resnet101(preset):
    """The trunk (with C4's res5 in the box head) has resnet101's layers and parameter count."""
    from torchvision.models import resnet101

    model = MaskRCNN(get_config(preset))
    theirs = resnet101(weights=None)
    expected = {k: tuple(v.shape) for k, v in theirs.state_dict().items()
                if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}  # fmt: skip
    assert _resnet_shapes(model.state_dict()) == expected
    # FrozenBatchNorm2d holds its affine as buffers: count the trunk's weights the same way
    ours = sum(int(np.prod(s)) for k, s in expected.items() if "running" not in k)
    theirs_count = sum(p.numel() for n, p in theirs.named_parameters() if not n.startswith("fc."))
    assert ours == theirs_count == 42_500_160


# ---------------------------------------------------------------------------- weights
@requires_torchvision
@pytest.mark.slow
def test_imagenet_resnet50_weights_load_into_c4_including_res5(tmp_path):
    from torchvision.models import resnet50

    torch.manual_seed(0)
    body = resnet50(weights=None)
    for name, buffer in body.named_buffers():  # random statistics too: no two layers alike
        if name.endswith(("running_mean", "running_var")):
            buffer.copy_(torch.rand_like(buffer) + 0.5)
    state = {k: v.numpy() for k, v in body.state_dict().items()}
    torch.save(body.state_dict(), tmp_path / "resnet50.pth")
    model = build_model("r50_c4", seed=0, backbone_weights=str(tmp_path / "resnet50.pth"),
                        log=lambda _: None)  # fmt: skip
    ours = model.state_dict()
    pairs = {
        "backbone.stem.0.weight": "conv1.weight",
        "backbone.stages.2.5.conv3.1.running_var": "layer3.5.bn3.running_var",
        "roi_heads.head.res5.0.conv2.0.weight": "layer4.0.conv2.weight",
        "roi_heads.head.res5.0.downsample.1.bias": "layer4.0.downsample.1.bias",
        "roi_heads.head.res5.2.conv3.1.running_mean": "layer4.2.bn3.running_mean",
    }
    for mine, theirs in pairs.items():
        np.testing.assert_array_equal(ours[mine], state[theirs], err_msg=mine)
    assert not any(k.startswith("backbone.stages.3") for k in ours)  # C5 lives in the box head
    # trainable_stages=3: C5 (res5), C4 and C3 train; C2 and the stem stay frozen
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("backbone.stem", "backbone.stages.0")) for n in frozen)
    assert all(p.requires_grad for p in model.roi_heads.head.parameters())
    model.freeze_backbone(0)
    assert not any(p.requires_grad for p in model.roi_heads.head.parameters())
    assert all(p.requires_grad for p in model.roi_heads.predictor.parameters())


# ---------------------------------------------------------------------------- the switches
SWITCHES = [
    {},
    {"pooler": "roi_pool"},
    {"roi_align_aligned": True},
    {"mask_class_agnostic": True},
    {"mask_loss": "softmax"},
    {"mask_head": "mlp"},
]


@pytest.mark.parametrize("preset", ["tiny", "tiny_c4"])
@pytest.mark.parametrize(
    "switch", SWITCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items())
)
def test_each_switch_trains_a_step_and_predicts(preset, switch):
    if preset == "tiny_c4" and switch.get("mask_head") == "mlp":
        with pytest.raises(ValueError, match="FPN layout"):
            small_model(preset, **switch)
        return
    model = small_model(preset, seed=4, **switch)
    batch = samples()
    losses = model([s["image"] for s in batch], batch)
    assert set(losses) == set(LOSSES)
    total_loss(losses).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and np.isfinite(p.grad).all(), name
    assert np.abs(model.mask_head.logits.weight.grad).sum() > 0  # the mask loss reached it
    model.eval()
    det = detections_to_host(model([batch[0]["image"]]))[0]
    assert det["masks"].shape[1:] == (64, 64) and det["masks"].dtype == np.uint8


@pytest.mark.parametrize("preset", ["tiny", "tiny_c4"])
@pytest.mark.parametrize("op", ["roi_align", "roi_pool"])
def test_the_pooler_switch_changes_the_op_of_every_pooler(preset, op, monkeypatch):
    calls = {"roi_align": 0, "roi_pool": 0}
    for name, (forward, backward) in list(poolers.POOL_OPS.items()):

        def counting(*args, _forward=forward, _name=name):
            calls[_name] += 1
            return _forward(*args)

        monkeypatch.setitem(poolers.POOL_OPS, name, (counting, backward))
    model = small_model(preset, pooler=op)
    for pooler in (model.roi_heads.pooler, model.mask_head.pooler):
        assert pooler is None or pooler.op == op  # C4's mask head pools through the box head
    batch = samples()
    total_loss(model([s["image"] for s in batch], batch)).backward()
    assert calls[op] > 0 and calls[{"roi_align": "roi_pool", "roi_pool": "roi_align"}[op]] == 0


def test_roi_pool_and_roi_align_pool_differently():
    features = [Tensor(np.random.default_rng(0).standard_normal((1, 2, 8, 8)))]
    boxes = [np.array([[3.3, 2.6, 40.1, 33.7]])]
    align = poolers.MultiScaleRoIAlign(4, 2)(features, boxes, [(64, 64)])
    pool = poolers.MultiScaleRoIAlign(4, 2, op="roi_pool")(features, boxes, [(64, 64)])
    from minimask.ops.roi_pool import roi_pool

    rois = np.array([[0, 3.3, 2.6, 40.1, 33.7]])
    np.testing.assert_array_equal(pool.data, roi_pool(features[0], rois, 4, 1 / 8).data)
    assert not np.allclose(align.data, pool.data)
    with pytest.raises(ValueError, match="roi_pool"):
        poolers.MultiScaleRoIAlign(4, 2, op="roi_warp")


@pytest.mark.parametrize("preset", ["tiny", "tiny_c4"])
def test_aligned_reaches_every_roi_align_of_the_model(preset, monkeypatch):
    seen = []
    forward, backward = poolers.POOL_OPS["roi_align"]

    def spy(features, rois, size, scale, ratio, aligned):
        seen.append((size, aligned))
        return forward(features, rois, size, scale, ratio, aligned)

    monkeypatch.setitem(poolers.POOL_OPS, "roi_align", (spy, backward))
    model = small_model(preset, roi_align_aligned=True)
    batch = samples()
    model([s["image"] for s in batch], batch)
    model.eval()
    model([batch[0]["image"]])
    sizes = {size for size, _ in seen}
    assert sizes == ({(14, 14)} if preset == "tiny_c4" else {(7, 7), (14, 14)})
    assert all(aligned for _, aligned in seen)


def test_class_agnostic_masks_have_one_channel_and_train_it():
    model = small_model("tiny", mask_class_agnostic=True)
    assert model.mask_head.logits.weight.shape[0] == 1
    features, sampled, _, x = fg_sampled(model, samples())
    fg = [s[0][s[1] > 0] for s in sampled]
    logits = model.mask_head(features, fg, tuple(x.shape[-2:]))
    assert logits.shape == (sum(map(len, fg)), 1, 28, 28)


def test_the_mlp_mask_head_is_table_2e():
    """fc 1024, fc 1024, fc K·28² on the flattened 14×14 pooled features (r50_fpn's sizes)."""
    config = get_config("r50_fpn", mask_head="mlp", num_classes=3)
    init.manual_seed(0)
    head = MLPMaskHead(config, 8)  # 8 channels and 3 classes keep it small
    assert head.fc1.weight.shape == (1024, 8 * 14 * 14)  # (out, in)
    assert head.fc2.weight.shape == (1024, 1024)
    assert head.logits.weight.shape == (3 * 28 * 28, 1024)
    out = head.layers(Tensor(np.random.default_rng(0).standard_normal((3, 8, 14, 14))))
    assert out.shape == (3, 3, 28, 28)


def test_softmax_masks_paste_the_softmax_probability_of_the_class():
    logits = np.random.default_rng(0).standard_normal((2, 4, 3, 3)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    log_odds = softmax_log_odds(logits)
    np.testing.assert_allclose(1 / (1 + np.exp(-log_odds)), probs, rtol=1e-12)
    big = np.array([[[[800.0]], [[-800.0]]]])  # no overflow at extreme logits
    assert np.isfinite(softmax_log_odds(big)).all()


def test_config_refuses_bad_switch_values():
    for field, value in [("layout", "c3"), ("pooler", "roi_warp"), ("mask_head", "cnn"),
                         ("mask_loss", "hinge")]:  # fmt: skip
        with pytest.raises(ValueError, match=f"config {field}='{value}'; use one of"):
            get_config("tiny", **{field: value})
    with pytest.raises(ValueError, match="class-specific"):
        get_config("tiny", mask_loss="softmax", mask_class_agnostic=True)


# ---------------------------------------------------------------------------- the CLI
def test_cli_set_parses_fields_by_type_and_refuses_unknown_ones(capsys):
    from minimask.cli import UsageError, config_changes, main

    settings = ["pooler=roi_pool", "mask_class_agnostic=true", "box_pool_size=5",
                "rpn_nms_iou=0.6", "anchor_sizes=16,32", "mask_conv_channels="]  # fmt: skip
    assert config_changes(settings) == {
        "pooler": "roi_pool",
        "mask_class_agnostic": True,
        "box_pool_size": 5,
        "rpn_nms_iou": 0.6,
        "anchor_sizes": (16, 32),
        "mask_conv_channels": (),
    }
    for bad, message in [("colour=red", "unknown config field 'colour'"),
                         ("box_pool_size=big", "box_pool_size takes a int"),
                         ("pooler", "write FIELD=VALUE")]:  # fmt: skip
        with pytest.raises(UsageError, match=message):
            config_changes([bad])
    for setting, message in [("colour=red", "unknown config field"),
                             ("pooler=roi_warp", "use one of roi_align, roi_pool")]:  # fmt: skip
        capsys.readouterr()
        try:
            status = main(["train", "--preset", "tiny_c4", "--set", setting])
        except SystemExit as e:  # how main ends a user error
            status = e.code
        err = capsys.readouterr().err.strip()
        assert status == 2 and len(err.splitlines()) == 1 and message in err, err
