"""The shared timing and table code of every benchmark."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass
class Case:
    """One benchmark row: the same work done by minimask and by the reference (or None)."""

    name: str
    ours: Callable[[], object]
    reference: Callable[[], object] | None = None


def median_ms(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeat`` runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def machine() -> str:
    """A one-line description of this machine, for the benchmark tables."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, numpy {np.__version__}, {platform.python_version()}"


def run_cases(cases: list[Case], repeat: int = 5, title: str = "", goal: float | None = None):
    """Time each case, print a Markdown table, and return its rows as dicts."""
    try:
        import torch  # noqa: PLC0415 - benchmark peer only

        torch_note = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    except ImportError:
        torch_note = "torch not installed: reference columns empty"
    print(f"## {title}\n\n{machine()}; {torch_note}; median of {repeat} runs\n")
    print("| case | minimask ms | reference ms | ratio |" + (" goal |" if goal else ""))
    print("|---|---:|---:|---:|" + ("---|" if goal else ""))
    rows = []
    for case in cases:
        ours = median_ms(case.ours, repeat)
        ref = median_ms(case.reference, repeat) if case.reference is not None else float("nan")
        ratio = ours / ref if ref == ref else float("nan")
        mark = ""
        if goal:
            mark = (" ok |" if ratio <= goal else " **miss** |") if ratio == ratio else " - |"
        print(f"| {case.name} | {ours:.1f} | {ref:.1f} | {ratio:.2f} |{mark}", flush=True)
        rows.append({"case": case.name, "ours_ms": ours, "ref_ms": ref, "ratio": ratio})
    print()
    return rows
