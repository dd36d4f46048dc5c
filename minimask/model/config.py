"""Every knob of the Mask R-CNN model in one frozen dataclass, with named presets.

A student should find every setting by reading this one file: each default has a comment saying
what it does and where it comes from. The model's constructors take a ``MaskRCNNConfig``
explicitly; there is no registry and no config inheritance.

Presets:

- ``tiny``: a CPU-sized model for the synthetic shapes (a small ResNet with basic blocks, a
  64-channel FPN, 128-pixel images, small anchors);
- ``r50_fpn``: the dimensions of torchvision's ``maskrcnn_resnet50_fpn``, layer for layer;
- ``r101_fpn``: the same on ResNet-101 (stage blocks (3, 4, 23, 3));
- ``r50_c4``, ``r101_c4``: the paper's C4 design (Fig. 4 left): RPN and RoIs on ResNet's C4,
  its C5 stage ("res5") as the box head, a 14x14 mask from res5's 7x7 output;
- ``tiny_c4``: the C4 design at the ``tiny`` preset's size, for the CPU;
- ``r50_fpn_keypoints``: torchvision's ``keypointrcnn_resnet50_fpn`` (box and keypoint heads, no
  mask head; Mask R-CNN §5);
- ``tiny_keypoints``: ``tiny`` with a small keypoint head and no mask head, for the synthetic
  stick figures (:mod:`minimask.data.figures`).

The ablation switches of the paper's Table 2 (``pooler``, ``mask_loss``, ``mask_class_agnostic``,
``mask_head``) default to the paper's choices; a bad value is refused when the config is made.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

# The allowed values of the string switches (checked in MaskRCNNConfig.__post_init__).
CHOICES = {
    "layout": ("fpn", "c4", "c5"),
    "block": ("basic", "bottleneck"),
    "norm": ("frozen_bn", "group_norm"),
    "pooler": ("roi_align", "roi_pool"),
    "mask_head": ("fcn", "mlp", "none"),
    "mask_loss": ("sigmoid", "softmax"),
}


@dataclass(frozen=True)
class MaskRCNNConfig:
    # ---------------------------------------------------------------- layout (§3, Fig. 4)
    layout: str = "fpn"  # "fpn": ResNet-FPN, RPN on P2..P6, heads pool from P2..P5 (Fig. 4
    # right). "c4": RPN on ResNet's C4 (stride 16) with every anchor size at one level; RoIs
    # pooled box_pool_size² (14x14) from C4; ResNet's C5 stage ("res5", first block stride 2)
    # is the box head, global-average pooled into the box predictor; the mask branch upsamples
    # res5's 7x7 output with a 2x deconv to a 14x14 mask (Fig. 4 left; Faster R-CNN on ResNet).
    # "c5": the ablation of Table 2d: the whole ResNet, the RPN and both heads on C5 alone
    # (stride 32, every anchor size at one level), with the FPN layout's heads (Fig. 4 right).
    # minimask.model.mask_rcnn.build_layout is the one place that reads it.

    # ---------------------------------------------------------------- data
    num_classes: int = 91  # classes including background (index 0); COCO's 90 ids + background
    min_size: int = 800  # resize so the shorter image side is this many pixels
    max_size: int = 1333  # ... unless the longer side would exceed this
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet RGB mean
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)  # ImageNet RGB std
    size_divisible: int = 32  # pad batches so H and W are multiples (the coarsest stride)

    # ---------------------------------------------------------------- backbone (ResNet)
    block: str = "bottleneck"  # "basic" (ResNet-18/34) or "bottleneck" (ResNet-50/101)
    stage_blocks: tuple[int, ...] = (3, 4, 6, 3)  # blocks in C2..C5; (3, 4, 6, 3) is ResNet-50
    stem_channels: int = 64  # channels of the 7x7 stride-2 stem
    stage_channels: tuple[int, ...] = (64, 128, 256, 512)  # bottleneck width of C2..C5
    norm: str = "frozen_bn"  # "frozen_bn" (weights trained elsewhere) or "group_norm"
    group_norm_groups: int = 32  # groups for "group_norm"
    trainable_stages: int = 3  # with pre-trained weights loaded, of C5, C4, C3, C2, stem (counted
    # from C5) this many train and the rest stay frozen (torchvision's trainable_layers=3: C3..C5
    # train). Freezing random weights makes no sense, so a model trained from scratch trains every
    # stage: the one place that decides is minimask.model.checkpoint.build_model.

    # ---------------------------------------------------------------- FPN
    fpn_channels: int = 256  # channels of every pyramid level P2..P6 (unused by "c4")
    # P6 is max_pool2d(P5, kernel 1, stride 2), used by the RPN only (torchvision LastLevelMaxPool)

    # ---------------------------------------------------------------- anchors and RPN
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)  # one size per level P2..P6, pixels
    # ("c4": all of them at every location of C4, so len(anchor_sizes) * 3 anchors per location)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # height / width, at every level
    rpn_fg_iou: float = 0.7  # anchors with IoU >= this with a GT box are positives
    rpn_bg_iou: float = 0.3  # anchors with max IoU < this are negatives; between: ignored
    rpn_batch_per_image: int = 256  # sampled anchors per image for the RPN loss
    rpn_positive_fraction: float = 0.5  # at most this fraction of them positive
    rpn_pre_nms_top_n_train: int = 2000  # proposals kept per level before NMS (training)
    rpn_pre_nms_top_n_test: int = 1000  # ... (inference)
    rpn_post_nms_top_n_train: int = 2000  # proposals kept per image after NMS (training)
    rpn_post_nms_top_n_test: int = 1000  # ... (inference)
    rpn_nms_iou: float = 0.7  # NMS threshold between proposals
    rpn_min_size: float = 1e-3  # proposals smaller than this (pixels) are removed
    rpn_box_weight: float = 1.0  # λ in L_RPN = L_cls + λ·p*·L_box

    # ---------------------------------------------------------------- box head (Fast R-CNN)
    box_pool_size: int = 7  # RoIAlign output, 7x7 ("c4": 14x14, which res5 halves to 7x7)
    pooler: str = "roi_align"  # "roi_align" (§3) or "roi_pool" (Fast R-CNN's quantized max
    # pooling, the RoIPool row of Table 2c): the op of every pooler, box and mask, both layouts
    pool_sampling_ratio: int = 2  # bilinear samples per bin side in RoIAlign (not RoIPool)
    roi_align_aligned: bool = False  # True shifts RoIs by -0.5 pixel (Detectron2's "aligned");
    # False is the paper's and torchvision's MultiScaleRoIAlign (and its weights'). Every
    # RoIAlign pooler of the model reads it; RoIPool has no such shift.
    box_fc_dim: int = 1024  # width of the two FC layers (TwoMLPHead; "c4" has none: res5)
    box_fg_iou: float = 0.5  # proposals with IoU >= this are foreground
    box_bg_iou: float = 0.5  # ... and below it background
    box_batch_per_image: int = 512  # sampled proposals per image for the box head loss
    box_positive_fraction: float = 0.25  # at most this fraction foreground
    box_coder_weights: tuple[float, ...] = (10.0, 10.0, 5.0, 5.0)  # (w_x, w_y, w_w, w_h)
    box_score_thresh: float = 0.05  # inference: drop detections scoring below this
    box_nms_iou: float = 0.5  # inference: per-class NMS threshold
    detections_per_image: int = 100  # inference: keep the top this many

    # ---------------------------------------------------------------- mask head
    mask_pool_size: int = 14  # RoIAlign output for the mask head, 14x14 ("c4" pools none:
    # its mask branch reads res5's 7x7 output, so its masks are 14x14)
    mask_head: str = "fcn"  # "fcn": convs, a 2x deconv, a 1x1 conv to K logits (Fig. 4);
    # "mlp": Table 2e's MLP on the pooled features, fc mask_mlp_dim, fc mask_mlp_dim, fc to
    # K·M·M with M = 2 x mask_pool_size (31.5 mask AP against the FCN's 33.6). "fpn" only.
    # "none": no mask branch (torchvision's Keypoint R-CNN has none: a box and keypoint model)
    mask_conv_channels: tuple[int, ...] = (256, 256, 256, 256)  # the FCN's 3x3 convs ("c4": none)
    mask_deconv_channels: int | None = None  # output channels of the FCN's 2x deconv; None:
    # as many as it receives (torchvision's MaskRCNNPredictor, 256 -> 256; Detectron's C4 head
    # sets 2048 -> 256). None is also what a checkpoint from before this field was made with.
    mask_mlp_dim: int = 1024  # width of the MLP head's two hidden FC layers
    mask_class_agnostic: bool = False  # True: one mask per RoI, whatever its class (§4.2: 29.7
    # mask AP against 30.3 class-specific, ResNet-50-C4); the loss and inference use channel 0
    mask_loss: str = "sigmoid"  # "sigmoid": per-pixel binary cross-entropy on the RoI's class's
    # mask only (§3, the paper's); "softmax": a per-pixel softmax over the K masks, the
    # "multinomial" row of Table 2b (24.8 against 30.3 mask AP): masks compete across classes
    mask_threshold: float = 0.5  # paste: a pixel is in the mask when its probability >= this
    # (the mask head's output size, 28 = 2 x mask_pool_size, follows from the layers)

    # ---------------------------------------------------------------- keypoint head (§5)
    num_keypoints: int = 0  # K keypoints per instance; 0: no keypoint head (COCO persons: 17)
    keypoint_pool_size: int = 14  # RoIAlign output for the keypoint head, 14x14
    keypoint_conv_channels: tuple[int, ...] = (512,) * 8  # the eight 3x3 convs (torchvision's)
    # (the heatmaps are 56x56: a 4x4 stride-2 deconvolution to 28x28, then 2x bilinear upsampling)

    def __post_init__(self):
        """Refuse a switch's unknown value, or a combination that cannot be built."""
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"config {name}={value!r}; use one of {', '.join(allowed)}")
        if self.mask_loss == "softmax" and self.mask_class_agnostic:
            raise ValueError("config mask_loss='softmax' needs class-specific masks (a softmax "
                             "over one mask_class_agnostic channel is constant)")  # fmt: skip
        if self.layout == "c4" and self.mask_head == "mlp":
            raise ValueError("config mask_head='mlp' is an ablation of the FPN layout (Table 2e); "
                             "the c4 layout's mask branch is res5 and a deconv")  # fmt: skip
        if not 0 <= self.trainable_stages <= 5:
            raise ValueError(f"config trainable_stages={self.trainable_stages} must be in 0..5")

    @property
    def has_masks(self) -> bool:
        """Whether the model has a mask branch (``mask_head`` is not ``"none"``)."""
        return self.mask_head != "none"

    def replace(self, **changes) -> MaskRCNNConfig:
        """A copy with some fields changed (the config itself is frozen)."""
        return replace(self, **changes)


def r50_fpn(num_classes: int = 91) -> MaskRCNNConfig:
    """torchvision's ``maskrcnn_resnet50_fpn``, layer for layer."""
    return MaskRCNNConfig(num_classes=num_classes)


def tiny(num_classes: int = 4) -> MaskRCNNConfig:
    """A Mask R-CNN that trains on 128-pixel shapes on a 2-core CPU in minutes."""
    return MaskRCNNConfig(
        num_classes=num_classes,  # background + square, circle, triangle
        min_size=128,
        max_size=128,
        image_mean=(0.0, 0.0, 0.0),  # shapes are already in [0, 1]; no ImageNet weights
        image_std=(1.0, 1.0, 1.0),
        block="basic",
        stage_blocks=(1, 1, 1, 1),
        stem_channels=16,
        stage_channels=(16, 32, 64, 128),
        norm="group_norm",  # trained from scratch at batch 2-4: GroupNorm, not BatchNorm
        group_norm_groups=8,
        trainable_stages=5,  # from scratch: everything trains
        fpn_channels=64,
        anchor_sizes=(8, 16, 32, 64, 128),
        rpn_batch_per_image=128,
        rpn_pre_nms_top_n_train=500,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_train=300,
        rpn_post_nms_top_n_test=100,
        box_fc_dim=256,
        box_batch_per_image=64,
        mask_conv_channels=(64, 64, 64, 64),
        mask_deconv_channels=64,
        mask_mlp_dim=256,
        detections_per_image=20,
    )


def r101_fpn(num_classes: int = 91) -> MaskRCNNConfig:
    """ResNet-101-FPN: ``r50_fpn`` with 23 blocks in C4 (torchvision's ``resnet101`` trunk)."""
    return MaskRCNNConfig(num_classes=num_classes, stage_blocks=(3, 4, 23, 3))


def r50_c4(num_classes: int = 91) -> MaskRCNNConfig:
    """ResNet-50-C4 (Mask R-CNN Fig. 4 left, the paper's ablation backbone), with Detectron's
    C4 settings: 15 anchors per location on C4, 12000/6000 proposals before NMS."""
    return MaskRCNNConfig(
        num_classes=num_classes,
        layout="c4",
        box_pool_size=14,  # RoIAlign 14x14 on C4; res5's stride 2 makes it 7x7
        rpn_pre_nms_top_n_train=12000,  # one level: Detectron's C4 numbers
        rpn_pre_nms_top_n_test=6000,
        mask_conv_channels=(),  # the mask branch is res5 (shared with the box head) + deconv
        mask_deconv_channels=256,
    )


def r101_c4(num_classes: int = 91) -> MaskRCNNConfig:
    """ResNet-101-C4: ``r50_c4`` with 23 blocks in C4 (the paper's Table 1 C4 row)."""
    return r50_c4(num_classes).replace(stage_blocks=(3, 4, 23, 3))


def tiny_c4(num_classes: int = 4) -> MaskRCNNConfig:
    """The C4 design at the ``tiny`` preset's size: trains on 128-pixel shapes on a CPU."""
    return tiny(num_classes).replace(
        layout="c4",
        anchor_sizes=(16, 32, 64),  # the shapes' sizes; 9 anchors at each C4 location
        box_pool_size=14,
        mask_conv_channels=(),
        mask_deconv_channels=64,
    )


def r50_fpn_keypoints(num_classes: int = 2, num_keypoints: int = 17) -> MaskRCNNConfig:
    """torchvision's ``keypointrcnn_resnet50_fpn``: persons (and background), 17 COCO keypoints,
    no mask head. (torchvision trains it at shorter sides 640..800; it predicts at 800.)"""
    return MaskRCNNConfig(num_classes=num_classes, num_keypoints=num_keypoints, mask_head="none")


def tiny_keypoints(num_classes: int = 2, num_keypoints: int = 7) -> MaskRCNNConfig:
    """``tiny`` with a four-conv, 64-channel keypoint head and no mask head: stick figures of
    7 joints (:mod:`minimask.data.figures`) on a 2-core CPU in minutes."""
    return tiny(num_classes).replace(
        num_keypoints=num_keypoints,
        keypoint_conv_channels=(64, 64, 64, 64),
        mask_head="none",
    )


# Every preset by name: the CLI's --preset choices are these keys.
PRESETS = {
    "tiny": tiny,
    "tiny_c4": tiny_c4,
    "tiny_keypoints": tiny_keypoints,
    "r50_fpn": r50_fpn,
    "r101_fpn": r101_fpn,
    "r50_c4": r50_c4,
    "r101_c4": r101_c4,
    "r50_fpn_keypoints": r50_fpn_keypoints,
}


def get_config(name: str, **changes) -> MaskRCNNConfig:
    """The preset ``name`` (a key of :data:`PRESETS`), with ``changes`` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]().replace(**changes)
