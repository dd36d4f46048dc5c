"""Layers, modules and training parts built on the engine, in the shape of ``torch.nn``.

- :mod:`minimask.nn.module`: ``Module``, ``Parameter``, ``Sequential``, ``ModuleList``
  (parameters, buffers, ``state_dict``, ``save``/``load`` as ``.npz``).
- :mod:`minimask.nn.conv`, :mod:`minimask.nn.pool`: ``conv2d``, ``conv_transpose2d``,
  ``max_pool2d``, ``upsample_nearest`` (functions on Tensors).
- :mod:`minimask.nn.layers`: ``Linear``, ``Conv2d``, ``ConvTranspose2d``, ``MaxPool2d``, ``ReLU``...
- :mod:`minimask.nn.norm`: ``GroupNorm``, ``FrozenBatchNorm2d``, ``group_norm``.
- :mod:`minimask.nn.init`: ``kaiming_normal_``, ``kaiming_uniform_``, ``normal_``, ``zeros_``...
- :mod:`minimask.nn.optim`: ``SGD``, ``AdamW``, ``WarmupMultiStepSchedule``, ``clip_grad_norm``.
"""

from minimask.nn import init
from minimask.nn.conv import conv2d, conv_transpose2d
from minimask.nn.layers import (
    Conv2d,
    ConvTranspose2d,
    Flatten,
    Identity,
    Linear,
    MaxPool2d,
    ReLU,
    Sigmoid,
    Upsample,
    flatten,
    linear,
)
from minimask.nn.module import LoadResult, Module, ModuleList, Parameter, Sequential, save_npz
from minimask.nn.norm import FrozenBatchNorm2d, GroupNorm, group_norm
from minimask.nn.optim import SGD, AdamW, Optimizer, WarmupMultiStepSchedule, clip_grad_norm
from minimask.nn.pool import max_pool2d, upsample_bilinear, upsample_nearest

__all__ = [
    "SGD",
    "AdamW",
    "Conv2d",
    "ConvTranspose2d",
    "Flatten",
    "FrozenBatchNorm2d",
    "GroupNorm",
    "Identity",
    "Linear",
    "LoadResult",
    "MaxPool2d",
    "Module",
    "ModuleList",
    "Optimizer",
    "Parameter",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "Upsample",
    "WarmupMultiStepSchedule",
    "clip_grad_norm",
    "conv2d",
    "conv_transpose2d",
    "flatten",
    "group_norm",
    "init",
    "linear",
    "max_pool2d",
    "save_npz",
    "upsample_bilinear",
    "upsample_nearest",
]
