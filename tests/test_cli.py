"""The command line end to end on shapes: train -> resume -> eval -> predict."""

import json

import numpy as np
from PIL import Image

from minimask.cli import main
from minimask.data.shapes import CLASSES, ShapesDataset, make_sample
from minimask.evaluate import evaluate, format_stat
from minimask.model.checkpoint import model_from_checkpoint


def test_train_resume_eval_predict(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["train", "--iterations", "2", "--batch-size", "1", "--checkpoint-every", "1",
              "--warmup", "1", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(common) == 0
    assert len((out / "losses.jsonl").read_text().splitlines()) == 2
    assert main([*common[:2], "3", *common[3:], "--resume"]) == 0  # one more iteration
    assert [json.loads(line)["iteration"] for line in open(out / "losses.jsonl")] == [1, 2, 3]

    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "checkpoint.npz"), "--val-images", "2"]) == 0
    # Three iterations teach the model nothing, so no AP can be expected of it. What the command
    # must get right: the library's evaluation of that checkpoint on those images, in the file
    # and on the screen, with the numbers COCO has no ground truth for marked absent.
    metrics = json.loads((out / "metrics.json").read_text())
    samples = list(ShapesDataset(2, seed=0))  # the validation images of --val-images 2
    model, _ = model_from_checkpoint(str(out / "checkpoint.npz"))
    expected, _ = evaluate(model, samples, CLASSES, progress=False)
    assert {k: metrics[k] for k in expected} == json.loads(json.dumps(expected))
    assert metrics["images"] == 2 and metrics["dataset"] == "shapes"
    areas = np.concatenate([s["masks"].sum(axis=(1, 2)) for s in samples])
    for size, (low, high) in {"s": (0, 32**2), "m": (32**2, 96**2), "l": (96**2, np.inf)}.items():
        present = bool(((areas >= low) & (areas < high)).any())  # COCO's area ranges
        for task in ("bbox", "segm"):
            assert (metrics[task][f"AP{size}"] is not None) == present, (task, size)
    printed = capsys.readouterr().out
    for task in ("bbox", "segm"):
        numbers = " | ".join(format_stat(metrics[task][n]) for n in ("AP", "AP50", "AP75"))
        assert f"| {task} | {numbers} |" in printed

    image = (make_sample(0, 0)["image"][:, :100, :120].transpose(1, 2, 0) * 255).astype(np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(image).save(path)
    pred = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(out / "checkpoint.npz"), str(path),
                 "--out", str(pred), "--score-thresh", "0.0"]) == 0  # fmt: skip
    drawn = Image.open(pred / "photo_pred.png")
    assert drawn.size[0] > 100 and drawn.format == "PNG"
