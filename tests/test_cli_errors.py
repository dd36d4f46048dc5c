"""Nothing lost, nothing silent: how the command line ends when its input is wrong.

A user error (bad arguments, a missing or damaged file, a full disk, a diverged run) prints one
line on stderr, ``minimask <command>: what is wrong; what to do``, and exits with status 2;
``--debug`` shows the traceback instead, and a bug keeps its traceback. Ctrl-C is one line and
status 130. ``predict`` skips the files it cannot read, predicts the others and exits with 1.
Each test also checks that the files already there are left as they were.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image
from test_coco import write_coco

from minimask import workflow
from minimask.cli import main
from minimask.data.images import read_image
from minimask.data.shapes import ShapesConfig, make_sample
from minimask.model.checkpoint import model_from_checkpoint, read_meta
from minimask.model.mask_rcnn import detections_to_host

SMALL = ["--min-size", "64", "--max-size", "64"]  # the tiny preset at 64 px: fast on a CPU
RESUME_ONE_MORE = ["--iterations", "2", "--batch-size", "1", "--warmup", "1", *SMALL, "--resume"]


def run(argv, capsys):
    """``main(argv)`` as a shell runs it: ``(exit status, stdout, stderr)``."""
    capsys.readouterr()
    try:
        status = main(argv)
    except SystemExit as e:  # argparse's errors, and minimask's user errors
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def error_line(err: str, command: str) -> str:
    """The one line a user error prints on stderr, checked: no traceback, no second line."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"minimask {command}: "), lines[0]
    return lines[0]


def snapshot(folder) -> dict:
    """Every file under ``folder`` and its bytes (to show that nothing was lost or added)."""
    return {
        os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(folder)
        for f in files
    }


def save_png(path, seed=0, size=80):
    image = make_sample(seed, 0, ShapesConfig(image_size=size))["image"]
    Image.fromarray((image.transpose(1, 2, 0) * 255).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished one-iteration shapes run (checkpoint.npz, losses.jsonl); copy it to change it."""
    out = tmp_path_factory.mktemp("train") / "run"
    argv = ["train", "--iterations", "1", "--batch-size", "1", "--warmup", "1", *SMALL]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture()
def checkpoint(run_dir, tmp_path):
    """A copy of the run's checkpoint, free to damage."""
    path = tmp_path / "checkpoint.npz"
    shutil.copy(run_dir / "checkpoint.npz", path)
    return path


@pytest.fixture()
def earlier_eval(tmp_path):
    """An output folder holding an earlier evaluation's metrics.json, which must survive."""
    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text('{"images": 100, "bbox": {"AP": 0.5}}')
    return out


# ---------------------------------------------------------------------------- the wrapper
def test_user_error_is_one_line_with_status_2_and_debug_shows_the_traceback(tmp_path):
    out = tmp_path / "notes.txt"  # --out names a file
    out.write_text("my notes")
    argv = [sys.executable, "-m", "minimask", "train", "--iterations", "1", "--out", str(out)]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    line = error_line(done.stderr, "train")
    assert str(out) in line and "is a file; give a folder" in line
    assert out.read_text() == "my notes"

    argv.insert(3, "--debug")
    debug = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "UsageError: --out" in debug.stderr and out.read_text() == "my notes"


def test_a_bug_keeps_its_traceback(run_dir, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise TypeError("a bug in minimask")

    monkeypatch.setattr(workflow, "evaluate", broken)
    with pytest.raises(TypeError, match="a bug in minimask"):
        main(["eval", "--checkpoint", str(run_dir / "checkpoint.npz"), "--out", str(tmp_path)])


def test_ctrl_c_is_one_line_and_status_130(run_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    before = snapshot(out)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(workflow, "train", interrupted)
    status, _, err = run(["train", *RESUME_ONE_MORE, "--out", str(out), "--no-progress"], capsys)
    assert status == 130
    line = error_line(err, "train")
    assert "interrupted" in line and f"--resume continues from {out / 'checkpoint.npz'}" in line
    assert snapshot(out) == before


# ---------------------------------------------------------------------------- train
def test_resume_without_a_checkpoint_starts_afresh_with_a_note(tmp_path, capsys):
    """A run killed before its first save left a log but no checkpoint: --resume starts again."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "losses.jsonl").write_text('{"iteration": 1, "total": 3.0}\n')
    status, printed, _ = run(["train", "--iterations", "1", "--batch-size", "1", "--out",
                              str(out), "--resume", "--no-progress"], capsys)  # fmt: skip
    assert status == 0
    assert f"no checkpoint in {out} to resume from: starting from iteration 0" in printed
    assert read_meta(str(out / "checkpoint.npz"))["iteration"] == 1
    assert [json.loads(line)["iteration"] for line in open(out / "losses.jsonl")] == [1]


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--lr", "nan"], "--lr nan"),
        (["--lr", "inf"], "--lr inf"),
        (["--lr", "0"], "--lr 0.0"),
        (["--lr", "-0.01"], "--lr -0.01"),
        (["--gamma", "nan"], "--gamma nan"),
        (["--warmup", "-1"], "--warmup -1"),
        (["--min-size", "16", "--max-size", "16"], "--min-size 16"),
        (["--min-size", "0"], "--min-size 0: must be at least 32"),
        (["--min-size", "128", "--max-size", "64"], "--max-size 64 is below --min-size 128"),
        (["--max-size", "100"], "--max-size 100 is below the default --min-size 128"),
        (["--iterations", "0"], "--iterations 0"),
        (["--batch-size", "0"], "--batch-size 0"),
        (["--checkpoint-every", "0"], "--checkpoint-every 0"),
    ],
)
def test_train_refuses_values_that_cannot_train(tmp_path, capsys, options, named):
    out = tmp_path / "run"
    argv = ["train", "--iterations", "1", "--batch-size", "1", "--out", str(out), "--no-progress"]
    status, _, err = run([*argv, *options], capsys)
    assert status == 2
    assert named in error_line(err, "train")
    assert not out.exists()  # refused before anything was written


def test_unknown_category_is_refused_naming_it(tmp_path, capsys):
    json_path = write_coco(tmp_path / "coco")
    out = tmp_path / "run"
    argv = ["train", "--dataset", "coco", "--root", str(tmp_path / "coco"), "--split", "val2017",
            "--categories", "person,nosuchthing", "--iterations", "1", "--out", str(out),
            "--no-progress"]  # fmt: skip
    status, _, err = run(argv, capsys)
    assert status == 2
    line = error_line(err, "train")
    assert "nosuchthing" in line and str(json_path) in line
    assert not out.exists()


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid:RuntimeWarning")
def test_a_diverging_run_says_where_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    """--lr 1e30: the first step is finite but throws the weights far; the second is NaN."""
    out = tmp_path / "run"
    argv = ["train", "--lr", "1e30", "--warmup", "0", "--iterations", "3", "--batch-size", "1",
            "--checkpoint-every", "1", *SMALL, "--out", str(out), "--no-progress"]  # fmt: skip
    status, _, err = run(argv, capsys)
    assert status == 2 and "Traceback" not in err
    # The one multi-line user error: the NaN detective's report is kept whole.
    assert err.startswith("minimask train: non-finite loss or gradient at iteration 2")
    assert "created at" in err  # the op where the NaN arose
    assert f"last good checkpoint: {out / 'checkpoint.npz'}" in err and "lower --lr" in err
    assert read_meta(str(out / "checkpoint.npz"))["iteration"] == 1
    model, _ = model_from_checkpoint(str(out / "checkpoint.npz"))
    assert all(np.isfinite(v).all() for v in model.state_dict().values())
    assert [json.loads(line)["iteration"] for line in open(out / "losses.jsonl")] == [1]


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(
    run_dir, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    checkpoint = (out / "checkpoint.npz").read_bytes()

    def disk_full(file, **arrays):
        file.write(b"PK\x03\x04 half an archive")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez", disk_full)
    status, _, err = run(["train", *RESUME_ONE_MORE, "--out", str(out), "--no-progress"], capsys)
    assert status == 2
    line = error_line(err, "train")
    assert os.strerror(errno.ENOSPC) in line and "free some space" in line
    assert (out / "checkpoint.npz").read_bytes() == checkpoint  # the last one is kept whole
    assert sorted(os.listdir(out)) == sorted(os.listdir(run_dir))  # no half-written file left


@pytest.mark.parametrize(
    ("how", "says"),
    [
        ("header", "{} is damaged"),
        ("missing", "{}: load_state_dict into MaskRCNN: missing keys"),  # a KeyError
    ],
)
def test_train_resume_from_a_damaged_checkpoint_is_refused(run_dir, tmp_path, capsys, how, says):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    damage(out / "checkpoint.npz", how)
    before = snapshot(out)
    status, _, err = run(["train", *RESUME_ONE_MORE, "--out", str(out), "--no-progress"], capsys)
    assert status == 2
    assert says.format(out / "checkpoint.npz") in error_line(err, "train")
    assert snapshot(out) == before


def test_checkpoints_are_written_with_the_usual_file_mode(tmp_path):
    old = os.umask(0o022)
    try:
        argv = ["train", "--iterations", "1", "--batch-size", "1", *SMALL]
        assert main([*argv, "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "run" / "checkpoint.npz").st_mode & 0o777 == 0o644
    assert os.stat(tmp_path / "run" / "losses.jsonl").st_mode & 0o777 == 0o644  # as open() does


# ---------------------------------------------------------------------------- damaged checkpoints
def damage(path, how: str) -> None:
    """Spoil a checkpoint the ways files get spoiled, or as a run that diverged leaves it."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: info for info in archive.infolist()}
    if how == "header":  # a member's header overwritten: zipfile.BadZipFile, naming no file
        offset = members["meta.npy"].header_offset
        data[offset : offset + 4] = b"XXXX"
    elif how == "bytes":  # bytes flipped inside an array: NumPy reads them without a check
        info = members["model/backbone.stem.0.weight.npy"]
        middle = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
        data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    elif how == "truncated":
        data = data[: len(data) // 2]
    elif how == "text":
        data = bytearray(b"a text file, not a checkpoint\n")
    elif how in ("nan", "empty", "missing"):
        with np.load(path) as archive:
            arrays = dict(archive)
        for key, value in arrays.items():
            if key.startswith("model/") and value.dtype.kind == "f":
                arrays[key] = value * np.nan if how == "nan" else value[:0].reshape(0)
        if how == "missing":
            arrays.pop("model/mask_head.logits.bias")  # what a KeyError is made of
        np.savez(path, **arrays)
        return
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("how", "says"),
    [
        ("header", "is damaged (meta.npy does not read back intact)"),
        ("bytes", "is damaged (model/backbone.stem.0.weight.npy does not read back intact)"),
        ("truncated", "is not a minimask checkpoint"),
        ("text", "is not a minimask checkpoint"),
        ("nan", "holds non-finite weights"),
        ("empty", "shape mismatch"),
        ("missing", "missing keys (in the module, not in the state): ['mask_head.logits.bias']"),
    ],
)
def test_a_damaged_checkpoint_is_refused_naming_it(checkpoint, earlier_eval, capsys, how, says):
    damage(checkpoint, how)
    before = snapshot(earlier_eval)
    argv = ["eval", "--checkpoint", str(checkpoint), "--val-images", "2"]
    status, _, err = run([*argv, "--out", str(earlier_eval), "--no-progress"], capsys)
    assert status == 2
    line = error_line(err, "eval")
    assert str(checkpoint) in line and says in line
    assert snapshot(earlier_eval) == before


@pytest.mark.parametrize("command", ["predict", "export"])
def test_predict_and_export_refuse_a_damaged_checkpoint(checkpoint, tmp_path, capsys, command):
    damage(checkpoint, "header")
    out = tmp_path / "out"
    save_png(tmp_path / "photo.png")
    argv = {
        "predict": ["predict", "--checkpoint", str(checkpoint), str(tmp_path / "photo.png"),
                    "--out", str(out)],
        "export": ["export", "--checkpoint", str(checkpoint), "--to", str(out / "model.pth")],
    }[command]  # fmt: skip
    status, _, err = run(argv, capsys)
    assert status == 2
    assert f"{checkpoint} is damaged" in error_line(err, command)
    assert not out.exists()


# ---------------------------------------------------------------------------- eval
@pytest.mark.parametrize("option", ["--batch-size", "--val-images", "--max-images"])
def test_eval_refuses_counts_below_one(run_dir, earlier_eval, capsys, option):
    before = snapshot(earlier_eval)
    argv = ["eval", "--checkpoint", str(run_dir / "checkpoint.npz"), option, "0"]
    status, _, err = run([*argv, "--out", str(earlier_eval), "--no-progress"], capsys)
    assert status == 2
    assert f"{option} 0: must be at least 1" in error_line(err, "eval")
    assert snapshot(earlier_eval) == before  # no AP of 0 images over the earlier metrics


def test_evaluate_refuses_to_score_no_image(run_dir, earlier_eval):
    model, meta = model_from_checkpoint(str(run_dir / "checkpoint.npz"))
    before = snapshot(earlier_eval)
    with pytest.raises(ValueError, match="no image to evaluate: shapes has 0 images"):
        workflow.evaluate(model, meta, workflow.ShapesData(0), str(earlier_eval), progress=False)

    class Unreadable(workflow.ShapesData):
        def eval_set(self, meta):
            def load(index):
                raise workflow.BadImageError(f"missing image file img{index}.png")

            shapes = super().eval_set(meta)
            return workflow.EvalSet(load, 2, shapes.gt, shapes.category_ids, "my photos")

    with pytest.raises(ValueError, match=r"my photos has 2 images, none readable .*img0\.png"):
        workflow.evaluate(model, meta, Unreadable(2), str(earlier_eval), progress=False)
    assert snapshot(earlier_eval) == before


def test_eval_refuses_a_checkpoint_of_another_dataset(checkpoint, tmp_path, capsys):
    """Both ways: a shapes checkpoint on COCO, and a COCO checkpoint on shapes."""
    write_coco(tmp_path / "coco")
    out = tmp_path / "eval"
    argv = ["eval", "--checkpoint", str(checkpoint), "--out", str(out), "--no-progress"]
    status, _, err = run([*argv, "--dataset", "coco", "--root", str(tmp_path / "coco")], capsys)
    assert status == 2
    line = error_line(err, "eval")
    assert "trained on 'shapes', not 'coco'" in line and "--dataset shapes" in line

    with np.load(checkpoint) as archive:
        arrays = dict(archive)
    meta = json.loads(str(arrays["meta"]))
    meta.update(dataset="coco", root=str(tmp_path / "coco"), split="val2017")
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(checkpoint, **arrays)
    status, _, err = run([*argv, "--val-images", "2"], capsys)
    assert status == 2
    line = error_line(err, "eval")
    assert "trained on 'coco', not 'shapes'" in line and "--dataset coco --root DIR" in line
    assert not out.exists()


def test_eval_on_shapes_prints_no_progress_bar_when_asked(run_dir, tmp_path, capsys):
    argv = ["eval", "--checkpoint", str(run_dir / "checkpoint.npz"), "--val-images", "2"]
    status, out, err = run([*argv, "--out", str(tmp_path), "--no-progress"], capsys)
    assert status == 0 and err == ""
    assert "| bbox |" in out and json.loads((tmp_path / "metrics.json").read_text())["images"] == 2


# ---------------------------------------------------------------------------- predict
def test_predict_skips_bad_files_and_keeps_every_output(run_dir, tmp_path, capsys):
    """Bad files are named and skipped, the others predicted; a.png and a.jpg keep both
    drawings; detections.json holds every detection of the good files; the exit status is 1."""
    photos = tmp_path / "photos"
    photos.mkdir()
    save_png(photos / "a.png", seed=1)
    Image.open(photos / "a.png").save(photos / "a.jpg", quality=95)
    save_png(photos / "b.png", seed=2, size=64)
    (photos / "notes.png").write_text("not an image")
    (photos / "cut.png").write_bytes((photos / "b.png").read_bytes()[:200])
    names = ["a.png", "notes.png", "a.jpg", "missing.png", "cut.png", "b.png"]
    out = tmp_path / "pred"
    argv = ["predict", "--checkpoint", str(run_dir / "checkpoint.npz"), "--score-thresh", "0"]
    status, printed, err = run([*argv, *(str(photos / n) for n in names), "--out", str(out)],
                               capsys)  # fmt: skip
    assert status == 1
    lines = err.strip().splitlines()
    assert len(lines) == 4 and "Traceback" not in err
    for line, bad in zip(lines, ["notes.png", "missing.png", "cut.png"]):
        assert line.startswith("minimask predict: skipped ") and str(photos / bad) in line
    assert lines[-1].startswith("minimask predict: 3 of 6 files could not be read")

    drawn = ["a_pred.png", "a_2_pred.png", "b_pred.png", "detections.json"]
    assert sorted(os.listdir(out)) == sorted(drawn)
    assert printed.split() == [str(out / n) for n in drawn]
    results = json.loads((out / "detections.json").read_text())
    model, _ = model_from_checkpoint(str(run_dir / "checkpoint.npz"))
    for position, name in [(1, "a.png"), (3, "a.jpg"), (6, "b.png")]:
        (det,) = detections_to_host(model([read_image(str(photos / name))]))
        mine = [r for r in results if r["file_name"] == name]
        assert len(mine) == len(det["boxes"]) > 0, name
        assert {r["image_id"] for r in mine} == {position}
        np.testing.assert_allclose([r["score"] for r in mine], det["scores"], rtol=1e-5)
    assert {r["file_name"] for r in results} == {"a.png", "a.jpg", "b.png"}


def test_predict_with_no_readable_file_writes_nothing(run_dir, tmp_path, capsys):
    out = tmp_path / "pred"
    out.mkdir()
    (out / "detections.json").write_text("[]  (an earlier run's)")
    (tmp_path / "notes.png").write_text("not an image")
    bad = [str(tmp_path / "notes.png"), str(tmp_path / "missing.png")]
    argv = ["predict", "--checkpoint", str(run_dir / "checkpoint.npz"), *bad]
    status, _, err = run([*argv, "--out", str(out)], capsys)
    assert status == 2
    line = error_line(err, "predict")
    assert "none of the 2 image files could be read" in line
    assert bad[0] in line and bad[1] in line
    assert snapshot(out) == {"detections.json": b"[]  (an earlier run's)"}


def test_predict_and_eval_refuse_an_out_that_is_a_file(run_dir, tmp_path, capsys):
    save_png(tmp_path / "photo.png")
    out = tmp_path / "notes.txt"
    out.write_text("my notes")
    ckpt = str(run_dir / "checkpoint.npz")
    commands = {
        "predict": ["predict", "--checkpoint", ckpt, str(tmp_path / "photo.png")],
        "eval": ["eval", "--checkpoint", ckpt, "--val-images", "1", "--no-progress"],
    }
    for command, argv in commands.items():
        status, _, err = run([*argv, "--out", str(out)], capsys)
        assert status == 2
        assert f"--out {out} is a file" in error_line(err, command)
        assert out.read_text() == "my notes"


# ---------------------------------------------------------------------------- data subset
def test_data_subset_names_a_bad_annotation_file(tmp_path, capsys):
    path = tmp_path / "instances_val2017.json"
    path.write_text('{"images": [], "annotations": [')
    out = tmp_path / "subset"
    argv = ["data", "subset", "--annotations", str(path), "--images", str(tmp_path)]
    status, _, err = run([*argv, "--out", str(out), "--no-progress"], capsys)
    assert status == 2
    assert f"{path} is not valid JSON" in error_line(err, "data subset")
    assert not out.exists()
