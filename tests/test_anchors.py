"""Anchors: hand-worked base anchors, ordering, and equality with torchvision's AnchorGenerator."""

import numpy as np
import pytest
from helpers import requires_torchvision, torch

from minimask.ops.anchors import AnchorGenerator, base_anchors, grid_anchors


def test_base_anchors_hand_worked_and_ratio_major():
    # ratio = height / width; rows: (ratio 0.5: sizes 16, 32), (ratio 2: sizes 16, 32)
    got = base_anchors(sizes=(16, 32), aspect_ratios=(0.5, 2.0))
    s = np.sqrt(2.0)  # ratio 0.5: width 16 * sqrt 2 = 22.6, height 16 / sqrt 2 = 11.3
    expected = np.round(
        np.array(
            [[-16 * s, -8 * s, 16 * s, 8 * s], [-32 * s, -16 * s, 32 * s, 16 * s]]
            + [[-8 * s, -16 * s, 8 * s, 16 * s], [-16 * s, -32 * s, 16 * s, 32 * s]]
        )
        / 2
    )
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(base_anchors((32,), (1.0,)), [[-16, -16, 16, 16]])


def test_grid_anchors_location_major_row_major():
    base = np.array([[-1, -1, 1, 1], [-2, -2, 2, 2]], dtype=np.float32)  # A = 2
    got = grid_anchors(base, grid_size=(2, 3), stride=(10, 4))  # Hf = 2, Wf = 3
    assert got.shape == (2 * 3 * 2, 4)
    # The 4th location (row-major) is (y=1, x=0): centre (0, 10); its second anchor is row 7.
    np.testing.assert_array_equal(got[6:8], [[-1, 9, 1, 11], [-2, 8, 2, 12]])
    np.testing.assert_array_equal(got[2], [3, -1, 5, 1])  # (y=0, x=1): centre (4, 0)


def test_generator_shapes_and_counts():
    gen = AnchorGenerator.fpn()
    assert gen.num_anchors_per_location() == [3] * 5
    assert AnchorGenerator.c4().num_anchors_per_location() == [15]
    feature_sizes = [(200, 304), (100, 152), (50, 76), (25, 38), (13, 19)]
    levels = gen.per_level((800, 1216), feature_sizes)
    assert [len(a) for a in levels] == [h * w * 3 for h, w in feature_sizes]
    assert gen.strides((800, 1216), feature_sizes)[:4] == [(4, 4), (8, 8), (16, 16), (32, 32)]
    allof = gen((800, 1216), feature_sizes)
    np.testing.assert_array_equal(allof, np.concatenate(levels))
    assert allof.dtype == np.float32
    assert gen((64, 64), [(4, 4)] * 5, dtype=np.float64).dtype == np.float64
    with pytest.raises(ValueError, match="levels"):
        gen((800, 1216), feature_sizes[:2])


CONFIGS = [
    # (sizes, aspect_ratios, image size, feature-map sizes)
    (((32, 64, 128, 256, 512),), ((0.5, 1.0, 2.0),), (800, 1088), [(50, 68)]),  # C4
    (
        ((32,), (64,), (128,), (256,), (512,)),
        ((0.5, 1.0, 2.0),) * 5,
        (512, 768),
        [(128, 192), (64, 96), (32, 48), (16, 24), (8, 12)],
    ),  # FPN
    (((20, 45),), ((0.33, 1.0, 1.7),), (97, 131), [(7, 9)]),  # odd sizes: 22.5 rounds to 22
    (((10,), (25, 70)), ((1.0,), (0.25, 3.0)), (60, 40), [(15, 10), (4, 3)]),  # mixed levels
]


@requires_torchvision
@pytest.mark.parametrize("sizes, ratios, image_size, feature_sizes", CONFIGS)
def test_equals_torchvision_anchor_generator(sizes, ratios, image_size, feature_sizes):
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchAnchors
    from torchvision.models.detection.image_list import ImageList

    images = ImageList(torch.zeros(2, 3, *image_size), [image_size, image_size])
    features = [torch.zeros(2, 1, h, w) for h, w in feature_sizes]
    expected = TorchAnchors(sizes, ratios)(images, features)
    got = AnchorGenerator(sizes, ratios)(image_size, feature_sizes)
    for per_image in expected:  # same anchors for every image of the batch
        np.testing.assert_array_equal(got, per_image.numpy())  # values and order, exactly
