"""NMS benchmark cases: minimask's ``nms`` against ``torchvision.ops.nms`` on the CPU.

Realistic inputs for the RPN's NMS (Faster R-CNN §3.3): 1,000 to 12,000 boxes with random centres
in an 800 × 800 image and random sides of 16 to 256 pixels (clipped to the image), random scores,
IoU threshold 0.7. Collected by ``minimask.bench.ops``; run with ``python -m minimask.bench ops``.
"""

from __future__ import annotations

import numpy as np

from minimask.bench.timing import Case
from minimask.ops.nms import nms

SIZES = (1_000, 2_000, 6_000, 12_000)
IOU_THRESHOLD = 0.7
IMAGE_SIDE = 800.0


def random_boxes(n: int, seed: int = 0):
    """``n`` float32 boxes ``(x1, y1, x2, y2)`` inside the image, and their (n,) scores."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, IMAGE_SIDE, (n, 2))  # (n, 2) x, y
    sizes = rng.uniform(16, 256, (n, 2))  # (n, 2) width, height
    boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1)  # (n, 4)
    boxes = boxes.clip(0, IMAGE_SIDE).astype(np.float32)
    return boxes, rng.random(n).astype(np.float32)


def cases() -> list[Case]:
    """One case per size; the torch tensors are made here, outside the timed callables."""
    try:
        import torch  # noqa: PLC0415 - benchmark peer only
        import torchvision  # noqa: PLC0415
    except ImportError:
        torch = torchvision = None
    result = []
    for n in SIZES:
        boxes, scores = random_boxes(n, seed=n)
        reference = None
        if torchvision is not None:
            t_boxes, t_scores = torch.from_numpy(boxes), torch.from_numpy(scores)
            reference = _bind(torchvision.ops.nms, t_boxes, t_scores)
        result.append(
            Case(
                name=f"nms {n:,} boxes, IoU {IOU_THRESHOLD}",
                ours=_bind(nms, boxes, scores),
                reference=reference,
            )
        )
    return result


def _bind(fn, boxes, scores):
    """``fn(boxes, scores, IOU_THRESHOLD)`` as a callable of no arguments (no late binding)."""
    return lambda: fn(boxes, scores, IOU_THRESHOLD)


if __name__ == "__main__":
    from minimask.bench.timing import run_cases  # noqa: PLC0415

    run_cases(cases(), title="NMS, CPU")
