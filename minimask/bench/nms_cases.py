"""NMS benchmark cases: minimask's ``nms`` against ``torchvision.ops.nms`` on the CPU.

Realistic inputs for the RPN's NMS (Faster R-CNN §3.3): 1,000 to 12,000 boxes with random centres
in an 800 × 800 image and random sides of 16 to 256 pixels (clipped to the image), random scores,
IoU threshold 0.7. Two harder shapes:

* a suppression chain: 6,000 boxes in a row, each overlapping the next (IoU 0.67) but not the
  one after (IoU 0.43), scores falling along the row, IoU 0.5: greedy NMS keeps every other box,
  the worst case for an order-free evaluation;
* the detector's per-class NMS at ``box_score_thresh`` 0: 1,000 proposals × 90 classes =
  90,000 candidates, each class's boxes the proposals moved by a few pixels, IoU 0.5
  (``batched_nms`` against ``torchvision.ops.batched_nms``).

Collected by ``minimask.bench.ops``; run with ``python -m minimask.bench ops``.
"""

from __future__ import annotations

import numpy as np

from minimask.bench.timing import Case
from minimask.ops.nms import batched_nms, nms

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


def chain_boxes(n: int):
    """``n`` boxes 10 × 10 every 2 pixels along a row, scores decreasing along it."""
    x = 2.0 * np.arange(n)
    boxes = np.stack([x, np.zeros(n), x + 10, np.full(n, 10.0)], axis=1).astype(np.float32)
    return boxes, np.linspace(1, 0, n, dtype=np.float32)


def per_class_boxes(proposals: int = 1000, classes: int = 90, seed: int = 0):
    """(proposals * classes) boxes, scores and class ids, as the box head's postprocess has them."""
    rng = np.random.default_rng(seed)
    base, _ = random_boxes(proposals, seed)
    jitter = rng.uniform(-4, 4, (classes, proposals, 4)).astype(np.float32)
    boxes = (base[None] + jitter).reshape(-1, 4)  # (classes * proposals, 4)
    labels = np.repeat(np.arange(1, classes + 1), proposals)
    return boxes, rng.random(len(boxes)).astype(np.float32), labels


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
    boxes, scores = chain_boxes(6_000)
    reference = None
    if torchvision is not None:
        t_boxes, t_scores = torch.from_numpy(boxes), torch.from_numpy(scores)
        reference = lambda: torchvision.ops.nms(t_boxes, t_scores, 0.5)  # noqa: E731
    result.append(Case("nms chain of 6,000 boxes, every other kept, IoU 0.5",
                       lambda: nms(boxes, scores, 0.5), reference))  # fmt: skip
    c_boxes, c_scores, c_labels = per_class_boxes()
    reference = None
    if torchvision is not None:
        tc = [torch.from_numpy(a) for a in (c_boxes, c_scores, c_labels)]
        reference = lambda: torchvision.ops.batched_nms(*tc, 0.5)  # noqa: E731
    ours = lambda: batched_nms(c_boxes, c_scores, c_labels, 0.5)  # noqa: E731
    result.append(Case("batched_nms 90,000 boxes, 90 classes, IoU 0.5", ours, reference))
    return result


def _bind(fn, boxes, scores):
    """``fn(boxes, scores, IOU_THRESHOLD)`` as a callable of no arguments (no late binding)."""
    return lambda: fn(boxes, scores, IOU_THRESHOLD)


if __name__ == "__main__":
    from minimask.bench.timing import run_cases  # noqa: PLC0415

    run_cases(cases(), title="NMS, CPU")
