"""Every knob of the Mask R-CNN model in one frozen dataclass, with named presets.

A student should find every setting by reading this one file: each default has a comment saying
what it does and where it comes from. The model's constructors take a ``MaskRCNNConfig``
explicitly; there is no registry and no config inheritance.

Presets:

- ``tiny``: a CPU-sized model for the synthetic shapes (a small ResNet with basic blocks, a
  64-channel FPN, 128-pixel images, small anchors);
- ``r50_fpn``: the dimensions of torchvision's ``maskrcnn_resnet50_fpn``, layer for layer;
- ``r50_fpn_keypoints``: torchvision's ``keypointrcnn_resnet50_fpn`` (box and keypoint heads, no
  mask head; Mask R-CNN §5);
- ``tiny_keypoints``: ``tiny`` with a small keypoint head and no mask head, for the synthetic
  stick figures (:mod:`minimask.data.figures`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class MaskRCNNConfig:
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
    fpn_channels: int = 256  # channels of every pyramid level P2..P6
    # P6 is max_pool2d(P5, kernel 1, stride 2), used by the RPN only (torchvision LastLevelMaxPool)

    # ---------------------------------------------------------------- anchors and RPN
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)  # one size per level P2..P6, pixels
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
    box_pool_size: int = 7  # RoIAlign output, 7x7
    pool_sampling_ratio: int = 2  # bilinear samples per bin side in RoIAlign
    roi_align_aligned: bool = False  # True shifts RoIs by -0.5 pixel (Detectron2's "aligned");
    # False is the paper's and torchvision's MultiScaleRoIAlign (and its weights')
    box_fc_dim: int = 1024  # width of the two FC layers (TwoMLPHead)
    box_fg_iou: float = 0.5  # proposals with IoU >= this are foreground
    box_bg_iou: float = 0.5  # ... and below it background
    box_batch_per_image: int = 512  # sampled proposals per image for the box head loss
    box_positive_fraction: float = 0.25  # at most this fraction foreground
    box_coder_weights: tuple[float, ...] = (10.0, 10.0, 5.0, 5.0)  # (w_x, w_y, w_w, w_h)
    box_score_thresh: float = 0.05  # inference: drop detections scoring below this
    box_nms_iou: float = 0.5  # inference: per-class NMS threshold
    detections_per_image: int = 100  # inference: keep the top this many

    # ---------------------------------------------------------------- mask head
    mask_pool_size: int = 14  # RoIAlign output for the mask head, 14x14
    mask_conv_channels: tuple[int, ...] = (256, 256, 256, 256)  # the four 3x3 convs
    mask_threshold: float = 0.5  # paste: a pixel is in the mask when its probability >= this
    # (the mask head's output size, 28 = 2 x mask_pool_size, follows from the layers)
    mask_head: bool = True  # False: no mask branch (torchvision's Keypoint R-CNN has none)

    # ---------------------------------------------------------------- keypoint head (§5)
    num_keypoints: int = 0  # K keypoints per instance; 0: no keypoint head (COCO persons: 17)
    keypoint_pool_size: int = 14  # RoIAlign output for the keypoint head, 14x14
    keypoint_conv_channels: tuple[int, ...] = (512,) * 8  # the eight 3x3 convs (torchvision's)
    # (the heatmaps are 56x56: a 4x4 stride-2 deconvolution to 28x28, then 2x bilinear upsampling)

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
        detections_per_image=20,
    )


def r50_fpn_keypoints(num_classes: int = 2, num_keypoints: int = 17) -> MaskRCNNConfig:
    """torchvision's ``keypointrcnn_resnet50_fpn``: persons (and background), 17 COCO keypoints,
    no mask head. (torchvision trains it at shorter sides 640..800; it predicts at 800.)"""
    return MaskRCNNConfig(num_classes=num_classes, num_keypoints=num_keypoints, mask_head=False)


def tiny_keypoints(num_classes: int = 2, num_keypoints: int = 7) -> MaskRCNNConfig:
    """``tiny`` with a four-conv, 64-channel keypoint head and no mask head: stick figures of
    7 joints (:mod:`minimask.data.figures`) on a 2-core CPU in minutes."""
    return tiny(num_classes).replace(
        num_keypoints=num_keypoints,
        keypoint_conv_channels=(64, 64, 64, 64),
        mask_head=False,
    )


PRESETS = {
    "tiny": tiny,
    "r50_fpn": r50_fpn,
    "tiny_keypoints": tiny_keypoints,
    "r50_fpn_keypoints": r50_fpn_keypoints,
}


def get_config(name: str, **changes) -> MaskRCNNConfig:
    """The preset ``name`` (a key of :data:`PRESETS`), with ``changes`` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]().replace(**changes)
