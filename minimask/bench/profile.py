"""``python -m minimask.bench profile [--preset P] [--mode train|infer] [--clock wall|cpu]``.

Prints where one training step (or one inference) of minimask's Mask R-CNN spends its time, per
engine op and phase, from :func:`minimask.engine.profile` (see ``minimask/engine/profiler.py``).
One step runs first as a warm-up (workspaces grown, caches filled); the next one is profiled.

Inputs: ``tiny``: a batch of 4 shapes images of 128×128 (``minimask.data.shapes``);
``r50_fpn``: one 800×1067 image with 3 objects (the real-scale rows of ``bench real``), random
weights. Inference runs in eval mode with ``box_score_thresh`` 0, so the mask head sees 100
detections.
"""

from __future__ import annotations

import argparse

from minimask.bench.timing import machine, threads_note


def r50_inputs(height: int = 800, width: int = 1067, objects: int = 3):
    """One smooth random image (3, H, W) and its target of ``objects`` ellipses."""
    from minimask.bench.parity import mask_targets, smooth_image  # noqa: PLC0415

    return [smooth_image(height, width, seed=0)], [mask_targets(height, width, objects, seed=10)]


def inputs(preset: str):
    """``(images, targets)`` for one step of ``preset`` (module docstring)."""
    if preset == "tiny":
        from minimask.data.shapes import shapes_batches  # noqa: PLC0415

        return shapes_batches(0, 4)(0)
    return r50_inputs()


def build(preset: str, mode: str):
    """The model of ``preset`` with seeded random weights, for ``mode`` ("train" or "infer")."""
    from minimask.data.shapes import CLASSES  # noqa: PLC0415
    from minimask.model.checkpoint import build_model  # noqa: PLC0415

    changes = {"num_classes": len(CLASSES)} if preset == "tiny" else {}
    if mode == "infer":
        changes["box_score_thresh"] = 0.0
    model = build_model(preset, 0, **changes)
    return model.train() if mode == "train" else model.eval()


def step_fn(model, images, targets, mode: str):
    """One training step (forward, backward, SGD step) or one inference, as a callable."""
    from minimask.backend import rng  # noqa: PLC0415
    from minimask.engine import no_grad  # noqa: PLC0415
    from minimask.train import TrainConfig, make_optimizer, total_loss  # noqa: PLC0415

    if mode == "infer":

        def infer():
            with no_grad():
                return model(images)

        return infer
    optimizer = make_optimizer(model, TrainConfig(lr=0.001))

    def train():
        model.rng = rng(0)  # the same sampling every step
        loss = total_loss(model(images, targets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return train


def main(repeat: int = 1, argv=None) -> None:
    from minimask.engine import profile  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="python -m minimask.bench profile")
    parser.add_argument("--preset", choices=("tiny", "r50_fpn"), default="tiny")
    parser.add_argument("--mode", choices=("train", "infer"), default="train")
    parser.add_argument("--top", type=int, default=25, help="rows shown (the rest summed)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: the process's CPU time, steady on a loaded machine with "
                        "--threads 1 (see minimask/engine/profiler.py)")  # fmt: skip
    args = parser.parse_args(argv)
    model = build(args.preset, args.mode)
    step = step_fn(model, *inputs(args.preset), args.mode)
    step()  # warm-up
    with profile(clock=args.clock) as prof:
        step()
    what = "one training step" if args.mode == "train" else "one inference"
    print(f"## Profile of {what}, preset {args.preset}\n\n{machine()}; {threads_note()}\n")
    print(prof.table(top=args.top))
    print()


if __name__ == "__main__":
    main()
