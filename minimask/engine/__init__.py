"""A tiny autograd engine on NumPy/CuPy arrays. Start with :mod:`minimask.engine.tensor`."""

from minimask.engine import ops
from minimask.engine.anomaly import AnomalyError, detect_anomaly, set_detect_anomaly
from minimask.engine.ops import (
    as_tensor,
    concatenate,
    matmul,
    maximum,
    minimum,
    pad,
    stack,
    unbroadcast,
    where,
)
from minimask.engine.profiler import profile, section
from minimask.engine.tensor import Function, Tensor, is_grad_enabled, no_grad

__all__ = [
    "AnomalyError",
    "Function",
    "Tensor",
    "as_tensor",
    "concatenate",
    "detect_anomaly",
    "is_grad_enabled",
    "matmul",
    "maximum",
    "minimum",
    "no_grad",
    "ops",
    "pad",
    "profile",
    "section",
    "set_detect_anomaly",
    "stack",
    "unbroadcast",
    "where",
]
