"""``python -m minimask.bench.gpu_check``: the whole GPU check of ``make gpu-check``, one report.

Three parts, each in its own process, each run whatever the others gave:

1. **tests**: ``pytest -m gpu``, every GPU test (CPU == GPU, the CUDA kernels among them);
2. **benchmark**: ``python -m minimask.bench gpu``, minimask on CuPy against torch on CUDA;
3. **training**: 300 iterations of ``minimask train`` on COCO-mini (person) at batch 2, with
   ``MINIMASK_DEVICE=gpu``, timed.

The report, ``runs/gpu-check/report.md`` (``--out``), holds the date, the commit, the card as
``nvidia-smi --query-gpu=name,memory.total --format=csv`` names it, and for each part its
command, exit status, wall time and output (the training's last lines; the whole of each output
is kept beside the report: ``tests.log``, ``bench.log``, ``train.log``), with a note where the
status alone would mislead: GPU tests that all skipped, or a training that no option sent to the
GPU. The exit status is 1 when any part failed or has such a note. docs/benchmarks.md ("GPU")
describes the report.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

TAIL = 60  # lines of a long output shown in the report


def parts(python: str, coco_root: str, out: Path, iterations: int) -> list[dict]:
    """The three parts: a title, the command, extra environment, the log's name, whole or tail."""
    options = "--dataset coco --categories person --batch-size 2 --overwrite --no-progress"
    train = [python, "-m", "minimask", "train", *options.split(), "--root", coco_root]
    train += ["--iterations", str(iterations), "--out", str(out / "train")]
    train += ["--device", "gpu"] if train_has_device_option(python) else []
    return [
        dict(
            title="Tests: pytest -m gpu",
            command=[python, "-m", "pytest", "-m", "gpu", "-q"],
            env={},
            log="tests.log",
            whole=False,
        ),
        dict(
            title="Benchmark: python -m minimask.bench gpu",
            command=[python, "-m", "minimask.bench", "gpu"],
            env={},
            log="bench.log",
            whole=True,
        ),
        dict(
            title=f"Training: {iterations} iterations of COCO-mini (person), batch 2, on the GPU",
            command=train,
            env={"MINIMASK_DEVICE": "gpu"},
            log="train.log",
            whole=False,
        ),
    ]


def train_has_device_option(python: str) -> bool:
    """Whether ``minimask train`` takes ``--device`` (else only MINIMASK_DEVICE can ask for the
    GPU, and nothing shows that the training used it)."""
    done = subprocess.run(
        [python, "-m", "minimask", "train", "--help"], capture_output=True, text=True
    )
    return "--device" in done.stdout


def notes(result: dict, out: Path) -> list[str]:
    """What the exit status alone does not say: GPU tests that all skipped (no GPU was used),
    and a training that was not told to use the GPU by an option."""
    text = (out / result["log"]).read_text(errors="replace")
    lines = text.strip().splitlines()
    found = []
    if result["log"] == "tests.log" and not (lines and " passed" in lines[-1]):
        found.append("no GPU test passed: they were all skipped or deselected (no GPU seen)")
    if result["log"] == "train.log" and "--device" not in result["command"]:
        found.append(
            "`minimask train` has no --device option here: MINIMASK_DEVICE=gpu was "
            "set, but nothing in this report shows that the training ran on the GPU"
        )
    return found


def run_part(part: dict, out: Path) -> dict:
    """Run one part, its output into its log; returns its exit status and wall time."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **part["env"])
    log = out / part["log"]
    start = time.perf_counter()
    with open(log, "w") as f:
        status = subprocess.run(part["command"], env=env, stdout=f, stderr=subprocess.STDOUT)
    result = dict(part, status=status.returncode, seconds=time.perf_counter() - start)
    result["notes"] = notes(result, out)
    return result


def card() -> str:
    """``nvidia-smi``'s name and memory of the card(s), or why there is none."""
    command = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"nvidia-smi did not run: {error}"
    return (done.stdout + done.stderr).strip()


def commit() -> str:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() or "unknown"


def report(results: list[dict], out: Path) -> str:
    """The Markdown report (docs/benchmarks.md, "GPU", describes it)."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [
        "# minimask GPU check",
        "",
        f"- date: {now}",
        f"- commit: {commit()}",
        f"- python: {sys.version.split()[0]}",
        "",
        "```",
        card(),
        "```",
        "",
        "| part | exit status | wall time | note |",
        "|---|---:|---:|---|",
    ]
    lines += [
        f"| {r['title']} | {r['status']} | {r['seconds']:.1f} s | {'; '.join(r['notes'])} |"
        for r in results
    ]
    for r in results:
        env = " ".join(f"{k}={v}" for k, v in r["env"].items())
        text = (out / r["log"]).read_text(errors="replace").rstrip("\n").splitlines()
        shown = text if r["whole"] or len(text) <= TAIL else text[-TAIL:]
        lines += [
            "",
            f"## {r['title']}",
            "",
            f"`{(env + ' ') if env else ''}{shlex.join(r['command'])}`",
            "",
            f"exit status {r['status']}, {r['seconds']:.1f} s",
        ]
        lines += [f"**Note:** {note}" for note in r["notes"]]
        if len(shown) < len(text):
            lines += [f"(the last {len(shown)} of {len(text)} lines; all in {r['log']})"]
        lines += ["", "```", *shown, "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m minimask.bench.gpu_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="runs/gpu-check", help="folder of the report and logs")
    parser.add_argument("--coco-root", default="../shared/data/coco-mini", help="COCO-mini")
    parser.add_argument("--iterations", type=int, default=300, help="training iterations")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for part in parts(sys.executable, args.coco_root, out, args.iterations):
        print(f"gpu-check: {part['title']} ...", flush=True)
        results.append(run_part(part, out))
        print(
            f"gpu-check:   exit status {results[-1]['status']}, {results[-1]['seconds']:.1f} s",
            flush=True,
        )
    (out / "report.md").write_text(report(results, out))
    print(f"gpu-check: report in {out / 'report.md'}")
    return 1 if any(r["status"] != 0 or r["notes"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
