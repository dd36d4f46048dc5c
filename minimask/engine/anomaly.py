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

import os
import threading
import traceback
from contextlib import contextmanager

from minimask.backend import get_array_module

_state = threading.local()
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    engine_dir = os.path.join(_PACKAGE_DIR, "engine")
    for frame in reversed(traceback.extract_stack()):
        if not os.path.abspath(frame.filename).startswith(engine_dir):
            code = (frame.line or "").strip()
            return f"{frame.filename}:{frame.lineno} in {frame.name}: {code}"
    return "<unknown>"


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
        note = "" if _finite(a) else " (already non-finite: it arrived from outside the graph)"
        shapes.append(f"input {i}: shape {tuple(getattr(a, 'shape', ()))}{note}")
    return "; ".join(shapes) or "no inputs"


def check_forward(fn, inputs, out) -> None:
    """Raise :class:`AnomalyError` when ``out`` holds NaN or inf."""
    if _finite(out):
        return
    raise AnomalyError(
        f"{fn.name} produced {_describe(out)} in its forward pass.\n"
        f"  inputs: {_inputs(inputs)}\n"
        f"  created at: {fn.created_at}"
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
            f"  created at: {fn.created_at}"
        )
