"""The NaN detective: find the first op whose output or gradient stopped being finite.

NaN losses are the most common complaint about detection frameworks, and the loss is the last place
a NaN shows up, not where it arose. In anomaly mode every op checks its forward output and, during
``backward()``, the gradients it sends to its inputs. The first non-finite value raises
:class:`AnomalyError`, naming the op, the shapes of its inputs, and the line of user code that
created it::

    from minimask.engine import detect_anomaly
    with detect_anomaly():
        loss = model(images, targets)["total"]
        loss.backward()

It costs one ``isfinite`` per op, so it is off by default. ``minimask train`` turns it on to
explain a non-finite loss.
"""

from __future__ import annotations

import linecache
import os
import sys
import threading
from contextlib import contextmanager

from minimask.backend import get_array_module

_state = threading.local()
_ENGINE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class AnomalyError(FloatingPointError):
    """A non-finite value (NaN or inf) appeared in an op's output or gradient."""


def is_enabled() -> bool:
    return getattr(_state, "enabled", False)


def set_detect_anomaly(enabled: bool) -> None:
    """Turn anomaly mode on or off for this thread."""
    _state.enabled = bool(enabled)


@contextmanager
def detect_anomaly(enabled: bool = True):
    """Check every op's output and gradient inside the block (see the module docstring)."""
    previous = is_enabled()
    set_detect_anomaly(enabled)
    try:
        yield
    finally:
        set_detect_anomaly(previous)


def user_frame() -> str:
    """``file:line in function: code`` of the innermost caller outside the minimask engine.

    Frames of ``minimask/engine`` are skipped, so the answer is the line of user or library code
    (a layer, a loss) that called the op.
    """
    frame = sys._getframe(1)  # walk outwards from the caller; cheaper than formatting the stack
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_ENGINE_DIR):
        frame = frame.f_back
    if frame is None:
        return "<unknown>"
    filename, lineno = frame.f_code.co_filename, frame.f_lineno
    code = linecache.getline(filename, lineno).strip()
    return f"{filename}:{lineno} in {frame.f_code.co_name}: {code}"


def _describe(array) -> str:
    xp = get_array_module(array)
    n_nan = int(xp.isnan(array).sum())
    n_inf = int(xp.isinf(array).sum())
    parts = []
    if n_nan:
        parts.append(f"{n_nan} NaN")
    if n_inf:
        parts.append(f"{n_inf} inf")
    return " and ".join(parts) + f" of {array.size} values"


def _finite(array) -> bool:
    if not hasattr(array, "dtype") or array.dtype.kind not in "fc":
        return True
    return bool(get_array_module(array).isfinite(array).all())


def _inputs(inputs) -> str:
    shapes = []
    for i, a in enumerate(inputs):
        note = "" if _finite(a) else f" holding {_describe(a)}"
        shapes.append(f"input {i}: shape {tuple(getattr(a, 'shape', ()))}{note}")
    return "; ".join(shapes) or "no inputs"


def _created_at(fn) -> str:
    if fn.created_at is None:
        return "unknown (the forward pass ran outside detect_anomaly; run it inside to see)"
    return fn.created_at


def check_forward(fn, inputs, out) -> None:
    """Raise :class:`AnomalyError` when ``out`` holds NaN or inf."""
    if _finite(out):
        return
    if all(_finite(a) for a in inputs):
        source = "it made them from finite inputs"
    else:  # had an op made them, that op would have raised first
        source = (
            "an input was already non-finite when it arrived: the NaN or inf came from the "
            "input data (or from an op run outside detect_anomaly), not from this op"
        )
    raise AnomalyError(
        f"{fn.name} produced {_describe(out)} in its forward pass; {source}.\n"
        f"  inputs: {_inputs(inputs)}\n"
        f"  created at: {_created_at(fn)}"
    )


def check_backward(fn, grad_out, grads) -> None:
    """Raise :class:`AnomalyError` when a gradient sent to an input holds NaN or inf."""
    for i, g in enumerate(grads):
        if g is None or _finite(g):
            continue
        source = (
            "the gradient it received was already non-finite"
            if not _finite(grad_out)
            else "its own backward rule made it (for example log or sqrt at 0, or 0/0)"
        )
        shapes = ", ".join(str(tuple(p.shape)) for p in fn.parents)
        raise AnomalyError(
            f"{fn.name} backward produced {_describe(g)} in the gradient of input {i}; {source}.\n"
            f"  input shapes: {shapes}\n"
            f"  created at: {_created_at(fn)}"
        )
