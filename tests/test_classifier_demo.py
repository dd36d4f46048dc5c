"""The foundation demo and the CLI: a short run learns, and writes its plot, metrics and weights."""

from __future__ import annotations

import json

import numpy as np
import pytest

from minimask import classifier_demo
from minimask.cli import main


def test_a_short_demo_learns_and_writes_its_outputs(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["--steps", "60", "--out", str(out), "--seed", "0", "--no-progress"]
    code = main(["classifier-demo", *args])
    assert code == 0

    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["losses"]) == 60
    assert metrics["initial_loss"] == pytest.approx(np.log(4), abs=0.1)  # a uniform first guess
    assert metrics["final_loss"] < metrics["initial_loss"] - 0.2
    # held-out images from a separate seed: 400 of them, so chance is 25% +- 2%
    assert metrics["accuracy"] > 0.4
    assert set(metrics["per_class_accuracy"]) == set(classifier_demo.CLASSES)

    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = classifier_demo.TinyConvNet()
    model.load(str(out / "model.npz"))  # strict: every name and shape matches

    printed = capsys.readouterr().out
    assert "held-out images" in printed and "chance" in printed and "wrote" in printed


def test_images_are_seeded_and_shaped():
    a, la = classifier_demo.make_images(8, 32, np.random.default_rng(3))
    b, lb = classifier_demo.make_images(8, 32, np.random.default_rng(3))
    assert a.shape == (8, 3, 32, 32) and a.dtype == np.float32 and la.shape == (8,)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert set(la) <= set(range(len(classifier_demo.CLASSES)))


@pytest.mark.parametrize("label", range(len(classifier_demo.CLASSES)))
def test_every_shape_fits_inside_the_image(label):
    rng = np.random.default_rng(label)
    for _ in range(20):
        mask = classifier_demo.draw_shape(label, 32, rng)
        assert mask.shape == (32, 32) and mask.any()
        # a border of at least one pixel all round
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def test_cli_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        main([])  # a command is required
    with pytest.raises(SystemExit):
        main(["classifier-demo", "--steps", "0"])
    with pytest.raises(SystemExit):
        main(["demo", "--iterations", "0"])
    with pytest.raises(SystemExit):
        main(["train-everything"])
