"""``python -m minimask.bench keypoints``: the keypoint head's training step against torchvision's.

One step of the keypoint branch on pooled RoI features, at torchvision's dimensions (Mask R-CNN
§5): R RoIs of (256, 14, 14) features through the eight 3×3 convs of 512 channels, the 4×4
stride-2 deconvolution to K = 17 heatmaps, the 2× bilinear upsampling to 56×56, the heatmap
targets and the softmax loss, and the backward pass (to the weights and to the pooled features,
which in the whole model flow on to RoIAlign). The peer is torchvision's ``KeypointRCNNHeads``,
``KeypointRCNNPredictor`` and ``keypointrcnn_loss`` on the same inputs and weights.

Each framework runs in its own process, so its memory is its own: "step MB" is how far the
resident memory rises during the steps above what the process held once its inputs and weights
were made (Linux's peak, ``VmHWM``, reset to the current size through ``/proc/self/clear_refs``
just before the steps), "peak MB" the whole process's peak (torch's libraries included). Ratios
are minimask / torchvision: below 1 means minimask is faster or smaller (the goal is <= 1).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from minimask.bench.timing import machine
from minimask.bench.train import _in_process, _peak_mb


def _status_mb(field: str) -> float:
    """``VmRSS`` or ``VmHWM`` (the peak) of this process from ``/proc/self/status``, in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise OSError(f"no {field} in /proc/self/status")


def _reset_peak() -> float:
    """Reset the peak resident memory to the current one (Linux >= 4.0); returns it in MB."""
    import gc  # noqa: PLC0415

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


K, CHANNELS, POOL = 17, 256, 14


def _inputs(rois: int, seed: int = 0):
    """Pooled features (R, 256, 14, 14), RoI boxes (R, 4) in one image, GT keypoints (R, K, 3)."""
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((rois, CHANNELS, POOL, POOL)).astype(np.float32)
    xy = rng.uniform(0, 400, (rois, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(40, 300, (rois, 2))], axis=1).astype(np.float32)
    t = rng.uniform(0, 1, (rois, K, 2))
    keypoints = np.zeros((rois, K, 3), np.float32)
    keypoints[..., :2] = boxes[:, None, :2] + t * (boxes[:, None, 2:] - boxes[:, None, :2])
    keypoints[..., 2] = rng.choice([0, 1, 2], (rois, K), p=[0.3, 0.2, 0.5])
    return features, boxes, keypoints


def _weights(seed: int = 1) -> dict[str, np.ndarray]:
    """The head's weights under torchvision's names, drawn by NumPy (He-normal, fan-out, as both
    initialise them), so that the minimask process never imports torch."""
    rng = np.random.default_rng(seed)
    state, c_in = {}, CHANNELS
    for i in range(8):
        std = np.float32(np.sqrt(2.0 / (512 * 9)))
        weight = rng.standard_normal((512, c_in, 3, 3), dtype=np.float32)
        state[f"roi_heads.keypoint_head.{2 * i}.weight"] = weight * std
        state[f"roi_heads.keypoint_head.{2 * i}.bias"] = np.zeros(512, np.float32)
        c_in = 512
    std = np.sqrt(2.0 / (512 * 16))  # torch's fan-out of a transposed conv's (C_in, K, 4, 4)
    name = "roi_heads.keypoint_predictor.kps_score_lowres"
    state[f"{name}.weight"] = np.float32(std) * rng.standard_normal((512, K, 4, 4), np.float32)
    state[f"{name}.bias"] = np.zeros(K, np.float32)
    return state


def _minimask_job(rois: int, steps: int, queue) -> None:
    from minimask.engine import Tensor  # noqa: PLC0415
    from minimask.model.config import get_config  # noqa: PLC0415
    from minimask.model.keypoint_head import KeypointHead, keypoints_to_heatmap  # noqa: PLC0415
    from minimask.model.weights import to_minimask  # noqa: PLC0415
    from minimask.nn import upsample_bilinear  # noqa: PLC0415
    from minimask.ops.losses import keypoint_loss  # noqa: PLC0415

    head = KeypointHead(get_config("r50_fpn_keypoints"), CHANNELS)
    mine = to_minimask(_weights(), kind="keypointrcnn")
    head.load_state_dict({k.removeprefix("keypoint_head."): v for k, v in mine.items()})
    del mine
    features, boxes, keypoints = _inputs(rois)
    baseline = _reset_peak()

    def step():
        x = Tensor(features, requires_grad=True)
        for conv in head.convs:
            x = conv(x).relu()
        logits = upsample_bilinear(head.logits(x), 2.0)  # (R, K, 56, 56)
        cells, valid = keypoints_to_heatmap(keypoints, boxes, logits.shape[-1])
        loss = keypoint_loss(logits, cells, valid)
        head.zero_grad()
        loss.backward()
        return loss.item()

    queue.put(_time(step, steps, baseline))


def _torchvision_job(rois: int, steps: int, queue) -> None:
    import torch  # noqa: PLC0415
    from torchvision.models.detection.keypoint_rcnn import (  # noqa: PLC0415
        KeypointRCNNHeads,
        KeypointRCNNPredictor,
    )
    from torchvision.models.detection.roi_heads import keypointrcnn_loss  # noqa: PLC0415

    head, predictor = KeypointRCNNHeads(CHANNELS, (512,) * 8), KeypointRCNNPredictor(512, K)
    weights = {k: torch.from_numpy(v) for k, v in _weights().items()}
    head.load_state_dict({k.removeprefix("roi_heads.keypoint_head."): v for k, v in
                          weights.items() if "keypoint_head" in k})  # fmt: skip
    predictor.load_state_dict({k.removeprefix("roi_heads.keypoint_predictor."): v for k, v in
                               weights.items() if "keypoint_predictor" in k})  # fmt: skip
    features, boxes, keypoints = (torch.from_numpy(a) for a in _inputs(rois))
    matched = torch.arange(rois)
    del weights
    baseline = _reset_peak()

    def step():
        x = features.clone().requires_grad_(True)
        logits = predictor(head(x))
        loss = keypointrcnn_loss(logits, [boxes], [keypoints], [matched])
        head.zero_grad()
        predictor.zero_grad()
        loss.backward()
        return loss.item()

    queue.put(_time(step, steps, baseline))


def _time(step, steps: int, baseline: float) -> dict:
    loss = step()  # warm-up (and the loss, to show both compute the same thing)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"s_per_step": float(np.median(times)), "step_mb": _status_mb("VmHWM") - baseline,
            "peak_mb": _peak_mb(), "loss": loss}  # fmt: skip


def main(repeat: int = 5, argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minimask.bench keypoints")
    parser.add_argument("--rois", type=int, default=16, help="RoIs per step (torchvision trains "
                        "on the foreground of 512 sampled: up to 128 per image)")  # fmt: skip
    args = parser.parse_args(argv)
    import torch  # noqa: PLC0415 - the peer is required here

    print(f"## Keypoint head training step: {args.rois} RoIs, 8 x 512 convs, K = {K}, 56 x 56\n")
    print(f"{machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads; median of "
          f"{repeat} steps\n")  # fmt: skip
    ours = _in_process(_minimask_job, args.rois, repeat)
    theirs = _in_process(_torchvision_job, args.rois, repeat)
    print("| | minimask | torchvision | ratio | goal |\n|---|---:|---:|---:|---|")
    for key, label in (("s_per_step", "s / step"), ("step_mb", "step MB"), ("peak_mb", "peak MB")):
        ratio = ours[key] / theirs[key] if theirs[key] > 0 else float("nan")
        mark = "ok" if ratio <= 1.0 else "**miss**"
        print(f"| {label} | {ours[key]:.3f} | {theirs[key]:.3f} | {ratio:.2f} | <= 1.0 {mark} |")
    print(f"\nloss: minimask {ours['loss']:.6f}, torchvision {theirs['loss']:.6f}")
