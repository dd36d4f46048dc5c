"""``python -m minimask.bench gpu``: minimask on CuPy against torch/torchvision on CUDA, same GPU.

One run, one process, one card, three tables. Each row is a median of ``--repeat`` runs after a
warm-up, with the GPU synchronised at the end of every run (``cupy.cuda.Device().synchronize()``,
``torch.cuda.synchronize()``), so that a time covers the work and not only its launch:

1. **Ops**, forward + backward: conv2d at the shapes of ``python -m minimask.bench conv``;
   roi_align and roi_pool at the cases of ``python -m minimask.bench ops`` (float32, a 256×50×50
   map); nms at its box counts (forward only).
2. **Training steps** (forward, backward and an SGD step): ``tiny`` at batch 8 of 128-pixel
   shapes against the torchvision model of ``python -m minimask.bench train``; ``r50_fpn`` at
   batch 2 of 800×800 images against torchvision's Mask R-CNN R50-FPN with the same weights
   (``FrozenBatchNorm2d``, every stage trainable, as ``python -m minimask.bench parity``).
   Goal: time ratio <= 1.5.
3. **Peak GPU memory** of one such training step: the high-water mark of the bytes in use in
   CuPy's memory pool (read after every allocation, so no peak between two reads is missed),
   against ``torch.cuda.max_memory_allocated``, each less what was in use before the pair of
   models was built. Both count the model, its gradients, the optimizer's state, the inputs and
   the step's temporaries; neither counts memory cached for reuse. Goal: ratio <= 1.2.

Ratios are minimask / torch: below 1 means minimask is faster or smaller. Both sides compute in
full float32: torch's TF32 is switched off for its convolutions and matrix products, as CuPy's is
by default.

Without a GPU it exits with one line naming what is missing: CuPy, a CUDA device, or torch (and
torchvision) with CUDA.
"""

from __future__ import annotations

import numpy as np

from minimask.backend import gpu_available
from minimask.bench import conv, nms_cases, roi_cases
from minimask.bench.timing import Case, run_cases

TRAIN_GOAL = 1.5  # time ratio of a training step
MEMORY_GOAL = 1.2  # peak-memory ratio of a training step
WARMUP_STEPS = 2  # training steps run before timing, beyond median_ms's own warm-up


def require_gpu():
    """``(cupy, torch, torchvision)`` on a CUDA device, or SystemExit with one line naming what
    is missing."""
    prefix = "python -m minimask.bench gpu needs"
    try:
        import cupy  # noqa: PLC0415 - optional dependency
    except Exception:  # ImportError, or CUDA libraries that fail to load
        raise SystemExit(f"{prefix} CuPy, which is not installed: pip install -e .[gpu]") from None
    if not gpu_available():
        raise SystemExit(f"{prefix} a CUDA device: CuPy is installed but sees none (nvidia-smi?)")
    try:
        import torch  # noqa: PLC0415 - benchmark peer only
        import torchvision  # noqa: PLC0415
    except ModuleNotFoundError:
        raise SystemExit(
            f"{prefix} torch and torchvision with CUDA: pip install -e '.[reference]'"
        ) from None
    if not torch.cuda.is_available():
        raise SystemExit(f"{prefix} a CUDA build of torch; torch {torch.__version__} sees no GPU")
    return cupy, torch, torchvision


def synchronised(fn, sync):
    """``fn`` followed by waiting for the GPU, as one callable for :func:`median_ms`."""

    def run():
        fn()
        sync()

    return run


def device_line(cp, torch) -> str:
    """The card, as each framework names it, and the software on both sides."""
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    runtime = cp.cuda.runtime.runtimeGetVersion()
    return (
        f"GPU: {name} (CuPy) / {torch.cuda.get_device_name()} (torch), "
        f"{props['totalGlobalMem'] / 2**30:.0f} GiB; CuPy {cp.__version__} "
        f"(CUDA runtime {runtime // 1000}.{runtime % 1000 // 10}), torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}); float32, TF32 off"
    )


# ---------------------------------------------------------------------------- ops
def conv_case(cp, torch, N: int, C: int, H: int, k: int) -> Case:
    """conv.py's row on the GPU: the same inputs, drawn the same way."""
    from minimask.engine import Tensor  # noqa: PLC0415
    from minimask.nn.conv import conv2d  # noqa: PLC0415

    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C, H, H), dtype=np.float32)
    w = rng.standard_normal((C, C, k, k), dtype=np.float32) * np.float32(1 / np.sqrt(C * k * k))
    grad = rng.standard_normal((N, C, H, H), dtype=np.float32)
    pad = k // 2
    ours_x, ours_w, ours_grad = (cp.asarray(a) for a in (x, w, grad))
    ref_x, ref_w, ref_grad = (torch.from_numpy(a).cuda() for a in (x, w, grad))

    def ours():
        xt, wt = Tensor(ours_x, requires_grad=True), Tensor(ours_w, requires_grad=True)
        conv2d(xt, wt, padding=pad).backward(ours_grad)

    def reference():
        xr, wr = ref_x.detach().requires_grad_(), ref_w.detach().requires_grad_()
        torch.nn.functional.conv2d(xr, wr, padding=pad).backward(ref_grad)

    return Case(f"conv2d {k}x{k} N={N} C={C} H=W={H} fwd+bwd", ours, reference)


def roi_case(cp, torch, torchvision, op: str, num_rois: int, out: int) -> Case:
    """roi_cases.py's row on the GPU: the same map, boxes and gradient."""
    from minimask.engine import Tensor  # noqa: PLC0415
    from minimask.ops.roi_align import roi_align  # noqa: PLC0415
    from minimask.ops.roi_pool import roi_pool  # noqa: PLC0415

    rng = np.random.default_rng(0)
    side = roi_cases.IMAGE // roi_cases.STRIDE
    features = rng.standard_normal((1, roi_cases.CHANNELS, side, side)).astype(np.float32)
    rois = roi_cases.proposal_rois(num_rois, rng).astype(np.float32)
    grad = rng.standard_normal((num_rois, roi_cases.CHANNELS, out, out)).astype(np.float32)
    args = dict(output_size=out, spatial_scale=1 / roi_cases.STRIDE)
    if op == "roi_align":
        args.update(sampling_ratio=2, aligned=False)
    ours_op = roi_align if op == "roi_align" else roi_pool
    ours_f, ours_rois, ours_grad = (cp.asarray(a) for a in (features, rois, grad))
    ref_f, ref_rois, ref_grad = (torch.from_numpy(a).cuda() for a in (features, rois, grad))
    ref_op = getattr(torchvision.ops, op)

    def ours():
        ours_op(Tensor(ours_f, requires_grad=True), ours_rois, **args).backward(ours_grad)

    def reference():
        ref_op(ref_f.detach().requires_grad_(), ref_rois, **args).backward(ref_grad)

    name = f"{op} fwd+bwd, {num_rois} RoIs, {roi_cases.CHANNELS}×{side}×{side} → {out}×{out}"
    return Case(name, ours, reference)


def nms_case(cp, torch, torchvision, n: int) -> Case:
    from minimask.ops.nms import nms  # noqa: PLC0415

    boxes, scores = nms_cases.random_boxes(n, seed=n)
    ours_boxes, ours_scores = cp.asarray(boxes), cp.asarray(scores)
    ref_boxes, ref_scores = torch.from_numpy(boxes).cuda(), torch.from_numpy(scores).cuda()
    threshold = nms_cases.IOU_THRESHOLD
    return Case(
        f"nms {n:,} boxes, IoU {threshold}",
        lambda: nms(ours_boxes, ours_scores, threshold),
        lambda: torchvision.ops.nms(ref_boxes, ref_scores, threshold),
    )


def op_cases(cp, torch, torchvision) -> list[Case]:
    cases = [conv_case(cp, torch, *shape) for shape in conv.SHAPES]
    for op in ("roi_align", "roi_pool"):
        cases += [roi_case(cp, torch, torchvision, op, 512, 7)]
        cases += [roi_case(cp, torch, torchvision, op, 128, 14)]
    cases += [nms_case(cp, torch, torchvision, n) for n in nms_cases.SIZES]
    return cases


# ---------------------------------------------------------------------------- training steps
def _on_gpu(cp, target: dict) -> dict:
    return {k: cp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in target.items()}


def _on_cuda(torch, target: dict) -> dict:
    keys = ("boxes", "labels", "masks")
    return {k: torch.from_numpy(np.ascontiguousarray(target[k])).cuda() for k in keys}


def minimask_step(cp, model, images, targets):
    """One training step of a minimask model already on the GPU: a callable, plus the model."""
    from minimask.backend import rng  # noqa: PLC0415
    from minimask.train import TrainConfig, make_optimizer, total_loss  # noqa: PLC0415

    model.train()
    optimizer = make_optimizer(model, TrainConfig(lr=0.001))
    images = [cp.asarray(image) for image in images]
    targets = [_on_gpu(cp, t) for t in targets]

    def step():
        model.rng = rng(0, cp)  # the same sampling every step
        loss = total_loss(model(images, targets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def torch_step(torch, model, images, targets):
    """One training step of a torchvision model already on the GPU, with the same optimizer."""
    model.train()
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    optimizer = torch.optim.SGD(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=0.001, momentum=0.9, weight_decay=1e-4,
    )  # fmt: skip
    images = [torch.from_numpy(np.ascontiguousarray(image)).cuda() for image in images]
    targets = [_on_cuda(torch, t) for t in targets]

    def step():
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def tiny_steps(cp, torch, batch_size: int = 8):
    """``(name, ours, reference)``: the tiny preset on a batch of 128-pixel shapes."""
    from minimask.bench.train import _torchvision_model  # noqa: PLC0415
    from minimask.data.shapes import CLASSES, shapes_batches  # noqa: PLC0415
    from minimask.model.checkpoint import build_model  # noqa: PLC0415

    images, samples = shapes_batches(0, batch_size)(0)
    model = build_model("tiny", 0, num_classes=len(CLASSES)).to("gpu")
    ours = minimask_step(cp, model, images, samples)
    torch.manual_seed(0)
    reference = torch_step(torch, _torchvision_model().cuda(), images, samples)
    return f"train step tiny, batch {batch_size}, 128×128", ours, reference


def r50_steps(cp, torch, batch_size: int = 2, size: int = 800):
    """``(name, ours, reference)``: R50-FPN, both models with the same weights."""
    from minimask.bench import parity  # noqa: PLC0415

    reference_model = parity.torchvision_maskrcnn(frozen_bn=True)  # seeded, in eval mode
    model = parity.minimask_from(parity.torchvision_state(reference_model)).to("gpu")
    images = [parity.smooth_image(size, size, seed=i) for i in range(batch_size)]
    targets = [parity.mask_targets(size, size, 3, seed=10 + i) for i in range(batch_size)]
    ours = minimask_step(cp, model, images, targets)
    reference = torch_step(torch, reference_model.cuda(), images, targets)
    return f"train step r50_fpn, batch {batch_size}, {size}×{size}", ours, reference


def peak_bytes_cupy(cp, fn) -> int:
    """The most bytes in use in CuPy's memory pool while ``fn()`` runs (and before it)."""
    pool = cp.get_default_memory_pool()
    cp.cuda.Device().synchronize()
    peak = pool.used_bytes()

    def malloc(size):  # use only grows at an allocation: reading it after each sees the peak
        nonlocal peak
        memory = pool.malloc(size)
        peak = max(peak, pool.used_bytes())
        return memory

    cp.cuda.set_allocator(malloc)
    try:
        fn()
        cp.cuda.Device().synchronize()
    finally:
        cp.cuda.set_allocator(pool.malloc)
    return peak


def peak_bytes_torch(torch, fn) -> int:
    """``torch.cuda.max_memory_allocated`` over ``fn()``."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


# ---------------------------------------------------------------------------- driver
def main(repeat: int = 5) -> None:
    cp, torch, torchvision = require_gpu()
    torch.backends.cudnn.allow_tf32 = False  # full float32, as CuPy computes it
    torch.backends.cuda.matmul.allow_tf32 = False
    sync_ours, sync_torch = cp.cuda.Device().synchronize, torch.cuda.synchronize
    print(f"# GPU benchmark: minimask on CuPy vs torch on CUDA\n\n{device_line(cp, torch)}\n")

    def on_gpu(cases):
        return [
            Case(c.name, synchronised(c.ours, sync_ours), synchronised(c.reference, sync_torch))
            for c in cases
        ]

    run_cases(on_gpu(op_cases(cp, torch, torchvision)), repeat, "Ops on the GPU: fwd+bwd")

    steps = []
    for build in (tiny_steps, r50_steps):
        # What the card holds before this pair of models is built: not counted in its memory.
        before = cp.get_default_memory_pool().used_bytes(), torch.cuda.memory_allocated()
        name, ours, reference = build(cp, torch)
        for _ in range(WARMUP_STEPS):  # kernels compiled, pools and caches filled
            synchronised(ours, sync_ours)()
            synchronised(reference, sync_torch)()
        steps.append((name, ours, reference, before))
    run_cases(
        on_gpu([Case(name, ours, reference) for name, ours, reference, _ in steps]),
        repeat,
        "Training steps on the GPU (forward, backward, SGD step)",
        goal=TRAIN_GOAL,
    )

    print("## Peak GPU memory of one training step\n")
    print("Model, gradients, optimizer state, inputs and the step's temporaries; not the memory")
    print("the caching allocators keep for reuse.\n")
    print("| case | minimask MiB | torch MiB | ratio | goal |\n|---|---:|---:|---:|---|")
    for name, ours, reference, (ours_before, torch_before) in steps:
        mine = (peak_bytes_cupy(cp, ours) - ours_before) / 2**20
        theirs = (peak_bytes_torch(torch, reference) - torch_before) / 2**20
        ratio = mine / theirs if theirs else float("nan")
        mark = "ok" if ratio <= MEMORY_GOAL else "**miss**"
        print(f"| {name} | {mine:.0f} | {theirs:.0f} | {ratio:.2f} | <= {MEMORY_GOAL} {mark} |")
    print()


if __name__ == "__main__":
    main()
