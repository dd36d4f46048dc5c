"""The shared timing, thread and table code of every benchmark.

Timing: each row runs minimask and the reference alternately (A, B, A, B...), so that other
load on the machine falls on both alike, and reports the median time of each and the median and
range (min–max) of the per-repetition ratios A/B.

Threads: :func:`use_threads` gives both sides the same number (``--threads N``, default every
core); benchmarks that run subprocesses pass it on in ``MINIMASK_BENCH_THREADS``.
"""

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


BENCH_THREADS = "MINIMASK_BENCH_THREADS"  # the threads of both sides, for subprocesses


def use_threads(threads: int | None = None) -> int:
    """Give minimask's BLAS and torch ``threads`` threads each (None: ``MINIMASK_BENCH_THREADS``
    when set, else every core); returns the count. Subprocesses started afterwards inherit it."""
    from minimask.backend import cores, set_threads  # noqa: PLC0415

    if threads is None:
        threads = int(os.environ.get(BENCH_THREADS, "0")) or cores()
    os.environ[BENCH_THREADS] = str(threads)
    set_threads(threads)
    try:
        import torch  # noqa: PLC0415 - benchmark peer only

        torch.set_num_threads(threads)
    except ImportError:
        pass
    return threads


def threads_note() -> str:
    """The threads of both sides, for a table's header."""
    from minimask.backend import blas_threads  # noqa: PLC0415

    note = f"minimask (NumPy's BLAS) {blas_threads()} threads"
    try:
        import torch  # noqa: PLC0415

        return f"{note}, torch {torch.__version__} {torch.get_num_threads()} threads"
    except ImportError:
        return f"{note}; torch not installed: reference columns empty"


def interleaved(ours: Callable[[], object], reference: Callable[[], object] | None,
                repeat: int = 5, warmup: int = 1) -> dict:  # fmt: skip
    """Time ``ours`` and ``reference`` alternately ``repeat`` times after ``warmup`` runs each.

    Returns ``{"ours_ms", "ref_ms"}`` (medians), ``"ratio"`` (median of the per-repetition
    ratios), ``"low"`` and ``"high"`` (their range); NaN where there is no reference.
    """
    fns = [ours] + ([reference] if reference is not None else [])
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, record in zip(fns, times):
            start = time.perf_counter()
            fn()
            record.append(time.perf_counter() - start)
    a = 1000 * np.array(times[0])
    if reference is None:
        nan = float("nan")
        return {"ours_ms": float(np.median(a)), "ref_ms": nan, "ratio": nan, "low": nan,
                "high": nan}  # fmt: skip
    b = 1000 * np.array(times[1])
    ratios = a / b
    return {"ours_ms": float(np.median(a)), "ref_ms": float(np.median(b)),
            "ratio": float(np.median(ratios)), "low": float(ratios.min()),
            "high": float(ratios.max())}  # fmt: skip


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
    """Time each case (interleaved, see :func:`interleaved`), print a Markdown table, and return
    its rows as dicts."""
    print(f"## {title}\n\n{machine()}; {threads_note()}; {repeat} interleaved runs, median "
          "times; ratio: median (min–max) of the per-run ratios\n")  # fmt: skip
    print("| case | minimask ms | reference ms | ratio (range) |" + (" goal |" if goal else ""))
    print("|---|---:|---:|---:|" + ("---|" if goal else ""))
    rows = []
    for case in cases:
        r = interleaved(case.ours, case.reference, repeat)
        ratio = r["ratio"]
        mark = ""
        if goal:
            mark = (" ok |" if ratio <= goal else " **miss** |") if ratio == ratio else " - |"
        print(f"| {case.name} | {r['ours_ms']:.1f} | {r['ref_ms']:.1f} | {ratio:.2f} "
              f"({r['low']:.2f}–{r['high']:.2f}) |{mark}", flush=True)  # fmt: skip
        rows.append({"case": case.name, **r})
    print()
    return rows
