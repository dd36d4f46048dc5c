"""The training loop: checkpoints, exact resume, and a NaN that says where it arose.

``fit`` drives any model whose ``forward(images, targets)`` returns a dict of named losses (the
Mask R-CNN's ``loss_objectness``, ``loss_rpn_box_reg``, ``loss_classifier``, ``loss_box_reg``,
``loss_mask``). One iteration is:

    batch = get_batch(i)                 # deterministic in i: resuming replays the same stream
    model.rng = rng((seed, i))           # the samplers' randomness, also a function of i
    losses = model(images, targets); total = sum(losses)
    total.backward(); clip_grad_norm; optimizer.step()

Because the batch and the samplers' random numbers depend only on ``(seed, i)``, a run resumed from
the checkpoint of iteration ``i`` continues exactly as the uninterrupted run would have.

What it writes to ``out_dir``:

- ``losses.jsonl``: one JSON line per iteration (every loss term, the total, the learning rate);
- ``loss_curve.png``: each loss term against the iteration;
- ``checkpoint.npz``: the model, the optimizer, and the iteration reached, written atomically
  every ``checkpoint_every`` iterations and at the end (a crash mid-write keeps the old one).

On a non-finite loss the step is re-run under the NaN detective, and training stops with
:class:`NonFiniteLossError` naming the op where the NaN arose and the last good checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

from minimask.backend import rng
from minimask.engine import AnomalyError, detect_anomaly
from minimask.model.checkpoint import load_checkpoint, save_checkpoint
from minimask.nn import SGD, AdamW, Module, WarmupMultiStepSchedule, clip_grad_norm


class NonFiniteLossError(FloatingPointError):
    """The loss stopped being finite; the message says where and which checkpoint is good."""


@dataclass(frozen=True)
class TrainConfig:
    iterations: int = 1000  # optimizer steps in the whole run
    lr: float = 0.02  # base learning rate (after warm-up, before decay)
    optimizer: str = "sgd"  # "sgd" (momentum 0.9) or "adamw"
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # L2 penalty (decoupled for AdamW)
    warmup_iters: int = 100  # linear warm-up from warmup_factor * lr
    warmup_factor: float = 0.001  # lr fraction at iteration 0
    milestones: tuple[int, ...] = ()  # iterations where lr is multiplied by gamma
    gamma: float = 0.1  # decay factor at each milestone
    clip_norm: float = 10.0  # clip the global gradient norm to this (0: off)
    checkpoint_every: int = 200  # iterations between checkpoints
    seed: int = 0  # seeds the data stream and the samplers


def make_optimizer(model: Module, config: TrainConfig):
    """SGD or AdamW over the trainable parameters; norm and bias parameters get no weight decay."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "sgd":
        return SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    raise ValueError(f"optimizer={config.optimizer!r}; use 'sgd' or 'adamw'")


def make_schedule(config: TrainConfig) -> WarmupMultiStepSchedule:
    return WarmupMultiStepSchedule(
        base_lr=config.lr,
        milestones=tuple(config.milestones),
        gamma=config.gamma,
        warmup_iters=config.warmup_iters,
        warmup_factor=config.warmup_factor,
    )


# ---------------------------------------------------------------------------- the loop
def total_loss(losses: dict):
    total = None
    for value in losses.values():
        total = value if total is None else total + value
    return total


def fit(
    model: Module,
    get_batch: Callable[[int], tuple],
    config: TrainConfig,
    out_dir: str,
    resume: bool = False,
    progress: bool = True,
    meta: dict | None = None,
) -> list[dict]:
    """Train ``model`` for ``config.iterations`` steps; returns the per-iteration log records.

    Args:
        get_batch: ``i -> (images, targets)``, deterministic in ``i``.
        resume: continue from ``out_dir/checkpoint.npz`` (error if it is missing).
        meta: extra JSON-able facts stored in the checkpoint (the model preset, the dataset).
    """
    os.makedirs(out_dir, exist_ok=True)
    ckpt = os.path.join(out_dir, "checkpoint.npz")
    log_path = os.path.join(out_dir, "losses.jsonl")
    optimizer, schedule = make_optimizer(model, config), make_schedule(config)
    meta = {"train_config": asdict(config), **(meta or {})}
    start = 0
    if resume:
        start = load_checkpoint(ckpt, model, optimizer)["iteration"]
        _truncate_log(log_path, start)
    elif os.path.exists(log_path):
        os.remove(log_path)

    params = [p for p in model.parameters() if p.requires_grad]
    records = []
    bar = _progress(range(start, config.iterations), progress, start, config.iterations)
    model.train()
    for i in bar:
        lr = schedule(i)
        optimizer.set_lr(lr)
        images, targets = get_batch(i)
        model.rng = rng((config.seed, i))
        losses = model(images, targets)
        total = total_loss(losses)
        values = {k: float(v.item()) for k, v in losses.items()}
        if not math.isfinite(float(total.item())):
            _explain_nan(model, images, targets, config.seed, i, values, ckpt)
        optimizer.zero_grad()
        total.backward()
        # clip_norm 0 turns clipping off (an infinite bound), not the check of the norm below
        grad_norm = clip_grad_norm(params, config.clip_norm or math.inf)
        if not math.isfinite(grad_norm):
            _explain_nan(model, images, targets, config.seed, i, values, ckpt)
        optimizer.step()
        record = {"iteration": i + 1, "lr": lr, "total": sum(values.values()), **values}
        records.append(record)
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{record['total']:.3f}", lr=f"{lr:.4f}")
        if (i + 1) % config.checkpoint_every == 0 or i + 1 == config.iterations:
            save_checkpoint(ckpt, model, optimizer, i + 1, meta)
    plot_losses(log_path, os.path.join(out_dir, "loss_curve.png"))
    return records


def _progress(iterable, enabled: bool, start: int, total: int):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm  # noqa: PLC0415 - progress bars only when asked

    return tqdm(iterable, initial=start, total=total, desc="train", dynamic_ncols=True)


def _truncate_log(path: str, iteration: int) -> None:
    """Drop log lines past ``iteration`` (written after the checkpoint we resume from)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if json.loads(line)["iteration"] <= iteration]
    with open(path, "w") as f:
        f.writelines(keep)


def _explain_nan(model, images, targets, seed, i, values, ckpt) -> None:
    """Re-run step ``i`` under the NaN detective and raise with where the NaN arose."""
    where = "the detective found no non-finite op on re-running the step"
    try:
        with detect_anomaly():
            model.rng = rng((seed, i))
            total_loss(model(images, targets)).backward()
    except AnomalyError as e:
        where = str(e)
    good = ckpt if os.path.exists(ckpt) else "none written yet"
    raise NonFiniteLossError(
        f"non-finite loss or gradient at iteration {i + 1}: {values}\n{where}\n"
        f"last good checkpoint: {good}"
    )


def plot_losses(log_path: str, png_path: str) -> None:
    """Every loss term of ``losses.jsonl`` against the iteration, on a log scale.

    Uses a bare ``Figure`` (no pyplot), so it never changes the plotting backend of a notebook.
    """
    from matplotlib.figure import Figure  # noqa: PLC0415 - plotting only when asked

    with open(log_path) as f:
        records = [json.loads(line) for line in f]
    if not records:
        return
    keys = [k for k in records[0] if k not in ("iteration", "lr")]
    its = [r["iteration"] for r in records]
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for k in keys:
        ax.plot(its, [max(r[k], 1e-6) for r in records], label=k, lw=2 if k == "total" else 1)
    ax.set(xlabel="iteration", ylabel="loss", yscale="log", title="training losses")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
