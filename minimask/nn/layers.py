"""The layers of a CNN as Modules: Linear, Conv2d, ConvTranspose2d, MaxPool2d, ReLU, Flatten...

Each layer holds its parameters and calls a function that does the maths (``linear`` here;
``conv2d`` and friends in :mod:`minimask.nn.conv` and :mod:`minimask.nn.pool`). Default
initialisation is torch's: weights ``kaiming_uniform_(a=sqrt(5))``, i.e. U(-1/sqrt(fan_in),
1/sqrt(fan_in)), and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

Shape letters: N batch, C channels, H x W spatial size, F features.
"""

from __future__ import annotations

import math

import numpy as np

from minimask.engine import Tensor
from minimask.nn import init
from minimask.nn.conv import conv2d, conv_transpose2d
from minimask.nn.module import Module, Parameter
from minimask.nn.pool import max_pool2d, upsample_nearest


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if np.isscalar(v) else (int(v[0]), int(v[1]))


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``y = x @ weight.T + bias``.

    Args:
        x: (..., F_in), at least 2 dims.
        weight: (F_out, F_in).
        bias: (F_out,) or None.

    Returns:
        (..., F_out).
    """
    y = x @ weight.T
    return y if bias is None else y + bias


def _default_init(weight: Parameter, bias: Parameter | None, fan_in: int) -> None:
    """torch's default for Linear, Conv2d and ConvTranspose2d."""
    init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        init.uniform_(bias, -bound, bound)


class Linear(Module):
    """A fully connected layer: (..., F_in) -> (..., F_out), ``y = x @ W.T + b``, W (F_out, F_in).

    Initialised as torch: W and b uniform in +-1 / sqrt(F_in).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype=np.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(np.empty((out_features, in_features), dtype=dtype))
        self.bias = Parameter(np.empty((out_features,), dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _default_init(self.weight, self.bias, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class Conv2d(Module):
    """2-D convolution: (N, C_in, H, W) -> (N, C_out, H', W'), weight (C_out, C_in, kh, kw).

    ``H' = (H + 2 * padding - dilation * (kh - 1) - 1) // stride + 1``, and likewise for W'.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        bias: bool = True,
        dtype=np.float32,
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        kh, kw = self.kernel_size
        self.weight = Parameter(np.empty((out_channels, in_channels, kh, kw), dtype=dtype))
        self.bias = Parameter(np.empty((out_channels,), dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        fan_in, _ = init.calculate_fan_in_and_fan_out(self.weight)
        _default_init(self.weight, self.bias, fan_in)

    def forward(self, x: Tensor, relu: bool = False) -> Tensor:
        """The conv; ``relu=True`` adds a ReLU inside the same op (see ``nn.conv.Conv2d``)."""
        return conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, relu)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"bias={self.bias is not None}"
        )


class ConvTranspose2d(Module):
    """Transposed convolution (the gradient of a conv): (N, C_in, H, W) -> (N, C_out, H', W').

    Weight (C_in, C_out, kh, kw), as torch. ``H' = (H - 1) * stride - 2 * padding + kh``. The mask
    head uses ``kernel_size=2, stride=2`` to double the resolution.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        bias: bool = True,
        dtype=np.float32,
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding = stride, padding
        kh, kw = self.kernel_size
        self.weight = Parameter(np.empty((in_channels, out_channels, kh, kw), dtype=dtype))
        self.bias = Parameter(np.empty((out_channels,), dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # torch computes fan_in from weight.shape[1] (= C_out) here; we follow it exactly.
        fan_in, _ = init.calculate_fan_in_and_fan_out(self.weight)
        _default_init(self.weight, self.bias, fan_in)

    def forward(self, x: Tensor) -> Tensor:
        return conv_transpose2d(x, self.weight, self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}"
        )


class MaxPool2d(Module):
    """Max over each ``kernel_size`` window: (N, C, H, W) -> (N, C, H', W'); stride defaults to
    the kernel size."""

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x: Tensor) -> Tensor:
        return max_pool2d(x, self.kernel_size, self.stride, self.padding)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class Upsample(Module):
    """Nearest-neighbour upsampling: (N, C, H, W) -> (N, C, H * s, W * s) or to ``size``."""

    def __init__(self, size=None, scale_factor=None):
        super().__init__()
        self.size, self.scale_factor = size, scale_factor

    def forward(self, x: Tensor) -> Tensor:
        return upsample_nearest(x, size=self.size, scale_factor=self.scale_factor)

    def extra_repr(self) -> str:
        return f"size={self.size}, scale_factor={self.scale_factor}"


class ReLU(Module):
    """``max(x, 0)`` elementwise."""

    def forward(self, x: Tensor) -> Tensor:
        return x.relu()


class Sigmoid(Module):
    """``1 / (1 + exp(-x))`` elementwise."""

    def forward(self, x: Tensor) -> Tensor:
        return x.sigmoid()


class Identity(Module):
    """Returns its input (a placeholder where a layer is optional)."""

    def forward(self, x: Tensor) -> Tensor:
        return x


def flatten(x: Tensor, start_dim: int = 1) -> Tensor:
    """Merge the axes from ``start_dim`` on: (N, C, H, W) -> (N, C * H * W) for ``start_dim=1``."""
    start_dim = start_dim % x.ndim
    merged = int(np.prod(x.shape[start_dim:]))  # explicit, so that N = 0 (no RoIs) works too
    return x.reshape(x.shape[:start_dim] + (merged,))


class Flatten(Module):
    """(N, C, H, W) -> (N, C * H * W); see :func:`flatten`."""

    def __init__(self, start_dim: int = 1):
        super().__init__()
        self.start_dim = start_dim

    def forward(self, x: Tensor) -> Tensor:
        return flatten(x, self.start_dim)

    def extra_repr(self) -> str:
        return f"start_dim={self.start_dim}"
