"""Normalisation layers: GroupNorm (trainable) and FrozenBatchNorm2d (a fixed affine map).

GroupNorm (Wu & He, 2018) normalises each image on its own, so it works with the batch of 1-2
images that detection trains on. The C channels are split into G groups of C/G; each
(image, group) slab of ``M = (C/G) * H * W`` values gets its own mean and variance::

    xhat = (x - mean) / sqrt(var + eps)        # var is the biased variance, as in torch
    y    = xhat * weight[c] + bias[c]          # per-channel affine (when affine=True)

Its backward is written by hand (one fused op instead of ~10 small ones): with ``gx = g * weight``
and means taken over each slab,

    dx = rstd * (gx - mean(gx) - xhat * mean(gx * xhat)),   rstd = 1 / sqrt(var + eps).

FrozenBatchNorm2d is BatchNorm with its statistics frozen, as torchvision uses for a pre-trained
backbone: ``y = x * scale + shift`` with ``scale = weight / sqrt(running_var + eps)`` and
``shift = bias - running_mean * scale``. All four arrays are buffers: saved, never trained.

Shape letters: N images, C channels, G groups, S spatial axes (any number, usually H, W).
"""

from __future__ import annotations

import numpy as np

from minimask.backend import get_array_module
from minimask.engine import Function, Tensor
from minimask.nn.module import Module, Parameter


# ---------------------------------------------------------------------------- plain array functions
def group_norm_forward(x, weight, bias, num_groups: int, eps: float = 1e-5):
    """GroupNorm on arrays, without the engine.

    Args:
        x: (N, C, *S).
        weight, bias: (C,) each, or None for no affine map.
        num_groups: G; must divide C.

    Returns:
        ``(y, saved)``: y of x's shape, and what :func:`group_norm_backward` needs.
    """
    xp = get_array_module(x)
    n, c = x.shape[:2]
    if c % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide the {c} channels")
    m = (c // num_groups) * int(np.prod(x.shape[2:]))
    xg = x.reshape(n, num_groups, m)  # (N, G, M): one row per (image, group) slab
    mean = xg.mean(axis=-1, keepdims=True)  # (N, G, 1)
    centred = xg - mean
    var = (centred * centred).mean(axis=-1, keepdims=True)
    rstd = 1 / xp.sqrt(var + eps)  # (N, G, 1)
    xhat = (centred * rstd).reshape(x.shape)  # (N, C, *S)
    affine_shape = (1, c) + (1,) * (x.ndim - 2)  # broadcasts a (C,) array over N and S
    y = xhat
    if weight is not None:
        y = y * weight.reshape(affine_shape)
    if bias is not None:
        y = y + bias.reshape(affine_shape)
    saved = (xhat, rstd, weight, (n, num_groups, m), affine_shape, bias is not None)
    return y, saved


def group_norm_backward(grad, saved):
    """Gradients ``(dx, dweight, dbias)`` of GroupNorm; dweight/dbias are None without affine."""
    xhat, rstd, weight, group_shape, affine_shape, has_bias = saved
    reduce_axes = (0,) + tuple(range(2, xhat.ndim))  # every axis but C
    dweight = (grad * xhat).sum(axis=reduce_axes) if weight is not None else None
    dbias = grad.sum(axis=reduce_axes) if has_bias else None
    gx = grad * weight.reshape(affine_shape) if weight is not None else grad  # dL/dxhat
    gx = gx.reshape(group_shape)  # (N, G, M)
    xhat_g = xhat.reshape(group_shape)
    dx = rstd * (
        gx - gx.mean(axis=-1, keepdims=True) - xhat_g * (gx * xhat_g).mean(axis=-1, keepdims=True)
    )
    return dx.reshape(xhat.shape), dweight, dbias


class GroupNormFunction(Function):
    """The engine op around :func:`group_norm_forward` / :func:`group_norm_backward`.

    Inputs are ``(x,)`` or ``(x, weight, bias)``.
    """

    def forward(self, x, *affine, num_groups=1, eps=1e-5):
        weight, bias = affine if affine else (None, None)
        y, self.saved = group_norm_forward(x, weight, bias, num_groups, eps)
        return y

    def backward(self, grad):
        dx, dweight, dbias = group_norm_backward(grad, self.saved)
        if dweight is None:
            return (dx,)
        return dx, dweight, dbias


def group_norm(x: Tensor, num_groups: int, weight=None, bias=None, eps: float = 1e-5) -> Tensor:
    """GroupNorm of ``x`` (N, C, *S) with optional per-channel ``weight`` and ``bias`` (C,).

    ``weight`` and ``bias`` go together: give both or neither.
    """
    if (weight is None) != (bias is None):
        raise ValueError("group_norm takes both weight and bias, or neither")
    tensors = (x,) if weight is None else (x, weight, bias)
    return GroupNormFunction.apply(*tensors, num_groups=num_groups, eps=eps)


# ---------------------------------------------------------------------------- modules
class GroupNorm(Module):
    """GroupNorm as torch.nn.GroupNorm: (N, C, *S) -> same shape; weight 1 and bias 0 at start."""

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        dtype=np.float32,
    ):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"num_groups={num_groups} must divide num_channels={num_channels}")
        self.num_groups, self.num_channels = num_groups, num_channels
        self.eps, self.affine = eps, affine
        if affine:
            self.weight = Parameter(np.ones(num_channels, dtype=dtype))
            self.bias = Parameter(np.zeros(num_channels, dtype=dtype))
        else:
            self.weight = self.bias = None

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"GroupNorm({self.num_channels} channels) got input {x.shape}")
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"


class FrozenBatchNorm2d(Module):
    """BatchNorm with fixed statistics and affine map, as torchvision.ops.FrozenBatchNorm2d.

    (N, C, H, W) -> same shape, ``y = x * scale + shift`` (see the module docstring). The buffers
    ``weight``, ``bias``, ``running_mean`` and ``running_var`` (all (C,)) start at 1, 0, 0, 1 and
    are filled by loading a pre-trained state dict. Only ``x`` gets a gradient.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, dtype=np.float32):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.register_buffer("weight", np.ones(num_features, dtype=dtype))
        self.register_buffer("bias", np.zeros(num_features, dtype=dtype))
        self.register_buffer("running_mean", np.zeros(num_features, dtype=dtype))
        self.register_buffer("running_var", np.ones(num_features, dtype=dtype))

    def scale_and_shift(self):
        """The folded ``(scale, shift)`` arrays, each (C,)."""
        xp = get_array_module(self.weight.data)
        scale = self.weight.data / xp.sqrt(self.running_var.data + self.eps)
        shift = self.bias.data - self.running_mean.data * scale
        return scale, shift

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self.scale_and_shift()
        c = self.num_features
        scale = scale.reshape(1, c, 1, 1).astype(x.dtype, copy=False)  # (1, C, 1, 1)
        shift = shift.reshape(1, c, 1, 1).astype(x.dtype, copy=False)
        return x * Tensor(scale) + Tensor(shift)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"
