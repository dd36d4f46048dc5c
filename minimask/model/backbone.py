"""The backbone: a ResNet that turns an image into feature maps C2..C5 (He et al., 2016).

Mask R-CNN §3.1 uses a ResNet-FPN backbone. The ResNet here has the layout of torchvision's
``resnet*`` (``conv1``/``bn1`` stem, ``layer1``..``layer4`` stages, stride on the 3x3 conv of a
bottleneck, "ResNet v1.5"), so that the ``r50_fpn`` preset matches torchvision layer for layer.

Shape letters: N images, C channels, H×W the padded image size. The stages output

    C2 (N, c2, H/4,  W/4)    C3 (N, c3, H/8,  W/8)
    C4 (N, c4, H/16, W/16)   C5 (N, c5, H/32, W/32)

with c_i = stage_channels[i] for basic blocks and 4·stage_channels[i] for bottlenecks.
"""

from __future__ import annotations

from minimask.engine import Tensor
from minimask.model.config import MaskRCNNConfig
from minimask.nn import (
    Conv2d,
    FrozenBatchNorm2d,
    GroupNorm,
    Module,
    ModuleList,
    Sequential,
    conv2d,
    init,
    max_pool2d,
)


def make_norm(config: MaskRCNNConfig, channels: int) -> Module:
    """The normalisation layer the config asks for, over ``channels`` channels."""
    if config.norm == "frozen_bn":
        return FrozenBatchNorm2d(channels)
    if config.norm == "group_norm":
        return GroupNorm(min(config.group_norm_groups, channels), channels)
    raise ValueError(f"config.norm={config.norm!r}; use 'frozen_bn' or 'group_norm'")


class ConvNorm(Sequential):
    """A bias-free conv ("same" padding) followed by the norm: the ResNet unit.

    Named ``0`` (the conv) and ``1`` (the norm) in the state dict, as torchvision's
    ``conv``/``bn`` pairs map to them. A frozen batch norm is an affine map per channel, so it
    is folded into the conv: ``conv(x, W) * scale + shift == conv(x, W * scale) + shift``,
    computed as one conv with the scaled weight and ``shift`` as its bias. That saves two full
    passes over the conv's output (a multiply and an add into new arrays); the weight is scaled
    anew at every call (a pass over the weight, far smaller than the maps), through the engine,
    so a trainable conv still gets its gradient. The result equals the unfolded one up to float
    rounding (``tests/test_backbone.py``). ``relu=True`` adds the ReLU that follows most units,
    inside the conv op when folded (one map instead of two kept for the backward pass).
    """

    def forward(self, x: Tensor, relu: bool = False) -> Tensor:
        """The conv, then the norm, then (``relu=True``) a ReLU."""
        conv, norm = self[0], self[1]
        if not isinstance(norm, FrozenBatchNorm2d) or conv.bias is not None:
            out = super().forward(x)
            return out.relu() if relu else out
        scale, shift = norm.scale_and_shift()  # (O,) each
        scale = Tensor(scale.reshape(-1, 1, 1, 1).astype(conv.weight.dtype, copy=False))
        shift = Tensor(shift.astype(x.dtype, copy=False))
        weight = conv.weight * scale  # (O, C, kh, kw)
        return conv2d(x, weight, shift, conv.stride, conv.padding, conv.dilation, relu=relu)


def conv_norm(config, c_in: int, c_out: int, kernel: int, stride: int = 1) -> ConvNorm:
    """A bias-free conv ("same" padding) followed by the norm: the ResNet unit."""
    conv = Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)
    init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return ConvNorm(conv, make_norm(config, c_out))


class BasicBlock(Module):
    """Two 3x3 convs and a shortcut (ResNet-18/34): x -> relu(F(x) + shortcut(x))."""

    expansion = 1

    def __init__(self, config, c_in: int, width: int, stride: int):
        super().__init__()
        self.conv1 = conv_norm(config, c_in, width, 3, stride)
        self.conv2 = conv_norm(config, width, width, 3)
        c_out = width * self.expansion
        self.downsample = (
            conv_norm(config, c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else None
        )

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.conv1(x, relu=True))
        return (out + shortcut).relu()


class Bottleneck(Module):
    """1x1 reduce, 3x3 (with the stride), 1x1 expand by 4, and a shortcut (ResNet-50/101)."""

    expansion = 4

    def __init__(self, config, c_in: int, width: int, stride: int):
        super().__init__()
        self.conv1 = conv_norm(config, c_in, width, 1)
        self.conv2 = conv_norm(config, width, width, 3, stride)
        self.conv3 = conv_norm(config, width, width * self.expansion, 1)
        c_out = width * self.expansion
        self.downsample = (
            conv_norm(config, c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else None
        )

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.conv3(self.conv2(self.conv1(x, relu=True), relu=True))
        return (out + shortcut).relu()


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def make_stage(config: MaskRCNNConfig, index: int) -> Sequential:
    """ResNet stage C{index + 2} (index 0..3), built from the config: its first block takes the
    previous stage's channels and (except C2) halves the resolution with stride 2.

    The ResNet trunk builds C2..C5 (or C2..C4 for the C4 layout, whose C5 is the box head).
    """
    if config.block not in BLOCKS:
        raise ValueError(f"config.block={config.block!r}; use 'basic' or 'bottleneck'")
    block = BLOCKS[config.block]
    c_in = (
        config.stem_channels if index == 0 else config.stage_channels[index - 1] * block.expansion
    )
    width, stride = config.stage_channels[index], 1 if index == 0 else 2  # C2 keeps stride 4
    layers = []
    for b in range(config.stage_blocks[index]):
        layers.append(block(config, c_in, width, stride if b == 0 else 1))
        c_in = width * block.expansion
    return Sequential(*layers)


class ResNet(Module):
    """Stem (7x7 stride-2 conv, 3x3 stride-2 max-pool) and stages; returns [C2, C3, C4, C5].

    ``num_stages=3`` stops at C4 (the C4 layout's trunk, whose C5 is the box head).
    """

    def __init__(self, config: MaskRCNNConfig, num_stages: int = 4):
        super().__init__()
        if config.block not in BLOCKS:
            raise ValueError(f"config.block={config.block!r}; use 'basic' or 'bottleneck'")
        expansion = BLOCKS[config.block].expansion
        self.stem = conv_norm(config, 3, config.stem_channels, 7, stride=2)
        self.stages = ModuleList([make_stage(config, i) for i in range(num_stages)])
        self.out_channels = [w * expansion for w in config.stage_channels[:num_stages]]
        if not 0 <= config.trainable_stages <= 5:
            raise ValueError(f"trainable_stages={config.trainable_stages} must be in 0..5")

    def freeze(self, trainable: int) -> None:
        """Train only the last ``trainable`` of (stem, C2, C3, C4, C5); stop gradients to the rest.

        Called once pre-trained weights are loaded (see ``MaskRCNNConfig.trainable_stages``).
        Parts are counted from C5 even when this trunk stops at C4 (the C4 layout's C5 is the
        box head, which freezes itself: :class:`minimask.model.c4.Res5Head`).
        """
        if not 0 <= trainable <= 5:
            raise ValueError(f"trainable_stages={trainable} must be in 0..5")
        for i, part in enumerate([self.stem, *self.stages]):  # i: 0 stem, 1 C2, ..., 4 C5
            for p in part.parameters():
                p.requires_grad = i >= 5 - trainable

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x, relu=True)
        x = max_pool2d(x, 3, stride=2, padding=1)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features
