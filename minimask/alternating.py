"""4-step alternating training: how the RPN and the detector come to share one backbone.

The slides' "Training – cont." (from Ren et al., "Faster R-CNN", 2015, §3.2)::

    1. RPN       its own backbone (ImageNet weights, or random)     trains: backbone + RPN
    2. detector  a separate backbone, on step 1's proposals         trains: backbone + heads
    3. RPN       backbone := step 2's, frozen                       trains: RPN only
    4. detector  the same frozen backbone, on step 3's proposals    trains: heads only

After step 4 both read one backbone: the final model is step 2's backbone and heads with step 3's
RPN. (``minimask train`` trains all of it at once by default: approximate joint training, where
the RPN's proposals enter the detector as constants, as here.)

The model's parameters fall in three groups, which each step trains or freezes
(``requires_grad``): ``model.shared_modules()`` (FPN layout: backbone and FPN),
``model.rpn_modules()`` and ``model.detector_modules()`` (box and mask heads). Each step is one
:func:`minimask.train.fit` run with its own loss:

- steps 1 and 3, :func:`rpn_losses`: ``loss_objectness`` and ``loss_rpn_box_reg``;
- steps 2 and 4, :class:`DetectorLosses`: ``loss_classifier``, ``loss_box_reg`` and
  ``loss_mask`` on proposals computed without gradient by the step 1 (or step 3) RPN, each RPN
  on its own model's features.

What it writes to ``out_dir``:

- ``step1/`` .. ``step4/``: each step's ``checkpoint.npz`` (a whole Mask R-CNN, loadable like any
  minimask checkpoint), ``losses.jsonl`` and ``loss_curve.png``;
- ``checkpoint.npz``: the final model (weights only), which ``minimask eval`` and ``predict``
  read as they read a jointly trained one.

Each step is set up from the checkpoints of the steps before it (the same files whether those
steps ran in this process or in an earlier one), so ``resume`` continues exactly: finished steps
only load, the step that was cut short resumes as :func:`fit` resumes, and later steps start.
Step ``k`` reads the data stream from where step ``k - 1`` stopped (batch ``offset + i``), so the
whole schedule sees as many batches as a joint run of the same total iterations.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, replace

from minimask.engine import no_grad
from minimask.model.checkpoint import load_checkpoint, read_meta, save_checkpoint
from minimask.model.mask_rcnn import MaskRCNN
from minimask.nn import Module
from minimask.train import RunExistsError, TrainConfig, _remove_stale_temporaries, fit

STEPS = 4
STEP_NAMES = {
    1: "RPN with its own backbone",
    2: "detector with a separate backbone, on step 1's proposals",
    3: "RPN on step 2's frozen backbone",
    4: "detector heads on the frozen shared backbone, on step 3's proposals",
}


# ---------------------------------------------------------------------------- the schedule
def split_iterations(iterations: int) -> tuple[int, ...]:
    """``iterations`` in four near-equal steps, the first ones taking the remainder.

    Ren et al. give the four steps equal schedules; 600 -> (150, 150, 150, 150).
    """
    if iterations < STEPS:
        raise ValueError(f"iterations={iterations}: alternating training needs at least "
                         f"{STEPS}, one per step")  # fmt: skip
    q, r = divmod(iterations, STEPS)
    return tuple(q + (k < r) for k in range(STEPS))


def step_configs(config: TrainConfig, step_iterations=None) -> list[TrainConfig]:
    """The four steps' train configs: ``config`` with each step's iterations.

    ``step_iterations`` defaults to :func:`split_iterations` of ``config.iterations``. Each step
    starts a fresh optimizer (warm-up included) and drops its learning rate at the same
    fractions of the step as ``config.milestones`` are of ``config.iterations``.
    """
    counts = tuple(split_iterations(config.iterations) if step_iterations is None
                   else step_iterations)  # fmt: skip
    if len(counts) != STEPS or any(int(n) != n or n < 1 for n in counts):
        raise ValueError(f"step_iterations={list(counts)}: give {STEPS} counts of at least 1")
    return [replace(config, iterations=int(n),
                    milestones=tuple(int(m * n / config.iterations) for m in config.milestones))
            for n in counts]  # fmt: skip


def step_dir(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, f"step{step}")


def step_checkpoint(out_dir: str, step: int) -> str:
    return os.path.join(step_dir(out_dir, step), "checkpoint.npz")


# ---------------------------------------------------------------------------- the losses
def rpn_losses(model: MaskRCNN, images, targets) -> dict:
    """Steps 1 and 3: the RPN's two terms (L_cls + λ·p*·L_box) on the model's own features."""
    x, sizes, _, targets = model.preprocess(images, targets)
    rpn_features, _ = model.features(x)
    _, losses = model.rpn(rpn_features, sizes, tuple(x.shape[-2:]), targets)
    return losses


@no_grad()
def proposals_of(rpn_model: MaskRCNN, x, sizes, rpn_features=None) -> list:
    """The proposals of ``rpn_model``'s RPN on a preprocessed batch ``x`` (N, 3, Hp, Wp).

    Returns N arrays (P_i, 4), (x1, y1, x2, y2) in padded-batch pixels, with no gradient: the
    detector takes them as given. ``rpn_features`` are ``rpn_model``'s own when already
    computed (step 4); otherwise its backbone runs on ``x`` (step 2).
    """
    if rpn_features is None:
        rpn_features, _ = rpn_model.features(x)
    proposals, _ = rpn_model.rpn(rpn_features, sizes, tuple(x.shape[-2:]))
    return proposals


class DetectorLosses:
    """Steps 2 and 4: the box and mask heads' losses on another RPN's proposals.

    ``proposer`` is the model whose RPN proposes (step 2: step 1's model, with its own
    backbone); None means the trained model's own RPN on its own features (step 4).
    """

    def __init__(self, proposer: MaskRCNN | None = None):
        self.proposer = proposer

    def __call__(self, model: MaskRCNN, images, targets) -> dict:
        x, sizes, _, targets = model.preprocess(images, targets)
        rpn_features, head_features = model.features(x)
        if self.proposer is None:
            proposals = proposals_of(model, x, sizes, rpn_features)
        else:
            proposals = proposals_of(self.proposer, x, sizes)
        return model.detector_losses(head_features, proposals, sizes, tuple(x.shape[-2:]),
                                     targets)  # fmt: skip


# ---------------------------------------------------------------------------- the steps
def freeze(modules) -> None:
    """Stop training every parameter of ``modules`` (``requires_grad = False``)."""
    for module in modules:
        for p in module.parameters():
            p.requires_grad = False


def copy_weights(targets: list[Module], sources: list[Module]) -> None:
    """Copy the parameters and buffers of each source module into its target, in place."""
    for target, source in zip(targets, sources, strict=True):
        target.load_state_dict(source.state_dict())


def setup_step(step: int, new_model: Callable[[], MaskRCNN], out_dir: str):
    """Step ``step``'s model, its trainable parameters marked, and its loss function.

    ``new_model()`` gives a fresh model with its initial weights (ImageNet's backbone or random)
    and the stages it may train; the earlier steps' results are read from their checkpoints in
    ``out_dir``. Returns ``(model, loss_fn)`` for :func:`minimask.train.fit`.
    """

    def trained(k: int) -> MaskRCNN:
        model = new_model()
        load_checkpoint(step_checkpoint(out_dir, k), model)
        return model

    model = new_model()
    if step == 1:  # backbone + RPN
        freeze(model.detector_modules())
        return model, rpn_losses
    if step == 2:  # a separate backbone + heads; step 1's model only proposes
        rpn_model = trained(1).train()  # proposes as in training (rpn_post_nms_top_n_train)
        freeze([rpn_model])
        freeze(model.rpn_modules())
        return model, DetectorLosses(rpn_model)
    if step == 3:  # step 1's RPN on step 2's backbone, frozen
        load_checkpoint(step_checkpoint(out_dir, 1), model)
        copy_weights(model.shared_modules(), trained(2).shared_modules())
        freeze(model.shared_modules() + model.detector_modules())
        return model, rpn_losses
    if step == 4:  # step 2's backbone and heads with step 3's RPN: one backbone from now on
        load_checkpoint(step_checkpoint(out_dir, 2), model)
        copy_weights(model.rpn_modules(), trained(3).rpn_modules())
        freeze(model.shared_modules() + model.rpn_modules())
        return model, DetectorLosses()
    raise ValueError(f"step={step}: the steps are 1..{STEPS}")


# ---------------------------------------------------------------------------- the run
def train_alternating(
    new_model: Callable[[], MaskRCNN],
    get_batch: Callable[[int], tuple],
    configs: list[TrainConfig],
    out_dir: str,
    resume: bool = False,
    progress: bool = True,
    meta: dict | None = None,
    overwrite: bool = False,
    log=print,
) -> MaskRCNN:
    """Train in four steps (module docstring); returns the final model, one backbone shared.

    Args:
        new_model: ``() -> MaskRCNN``, a fresh model with its initial weights, on its device.
        get_batch: ``i -> (images, targets)``, deterministic in ``i``.
        configs: the four steps' train configs (:func:`step_configs`).
        resume, overwrite, meta, log: as :func:`minimask.train.fit`, for the whole schedule.

    Raises:
        RunExistsError: ``out_dir`` holds a run and neither ``resume`` nor ``overwrite`` is set.
        ValueError: ``resume`` of a run whose facts differ (named), of a joint-training run, or
            one where a later step already started from an earlier step that would now change.
    """
    if len(configs) != STEPS:
        raise ValueError(f"{len(configs)} train configs: alternating training has {STEPS} steps")
    _prepare(out_dir, resume, overwrite)
    offset = 0
    for step, config in enumerate(configs, start=1):
        if resume:
            _check_later_steps(out_dir, step, config)
        model, loss_fn = setup_step(step, new_model, out_dir)
        log(f"step {step} of {STEPS}: {STEP_NAMES[step]} ({config.iterations} iterations)")
        step_meta = {**(meta or {}), "schedule": "alternating", "step": step,
                     "data_offset": offset}  # fmt: skip
        fit(model, _shifted(get_batch, offset), config, step_dir(out_dir, step), resume=resume,
            progress=progress, meta=step_meta, log=log, loss_fn=loss_fn)  # fmt: skip
        offset += config.iterations
    final_meta = {**(meta or {}), "schedule": "alternating",
                  "step_iterations": [c.iterations for c in configs],
                  "train_configs": [asdict(c) for c in configs]}  # fmt: skip
    save_checkpoint(os.path.join(out_dir, "checkpoint.npz"), model, None, offset, final_meta)
    return model


def _shifted(get_batch, offset: int):
    """The data stream from batch ``offset`` on: ``i -> get_batch(offset + i)``."""
    return lambda i: get_batch(offset + i)


def _files_of(folder: str) -> list[str]:
    """The checkpoint and the log in ``folder``, those that exist."""
    paths = [os.path.join(folder, name) for name in ("checkpoint.npz", "losses.jsonl")]
    return [path for path in paths if os.path.exists(path)]


def _run_files(out_dir: str) -> list[str]:
    """The files of a run in ``out_dir``: the final checkpoint and log, and every step's."""
    return [p for f in [out_dir, *(step_dir(out_dir, k) for k in range(1, STEPS + 1))]
            for p in _files_of(f)]  # fmt: skip


def _prepare(out_dir: str, resume: bool, overwrite: bool) -> None:
    """Refuse, resume or clear a run already in ``out_dir``, before any step trains."""
    os.makedirs(out_dir, exist_ok=True)
    _remove_stale_temporaries(out_dir)  # a killed save of the final checkpoint
    existing = _run_files(out_dir)
    final = os.path.join(out_dir, "checkpoint.npz")
    if resume:
        if os.path.exists(final) and read_meta(final).get("schedule") != "alternating":
            raise ValueError(f"cannot resume {out_dir} with --schedule alternating: it holds a "
                             "joint training run; resume it without --schedule alternating, or "
                             "use another --out")  # fmt: skip
        return
    if existing and not overwrite:
        shown = ", ".join(os.path.relpath(p, out_dir) for p in existing)
        raise RunExistsError(f"{out_dir} already holds a run ({shown}): add --resume to continue "
                             "it, or --overwrite to start again")  # fmt: skip
    for path in existing:  # all at once: no stale later step may outlive a new earlier one
        os.remove(path)


def _check_later_steps(out_dir: str, step: int, config: TrainConfig) -> None:
    """Refuse to train step ``step`` further when a later step already started from it."""
    path = step_checkpoint(out_dir, step)
    reached = read_meta(path)["iteration"] if os.path.exists(path) else 0
    if reached >= config.iterations:
        return  # finished: fit only loads it
    later = [k for k in range(step + 1, STEPS + 1) if _files_of(step_dir(out_dir, k))]
    if later:
        raise ValueError(
            f"cannot resume {out_dir}: step {later[0]} already started from step {step}'s "
            f"{reached} iterations, but step {step} would now run {config.iterations}; resume "
            "with the run's own step iterations, or start again with --overwrite"
        )
