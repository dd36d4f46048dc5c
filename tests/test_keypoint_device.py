"""The keypoint model's GPU path on the CPU stand-in for CuPy (see ``test_strict_device.py``):
a training step and an inference of ``tiny_keypoints`` on the stick figures, with no implicit
host conversion, everything left on the device, and the NumPy model's numbers."""

from __future__ import annotations

import numpy as np
import pytest

from minimask.backend import rng
from minimask.data.figures import FiguresConfig, make_sample
from minimask.model.config import get_config
from minimask.model.mask_rcnn import MaskRCNN
from minimask.nn import SGD, init
from minimask.testing import strict
from minimask.testing.strict import StrictArray
from minimask.train import total_loss

FIGURES = FiguresConfig(image_size=64, min_height=24, max_height=40, max_figures=2)


def _model_pair():
    models = []
    for _ in range(2):
        init.manual_seed(0)
        config = get_config("tiny_keypoints", min_size=64, max_size=64,
                            keypoint_conv_channels=(16, 16))  # fmt: skip
        models.append(MaskRCNN(config))
    models[1].to("strict")
    return models


def _step(model, images, targets, xp):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = SGD(params, lr=0.01, momentum=0.9)
    model.train()
    model.rng = rng(0, xp)
    losses = model(images, targets)
    values = {k: float(v.item()) for k, v in losses.items()}
    opt.zero_grad()
    total_loss(losses).backward()
    opt.step()
    return values, params


def test_one_keypoint_training_step_stays_on_the_device():
    numpy_model, model = _model_pair()
    samples = [make_sample(0, i, FIGURES) for i in range(2)]
    images = [s["image"] for s in samples]
    expected, expected_params = _step(numpy_model, images, samples, np)
    with strict.counting() as log:
        got, params = _step(model, images, samples, strict.xp)
    assert log.refused == 0, log.summary()
    assert "loss_keypoint" in got and "loss_mask" not in got
    for name in expected:
        assert got[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-6), name
    for p, q in zip(params, expected_params):
        assert isinstance(p.data, StrictArray)
        np.testing.assert_allclose(p.data.get(), q.data, rtol=1e-4, atol=1e-6)


def test_keypoint_inference_stays_on_the_device():
    numpy_model, model = _model_pair()
    images = [make_sample(0, i, FIGURES)["image"] for i in range(2)]
    expected = numpy_model.eval()(images)
    with strict.counting() as log:
        got = model.eval()(images)
    assert log.refused == 0, log.summary()
    assert len(got[0]["boxes"]) > 0
    for g, e in zip(got, expected):
        assert set(g) == set(e) == {"boxes", "scores", "labels", "keypoints", "keypoints_scores"}
        for key in e:
            assert isinstance(g[key], StrictArray), key
            np.testing.assert_allclose(g[key].get(), e[key], rtol=1e-4, atol=1e-3, err_msg=key)
