"""Weight initialisation, with PyTorch's conventions (``torch.nn.init``).

Each function fills a Tensor (or array) *in place* and returns it. The random numbers come from one
NumPy generator in this module, so ``manual_seed(0)`` before building a model makes its weights
reproducible; pass ``rng=`` to use your own generator instead.

Fan conventions (as torch): for a weight of shape (out, in, k1, k2, ...),
``fan_in = in * k1 * k2 * ...`` and ``fan_out = out * k1 * k2 * ...``. A transposed conv's weight is
(C_in, C_out, kh, kw), so its "fan_in" is ``C_out * kh * kw``, exactly as torch computes it.

Kaiming He et al., "Delving Deep into Rectifiers" (2015): a layer followed by a ReLU keeps the
variance of its activations when its weights have std ``gain / sqrt(fan)``, ``gain = sqrt(2)``.
"""

from __future__ import annotations

import math

import numpy as np

from minimask.backend import get_array_module
from minimask.engine import Tensor

_rng = np.random.default_rng(0)


def manual_seed(seed: int) -> None:
    """Reseed the generator that every init function uses by default."""
    global _rng
    _rng = np.random.default_rng(seed)


def _fill(tensor, values: np.ndarray):
    """Write host ``values`` into ``tensor`` (a Tensor or an array) in place, on its device."""
    data = tensor.data if isinstance(tensor, Tensor) else tensor
    xp = get_array_module(data)
    data[...] = xp.asarray(values, dtype=data.dtype)
    return tensor


def _shape(tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def calculate_fan_in_and_fan_out(tensor) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a weight of shape (out, in, *kernel); see the module docstring."""
    shape = _shape(tensor)
    if len(shape) < 2:
        raise ValueError(f"fan in and fan out need a weight of 2 or more dims, got shape {shape}")
    receptive_field = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return shape[1] * receptive_field, shape[0] * receptive_field


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    """The recommended std multiplier for a layer followed by ``nonlinearity`` (torch's table)."""
    linear = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose2d", "sigmoid")
    if nonlinearity in linear:
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        slope = 0.01 if param is None else float(param)
        return math.sqrt(2.0 / (1 + slope**2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ValueError(f"unknown nonlinearity {nonlinearity!r}")


def _fan(tensor, mode: str) -> int:
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")
    fan_in, fan_out = calculate_fan_in_and_fan_out(tensor)
    return fan_in if mode == "fan_in" else fan_out


def uniform_(tensor, a: float = 0.0, b: float = 1.0, rng=None):
    """Fill with U(a, b)."""
    return _fill(tensor, (rng or _rng).uniform(a, b, size=_shape(tensor)))


def normal_(tensor, mean: float = 0.0, std: float = 1.0, rng=None):
    """Fill with N(mean, std^2)."""
    return _fill(tensor, (rng or _rng).normal(mean, std, size=_shape(tensor)))


def constant_(tensor, value: float):
    """Fill with ``value``."""
    return _fill(tensor, np.full(_shape(tensor), value))


def zeros_(tensor):
    return constant_(tensor, 0.0)


def ones_(tensor):
    return constant_(tensor, 1.0)


def kaiming_uniform_(
    tensor, a: float = 0.0, mode: str = "fan_in", nonlinearity: str = "leaky_relu", rng=None
):
    """Fill with U(-bound, bound), ``bound = gain * sqrt(3 / fan)`` (std ``gain / sqrt(fan)``).

    ``a`` is the negative slope of the leaky ReLU that follows. torch's Linear and Conv2d default is
    ``a = sqrt(5)``, which gives ``bound = 1 / sqrt(fan_in)``.
    """
    std = calculate_gain(nonlinearity, a) / math.sqrt(_fan(tensor, mode))
    bound = math.sqrt(3.0) * std
    return uniform_(tensor, -bound, bound, rng=rng)


def kaiming_normal_(
    tensor, a: float = 0.0, mode: str = "fan_in", nonlinearity: str = "leaky_relu", rng=None
):
    """Fill with N(0, std^2), ``std = gain / sqrt(fan)``.

    Mask R-CNN's heads use ``mode="fan_out", nonlinearity="relu"`` (detectron2's c2_msra_fill).
    """
    std = calculate_gain(nonlinearity, a) / math.sqrt(_fan(tensor, mode))
    return normal_(tensor, 0.0, std, rng=rng)
