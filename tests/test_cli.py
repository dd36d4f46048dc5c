"""The command line end to end on shapes: train -> resume -> eval -> predict."""

import json

import numpy as np
import pytest
from PIL import Image

from minimask.cli import main
from minimask.data.shapes import make_sample


def test_train_resume_eval_predict(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["train", "--iterations", "2", "--batch-size", "1", "--checkpoint-every", "1",
              "--warmup", "1", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(common) == 0
    assert len((out / "losses.jsonl").read_text().splitlines()) == 2
    assert main([*common[:2], "3", *common[3:], "--resume"]) == 0  # one more iteration
    assert [json.loads(line)["iteration"] for line in open(out / "losses.jsonl")] == [1, 2, 3]

    assert main(["eval", "--checkpoint", str(out / "checkpoint.npz"), "--val-images", "2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"bbox", "segm"} and 0.0 <= metrics["segm"]["AP50"] <= 1.0
    assert "AP50" in capsys.readouterr().out

    image = (make_sample(0, 0)["image"][:, :100, :120].transpose(1, 2, 0) * 255).astype(np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(image).save(path)
    pred = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(out / "checkpoint.npz"), str(path),
                 "--out", str(pred), "--score-thresh", "0.0"]) == 0  # fmt: skip
    drawn = Image.open(pred / "photo_pred.png")
    assert drawn.size[0] > 100 and drawn.format == "PNG"


def test_predict_names_a_bad_image_file(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    from minimask.data.images import read_image  # what predict reads files with

    with pytest.raises(ValueError, match="notes.png"):
        read_image(str(bad))
    with pytest.raises(ValueError, match="missing.png"):
        read_image(str(tmp_path / "missing.png"))
