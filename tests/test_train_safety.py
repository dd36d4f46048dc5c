"""Nothing lost: a run is never overwritten by accident, never replaced by NaN weights, resumes only
as itself, survives a half-written log line and a killed save, and Ctrl-C saves before it stops."""

import json
import os
import signal
from dataclasses import replace

import numpy as np
import pytest
from test_coco import write_coco

from minimask.cli import main
from minimask.data.shapes import ShapesConfig, shapes_batches
from minimask.data.subset import build_subset
from minimask.model.checkpoint import read_meta
from minimask.model.config import tiny
from minimask.model.mask_rcnn import MaskRCNN
from minimask.nn import init
from minimask.train import (
    NonFiniteLossError,
    RunExistsError,
    TrainConfig,
    TrainingInterrupted,
    fit,
    load_checkpoint,
)

SMALL = ShapesConfig(image_size=64, min_size=12, max_size=28, max_shapes=3)
CONFIG = TrainConfig(iterations=4, lr=0.01, warmup_iters=2, milestones=(3,), checkpoint_every=2)


def small_model(**changes):
    init.manual_seed(0)
    return MaskRCNN(tiny().replace(min_size=64, max_size=64, **changes))


def run(out, config=CONFIG, model=None, batches=None, **kwargs):
    return fit(model or small_model(), batches or shapes_batches(0, 2, SMALL), config, str(out),
               progress=False, **kwargs)  # fmt: skip


def snapshot(out):
    return {name: (out / name).read_bytes() for name in ("checkpoint.npz", "losses.jsonl")}


def test_a_folder_holding_a_run_is_refused_without_resume_or_overwrite(tmp_path):
    run(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(RunExistsError, match=r"--resume to continue it, or --overwrite"):
        run(tmp_path)
    assert snapshot(tmp_path) == before  # nothing lost
    records = run(tmp_path, overwrite=True)
    assert len(records) == CONFIG.iterations
    assert len((tmp_path / "losses.jsonl").read_text().splitlines()) == CONFIG.iterations


def test_the_cli_refuses_to_train_over_a_run(tmp_path):
    argv = ["train", "--iterations", "2", "--batch-size", "1", "--out", str(tmp_path),
            "--no-progress"]  # fmt: skip
    main(argv)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert "already holds a run" in str(e.value) and "\n" not in str(e.value)
    assert snapshot(tmp_path) == before
    assert main([*argv, "--overwrite"]) == 0


def test_non_finite_weights_never_replace_the_last_good_checkpoint(tmp_path):
    # At the milestone the lr jumps to 1e43: float32 weights overflow, the loss was still finite.
    config = replace(CONFIG, milestones=(2,), gamma=1e45, checkpoint_every=1, warmup_iters=0)
    with pytest.raises(NonFiniteLossError, match=r"not finite after iteration 3.*not saved"):
        run(tmp_path, config)
    model = small_model()
    assert load_checkpoint(str(tmp_path / "checkpoint.npz"), model)["iteration"] == 2
    assert all(np.isfinite(v).all() for v in model.state_dict().values())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lr": float("nan")}, "lr=nan"),
        ({"lr": 0.0}, "lr=0.0"),
        ({"lr": float("inf")}, "lr=inf"),
        ({"warmup_iters": -1}, "warmup_iters=-1"),
        ({"iterations": 0}, "iterations=0"),
        ({"clip_norm": -1.0}, "clip_norm=-1.0"),
    ],
)
def test_settings_that_could_only_train_on_garbage_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        replace(CONFIG, **change)


def test_a_half_written_log_line_does_not_block_resume(tmp_path):
    straight = small_model()
    run(tmp_path / "straight", model=straight)
    batches = shapes_batches(0, 2, SMALL)

    def crashing(i):
        if i == 3:
            raise KeyboardInterrupt("power cut")
        return batches(i)

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run", batches=crashing)
    with open(tmp_path / "run" / "losses.jsonl", "a") as f:
        f.write('{"iteration": 4, "lr": 0.0')  # the disk filled up mid-line
    resumed = small_model()
    run(tmp_path / "run", model=resumed, resume=True)
    lines = (tmp_path / "run" / "losses.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2, 3, 4]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.parametrize(
    ("config", "model_change", "meta", "message"),
    [
        (replace(CONFIG, seed=1), {}, {}, r"train_config.seed was 0, now 1"),
        (replace(CONFIG, optimizer="adamw"), {}, {}, r"train_config.optimizer was 'sgd'"),
        (CONFIG, {"num_classes": 3}, {}, r"model_config.num_classes was 4, now 3"),
        (CONFIG, {}, {"batch_size": 4}, r"batch_size was 2, now 4"),
        (CONFIG, {}, {"classes": ["bg", "dog"]}, r"classes was \['bg', 'person'\]"),
    ],
)
def test_resume_refuses_other_settings_naming_the_field(tmp_path, config, model_change, meta,
                                                        message):  # fmt: skip
    from dataclasses import asdict

    def facts(model, **extra):
        return {"batch_size": 2, "classes": ["bg", "person"], "model_config": asdict(model.config),
                **extra}  # fmt: skip

    first = small_model()
    crashing = shapes_batches(0, 2, SMALL)
    run(tmp_path, replace(CONFIG, iterations=2), model=first, meta=facts(first),
        batches=crashing)  # fmt: skip
    before = snapshot(tmp_path)
    model = small_model(**model_change)
    with pytest.raises(ValueError, match=message):
        run(tmp_path, config, model=model, meta=facts(model, **meta), resume=True)
    assert snapshot(tmp_path) == before
    # How long a run lasts may change on resume (and the milestones follow it).
    longer = replace(CONFIG, iterations=6, milestones=(5,))
    run(tmp_path, longer, model=small_model(), meta=facts(first), resume=True)
    assert read_meta(str(tmp_path / "checkpoint.npz"))["iteration"] == 6


def test_the_cli_resume_names_a_changed_batch_size(tmp_path):
    argv = ["train", "--iterations", "2", "--batch-size", "1", "--out", str(tmp_path),
            "--no-progress"]  # fmt: skip
    main(argv)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([*argv[:4], "2", *argv[5:], "--resume"])
    assert "batch_size was 1, now 2" in str(e.value)
    assert snapshot(tmp_path) == before


def test_stale_temporary_files_are_removed_and_a_first_save_killed_resumes_afresh(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    for k in range(3):  # what kills during np.savez leave behind (no checkpoint.npz yet)
        (tmp_path / f".tmp-{k}abc.npz").write_bytes(b"PK\x03\x04 half an archive")
    notes = []
    records = run(tmp_path, resume=True, log=notes.append)
    assert len(records) == CONFIG.iterations and "no checkpoint" in notes[0]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


def test_ctrl_c_saves_then_stops_and_resume_is_exact(tmp_path):
    straight = small_model()
    run(tmp_path / "straight", model=straight)
    batches = shapes_batches(0, 2, SMALL)

    def ctrl_c_at_1(i):
        if i == 0:
            os.kill(os.getpid(), signal.SIGINT)  # as a terminal's Ctrl-C during iteration 1
        return batches(i)

    with pytest.raises(TrainingInterrupted, match=r"saved iteration 1 of 4 .*--resume"):
        run(tmp_path / "run", batches=ctrl_c_at_1)
    # saved at once, though the next regular save (checkpoint_every=2) was an iteration away
    assert read_meta(str(tmp_path / "run" / "checkpoint.npz"))["iteration"] == 1
    resumed = small_model()
    run(tmp_path / "run", model=resumed, resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_a_second_ctrl_c_aborts_at_once(tmp_path):
    batches = shapes_batches(0, 2, SMALL)

    def two_ctrl_c(i):
        if i == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return batches(i)

    with pytest.raises(KeyboardInterrupt) as e:
        run(tmp_path, batches=two_ctrl_c)
    assert not isinstance(e.value, TrainingInterrupted)
    assert read_meta(str(tmp_path / "checkpoint.npz"))["iteration"] == 2  # the last regular save


# ---------------------------------------------------------------------------- data subset
def test_subset_refuses_to_overwrite_its_input(tmp_path):
    write_coco(tmp_path)
    source = tmp_path / "annotations" / "instances_val2017.json"
    before = source.read_bytes()
    with pytest.raises(ValueError, match="would overwrite the input"):
        build_subset(str(source), str(tmp_path / "val2017"), str(tmp_path), progress=False)
    assert source.read_bytes() == before
    with pytest.raises(SystemExit) as e:
        main(["data", "subset", "--annotations", str(source), "--images",
              str(tmp_path / "val2017"), "--out", str(tmp_path), "--no-progress"])  # fmt: skip
    assert "would overwrite" in str(e.value) and source.read_bytes() == before


def test_subset_with_nothing_selected_is_an_error_and_writes_nothing(tmp_path):
    write_coco(tmp_path)
    source = str(tmp_path / "annotations" / "instances_val2017.json")
    for image_dir in (str(tmp_path / "nowhere"), str(tmp_path / "val2017")):
        min_area = 0.0 if "nowhere" in image_dir else 1e9  # wrong folder / nothing big enough
        with pytest.raises(ValueError, match="nothing written"):
            build_subset(source, image_dir, str(tmp_path / "out"), min_area=min_area,
                         progress=False)  # fmt: skip
        assert not (tmp_path / "out").exists()
