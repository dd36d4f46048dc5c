"""The C4 design of Mask R-CNN (He et al. 2017, §3 and Fig. 4 left): Faster R-CNN on a ResNet.

The ResNet's first four stages (stem, C2, C3, C4) are the shared trunk. Its fifth stage, res5,
is not part of the backbone but the *box head*: every RoI is pooled 14×14 from C4 (stride 16, so a
single-scale RoIAlign at spatial scale 1/16), and res5, whose first block has stride 2, turns
each pooled RoI into a 7×7 map. Global average pooling then gives the vector that the class and
box layers read. The mask branch starts from the same 7×7 res5 maps: a 2× deconvolution, a ReLU
and a 1×1 conv to K mask logits, 14×14 (:class:`minimask.model.mask_head.MaskHead` with no 3×3
convs).

    image ─ stem, C2, C3, C4 ─ C4 (N, c4, H/16, W/16)
        C4 ─ RPN (every anchor size at each location) ─ proposals
        C4, RoIs ─ RoIAlign 14×14 ─ res5 ─ (R, c5, 7, 7) ─ avg pool ─ classes, boxes
                                           └─ (foreground RoIs) deconv 2× ─ 1×1 ─ K masks 14×14

Training reuses the res5 maps of the sampled foreground RoIs for the mask branch (as Detectron
does); at inference the detections' boxes are pooled and run through res5 again for their masks.

Shape letters: R RoIs, c4 and c5 the channels of C4 and C5 (1024 and 2048 for ResNet-50).
"""

from __future__ import annotations

from minimask.engine import Tensor
from minimask.model.backbone import BLOCKS, make_stage
from minimask.model.config import MaskRCNNConfig
from minimask.nn import Module


class Res5Head(Module):
    """ResNet's C5 stage as the box head: (R, c4, 14, 14) pooled RoIs -> (R, c5, 7, 7) maps.

    The box predictor average-pools the maps to (R, c5) vectors
    (:class:`minimask.model.roi_heads.BoxPredictor`); the mask branch reads them as they are.
    Its layers are named as the trunk's stage would be, under ``res5``, so that an ImageNet
    ResNet's ``layer4`` loads here (:mod:`minimask.model.weights`).
    """

    def __init__(self, config: MaskRCNNConfig):
        super().__init__()
        self.res5 = make_stage(config, 3)  # C5: its first block has stride 2: 14x14 -> 7x7
        self.out_channels = config.stage_channels[3] * BLOCKS[config.block].expansion  # c5

    def freeze(self, trainable: int) -> None:
        """res5 is C5, the first of (C5, C4, C3, C2, stem) to train (see ``ResNet.freeze``)."""
        for p in self.res5.parameters():
            p.requires_grad = trainable >= 1

    def forward(self, x: Tensor) -> Tensor:
        return self.res5(x)
