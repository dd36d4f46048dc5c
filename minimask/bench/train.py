"""``python -m minimask.bench train``: the tiny Mask R-CNN against torchvision's, side by side.

The peer is torchvision's ``MaskRCNN`` class assembled from torchvision parts with the ``tiny``
preset's dimensions: the same ResNet (basic blocks, GroupNorm, the same widths, written in torch
below since torchvision's ResNet has fixed widths), ``FeaturePyramidNetwork`` with
``LastLevelMaxPool``, the same ``AnchorGenerator``, ``RPNHead``, ``MultiScaleRoIAlign`` poolers,
``TwoMLPHead``, ``MaskRCNNHeads`` and predictors, the same sampling sizes and NMS settings.

``--preset tiny_c4`` compares the C4 layout: torchvision's ``MaskRCNN`` on the ResNet trunk up to
C4 (a backbone with one feature map), the same single-level ``AnchorGenerator``, a 14×14
``MultiScaleRoIAlign`` on C4, res5 + average pooling as the ``box_head``, and the same res5
module as the ``mask_head`` before a ``MaskRCNNPredictor`` (deconv, ReLU, 1×1). One difference
of work: in training torchvision pools the foreground RoIs again and runs res5 on them for the
masks, where minimask reuses the box head's res5 maps (up to a quarter of the box head's RoIs).

Two measurements, each framework in its own process (so peak memory is its own):

1. **Speed and memory**: seconds per training iteration (median over ``--speed-iters`` after a
   warm-up) and peak resident memory, at the same batch and image size.
2. **Learning parity**: both train for ``--iterations`` on the same shapes stream with the same
   optimizer and schedule, then both are evaluated by the same pycocotools code on the same
   validation split.

Ratios are minimask / torchvision: below 1 means minimask is faster or smaller.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time

import numpy as np

from minimask.bench.timing import machine, threads_note, use_threads

LR, MOMENTUM, WEIGHT_DECAY, WARMUP, CLIP = 0.02, 0.9, 1e-4, 100, 10.0


def _lr(i: int, iterations: int) -> float:
    warm = min(1.0, 0.001 + (1 - 0.001) * i / WARMUP) if i < WARMUP else 1.0
    return LR * warm * (0.1 if i >= int(0.8 * iterations) else 1.0)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


# ---------------------------------------------------------------------------- minimask
def _minimask_job(preset: str, mode: str, iterations: int, batch_size: int, queue) -> None:
    use_threads()  # the parent's --threads, from the environment
    from minimask.data.shapes import CLASSES, shapes_batches  # noqa: PLC0415
    from minimask.model.checkpoint import build_model  # noqa: PLC0415
    from minimask.train import TrainConfig, fit  # noqa: PLC0415

    if mode == "speed":
        from minimask.backend import rng  # noqa: PLC0415
        from minimask.train import make_optimizer, total_loss  # noqa: PLC0415

        model = build_model(preset, 0, num_classes=len(CLASSES))
        opt = make_optimizer(model, TrainConfig(lr=0.001))
        get_batch = shapes_batches(0, batch_size)
        times = []
        for i in range(iterations + 3):
            images, targets = get_batch(i)
            start = time.perf_counter()
            model.rng = rng(i)
            loss = total_loss(model(images, targets))
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - start)
        queue.put({"s_per_iter": float(np.median(times[3:])), "peak_mb": _peak_mb()})
        return
    import tempfile  # noqa: PLC0415

    config = TrainConfig(
        iterations=iterations, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
        warmup_iters=WARMUP, milestones=(int(0.8 * iterations),), clip_norm=CLIP,
        checkpoint_every=iterations,
    )  # fmt: skip
    model = build_model(preset, 0, num_classes=len(CLASSES))
    with tempfile.TemporaryDirectory() as out:
        fit(model, shapes_batches(0, batch_size), config, out, progress=False)
        from minimask.workflow import ShapesData, evaluate  # noqa: PLC0415

        data = ShapesData(100, 0)
        queue.put(evaluate(model, data.meta(), data, out, progress=False, log=lambda _: None))


# ---------------------------------------------------------------------------- torchvision
def _torchvision_model(preset: str = "tiny"):
    """torchvision's MaskRCNN with the preset's architecture (see the module docstring)."""
    from collections import OrderedDict  # noqa: PLC0415

    import torch  # noqa: PLC0415
    from torch import nn  # noqa: PLC0415
    from torchvision.models.detection import MaskRCNN  # noqa: PLC0415
    from torchvision.models.detection.anchor_utils import AnchorGenerator  # noqa: PLC0415
    from torchvision.models.detection.faster_rcnn import (  # noqa: PLC0415
        FastRCNNPredictor,
        TwoMLPHead,
    )
    from torchvision.models.detection.mask_rcnn import (  # noqa: PLC0415
        MaskRCNNHeads,
        MaskRCNNPredictor,
    )
    from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign  # noqa: PLC0415
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool  # noqa: PLC0415

    from minimask.model.config import get_config  # noqa: PLC0415

    c = get_config(preset)

    def conv_norm(c_in, c_out, k, stride=1):
        return nn.Sequential(
            nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False),
            nn.GroupNorm(min(c.group_norm_groups, c_out), c_out),
        )

    class Block(nn.Module):
        def __init__(self, c_in, width, stride):
            super().__init__()
            self.conv1, self.conv2 = conv_norm(c_in, width, 3, stride), conv_norm(width, width, 3)
            self.down = conv_norm(c_in, width, 1, stride) if stride != 1 or c_in != width else None

        def forward(self, x):
            short = x if self.down is None else self.down(x)
            return torch.relu(self.conv2(torch.relu(self.conv1(x))) + short)

    stages, c_in = [], c.stem_channels
    for i, (n, w) in enumerate(zip(c.stage_blocks, c.stage_channels)):
        blocks = [Block(c_in if b == 0 else w, w, (1 if i == 0 else 2) if b == 0 else 1)
                  for b in range(n)]  # fmt: skip
        stages.append(nn.Sequential(*blocks))
        c_in = w
    if c.layout == "c4":
        return _torchvision_c4(c, conv_norm, stages)

    class Backbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = conv_norm(3, c.stem_channels, 7, 2)
            self.stages = nn.ModuleList(stages)
            self.fpn = FeaturePyramidNetwork(
                list(c.stage_channels), c.fpn_channels, extra_blocks=LastLevelMaxPool()
            )
            self.out_channels = c.fpn_channels

        def forward(self, x):
            x = nn.functional.max_pool2d(torch.relu(self.stem(x)), 3, 2, 1)
            feats = OrderedDict()
            for i, stage in enumerate(self.stages):
                x = stage(x)
                feats[str(i)] = x
            return self.fpn(feats)

    levels = ["0", "1", "2", "3"]
    anchors = AnchorGenerator(tuple((s,) for s in c.anchor_sizes), (c.aspect_ratios,) * 5)
    return MaskRCNN(
        Backbone(),
        num_classes=None,
        rpn_anchor_generator=anchors,
        **_shared_options(c),
        box_roi_pool=MultiScaleRoIAlign(levels, c.box_pool_size, c.pool_sampling_ratio),
        box_head=TwoMLPHead(c.fpn_channels * c.box_pool_size**2, c.box_fc_dim),
        box_predictor=FastRCNNPredictor(c.box_fc_dim, c.num_classes),
        box_batch_size_per_image=c.box_batch_per_image,
        box_detections_per_img=c.detections_per_image,
        mask_roi_pool=MultiScaleRoIAlign(levels, c.mask_pool_size, c.pool_sampling_ratio),
        mask_head=MaskRCNNHeads(c.fpn_channels, list(c.mask_conv_channels), 1),
        mask_predictor=MaskRCNNPredictor(c.mask_conv_channels[-1], c.mask_conv_channels[-1],
                                         c.num_classes),
    )  # fmt: skip


def _shared_options(c) -> dict:
    """torchvision ``MaskRCNN`` keyword arguments that follow the minimask config ``c`` alike
    for both peers (FPN and C4): the transform's sizes and normalisation, the RPN's numbers."""
    return dict(
        min_size=c.min_size, max_size=c.max_size,
        image_mean=list(c.image_mean), image_std=list(c.image_std),
        rpn_pre_nms_top_n_train=c.rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=c.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=c.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=c.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=c.rpn_batch_per_image,
    )  # fmt: skip


def _torchvision_c4(c, conv_norm, stages):
    """The C4 peer: torchvision's MaskRCNN on a one-map backbone, res5 as box and mask head."""
    import torch  # noqa: PLC0415
    from torch import nn  # noqa: PLC0415
    from torchvision.models.detection import MaskRCNN  # noqa: PLC0415
    from torchvision.models.detection.anchor_utils import AnchorGenerator  # noqa: PLC0415
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor  # noqa: PLC0415
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor  # noqa: PLC0415
    from torchvision.ops import MultiScaleRoIAlign  # noqa: PLC0415

    class Trunk(nn.Module):  # stem, C2, C3, C4: one map at stride 16
        def __init__(self):
            super().__init__()
            self.stem = conv_norm(3, c.stem_channels, 7, 2)
            self.stages = nn.Sequential(*stages[:3])
            self.out_channels = c.stage_channels[2]

        def forward(self, x):
            return self.stages(nn.functional.max_pool2d(torch.relu(self.stem(x)), 3, 2, 1))

    res5 = stages[3]

    class Res5Box(nn.Module):  # res5, then global average pooling: (R, c5)
        def __init__(self):
            super().__init__()
            self.res5 = res5

        def forward(self, x):
            return self.res5(x).mean(dim=(2, 3))

    c5 = c.stage_channels[3]
    anchors = AnchorGenerator((tuple(c.anchor_sizes),), (tuple(c.aspect_ratios),))
    return MaskRCNN(
        Trunk(),
        num_classes=None,
        rpn_anchor_generator=anchors,
        **_shared_options(c),
        box_roi_pool=MultiScaleRoIAlign(["0"], c.box_pool_size, c.pool_sampling_ratio),
        box_head=Res5Box(),
        box_predictor=FastRCNNPredictor(c5, c.num_classes),
        box_batch_size_per_image=c.box_batch_per_image,
        box_detections_per_img=c.detections_per_image,
        mask_roi_pool=MultiScaleRoIAlign(["0"], c.box_pool_size, c.pool_sampling_ratio),
        mask_head=res5,  # the same module: (R, c5, 7, 7)
        mask_predictor=MaskRCNNPredictor(c5, c.mask_deconv_channels, c.num_classes),
    )  # fmt: skip


def _torch_batch(samples):
    import torch  # noqa: PLC0415

    images = [torch.from_numpy(s["image"]) for s in samples]
    targets = [{
        "boxes": torch.from_numpy(s["boxes"]),
        "labels": torch.from_numpy(s["labels"]),
        "masks": torch.from_numpy(s["masks"]),
    } for s in samples]  # fmt: skip
    return images, targets


def _torchvision_job(preset: str, mode: str, iterations: int, batch_size: int, queue) -> None:
    import torch  # noqa: PLC0415

    use_threads()

    from minimask.data.shapes import CLASSES, ShapesDataset, make_sample  # noqa: PLC0415
    from minimask.evaluate import (  # noqa: PLC0415
        coco_evaluate,
        detections_to_results,
        ground_truth_coco,  # noqa: PLC0415
    )

    torch.manual_seed(0)
    model = _torchvision_model(preset)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
    )  # fmt: skip
    model.train()
    steps = iterations + 3 if mode == "speed" else iterations
    times = []
    for i in range(steps):
        samples = [make_sample(0, i * batch_size + k) for k in range(batch_size)]
        images, targets = _torch_batch(samples)
        for g in opt.param_groups:
            g["lr"] = 0.001 if mode == "speed" else _lr(i, iterations)
        start = time.perf_counter()
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        if mode != "speed":
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        times.append(time.perf_counter() - start)
    if mode == "speed":
        queue.put({"s_per_iter": float(np.median(times[3:])), "peak_mb": _peak_mb()})
        return
    model.eval()
    val = list(ShapesDataset(100, seed=0))
    results = []
    with torch.no_grad():
        for start in range(0, len(val), 4):
            chunk = val[start : start + 4]
            outputs = model([torch.from_numpy(s["image"]) for s in chunk])
            for s, out in zip(chunk, outputs):
                det = {
                    "boxes": out["boxes"].numpy(),
                    "scores": out["scores"].numpy(),
                    "labels": out["labels"].numpy(),
                    "masks": (out["masks"][:, 0] >= 0.5).numpy().astype(np.uint8),
                }
                results += detections_to_results(s["image_id"], det)
    queue.put(coco_evaluate(ground_truth_coco(val, CLASSES), results))


# ---------------------------------------------------------------------------- driver
def _in_process(job, *args):
    ctx = mp.get_context("spawn")  # a fresh interpreter: its peak memory is its own
    queue = ctx.Queue()
    proc = ctx.Process(target=job, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(repeat: int = 3, argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minimask.bench train")
    parser.add_argument("--speed-iters", type=int, default=40, help="timed steps per process")
    parser.add_argument("--iterations", type=int, default=1000, help="parity training length")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--skip-parity", action="store_true")
    parser.add_argument("--preset", default="tiny", choices=("tiny", "tiny_c4"))
    args = parser.parse_args(argv)
    import torch  # noqa: PLC0415, F401 - the peer is required here

    p = args.preset
    print(f"## Training benchmark: {p} preset, batch {args.batch_size}, 128x128 shapes\n")
    print(f"{machine()}; {threads_note()}; {repeat} interleaved pairs of processes (minimask, "
          f"torchvision, ...), each the median of {args.speed_iters} steps; ratio: median "
          "(min–max) of the pairs' ratios\n")  # fmt: skip
    goal_time = 2.0 if p == "tiny" else 1.0
    runs = []
    for _ in range(repeat):  # interleaved, so that other load on the machine hits both alike
        ours = _in_process(_minimask_job, p, "speed", args.speed_iters, args.batch_size)
        theirs = _in_process(_torchvision_job, p, "speed", args.speed_iters, args.batch_size)
        runs.append((ours, theirs))
    print("| | minimask | torchvision | ratio (range) | goal |\n|---|---:|---:|---:|---|")
    for key, label, fmt, goal in (("s_per_iter", "s / iteration", ".3f", goal_time),
                                  ("peak_mb", "peak RSS (MB)", ".0f", 1.5)):  # fmt: skip
        a = np.array([o[key] for o, _ in runs])
        b = np.array([t[key] for _, t in runs])
        r = a / b
        mark = "ok" if np.median(r) <= goal else "**miss**"
        print(f"| {label} | {np.median(a):{fmt}} | {np.median(b):{fmt}} | {np.median(r):.2f} "
              f"({r.min():.2f}–{r.max():.2f}) | <= {goal} {mark} |")  # fmt: skip
    print()
    if args.skip_parity:
        return
    ours = _in_process(_minimask_job, p, "parity", args.iterations, args.batch_size)
    theirs = _in_process(_torchvision_job, p, "parity", args.iterations, args.batch_size)
    print(f"Learning parity after {args.iterations} iterations (100 validation images):\n")
    print("| metric | minimask | torchvision | difference |\n|---|---:|---:|---:|")
    for task in ("bbox", "segm"):
        for k in ("AP", "AP50", "AP75"):
            a, b = ours[task][k], theirs[task][k]
            print(f"| {task} {k} | {a:.3f} | {b:.3f} | {a - b:+.3f} |")
    print(json.dumps({"minimask": ours, "torchvision": theirs}))
