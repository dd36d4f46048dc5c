"""The one train / evaluate / predict path, and weights on the command line."""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from minimask.cli import main
from minimask.data.shapes import CLASSES, ShapesConfig, make_sample
from minimask.model.checkpoint import build_model, load_model, model_from_checkpoint
from minimask.model.config import tiny
from minimask.model.mask_rcnn import detections_to_host
from minimask.model.weights import export_weights, to_torchvision
from minimask.workflow import image_id_of
from tests.helpers import requires_torch

SHAPES_4 = {"num_classes": len(CLASSES), "min_size": 64, "max_size": 64}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny shapes run of two iterations (a checkpoint with meta), and a photo-like PNG."""
    root = tmp_path_factory.mktemp("run")
    main(["train", "--iterations", "2", "--batch-size", "2", "--min-size", "64",
          "--max-size", "64", "--out", str(root / "run"), "--no-progress"])  # fmt: skip
    image = make_sample(5, 0, ShapesConfig(image_size=80))["image"]
    Image.fromarray((image.transpose(1, 2, 0) * 255).astype(np.uint8)).save(root / "0042.png")
    return root


def test_build_model_freezes_only_loaded_weights(tmp_path):
    config = tiny(**{"num_classes": 4}).replace(trainable_stages=2)
    scratch = build_model(config, seed=0)
    assert all(p.requires_grad for p in scratch.parameters())  # random weights: all train
    path = str(tmp_path / "w.safetensors")
    export_weights(scratch, path)
    loaded = build_model(config, seed=1, weights=path, log=lambda _: None)
    frozen = [n for n, p in loaded.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("backbone.stem", "backbone.stages.0", "backbone.stages.1",
                                        "backbone.stages.2")) for n in frozen)  # fmt: skip
    assert all(
        p.requires_grad
        for n, p in loaded.named_parameters()
        if n.startswith(("backbone.stages.3", "fpn", "rpn", "roi_heads", "mask_head"))
    )
    for (name, a), b in zip(scratch.state_dict().items(), loaded.state_dict().values()):
        np.testing.assert_array_equal(a, b, err_msg=name)
    with pytest.raises(ValueError, match="not both"):
        build_model(config, weights=path, backbone_weights=path)


def test_weights_file_predicts_as_its_checkpoint(trained, tmp_path):
    model, meta = model_from_checkpoint(str(trained / "run" / "checkpoint.npz"))
    path = str(tmp_path / "model.pth")
    export_weights(model, path)
    again, again_meta = load_model(weights=path, preset="tiny", log=lambda _: None)
    assert again.config.num_classes == len(CLASSES)
    image = make_sample(1, 0, ShapesConfig(image_size=70))["image"]
    a = detections_to_host(model([image]))[0]
    # The weights file carries no config: the preset's sizes differ from the run's 64 px.
    again = build_model(model.config, weights=path, log=lambda _: None).eval()
    b = detections_to_host(again([image]))[0]
    for key in ("boxes", "scores", "labels", "masks"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert again_meta["category_ids"] == [1, 2, 3]
    with pytest.raises(ValueError, match="either --checkpoint"):
        load_model(checkpoint="x.npz", weights=path)


def test_torchvision_91_class_weights_label_coco_ids(tmp_path):
    path = str(tmp_path / "coco91.safetensors")
    export_weights(build_model(tiny(num_classes=91)), path)
    model, meta = load_model(weights=path, preset="tiny", log=lambda _: None)
    assert model.config.num_classes == 91 and meta["category_ids"] == list(range(1, 91))
    assert meta["classes"][1] == "person" and meta["classes"][18] == "dog"
    assert meta["classes"][12] == "N/A"  # an id COCO never used


def test_predict_writes_every_detection_as_coco_results(trained, capsys):
    out = trained / "pred"
    main(["predict", "--checkpoint", str(trained / "run" / "checkpoint.npz"),
          str(trained / "0042.png"), "--out", str(out)])  # fmt: skip
    results = json.loads((out / "detections.json").read_text())
    model, _ = model_from_checkpoint(str(trained / "run" / "checkpoint.npz"))
    image = np.asarray(Image.open(trained / "0042.png"), np.float32).transpose(2, 0, 1) / 255
    det = detections_to_host(model([image]))[0]
    assert len(results) == len(det["boxes"]) > 0  # every detection, not only those drawn
    for r, box, score, label, m in zip(results, det["boxes"], det["scores"], det["labels"],
                                       det["masks"]):  # fmt: skip
        assert r["image_id"] == 42 and r["file_name"] == "0042.png"  # COCO-style numeric name
        np.testing.assert_allclose(r["bbox"], [*box[:2], *(box[2:] - box[:2])], rtol=1e-5)
        assert r["score"] == pytest.approx(float(score)) and r["category_id"] == int(label)
        np.testing.assert_array_equal(mask_utils.decode(r["segmentation"]), m)
    assert image_id_of("photo.jpg", 3) == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["predict", "x.png"], "give --checkpoint FILE or --weights FILE"),
        (["predict", "--checkpoint", "CKPT", "--weights", "CKPT", "x.png"], "give --checkpoint"),
        (["predict", "--weights", "missing.pth", "x.png"], "missing.pth"),
        (["export", "--checkpoint", "CKPT", "--to", "model.onnx"], "unknown suffix"),
        (["export", "--checkpoint", "missing.npz", "--to", "m.pth"], "no checkpoint at"),
        (["train", "--weights", "BAD", "--iterations", "1"], "BAD"),
        (["eval", "--checkpoint", "BAD"], "not a minimask checkpoint"),
    ],
)
def test_cli_refuses_bad_model_arguments_in_one_line(trained, tmp_path, argv, message):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x00garbage, not a checkpoint")
    ckpt = str(trained / "run" / "checkpoint.npz")
    argv = [ckpt if a == "CKPT" else str(bad) if a == "BAD" else a for a in argv]
    if argv[0] == "train":
        argv += ["--out", str(tmp_path / "t"), "--no-progress"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert message.replace("BAD", str(bad)) in str(e.value) and "\n" not in str(e.value)


def test_train_from_weights_with_another_class_count(trained, tmp_path, capsys):
    """Weights of a 91-class detector into a 4-class shapes run: the class layers start fresh."""
    path = str(tmp_path / "coco91.pth")
    export_weights(build_model(tiny(num_classes=91)), path)
    main(["train", "--weights", path, "--iterations", "1", "--batch-size", "1", "--min-size",
          "64", "--max-size", "64", "--out", str(tmp_path / "ft"), "--no-progress"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "cls_score" in printed and "fresh" in printed
    meta = json.loads(str(np.load(tmp_path / "ft" / "checkpoint.npz")["meta"]))
    assert meta["weights"] == path


def test_train_from_backbone_weights(tmp_path):
    """An ImageNet-style ResNet checkpoint (conv1, bn1, layer1.., fc) loads into the backbone."""
    source = build_model("tiny", seed=3, **SHAPES_4)
    prefix = "backbone.body."
    resnet = {k[len(prefix):]: v for k, v in to_torchvision(source.state_dict()).items()
              if k.startswith(prefix)}  # fmt: skip
    resnet["fc.weight"], resnet["fc.bias"] = np.zeros((10, 128), np.float32), np.zeros(10)
    path = str(tmp_path / "resnet.safetensors")
    export_weights(resnet, path)
    main(["train", "--backbone-weights", path, "--iterations", "1", "--batch-size", "1",
          "--min-size", "64", "--max-size", "64", "--lr", "1e-9", "--warmup", "0",
          "--out", str(tmp_path / "bb"), "--no-progress"])  # fmt: skip
    model, _ = model_from_checkpoint(str(tmp_path / "bb" / "checkpoint.npz"))
    ours, theirs = model.state_dict(), source.state_dict()
    for name in ("backbone.stem.0.weight", "backbone.stages.3.0.conv2.0.weight"):
        np.testing.assert_allclose(ours[name], theirs[name], atol=1e-6, err_msg=name)


@requires_torch
def test_export_command_writes_what_torch_loads(trained, tmp_path):
    import torch

    path = tmp_path / "model.pth"
    main(["export", "--checkpoint", str(trained / "run" / "checkpoint.npz"), "--to", str(path)])
    state = torch.load(path, weights_only=True)
    model, _ = model_from_checkpoint(str(trained / "run" / "checkpoint.npz"))
    np.testing.assert_array_equal(state["backbone.body.conv1.weight"].numpy(),
                                  model.state_dict()["backbone.stem.0.weight"])  # fmt: skip


def test_predict_on_a_large_jpeg_answers_in_the_files_pixels(trained, tmp_path):
    """A JPEG far larger than the model's size is decoded reduced; the results are still in the
    file's pixels, each mask at the file's full size."""
    image = make_sample(2, 0, ShapesConfig(image_size=80))["image"].transpose(1, 2, 0)
    big = Image.fromarray((image * 255).astype(np.uint8)).resize((1200, 900))
    big.save(tmp_path / "big.jpg", quality=95)
    out = tmp_path / "pred"
    main(["predict", "--checkpoint", str(trained / "run" / "checkpoint.npz"),
          str(tmp_path / "big.jpg"), "--out", str(out), "--score-thresh", "0"])  # fmt: skip
    results = json.loads((out / "detections.json").read_text())
    assert results
    for r in results:
        assert r["segmentation"]["size"] == [900, 1200]
        x, y, w, h = r["bbox"]
        assert 0 <= x <= x + w <= 1200 and 0 <= y <= y + h <= 900
        mask = mask_utils.decode(r["segmentation"])
        if mask.any():  # the mask lies around its box, in the same (file) pixels
            ys, xs = np.nonzero(mask)
            assert xs.min() >= x - 20 and xs.max() <= x + w + 20
    assert (out / "big_pred.png").exists()
