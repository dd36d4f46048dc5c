"""The Feature Pyramid Network (Lin et al., 2017), as Mask R-CNN's backbone neck (§3.1).

The ResNet's maps C2..C5 are strong but coarse at the top and fine but weak at the bottom. The FPN
gives every level both: a 1x1 "lateral" conv brings each C_i to ``fpn_channels``; a top-down path
upsamples the coarser level by nearest neighbour and adds it; a 3x3 conv smooths each sum. P6 is a
stride-2 subsample of P5 (max-pool with a 1x1 kernel), used by the RPN for the largest anchors.

    P5 = smooth5(lat5(C5))
    P4 = smooth4(lat4(C4) + up(lat5(C5) ...))      (the running top-down sum, not P5 itself)
    ...
    P6 = max_pool2d(P5, 1, stride 2)

Output: [P2, P3, P4, P5, P6], each (N, fpn_channels, H/s, W/s) with strides s = 4, 8, 16, 32, 64.
"""

from __future__ import annotations

from minimask.engine import Tensor
from minimask.nn import Conv2d, Module, ModuleList, init, max_pool2d, upsample_nearest


class FPN(Module):
    def __init__(self, in_channels: list[int], out_channels: int):
        super().__init__()
        self.lateral = ModuleList([Conv2d(c, out_channels, 1) for c in in_channels])
        self.smooth = ModuleList(
            [Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels]
        )
        for conv in [*self.lateral, *self.smooth]:  # torchvision's FPN init
            init.kaiming_uniform_(conv.weight, a=1)
            init.zeros_(conv.bias)
        self.out_channels = out_channels

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """[C2..C5] -> [P2..P6]."""
        running = self.lateral[-1](features[-1])
        outputs = [self.smooth[-1](running)]
        for i in range(len(features) - 2, -1, -1):  # from C4 down to C2
            lateral = self.lateral[i](features[i])
            running = lateral + upsample_nearest(running, size=lateral.shape[-2:])
            outputs.insert(0, self.smooth[i](running))
        outputs.append(max_pool2d(outputs[-1], 1, stride=2))  # P6
        return outputs
