"""The training loop: checkpoints, exact resume, and a NaN that says where it arose.

``fit`` drives any model whose ``forward(images, targets)`` returns a dict of named losses (the
Mask R-CNN's ``loss_objectness``, ``loss_rpn_box_reg``, ``loss_classifier``, ``loss_box_reg``,
``loss_mask``), or any ``loss_fn(model, images, targets)`` that does. One iteration is:

    batch = get_batch(i)                 # deterministic in i: resuming replays the same stream
    model.rng = rng((seed, i))           # the samplers' randomness, also a function of i
    losses = model(images, targets); total = sum(losses)     # or loss_fn(model, ...)
    total.backward(); clip_grad_norm; optimizer.step()       # the requires_grad parameters

Because the batch and the samplers' random numbers depend only on ``(seed, i)``, a run resumed from
the checkpoint of iteration ``i`` continues exactly as the uninterrupted run would have, bit for
bit at a fixed BLAS thread count (``MINIMASK_THREADS=N``): under the default "auto" policy the
count may change with the machine's load, and OpenBLAS's sums then round differently (the two runs
then agree to about 1e-7 relative; README, "CPU threads").

What it writes to ``out_dir``:

- ``losses.jsonl``: one JSON line per iteration (every loss term, the total, the learning rate);
- ``loss_curve.png``: each loss term against the iteration;
- ``checkpoint.npz``: the model, the optimizer, and the iteration reached, written atomically
  every ``checkpoint_every`` iterations and at the end (a crash mid-write keeps the old one).

On a non-finite loss the step is re-run under the NaN detective, and training stops with
:class:`NonFiniteLossError` naming the op where the NaN arose and the last good checkpoint.

Nothing is lost:

- a folder that already holds a run is refused unless ``resume`` (continue it) or ``overwrite``
  (start again) says what to do with it (:class:`RunExistsError`);
- ``resume`` refuses a run whose stored facts (classes, batch size, seed, model, optimizer...)
  differ from the new ones, naming the field and both values; without a checkpoint it starts
  afresh, with a note;
- the weights are checked before every save, so a non-finite update never replaces the last
  good checkpoint;
- the first Ctrl-C finishes the iteration, saves a checkpoint and stops
  (:class:`TrainingInterrupted`); a second one aborts at once;
- temporary files left by a killed save are removed at the start, and a half-written last line
  of ``losses.jsonl`` (a full disk) is dropped on resume.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from minimask.backend import adapt_threads, get_array_module, rng
from minimask.engine import AnomalyError, detect_anomaly
from minimask.model.checkpoint import load_checkpoint, read_meta, save_checkpoint
from minimask.nn import SGD, AdamW, Module, WarmupMultiStepSchedule, clip_grad_norm


class NonFiniteLossError(FloatingPointError):
    """The loss stopped being finite; the message says where and which checkpoint is good."""


class RunExistsError(ValueError):
    """The output folder already holds a run, and neither resume nor overwrite was asked for."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training after saving a checkpoint; the message says where."""


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

    def __post_init__(self):
        """Refuse settings that could only train on garbage, naming the value."""
        problems = [
            (not (math.isfinite(self.lr) and self.lr > 0), f"lr={self.lr} must be finite and > 0"),
            (self.iterations < 1, f"iterations={self.iterations} must be >= 1"),
            (self.warmup_iters < 0, f"warmup_iters={self.warmup_iters} must be >= 0"),
            (not 0 < self.warmup_factor <= 1, f"warmup_factor={self.warmup_factor} not in (0, 1]"),
            (self.checkpoint_every < 1, f"checkpoint_every={self.checkpoint_every} must be >= 1"),
            (not (self.clip_norm >= 0), f"clip_norm={self.clip_norm} must be >= 0 (0: off)"),
            (not math.isfinite(self.gamma) or self.gamma <= 0, f"gamma={self.gamma} must be > 0"),
            (not (math.isfinite(self.weight_decay) and self.weight_decay >= 0),
             f"weight_decay={self.weight_decay} must be finite and >= 0"),
        ]  # fmt: skip
        for bad, message in problems:
            if bad:
                raise ValueError(f"TrainConfig: {message}")


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
def model_losses(model: Module, images, targets) -> dict:
    """The default loss of an iteration: the model's own forward in training mode."""
    return model(images, targets)


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
    overwrite: bool = False,
    log=print,
    loss_fn: Callable[[Module, list, list], dict] = model_losses,
) -> list[dict]:
    """Train ``model`` for ``config.iterations`` steps; returns the per-iteration log records.

    Args:
        get_batch: ``i -> (images, targets)``, deterministic in ``i``.
        resume: continue from ``out_dir/checkpoint.npz`` (a fresh start, with a note, if none).
        meta: extra JSON-able facts stored in the checkpoint (the model preset, the dataset).
        overwrite: start again in a folder that already holds a run.
        log: where notes go (``print`` by default).
        loss_fn: ``(model, images, targets) -> dict of losses`` (default: ``model(images,
            targets)``); another one trains the model on part of its losses, as each step of
            :mod:`minimask.alternating` does. Only parameters with ``requires_grad`` train.

    Raises:
        RunExistsError: ``out_dir`` holds a run and neither ``resume`` nor ``overwrite`` is set.
        ValueError: ``resume`` and the checkpoint's facts differ from ``meta`` or ``config``.
        NonFiniteLossError: the loss, the gradient or the weights stopped being finite.
        TrainingInterrupted: Ctrl-C; the checkpoint of the last finished iteration is saved.
    """
    os.makedirs(out_dir, exist_ok=True)
    ckpt = os.path.join(out_dir, "checkpoint.npz")
    log_path = os.path.join(out_dir, "losses.jsonl")
    _remove_stale_temporaries(out_dir)
    optimizer, schedule = make_optimizer(model, config), make_schedule(config)
    meta = {"train_config": asdict(config), **(meta or {})}
    start = 0
    if resume and os.path.exists(ckpt):
        check_resume(read_meta(ckpt), meta, ckpt)
        start = load_checkpoint(ckpt, model, optimizer)["iteration"]
        _truncate_log(log_path, start)
    else:
        if resume:
            log(f"note: no checkpoint in {out_dir} to resume from: starting from iteration 0")
        existing = [p for p in (ckpt, log_path) if os.path.exists(p)]
        if existing and not (overwrite or resume):
            raise RunExistsError(
                f"{out_dir} already holds a run ({', '.join(map(os.path.basename, existing))}):"
                " add --resume to continue it, or --overwrite to start again"
            )
        for path in existing:
            os.remove(path)

    params = [p for p in model.parameters() if p.requires_grad]
    xp = get_array_module(next(iter(model.parameters())).data)  # the model's device
    records = []
    bar = _progress(range(start, config.iterations), progress, start, config.iterations)
    model.train()
    with _interruptible() as interrupt:
        for i in bar:
            adapt_threads()  # BLAS threads: the cores no other process is using (backend.py)
            records.append(_step(model, optimizer, schedule, params, get_batch, config, i, ckpt,
                                 xp, loss_fn))  # fmt: skip
            with open(log_path, "a") as f:
                f.write(json.dumps(records[-1]) + "\n")
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{records[-1]['total']:.3f}", lr=f"{records[-1]['lr']:.4f}")
            last = i + 1 == config.iterations
            if (i + 1) % config.checkpoint_every == 0 or last or interrupt.requested:
                _check_finite_weights(model, i, ckpt)
                save_checkpoint(ckpt, model, optimizer, i + 1, meta)
            if interrupt.requested and not last:
                plot_losses(log_path, os.path.join(out_dir, "loss_curve.png"))
                raise TrainingInterrupted(
                    f"interrupted: saved iteration {i + 1} of {config.iterations} in {ckpt}; "
                    "run the same command with --resume to continue"
                )
    plot_losses(log_path, os.path.join(out_dir, "loss_curve.png"))
    return records


def _step(model, optimizer, schedule, params, get_batch, config, i, ckpt, xp,
          loss_fn=model_losses) -> dict:  # fmt: skip
    """One iteration (the module docstring's five lines); returns its log record."""
    lr = schedule(i)
    optimizer.set_lr(lr)
    images, targets = get_batch(i)  # host arrays: the model's transform uploads them
    model.rng = rng((config.seed, i), xp)  # on the model's device (backend.rng's policy)
    losses = loss_fn(model, images, targets)
    total = total_loss(losses)
    values = {k: float(v.item()) for k, v in losses.items()}  # the step's one sync: the log
    if not math.isfinite(float(total.item())):
        _explain_nan(model, images, targets, config.seed, i, values, ckpt, xp, loss_fn)
    optimizer.zero_grad()
    total.backward()
    # clip_norm 0 turns clipping off (an infinite bound), not the check of the norm below
    grad_norm = clip_grad_norm(params, config.clip_norm or math.inf)
    if not math.isfinite(grad_norm):
        _explain_nan(model, images, targets, config.seed, i, values, ckpt, xp, loss_fn)
    optimizer.step()
    return {"iteration": i + 1, "lr": lr, "total": sum(values.values()), **values}


# Facts a resumed run may change: how long it runs, and how often it saves. (The lr milestones
# default to 80% of the iterations, so they follow a longer run.) Everything else must match.
RESUMABLE_CHANGES = ("iterations", "checkpoint_every", "milestones")


def check_resume(stored: dict, new: dict, path: str) -> None:
    """Refuse to resume when the run's stored facts differ from the new ones.

    Compares every fact of ``new`` (the train config, the model config, the classes, the batch
    size, the data source...) with the checkpoint's, except :data:`RESUMABLE_CHANGES`.
    """

    def flat(meta):
        out = {k: v for k, v in meta.items() if k not in ("iteration", "param_groups")}
        out.update({f"train_config.{k}": v for k, v in out.pop("train_config", {}).items()})
        out.update({f"model_config.{k}": v for k, v in out.pop("model_config", {}).items()})
        return json.loads(json.dumps(out))  # tuples as lists, as stored

    old, now = flat(stored), flat(new)
    for key in sorted(set(old) | set(now)):
        if key.split(".")[-1] in RESUMABLE_CHANGES:
            continue
        if old.get(key) != now.get(key):
            raise ValueError(
                f"cannot resume {path}: {key} was {old.get(key)!r}, now {now.get(key)!r} "
                "(resume with the run's own settings, or start a new run in another --out)"
            )


def _check_finite_weights(model: Module, i: int, ckpt: str) -> None:
    """Refuse to save non-finite weights over the last good checkpoint."""
    for name, p in model.named_parameters():
        if not bool(p.xp.isfinite(p.data).all()):
            good = ckpt if os.path.exists(ckpt) else "none written yet"
            raise NonFiniteLossError(
                f"parameter {name} is not finite after iteration {i + 1} (the update overflowed:"
                f" lower the learning rate or add warm-up); not saved. Last good checkpoint: {good}"
            )


class _interruptible:
    """While training: the first Ctrl-C asks to stop after the iteration (and save), a second one
    aborts at once. Only the main thread can catch signals; elsewhere Ctrl-C works as usual."""

    def __enter__(self):
        self.requested, self.previous = False, None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt  # the second Ctrl-C
        self.requested = True
        print("\nCtrl-C: saving a checkpoint after this iteration (Ctrl-C again to abort)",
              file=sys.stderr, flush=True)  # fmt: skip

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


def _remove_stale_temporaries(out_dir: str) -> None:
    """Delete the temporary files of saves that a kill interrupted (``.tmp-*.npz``)."""
    for name in os.listdir(out_dir):
        if name.startswith(".tmp-") and name.endswith(".npz"):
            os.remove(os.path.join(out_dir, name))


def _progress(iterable, enabled: bool, start: int, total: int):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm  # noqa: PLC0415 - progress bars only when asked

    return tqdm(iterable, initial=start, total=total, desc="train", dynamic_ncols=True)


def _truncate_log(path: str, iteration: int) -> None:
    """Keep the log's complete lines up to ``iteration`` (the checkpoint resumed from).

    Lines past it were written after that checkpoint; a line cut short (a full disk, a kill
    mid-write) ends the usable log.
    """
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break  # a half-written line: nothing after it is trusted either
            if not line.endswith("\n") or record.get("iteration", math.inf) > iteration:
                break
            keep.append(line)
    with open(path, "w") as f:
        f.writelines(keep)


def _explain_nan(model, images, targets, seed, i, values, ckpt, xp=np,
                 loss_fn=model_losses) -> None:  # fmt: skip
    """Re-run step ``i`` under the NaN detective and raise with where the NaN arose."""
    where = "the detective found no non-finite op on re-running the step"
    try:
        with detect_anomaly():
            model.rng = rng((seed, i), xp)
            total_loss(loss_fn(model, images, targets)).backward()
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
