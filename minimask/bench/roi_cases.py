"""Benchmark cases for RoIAlign and RoIPool, forward + backward, against torchvision.

Both sides pool the same float32 stride-16 map of an 800×800 image (256×50×50) at the same
proposal-like boxes and backpropagate the same gradient. The torch tensors are built outside the
timed callables; both sides use the threads of ``--threads`` (default: every core).
"""

from __future__ import annotations

import numpy as np

from minimask.bench.timing import Case
from minimask.engine import Tensor
from minimask.ops.roi_align import roi_align
from minimask.ops.roi_pool import roi_pool

IMAGE = 800  # pixels, square
STRIDE = 16  # so the map is 50×50
CHANNELS = 256


def proposal_rois(num: int, rng, image: int = IMAGE, num_images: int = 1):
    """(num, 5) rows ``[n, x1, y1, x2, y2]``: centres uniform in the image, sides log-uniform
    in [16, 400] pixels (boxes may stick out of the image, as proposals before clipping do)."""
    cx, cy = rng.uniform(0, image, (2, num))
    w, h = np.exp(rng.uniform(np.log(16), np.log(400), (2, num)))
    n = rng.integers(0, num_images, num)
    return np.stack([n, cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def _case(op: str, num_rois: int, out: int, seed: int = 0) -> Case:
    rng = np.random.default_rng(seed)
    side = IMAGE // STRIDE
    features = rng.standard_normal((1, CHANNELS, side, side)).astype(np.float32)
    rois = proposal_rois(num_rois, rng).astype(np.float32)
    grad = rng.standard_normal((num_rois, CHANNELS, out, out)).astype(np.float32)
    if op == "roi_align":
        args = dict(output_size=out, spatial_scale=1 / STRIDE, sampling_ratio=2, aligned=False)
        name = f"roi_align fwd+bwd, {num_rois} RoIs, {CHANNELS}×{side}×{side} → {out}×{out}, s=2"
    else:
        args = dict(output_size=out, spatial_scale=1 / STRIDE)
        name = f"roi_pool fwd+bwd, {num_rois} RoIs, {CHANNELS}×{side}×{side} → {out}×{out}"
    ours_op = roi_align if op == "roi_align" else roi_pool

    def ours():
        x = Tensor(features, requires_grad=True)
        ours_op(x, rois, **args).backward(grad)
        return x.grad

    return Case(name, ours, _torchvision(op, features, rois, grad, args))


def _torchvision(op: str, features, rois, grad, args):
    """The same work in torchvision, or None when it is not installed."""
    try:
        import torch  # noqa: PLC0415 - benchmark peer only
        import torchvision  # noqa: PLC0415
    except ImportError:
        return None
    x = torch.tensor(features, requires_grad=True)
    boxes, g = torch.tensor(rois), torch.tensor(grad)
    fn = getattr(torchvision.ops, op)

    def reference():
        x.grad = None
        fn(x, boxes, **args).backward(g)
        return x.grad

    return reference


def cases() -> list[Case]:
    """RoIAlign and RoIPool at the box head's (512 RoIs, 7×7) and mask head's (128, 14×14) sizes."""
    return [
        _case("roi_align", 512, 7),
        _case("roi_align", 128, 14),
        _case("roi_pool", 512, 7),
        _case("roi_pool", 128, 14),
    ]
