"""``python -m minimask.bench real``: R50-FPN at 800 pixels against torchvision, time and memory.

Two rows of work, as a user runs them:

* **inference**: one 800×1067 image (a smooth random picture), eval mode, ``box_score_thresh``
  0 so that both run the mask head on 100 detections and paste 100 masks at full size;
* **training step**: batch 1, the same image with 3 objects (ellipse masks), forward, backward
  and an SGD step (momentum 0.9).

minimask's ``r50_fpn`` against torchvision's Mask R-CNN R50-FPN with ``FrozenBatchNorm2d`` and
every stage trainable (as minimask's r50_fpn built from scratch), both with seeded random weights.
Each measurement runs in a fresh subprocess, so that its peak resident memory
(``ru_maxrss``) is its own: the process builds the model, runs the work once (warm-up) and then
times it once more. minimask and torchvision alternate (A, B, A, B) ``--repeat`` times. Ratios
are minimask / torchvision: the median and range of the per-repetition ratios.
Goal: ratio <= 1.0 for time and for peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

from minimask.bench.timing import machine, threads_note, use_threads

GOAL = 1.0
WORK = ("infer", "train")


def _child(framework: str, work: str) -> None:
    """In the subprocess: build, warm up, time one run; print one JSON line."""
    use_threads()  # the parent's --threads, from the environment
    from minimask.bench.profile import r50_inputs  # noqa: PLC0415

    images, targets = r50_inputs()
    if framework == "minimask":
        from minimask.bench.profile import build, step_fn  # noqa: PLC0415

        step = step_fn(build("r50_fpn", work), images, targets, work)
    else:
        step = _torchvision_step(images, targets, work)
    step()  # warm-up
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes
    print(json.dumps({"seconds": seconds, "peak_mb": peak_mb}), flush=True)


def _torchvision_step(images, targets, work: str):
    import torch  # noqa: PLC0415 - benchmark peer only

    from minimask.bench.parity import torchvision_maskrcnn  # noqa: PLC0415

    model = torchvision_maskrcnn(frozen_bn=True, box_score_thresh=0.0)
    images = [torch.from_numpy(image) for image in images]
    if work == "infer":

        def infer():
            with torch.no_grad():
                return model(images)

        return infer
    model.train()
    targets = [{k: torch.from_numpy(v) for k, v in t.items()} for t in targets]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)

    def train():
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return train


def _run(framework: str, work: str) -> dict:
    command = [sys.executable, "-m", "minimask.bench.real", "--child", framework, "--work", work]
    out = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"the {framework} {work} subprocess failed (exit {out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(repeat: int = 3, argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minimask.bench real")
    parser.add_argument("--work", choices=WORK, action="append", help="rows (default: both)")
    parser.add_argument("--child", choices=("minimask", "torchvision"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, args.work[0])
        return
    use_threads()
    print("## R50-FPN at 800 px: minimask vs torchvision, each run in its own process\n")
    print(f"{machine()}; {threads_note()}; {repeat} interleaved repetitions; ratio: median "
          "(min–max) of the per-repetition ratios\n")  # fmt: skip
    print("| work | minimask | torchvision | ratio (range) | goal |\n|---|---:|---:|---:|---|")
    labels = {"infer": "inference, 800×1067, 100 detections with masks",
              "train": "training step, batch 1, 800×1067, 3 objects"}  # fmt: skip
    for work in args.work or WORK:
        runs = [(_run("minimask", work), _run("torchvision", work)) for _ in range(repeat)]
        for key, unit, fmt in (("seconds", "s", ".2f"), ("peak_mb", "MB peak RSS", ".0f")):
            a = np.array([ours[key] for ours, _ in runs])
            b = np.array([theirs[key] for _, theirs in runs])
            r = a / b
            mark = "ok" if np.median(r) <= GOAL else "**miss**"
            print(f"| {labels[work]}, {unit} | {np.median(a):{fmt}} | {np.median(b):{fmt}} | "
                  f"{np.median(r):.2f} ({r.min():.2f}–{r.max():.2f}) | <= {GOAL} {mark} |",
                  flush=True)  # fmt: skip
    print()


if __name__ == "__main__":
    main()
