"""The GPU path, checked on every run without a GPU: minimask on the CPU stand-in for CuPy.

:mod:`minimask.testing.strict` gives "device arrays" that refuse any implicit conversion to a
NumPy array and any NumPy array mixed into their ops, as CuPy's do, and count every sync with the
host. Each test runs a part of minimask on them and checks three things:

1. nothing leaks: no implicit conversion is attempted (a TypeError would fail the test, and the
   log's ``refused`` count must stay 0 even if some code caught the error);
2. the results stay on the device (StrictArrays, never host arrays) and equal the NumPy results;
3. for the model, the syncs of one training step and one inference stay within the recorded
   numbers (their breakdown is in the docstrings of those tests).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from minimask import train
from minimask.backend import device_of, get_array_module, rng, to_device, to_host
from minimask.data.shapes import ShapesConfig, make_sample
from minimask.engine import Tensor, concatenate, maximum, minimum, pad, stack, where
from minimask.model.config import tiny
from minimask.model.mask_rcnn import MaskRCNN
from minimask.model.transform import paste_masks
from minimask.nn import (
    SGD,
    AdamW,
    FrozenBatchNorm2d,
    GroupNorm,
    Parameter,
    clip_grad_norm,
    conv2d,
    conv_transpose2d,
    init,
    max_pool2d,
    upsample_nearest,
)
from minimask.ops import losses
from minimask.ops.anchors import AnchorGenerator
from minimask.ops.box_coder import BOX_HEAD_WEIGHTS, BoxCoder
from minimask.ops.boxes import (
    box_ioa,
    box_iou,
    check_boxes,
    clip_boxes_to_image,
    remove_small_boxes,
)
from minimask.ops.matcher import Matcher
from minimask.ops.nms import batched_nms, nms
from minimask.ops.poolers import MultiScaleRoIAlign
from minimask.ops.roi_align import roi_align
from minimask.ops.roi_pool import roi_pool
from minimask.ops.sampler import BalancedPositiveNegativeSampler
from minimask.testing import strict
from minimask.testing.strict import StrictArray
from minimask.train import total_loss

xp = strict.xp


# ---------------------------------------------------------------------------- the harness
def on_device(tree):
    """Every NumPy array in a tree of dicts, lists and tuples, uploaded to the stand-in."""
    if isinstance(tree, np.ndarray):
        return strict.asarray(tree)
    if isinstance(tree, dict):
        return {k: on_device(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(on_device(v) for v in tree)
    return tree


def leaves(tree):
    """The arrays of a result tree (Tensors as their data)."""
    if isinstance(tree, Tensor):
        tree = tree.data
    if isinstance(tree, dict):
        return [leaf for v in tree.values() for leaf in leaves(v)]
    if isinstance(tree, (list, tuple)):
        return [leaf for v in tree for leaf in leaves(v)]
    return [tree] if hasattr(tree, "shape") else []


def same_on_both(fn, *args, rtol=1e-6, atol=1e-6):
    """``fn(*args)`` on NumPy, then on the stand-in: no implicit conversion, every array of the
    result on the device and equal to NumPy's. Returns the stand-in run's log."""
    expected = leaves(fn(*args))
    with strict.counting() as log:
        got = leaves(fn(*on_device(args)))
    assert log.refused == 0, log.summary()
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert isinstance(g, StrictArray), f"a result left the device: {type(g).__name__}"
        g = g.get()
        assert g.dtype == e.dtype and g.shape == e.shape
        np.testing.assert_allclose(g, e, rtol=rtol, atol=atol)
    return log


def forward_backward(fn, *arrays, seed=0):
    """``out = fn(*inputs)`` and the gradients of ``sum(out * w)`` for a fixed random ``w``.

    Float arrays become Tensors that require grad; other arrays (indices) are passed as they are.
    Returns ``(out, [gradient of each float input])``.
    """
    inputs = [Tensor(a, requires_grad=True) if a.dtype.kind == "f" else a for a in arrays]
    out = fn(*inputs)
    w = np.random.default_rng(seed).standard_normal(out.shape).astype(out.dtype)
    out.backward(out.xp.asarray(w))
    return out, [t.grad for t in inputs if isinstance(t, Tensor)]


def random(*shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def boxes_in(n, size=64.0, seed=0):
    """(n, 4) valid float32 boxes inside a ``size`` square."""
    r = np.random.default_rng(seed)
    xy = r.uniform(0, size * 0.7, (n, 2))
    wh = r.uniform(2, size * 0.3, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


# ---------------------------------------------------------------------------- the stand-in
def test_implicit_conversions_are_refused_and_counted():
    x = strict.asarray(np.arange(6.0).reshape(2, 3))
    with strict.counting() as log:
        for convert in (np.asarray, np.array, np.ascontiguousarray, lambda a: a.__array__()):
            with pytest.raises(TypeError, match="Implicit conversion to a NumPy array"):
                convert(x)
    assert log.refused == 4


@pytest.mark.parametrize(
    "leak",
    [
        lambda x: x + np.ones(3),  # a host operand
        lambda x: np.ones(3) * x,  # ... on either side
        lambda x: x[np.array([0, 1])],  # a host index array
        lambda x: x.__setitem__(0, np.zeros(3)),  # a host value assigned
        lambda x: xp.concatenate([x, np.zeros((1, 3))]),  # a host argument
        lambda x: xp.maximum(x, 0, out=np.zeros((2, 3))),  # a host output
    ],
)
def test_host_arrays_mixed_into_device_ops_are_refused(leak):
    x = strict.asarray(np.arange(6.0).reshape(2, 3))
    with pytest.raises(TypeError, match="mixed with device arrays"):
        leak(x)


def test_syncs_and_uploads_are_counted_with_their_line():
    with strict.counting() as log:
        x = strict.asarray(np.arange(6.0))  # upload
        total = x.sum()
        assert isinstance(total, StrictArray) and total.shape == ()  # a 0-d device array
        assert float(total) == 15.0 and int(x.argmax()) == 5 and bool((x > 4).any())  # 3 scalar
        assert x[x > 2].shape == (3,)  # boolean mask: the size is read on the host
        assert xp.flatnonzero(x > 2).shape == (3,)
        assert xp.bincount(xp.arange(3), minlength=5).shape == (5,)  # CuPy syncs twice
        assert to_host(x).tolist() == x.get().tolist()  # two explicit downloads
    assert log.by_kind() == {"upload": 1, "scalar": 3, "size": 4, "get": 2}
    assert log.syncs == 9 and log.refused == 0
    assert all("test_strict_device.py" in e.where for e in log.events)
    assert "syncs 9" in log.summary()


def test_backend_knows_the_stand_in():
    host = np.arange(4, dtype=np.float32)
    x = to_device(host, "strict")
    assert isinstance(x, StrictArray) and get_array_module(x) is xp
    assert device_of(x) == "strict" and device_of(host) == "cpu"
    host[0] = 9  # an upload is a copy
    assert x.get()[0] == 0
    back = to_host(x)
    assert isinstance(back, np.ndarray) and back.tolist() == [0, 1, 2, 3]
    assert to_device(x, "cpu").tolist() == [0, 1, 2, 3]
    assert xp.float32 is np.float32 and xp.ndarray is StrictArray  # dtypes are NumPy's, as CuPy
    assert isinstance(Tensor(x).data, StrictArray) and Tensor(x).xp is xp


def test_sorts_are_stable_as_on_cupy():
    keys = strict.asarray(np.array([1, 0, 1, 0, 1, 0] * 20))
    order = xp.argsort(keys).get()
    np.testing.assert_array_equal(order, np.argsort(keys.get(), kind="stable"))
    with pytest.raises(ValueError, match="kind can only be None or 'stable'"):
        xp.argsort(keys, kind="quicksort")  # CuPy refuses it


def test_the_generator_draws_numpys_stream_on_the_device():
    a = rng(3).random(5)
    b = rng(3, xp).random(5)
    assert isinstance(b, StrictArray)
    np.testing.assert_array_equal(a, b.get())


# ---------------------------------------------------------------------------- engine ops
ENGINE_OPS = {
    "add_broadcast": lambda a, b, i: a + b,
    "sub_mul_div": lambda a, b, i: (a - b) * a / (b * b + 1.0),
    "pow": lambda a, b, i: a**3 - b**2,
    "maximum_minimum": lambda a, b, i: maximum(a, b) + minimum(a, 0.25),
    "where": lambda a, b, i: where(a.data > b.data, a, b),
    "matmul": lambda a, b, i: a @ b.reshape(4, 1),
    "unary": lambda a, b, i: (
        a.exp()
        + (a * a + 1.0).log()
        + (a * a + 1.0).sqrt()
        + a.abs()
        + a.relu()
        + a.sigmoid()
        + a.tanh()
        - a
    ),
    "clip_cast": lambda a, b, i: a.clip(-0.5, 0.5) + a.astype(np.float64).astype(np.float32),
    "reductions": lambda a, b, i: a.sum(axis=0) + a.mean(axis=0) + a.max(axis=0) + a.max(),
    "movement": lambda a, b, i: a.reshape(2, 6).T.reshape(4, 3).permute(1, 0) + a.transpose(0, 1).T,
    "basic_index": lambda a, b, i: a[1:, ::2] * 2.0,
    "array_index": lambda a, b, i: a[i] + a[i, i % 4].reshape(-1, 1),  # repeats: scatter-add
    "mask_index": lambda a, b, i: a[a.data > 0] * 3.0,
    "join": lambda a, b, i: (
        concatenate([a, b.reshape(1, 4)]).sum(axis=1)
        + stack([a, a * 2.0], axis=1).sum(axis=(1, 2)).sum()
    ),
    "pad": lambda a, b, i: pad(a, ((1, 0), (0, 2)), value=0.5),
}


@pytest.mark.parametrize("name", sorted(ENGINE_OPS))
def test_engine_ops(name):
    a, b = random(3, 4), random(4, seed=1)
    index = np.array([2, 0, 2, 1])  # repeats, so the backward must add duplicates

    def run(a, b, i):
        return forward_backward(ENGINE_OPS[name], a, b, i)

    log = same_on_both(run, a, b, index)
    # One op, forward and backward: only a boolean mask reads a size on the host.
    assert log.syncs == (1 if name == "mask_index" else 0), log.summary()


# ---------------------------------------------------------------------------- layers
CONVS = {
    "3x3": dict(padding=1),
    "3x3_stride2": dict(stride=2, padding=1),
    "dilated": dict(padding=2, dilation=2),
    "1x1_stride2": dict(stride=2),
    "7x7_stem": dict(stride=2, padding=3),
}


@pytest.mark.parametrize("name", sorted(CONVS))
def test_conv2d(name):
    k = 7 if name == "7x7_stem" else 1 if name.startswith("1x1") else 3
    x, w, b = random(2, 3, 9, 8), random(4, 3, k, k, seed=1), random(4, seed=2)

    def run(x, w, b):
        return forward_backward(lambda *t: conv2d(*t, **CONVS[name]), x, w, b)

    assert same_on_both(run, x, w, b, rtol=1e-5, atol=1e-5).syncs == 0


@pytest.mark.parametrize("options", [dict(stride=2), dict(stride=2, padding=1, output_padding=1)])
def test_conv_transpose2d(options):
    x, w, b = random(2, 4, 5, 6), random(4, 3, 2, 2, seed=1), random(3, seed=2)
    if "padding" in options:
        w = random(4, 3, 3, 3, seed=1)

    def run(x, w, b):
        return forward_backward(lambda *t: conv_transpose2d(*t, **options), x, w, b)

    assert same_on_both(run, x, w, b, rtol=1e-5, atol=1e-5).syncs == 0


@pytest.mark.parametrize(
    "pool",
    [
        lambda t: max_pool2d(t, 3, stride=2, padding=1),  # ResNet's stem
        lambda t: max_pool2d(t, 1, stride=2),  # FPN's P6
        lambda t: upsample_nearest(t, size=(13, 11)),  # FPN's top-down path, odd sizes
        lambda t: upsample_nearest(t, scale_factor=2),
        lambda t: upsample_nearest(t, size=(4, 3)),  # down: some pixels are never copied
    ],
)
def test_pooling(pool):
    x = random(2, 3, 7, 6)
    log = same_on_both(lambda x: forward_backward(pool, x), x)
    assert log.syncs == 0 and log.uploads <= 2, log.summary()  # the inputs only: index maps
    # are made on the device


@pytest.mark.parametrize("module", ["group_norm", "frozen_bn"])
def test_normalisation_layers(module):
    def run(x):
        init.manual_seed(0)
        layer = GroupNorm(2, 4) if module == "group_norm" else FrozenBatchNorm2d(4)
        for _, t in [*layer.named_parameters(), *layer.named_buffers()]:
            init.uniform_(t, 0.5, 1.5)
        if get_array_module(x) is xp:
            layer.to("strict")
        return forward_backward(layer, x)[0], [p.grad for p in layer.parameters()]

    assert same_on_both(run, random(2, 4, 5, 3), rtol=1e-5, atol=1e-5).syncs == 0


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2),
        lambda ps: SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
        lambda ps: AdamW(ps, lr=0.01, weight_decay=0.1),
    ],
)
def test_optimizers_and_gradient_clipping(make):
    start = [random(3, 2), random(4, seed=1)]
    grads = [[random(3, 2, seed=10 + s), random(4, seed=20 + s)] for s in range(3)]

    def run(start, grads):
        params = [Parameter(a.copy()) for a in start]
        opt, norms = make(params), []
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g * 1.0  # a fresh array: clipping scales it in place
            norms.append(clip_grad_norm(params, 1.0))
            opt.step()
        assert all(isinstance(n, float) for n in norms)  # the one explicit read per step
        state = opt.state_dict()  # host copies, for a checkpoint
        opt.load_state_dict(state)  # back onto the parameters' device
        assert all(device_of(v) == device_of(params[0].data) for v in _state_arrays(opt))
        return params

    log = same_on_both(run, start, grads)
    assert log.count("scalar") == 3, log.summary()  # clip_grad_norm's float(norm), per step


def _state_arrays(opt):
    return [v for s in opt.state.values() for v in s.values() if hasattr(v, "shape")]


# ---------------------------------------------------------------------------- box ops
def test_box_ops_coder_and_anchors():
    gt, anchors = boxes_in(5, seed=1), boxes_in(40, seed=2)

    def run(gt, anchors, matched):
        coder = BoxCoder(BOX_HEAD_WEIGHTS)
        deltas = coder.encode(gt[matched], anchors)
        check_boxes(gt)
        with_empty = anchors.copy()
        with_empty[3, 2:] = with_empty[3, :2]  # an empty box: IoU 0, not NaN
        grid = AnchorGenerator.fpn((8, 16))(
            (64, 64), [(16, 16), (8, 8)], xp=get_array_module(gt), dtype=np.float32
        )
        return (
            box_iou(gt, with_empty),
            box_ioa(gt, anchors),
            clip_boxes_to_image(anchors * 1.5 - 10, (50, 60)),
            remove_small_boxes(anchors, 8.0),
            deltas,
            coder.decode(deltas, anchors),
            grid,
        )

    log = same_on_both(run, gt, anchors, np.arange(40) % 5, rtol=1e-5, atol=1e-4)
    # check_boxes: three "any bad row?" tests; remove_small_boxes: a data-dependent count.
    assert log.by_kind()["scalar"] == 3 and log.by_kind()["size"] == 1, log.summary()


@pytest.mark.parametrize("crowd", [False, True])
def test_matcher_and_sampler(crowd):
    gt, anchors = boxes_in(6, seed=3), boxes_in(300, seed=4)
    is_crowd = np.array([0, 0, 1, 0, 0, 0], dtype=bool) if crowd else np.zeros(6, dtype=bool)

    def run(gt, anchors, is_crowd):
        device = get_array_module(gt)
        matcher = Matcher(0.5, 0.3, allow_low_quality_matches=True)
        matches = matcher.match_boxes(gt, anchors, is_crowd=is_crowd)
        labels = device.where(matches >= 0, 1, 0)
        labels[matches < -1] = -1  # between thresholds, or ignored
        positive, negative = BalancedPositiveNegativeSampler(64, 0.25)(labels, rng(5, device))
        return matches, positive, negative

    same_on_both(run, gt, anchors, is_crowd)


def test_nms():
    boxes = boxes_in(300, seed=5)
    scores = np.random.default_rng(6).random(300).astype(np.float32)
    scores[7] = np.nan  # NaN first, as torchvision orders them
    classes = np.random.default_rng(7).integers(0, 3, 300)

    def run(boxes, scores, classes):
        return nms(boxes, scores, 0.5), batched_nms(boxes, scores, classes, 0.3)

    same_on_both(run, boxes, scores, classes)  # the array-form path: the kernel needs CuPy


# ---------------------------------------------------------------------------- poolers
def _rois(n_images=2, k=24, size=64.0, seed=8):
    boxes = boxes_in(k, size, seed=seed)
    image = np.arange(k) % n_images  # interleaved: the ops must sort them by image
    return np.concatenate([image[:, None].astype(np.float32), boxes], axis=1)


@pytest.mark.parametrize(
    "sampling_ratio, aligned, scale", [(2, False, 0.25), (-1, True, 0.5), (0, False, 1.0)]
)
def test_roi_align(sampling_ratio, aligned, scale):
    features, rois = random(2, 5, 16, 20), _rois()

    def run(features, rois):
        return forward_backward(
            lambda f: roi_align(f, rois, (7, 6), scale, sampling_ratio, aligned), features
        )

    log = same_on_both(run, features, rois, rtol=1e-5, atol=1e-5)
    # check_rois 1, the block plan's download 1, the finiteness test 1 in forward and 1 in
    # backward, and 1 for the largest sample grid when it adapts to the RoIs.
    assert log.syncs == (4 if sampling_ratio > 0 else 5), log.summary()


def test_roi_align_with_nan_features():
    features, rois = random(2, 5, 16, 20), _rois()
    features[1, 2, 3:5, 4:9] = np.nan

    def run(features, rois):
        return forward_backward(lambda f: roi_align(f, rois, 7, 0.25, 2), features)

    same_on_both(run, features, rois, rtol=1e-5, atol=1e-5)


def test_roi_pool():
    features, rois = random(2, 5, 16, 20), _rois()
    rois[0, 1:] = [70, 70, 90, 90]  # outside the map: empty bins

    def run(features, rois):
        return forward_backward(lambda f: roi_pool(f, rois, (7, 5), 0.25), features)

    log = same_on_both(run, features, rois, rtol=1e-5, atol=1e-5)
    assert log.syncs == 2, log.summary()  # check_rois, and one download for all the planning


def test_multiscale_roi_align():
    levels = [random(2, 4, 32 // 2**k, 32 // 2**k, seed=k) for k in range(4)]
    boxes = [boxes_in(20, 128.0, seed=9), boxes_in(15, 128.0, seed=10)]

    def run(levels, boxes):
        pooler = MultiScaleRoIAlign(7, 2)
        return forward_backward(
            lambda *maps: pooler(list(maps), boxes, [(128, 128)]), *levels, seed=1
        )

    log = same_on_both(run, levels, boxes, rtol=1e-5, atol=1e-5)
    assert log.count("get") >= 1 and log.count("size") == 0, log.summary()


@pytest.mark.parametrize("threshold", [None, 0.5])
def test_paste_masks(threshold):
    probs = np.random.default_rng(11).random((20, 28, 28)).astype(np.float32)
    boxes = boxes_in(20, 60.0, seed=12)
    boxes[0] = [-5, -5, 70, 80]  # larger than the image

    def run(probs, boxes):
        return paste_masks(probs, boxes, (50, 60), threshold, chunk=8)

    assert same_on_both(run, probs, boxes, rtol=1e-5, atol=1e-5).syncs == 0


# ---------------------------------------------------------------------------- losses
def test_losses():
    r = np.random.default_rng(13)
    a, k, m = 40, 4, 6
    case = dict(
        objectness=random(a),
        deltas=random(a, 4, seed=1),
        rpn_labels=r.integers(-1, 2, a),
        rpn_targets=random(a, 4, seed=2),
        sampled=r.random(a) < 0.5,
        soft_targets=r.random(a).astype(np.float32),
        logits=random(a, k, seed=3),
        box_deltas=random(a, 4 * k, seed=4),
        labels=r.integers(0, k, a),
        mask_logits=random(6, k, m, m, seed=5),
        mask_labels=r.integers(1, k, 6),
        mask_targets=(r.random((6, m, m)) > 0.5).astype(np.float32),
    )

    def run(c):
        t = {name: Tensor(v, requires_grad=True) for name, v in c.items() if v.dtype.kind == "f"}
        out = losses.rpn_loss(
            t["objectness"], t["deltas"], c["rpn_labels"], c["rpn_targets"], sampled=c["sampled"]
        )
        out["cls"], out["box"] = losses.fastrcnn_loss(
            t["logits"], t["box_deltas"], c["labels"], c["rpn_targets"]
        )
        out["mask"] = losses.mask_loss(t["mask_logits"], c["mask_labels"], t["mask_targets"])
        no_rois = slice(0, 0)
        out["empty_mask"] = losses.mask_loss(
            t["mask_logits"][no_rois], c["mask_labels"][no_rois], c["mask_targets"][no_rois]
        )
        out["l1"] = losses.l1_loss(t["deltas"], c["rpn_targets"], reduction="sum")
        out["bce"] = losses.binary_cross_entropy_with_logits(
            t["objectness"], c["soft_targets"], weight=t["rpn_targets"][:, 0]
        )
        total_loss(out).backward()
        return out, {k: v.grad for k, v in t.items()}

    log = same_on_both(run, case, rtol=1e-5, atol=1e-6)
    # The label checks (one each in cross_entropy and mask_loss) and the data-dependent sizes of
    # the sampled, positive and foreground rows (rpn_loss 3, fastrcnn_loss 1).
    assert log.by_kind()["scalar"] == 2 and log.by_kind()["size"] == 4, log.summary()


def test_a_bad_label_is_still_refused_on_the_device():
    logits = Tensor(strict.asarray(random(3, 4)))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\), got 0..4"):
        losses.cross_entropy(logits, strict.asarray(np.array([0, 4, 1])))


# ---------------------------------------------------------------------------- the model
SHAPES = ShapesConfig(image_size=64, min_size=12, max_size=28, max_shapes=3)


def _model_pair():
    """The tiny model at 64-pixel images twice, with the same weights: on NumPy and on the
    stand-in (moved there by ``Module.to``)."""
    models = []
    for _ in range(2):
        init.manual_seed(0)
        models.append(MaskRCNN(tiny().replace(min_size=64, max_size=64)))
    models[1].to("strict")
    return models


def _training_step(model, images, targets, xp_):
    """One iteration as ``minimask.train`` runs it (its ``_step``), with the samplers' generator
    on the model's device."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    model.train()
    model.rng = rng(0, xp_)
    losses_ = model(images, targets)
    total = total_loss(losses_)
    values = {k: float(v.item()) for k, v in losses_.items()}  # the log record
    assert math.isfinite(float(total.item()))
    opt.zero_grad()
    total.backward()
    assert math.isfinite(clip_grad_norm(params, 10.0))
    opt.step()
    return values, params


# Measured on this test's two images (the tiny preset at 64 pixels). Each bound is the measured
# count: a change that adds a sync or an upload must raise it here, on purpose, with its reason.
STEP_SYNCS_OUTSIDE_NMS = 44
STEP_SYNCS = 151
STEP_UPLOADS = 30
INFERENCE_SYNCS_OUTSIDE_NMS = 18
INFERENCE_SYNCS = 160
INFERENCE_UPLOADS = 13


# The array-form NMS's functions (minimask/ops/nms.py): a GPU runs its CUDA kernel instead.
# _batched_nms's syncs are its split into categories, made only on that array-form path.
ARRAY_FORM_NMS = ("_batched_nms", "_greedy_blocks", "_solve_block", "_walk_block", "_near")


def _outside_nms(log):
    """Syncs outside the array-form NMS, which a GPU replaces by its CUDA kernel."""
    sites = log.by_site(*strict.SYNC_KINDS)

    def in_nms(where: str) -> bool:
        return where.startswith("minimask/ops/nms.py") and where.split()[-1] in ARRAY_FORM_NMS

    return sum(n for (_, where), n in sites.items() if not in_nms(where))


def test_one_training_step_stays_on_the_device():
    """A training step of the tiny model on the stand-in: no implicit host conversion, the NumPy
    model's losses and updated weights, and at most the recorded syncs and uploads.

    Where the 44 syncs outside the NMS come from (kinds as in :mod:`minimask.testing.strict`):

    * the trainer's own reads: the five losses and the total for the log record, the gradient
      norm in ``clip_grad_norm``: 7 scalar;
    * RoIAlign: the box and mask heads' poolers (here all RoIs fall on one level) and
      ``project_masks`` once per image make 4 calls, each with ``check_rois`` (1), the block
      plan's download (1) and the finiteness test (1), plus the finiteness test of the 2
      backward passes, the adaptive sample grid of ``project_masks`` (1 per image) and each
      pooler's download of the RoIs' levels (2): 18;
    * sizes that depend on the data: the samplers' positives and negatives (RPN and box head,
      per image: 8), the mask head's foreground RoIs (2), ``remove_small_boxes`` (2), the boxes
      NMS keeps (2), the sampled and positive rows of the losses (3): 17;
    * the label checks of the two classification losses, against labels that would otherwise
      pick another class's score silently: 2.

    The array-form NMS adds about 110 (per category of the box head's per-class NMS, per block
    of 128 boxes, and per round of its fixed-point loop); on a GPU its CUDA kernel runs instead,
    without a sync of its own.

    The 30 uploads: the images, the normalisation's mean and std, and the targets' boxes,
    labels and masks (10), the RoIs' order of each RoIAlign plan and pooler (6), the anchors of
    each level (5), and the Python numbers in the losses' arithmetic (9).
    """
    numpy_model, model = _model_pair()
    samples = [make_sample(0, i, SHAPES) for i in range(2)]
    images = [s["image"] for s in samples]
    expected, expected_params = _training_step(numpy_model, images, samples, np)
    with strict.counting() as log:
        got, params = _training_step(model, images, samples, xp)  # host data: uploaded once
    assert log.refused == 0
    for name in expected:
        assert got[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-6), name
    for p, q in zip(params, expected_params):
        assert isinstance(p.data, StrictArray)
        np.testing.assert_allclose(p.data.get(), q.data, rtol=1e-4, atol=1e-6)
    assert _outside_nms(log) <= STEP_SYNCS_OUTSIDE_NMS, log.summary()
    assert log.syncs <= STEP_SYNCS, log.summary()
    assert log.uploads <= STEP_UPLOADS, log.summary()


def test_one_inference_stays_on_the_device():
    """Inference of the tiny model on the stand-in: the NumPy model's detections, pasted masks
    included, all on the device, with no implicit host conversion and at most the recorded syncs.

    The 18 syncs outside the NMS: RoIAlign in the box and mask heads (the levels' download, then
    ``check_rois``, the block plan and the finiteness test on the one level with RoIs): 8; per
    image, the boxes kept by the RPN's NMS and by the box head's per-class NMS: 4; per image,
    ``remove_small_boxes`` in the RPN and the box head, and the boxes over the score threshold:
    6. The array-form NMS adds 94, which a GPU's kernel replaces. The 13
    uploads: the images and the normalisation's mean and std (4), the anchors of each level (5),
    the RoIs' order of each RoIAlign plan and pooler (4).
    """
    numpy_model, model = _model_pair()
    images = [make_sample(0, i, SHAPES)["image"] for i in range(2)]
    numpy_model.eval()
    model.eval()
    expected = numpy_model(images)
    with strict.counting() as log:
        got = model(images)
    assert log.refused == 0
    assert len(got[0]["boxes"]) > 0  # masks were pasted: an untrained model scores above 0.05
    for g, e in zip(got, expected):
        assert set(g) == set(e) == {"boxes", "scores", "labels", "masks"}
        for key in e:
            assert isinstance(g[key], StrictArray), key
            np.testing.assert_allclose(g[key].get(), e[key], rtol=1e-4, atol=1e-4, err_msg=key)
    assert _outside_nms(log) <= INFERENCE_SYNCS_OUTSIDE_NMS, log.summary()
    assert log.syncs <= INFERENCE_SYNCS, log.summary()
    assert log.uploads <= INFERENCE_UPLOADS, log.summary()


def test_the_trainers_own_step_stays_on_the_device(tmp_path):
    _, model = _model_pair()
    config = train.TrainConfig(iterations=1, warmup_iters=0)
    params = [p for p in model.parameters() if p.requires_grad]
    samples = [make_sample(0, i, SHAPES) for i in range(2)]

    def get_batch(i):
        return [s["image"] for s in samples], samples

    optimizer, schedule = train.make_optimizer(model, config), train.make_schedule(config)
    model.train()
    with strict.counting() as log:
        train._step(
            model, optimizer, schedule, params, get_batch, config, 0, str(tmp_path), strict.xp
        )  # the trainer's generator lives on the model's device
    assert log.refused == 0


def test_fit_runs_on_the_device_with_no_implicit_conversion(tmp_path):
    """The whole loop: fit picks the generator of the model's device, and its checkpoint is an
    explicit download."""
    _, model = _model_pair()
    samples = [make_sample(0, i, SHAPES) for i in range(2)]
    config = train.TrainConfig(iterations=2, warmup_iters=0, checkpoint_every=1)
    with strict.counting() as log:
        train.fit(model, lambda i: ([s["image"] for s in samples], samples), config,
                  str(tmp_path), progress=False)  # fmt: skip
    assert log.refused == 0
    assert (tmp_path / "checkpoint.npz").exists()
