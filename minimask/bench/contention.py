"""``python -m minimask.bench contention``: two identical trainings at once, against one alone.

A machine's cores are often shared: two experiments started together, or tests beside a
training. Fair sharing of C cores between two equal jobs makes each take about 2× its time alone.
Thread pools that spin while they wait for work (BLAS's and OpenMP's) can do much worse: each
pool's spinning threads take the cores the other pool's working threads need.

Each row times ``--iterations`` training steps of the ``tiny`` preset (batch 4, 128×128 shapes;
the model built and one warm-up step run before the clock starts), each run in a fresh
subprocess: once alone, then two started together. The ratio is (the slower of the pair) / (the
lone run). minimask and torchvision alternate within each repetition (alone A, alone B, pair A,
pair B, ...) so that other load on the machine hits both alike. Goal: ratio <= 2.5.

The threads of each side are those of ``--threads`` (default: minimask's thread policy, see
``minimask.backend.set_threads``, and torch's default for torch).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

from minimask.bench.timing import machine

GOAL = 2.5


def _child(framework: str, iterations: int, threads: int | None) -> None:
    """Run in the subprocess: time ``iterations`` training steps, print one JSON line."""
    from minimask.backend import adapt_threads, set_threads  # noqa: PLC0415
    from minimask.data.shapes import CLASSES, shapes_batches  # noqa: PLC0415

    get_batch = shapes_batches(0, 4)
    if framework == "minimask":
        from minimask.backend import rng  # noqa: PLC0415
        from minimask.model.checkpoint import build_model  # noqa: PLC0415
        from minimask.train import TrainConfig, make_optimizer, total_loss  # noqa: PLC0415

        used = set_threads(threads)
        model = build_model("tiny", 0, num_classes=len(CLASSES))
        opt = make_optimizer(model, TrainConfig(lr=0.001))

        def step(i):
            adapt_threads()  # what minimask.train.fit does each step
            images, targets = get_batch(i)
            model.rng = rng(i)
            loss = total_loss(model(images, targets))
            opt.zero_grad()
            loss.backward()
            opt.step()

    else:
        import torch  # noqa: PLC0415

        from minimask.bench.train import _torch_batch, _torchvision_model  # noqa: PLC0415

        if threads is not None:
            torch.set_num_threads(threads)
        used = torch.get_num_threads()
        torch.manual_seed(0)
        model = _torchvision_model().train()
        opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)

        def step(i):
            images, targets = _torch_batch(get_batch(i)[1])
            loss = sum(model(images, targets).values())
            opt.zero_grad()
            loss.backward()
            opt.step()

    step(0)  # warm-up
    start = time.perf_counter()
    for i in range(1, iterations + 1):
        step(i)
    if framework == "minimask":
        used = adapt_threads()  # the count at the end
    print(json.dumps({"seconds": time.perf_counter() - start, "threads": used}), flush=True)


def _launch(framework: str, iterations: int, threads: int | None) -> subprocess.Popen:
    command = [sys.executable, "-m", "minimask.bench.contention", "--child", framework,
               "--iterations", str(iterations)]  # fmt: skip
    if threads is not None:
        command += ["--threads", str(threads)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen, deadline: float) -> dict:
    """The run's JSON line; a run still going at ``deadline`` is stopped and counts as taking
    until then (its ratio is then a lower bound, shown with ">")."""
    try:
        out, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"seconds": float("inf"), "threads": None}
    if proc.returncode != 0:
        raise SystemExit(f"a benchmark subprocess failed (exit {proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def run(framework: str, iterations: int, threads: int | None, together: int,
        limit: float) -> list[dict]:  # fmt: skip
    """``together`` identical runs started at once, each stopped after ``limit`` seconds."""
    procs = [_launch(framework, iterations, threads) for _ in range(together)]
    deadline = time.monotonic() + limit
    return [_result(p, deadline) for p in procs]


def main(repeat: int = 3, argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minimask.bench contention")
    parser.add_argument("--iterations", type=int, default=10, help="timed steps per run")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--frameworks", default="minimask,torchvision")
    parser.add_argument("--limit", type=float, default=120, help="seconds before a run is stopped")
    parser.add_argument("--child", choices=("minimask", "torchvision"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, args.iterations, args.threads)
        return
    frameworks = args.frameworks.split(",")
    alone = {f: [] for f in frameworks}
    pair = {f: [] for f in frameworks}
    used = {}
    for _ in range(repeat):
        for f in frameworks:  # interleaved: alone A, alone B, then the pairs
            (r,) = run(f, args.iterations, args.threads, 1, args.limit)
            alone[f].append(r["seconds"])
            used[f] = r["threads"] if r["threads"] is not None else "?"
        for f in frameworks:
            runs = run(f, args.iterations, args.threads, 2, args.limit)
            pair[f].append(max(r["seconds"] for r in runs))
            print(f"{f}: alone {alone[f][-1]:.2f} s, two at once {pair[f][-1]:.2f} s (slower)",
                  flush=True)  # fmt: skip
    print(f"## Two trainings at once: tiny, batch 4, {args.iterations} steps each\n")
    print(f"{machine()}; threads: " + ", ".join(f"{f} {used[f]}" for f in frameworks)
          + f"; {repeat} interleaved repetitions, median (min–max)\n")  # fmt: skip
    print("| framework | alone s | two at once s (slower) | ratio | goal |")
    print("|---|---:|---:|---:|---|")
    for f in frameworks:
        a, p = np.array(alone[f]), np.minimum(np.array(pair[f]), args.limit)
        if np.isinf(a).any():  # no lone time to compare with
            print(f"| {f} | >{args.limit:.0f} (stopped) | >= {np.median(p):.0f} | - | - |")
            continue
        ratios = p / a
        more = ">" if np.isinf(pair[f]).any() else ""  # a stopped run: a lower bound
        mark = "ok" if np.median(ratios) <= GOAL else "**miss**"
        print(f"| {f} | {np.median(a):.2f} ({a.min():.2f}–{a.max():.2f}) | {more}{np.median(p):.2f}"
              f" ({p.min():.2f}–{p.max():.2f}) | {more}{np.median(ratios):.2f} "
              f"({ratios.min():.2f}–{ratios.max():.2f}) | <= {GOAL} {mark} |")  # fmt: skip
    print()


if __name__ == "__main__":
    main()
