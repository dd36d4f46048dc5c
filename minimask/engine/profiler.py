"""Where the time goes: a profiler that counts every engine op, forward and backward apart.

Usage::

    from minimask.engine import profile

    with profile() as prof:
        loss = total_loss(model(images, targets))
        loss.backward()
    print(prof.table())

Every :class:`~minimask.engine.tensor.Function` (Conv2d, RoIAlign, MatMul, ...) is one row per
phase: how many times it ran, its total wall time, and its share of the block's wall time.
``Function.apply`` times ``forward`` and ``Tensor.backward`` times each ``backward``. Work that
is no engine op (NMS, anchors, the matcher, pasting masks, Python glue) is the row "outside
ops"; :func:`section` names a piece of it, and that piece becomes a row of its own.

Cost when off: ``apply`` and ``backward`` read one module attribute (``active``) and compare it
with None. Cost when on: two clock reads per op (about 0.1 µs each), so the numbers are the ops'
own. The clock is wall time (``perf_counter``) unless ``profile(clock="cpu")`` asks for the
process's CPU time (``process_time``): on a machine that other jobs load, wall times grow with
the load, while the CPU time of a single-threaded run (one BLAS thread) stays the work's own.
With several BLAS threads the CPU time adds up all of them (their spinning too).

Only one profile runs at a time (a second ``profile()`` inside the first raises), and it records
the thread that opened it: ops run by other threads are not counted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

# The profile being recorded, or None: the one flag that Function.apply and backward check.
active: Profile | None = None

OUTSIDE = "outside ops"  # the row for time spent in no op and no section
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # see the module docstring


@dataclass
class Row:
    """One line of the table: an op (or section) in one phase."""

    name: str
    phase: str  # "forward", "backward" or "section"
    count: int = 0
    seconds: float = 0.0


@dataclass
class Profile:
    """The record of one ``with profile():`` block (see the module docstring)."""

    rows: dict = field(default_factory=dict)  # (name, phase) -> Row
    wall: float = 0.0  # seconds from the start to the end of the block (on ``clock``)
    thread: int = field(default_factory=threading.get_ident)
    clock: Callable[[], float] = time.perf_counter  # CLOCKS["wall"] or CLOCKS["cpu"]

    def add(self, name: str, phase: str, seconds: float) -> None:
        """Count one run of ``name`` in ``phase`` that took ``seconds``."""
        if threading.get_ident() != self.thread:
            return
        row = self.rows.get((name, phase))
        if row is None:
            row = self.rows[(name, phase)] = Row(name, phase)
        row.count += 1
        row.seconds += seconds

    def total(self, phase: str | None = None) -> float:
        """Seconds spent in ops (and sections) of ``phase``, or of all phases."""
        return sum(r.seconds for r in self.rows.values() if phase in (None, r.phase))

    def summary(self) -> list[Row]:
        """Every row, slowest first, then the "outside ops" row (wall time less everything)."""
        rows = sorted(self.rows.values(), key=lambda r: -r.seconds)
        outside = max(self.wall - self.total(), 0.0)
        return rows + [Row(OUTSIDE, "-", 1, outside)]

    def table(self, top: int | None = 25) -> str:
        """A Markdown table: op, phase, count, total ms, ms per call, share of the wall time."""
        clock = "CPU time" if self.clock is CLOCKS["cpu"] else "wall time"
        lines = [
            f"{clock} {1000 * self.wall:.0f} ms: forward ops {1000 * self.total('forward'):.0f}"
            f" ms, backward ops {1000 * self.total('backward'):.0f} ms, named sections "
            f"{1000 * self.total('section'):.0f} ms\n",
            "| op | phase | count | total ms | ms / call | share |",
            "|---|---|---:|---:|---:|---:|",
        ]
        rows = self.summary()
        shown = rows[:-1] if top is None else rows[:-1][:top]
        hidden = rows[len(shown) : -1]
        if hidden:
            rest = sum(r.seconds for r in hidden)
            shown = shown + [Row(f"({len(hidden)} more rows)", "-", sum(r.count for r in hidden),
                                 rest)]  # fmt: skip
        for r in shown + rows[-1:]:
            share = r.seconds / self.wall if self.wall > 0 else 0.0
            per_call = 1000 * r.seconds / max(r.count, 1)
            lines.append(
                f"| {r.name} | {r.phase} | {r.count} | {1000 * r.seconds:.1f} | "
                f"{per_call:.2f} | {100 * share:.1f} % |"
            )
        return "\n".join(lines)


@contextmanager
def profile(clock: str = "wall"):
    """Record every engine op run inside the block; yields the :class:`Profile`.

    ``clock``: ``"wall"`` (elapsed time) or ``"cpu"`` (this process's CPU time).
    """
    global active
    if active is not None:
        raise RuntimeError("a profile is already being recorded; profiles do not nest")
    if clock not in CLOCKS:
        raise ValueError(f"profile(clock={clock!r}): use one of {sorted(CLOCKS)}")
    prof = Profile(clock=CLOCKS[clock])
    start = prof.clock()
    active = prof
    try:
        yield prof
    finally:
        active = None
        prof.wall = prof.clock() - start


@contextmanager
def section(name: str):
    """Name a piece of non-op work (``with section("nms"):``) so the profile shows it as a row.

    Costs one flag check when no profile is recorded. Ops run inside a section are counted in
    their own rows and not in the section's (sections hold only the work outside ops), and a
    section inside another counts only in the inner one.
    """
    prof = active
    if prof is None:
        yield
        return
    ops_before = prof.total()
    start = prof.clock()
    try:
        yield
    finally:
        inside_ops = prof.total() - ops_before  # ops and inner sections
        prof.add(name, "section", prof.clock() - start - inside_ops)
