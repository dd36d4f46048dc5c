"""4-step alternating training: each step trains exactly its own parameters on the right
proposals, the end is one model with one backbone, and resume across steps is exact."""

import json
import os
import shutil
from dataclasses import asdict

import numpy as np
import pytest
from test_cli_errors import error_line, run

from minimask import workflow
from minimask.alternating import (
    STEPS,
    setup_step,
    split_iterations,
    step_checkpoint,
    step_configs,
    train_alternating,
)
from minimask.cli import main
from minimask.data.shapes import ShapesConfig, shapes_batches
from minimask.engine import no_grad
from minimask.model.checkpoint import load_checkpoint, model_from_checkpoint, read_meta
from minimask.model.config import tiny
from minimask.model.mask_rcnn import MaskRCNN
from minimask.nn import init
from minimask.train import RunExistsError, TrainConfig, fit

SMALL = ShapesConfig(image_size=64, min_size=12, max_size=28, max_shapes=3)
BASE = TrainConfig(iterations=8, lr=0.01, warmup_iters=1, milestones=(6,), checkpoint_every=1)
CONFIGS = step_configs(BASE)  # 2 iterations per step
GROUPS = ("shared", "rpn", "detector")
TRAINS = {1: {"shared", "rpn"}, 2: {"shared", "detector"}, 3: {"rpn"}, 4: {"detector"}}


MODEL = tiny().replace(min_size=64, max_size=64)
META = {"model_config": asdict(MODEL), **workflow.ShapesData().meta()}  # as minimask train stores


def new_model():
    init.manual_seed(0)
    return MaskRCNN(MODEL)


def batches():
    return shapes_batches(0, 2, SMALL)


def train(out, get_batch=None, **kwargs):
    return train_alternating(new_model, get_batch or batches(), CONFIGS, str(out),
                             progress=False, meta=META, log=lambda _: None, **kwargs)  # fmt: skip


def group_of(model) -> dict[str, str]:
    """Each parameter's name -> its group, checking that every parameter is in exactly one."""
    ids = {}
    for group in GROUPS:
        for module in getattr(model, f"{group}_modules")():
            for p in module.parameters():
                assert id(p) not in ids, f"a parameter in both {ids[id(p)]} and {group}"
                ids[id(p)] = group
    names = dict(model.named_parameters())
    assert set(map(id, names.values())) == set(ids), "some parameter is in no group"
    return {name: ids[id(p)] for name, p in names.items()}


def weights(model) -> dict[str, np.ndarray]:
    return {name: p.data.copy() for name, p in model.named_parameters()}


def trained(out, step: int) -> MaskRCNN:
    model = new_model()
    load_checkpoint(step_checkpoint(str(out), step), model)
    return model


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """An uninterrupted run: ``(out, final model)``."""
    out = tmp_path_factory.mktemp("alternating")
    return out, train(out)


# ---------------------------------------------------------------------------- the schedule
def test_iterations_split_in_four_steps_and_milestones_follow():
    assert split_iterations(600) == (150, 150, 150, 150)
    assert split_iterations(10) == (3, 3, 2, 2)
    with pytest.raises(ValueError, match="at least 4"):
        split_iterations(3)
    steps = step_configs(TrainConfig(iterations=600, milestones=(480,)))
    assert [(c.iterations, c.milestones) for c in steps] == [(150, (120,))] * 4
    steps = step_configs(TrainConfig(iterations=600, milestones=(480,)), (100, 200, 100, 200))
    assert [c.milestones for c in steps] == [(80,), (160,), (80,), (160,)]
    with pytest.raises(ValueError, match="give 4 counts"):
        step_configs(BASE, (2, 2, 2))
    with pytest.raises(ValueError, match="give 4 counts"):
        step_configs(BASE, (2, 0, 2, 2))


# ---------------------------------------------------------------------------- the steps
@pytest.mark.parametrize("step", [1, 2, 3, 4])
def test_each_step_trains_exactly_its_own_parameters(finished, step):
    """Which parameters get gradients, and which change over the step's iterations."""
    out, _ = finished
    model, loss_fn = setup_step(step, new_model, str(out))  # the step's starting point
    groups = group_of(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, g in groups.items() if g in TRAINS[step]}

    images, targets = batches()(0)
    model.train()
    losses = loss_fn(model, images, targets)
    rpn_terms = {"loss_objectness", "loss_rpn_box_reg"}
    assert set(losses) == (rpn_terms if step in (1, 3) else
                           {"loss_classifier", "loss_box_reg", "loss_mask"})  # fmt: skip
    sum(losses.values()).backward()
    got_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got_grad <= trainable  # nothing frozen gets a gradient, and the trainable do, but:
    missing = trainable - got_grad  # at 64 px every RoI pools from P2, so in step 2 the FPN's
    if step == 2:  # P3..P5 output layers get no gradient from the heads (only from an RPN)
        assert {groups[n] for n in missing} <= {"shared"} and len(missing) <= 0.2 * len(trainable)
    else:
        assert not missing

    before, after = weights(model), weights(trained(out, step))
    changed = {n for n in before if not np.array_equal(before[n], after[n])}
    assert got_grad <= changed <= trainable


def test_step_2_trains_on_step_1s_proposals_and_step_4_on_step_3s(finished):
    out, _ = finished
    images, targets = batches()(0)
    for step, proposer_step in ((2, 1), (4, 3)):
        model, loss_fn = setup_step(step, new_model, str(out))
        seen = []
        heads = model.detector_losses

        def spy(features, proposals, *args, heads=heads, seen=seen):
            seen.append(proposals)
            return heads(features, proposals, *args)

        model.detector_losses = spy
        model.train()
        loss_fn(model, images, targets)

        def proposals(rpn_model):
            with no_grad():
                x, sizes, _, _ = rpn_model.preprocess(images, targets)
                rpn_features, _ = rpn_model.features(x)
                return rpn_model.rpn(rpn_features, sizes, tuple(x.shape[-2:]))[0]

        expected, own = proposals(trained(out, proposer_step)), proposals(model)
        for got, want in zip(seen[0], expected, strict=True):
            np.testing.assert_array_equal(got, want)
        if step == 2:  # the detector's own (untrained) RPN would propose other boxes
            assert any(a.shape != b.shape or not np.array_equal(a, b)
                       for a, b in zip(own, expected))  # fmt: skip
        else:  # step 4: the final model's own RPN is step 3's, on the same backbone
            for a, b in zip(own, expected):
                np.testing.assert_array_equal(a, b)


def test_the_end_is_one_model_with_one_backbone_that_evaluates(finished, capsys):
    out, final = finished
    step2, step3, step4 = (weights(trained(out, k)) for k in (2, 3, 4))
    groups = group_of(final)
    for name, value in weights(final).items():  # step 2's backbone, step 3's RPN, step 4's heads
        source = {"shared": step2, "rpn": step3, "detector": step4}[groups[name]]
        np.testing.assert_array_equal(value, source[name], err_msg=name)
        if groups[name] == "shared":  # step 3's RPN learned on this very backbone
            np.testing.assert_array_equal(value, step3[name], err_msg=name)

    x, _, _, _ = final.preprocess(batches()(0)[0])
    rpn_features, head_features = final.features(x)
    assert all(any(h is r for r in rpn_features) for h in head_features)  # the same arrays

    path = out / "checkpoint.npz"
    rebuilt, meta = model_from_checkpoint(str(path))
    assert meta["schedule"] == "alternating" and meta["iteration"] == BASE.iterations
    with np.load(path) as archive:  # one copy of every weight, no optimizer state
        assert sorted(archive.files) == sorted(["meta", *(f"model/{k}" for k in
                                                          rebuilt.state_dict())])  # fmt: skip
    for name, value in weights(final).items():
        np.testing.assert_array_equal(weights(rebuilt)[name], value, err_msg=name)
    status, _, _ = run(["eval", "--checkpoint", str(path), "--val-images", "2",
                        "--out", str(out / "eval"), "--no-progress"], capsys)  # fmt: skip
    assert status == 0 and (out / "eval" / "metrics.json").exists()


# ---------------------------------------------------------------------------- resume
@pytest.mark.parametrize("crash_at", [4, 3], ids=["at-step-3s-start", "mid-step-2"])
def test_resume_across_steps_gives_the_uninterrupted_weights(finished, tmp_path, crash_at):
    """Batch 4 is step 3's first (steps 1-2 done); batch 3 is step 2's second (one saved)."""
    straight_out, straight = finished
    stream = batches()

    def crashing(i):
        if i == crash_at:
            raise KeyboardInterrupt("power cut")
        return stream(i)

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, crashing)
    assert not (tmp_path / "checkpoint.npz").exists()
    resumed = train(tmp_path, resume=True)

    for name, value in weights(straight).items():
        np.testing.assert_array_equal(weights(resumed)[name], value, err_msg=name)
    for step in range(1, STEPS + 1):
        name = f"step{step}/losses.jsonl"
        log = [json.loads(line) for line in open(tmp_path / name)]
        assert log == [json.loads(line) for line in open(straight_out / name)], step


def test_resume_refuses_to_retrain_a_step_that_a_later_one_started_from(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    longer = [*step_configs(BASE, (3, 2, 2, 2))]
    with pytest.raises(ValueError, match="step 2 already started from step 1's 2 iterations"):
        train_alternating(new_model, batches(), longer, str(out), resume=True, progress=False,
                          log=lambda _: None)  # fmt: skip
    assert read_meta(step_checkpoint(str(out), 1))["iteration"] == 2  # untouched


def test_a_folder_holding_a_run_is_refused_and_overwrite_clears_every_step(tmp_path):
    joint = new_model()
    fit(joint, batches(), TrainConfig(iterations=1), str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="holds a joint training run"):
        train(tmp_path, resume=True)
    with pytest.raises(RunExistsError, match="checkpoint.npz, losses.jsonl"):
        train(tmp_path)
    stale = tmp_path / "step3"  # a later step of an older run must not survive a new start
    stale.mkdir()
    (stale / "losses.jsonl").write_text('{"iteration": 1, "total": 1.0}\n')

    def crash_in_step_2(i):
        if i == 2:
            raise KeyboardInterrupt
        return batches()(i)

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, crash_in_step_2, overwrite=True)
    assert not (tmp_path / "checkpoint.npz").exists() and not (stale / "losses.jsonl").exists()


# ---------------------------------------------------------------------------- the command line
SMALL_ARGS = ["--batch-size", "1", "--warmup", "1", "--min-size", "64", "--max-size", "64"]


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--schedule", "sideways"], "--schedule sideways: use joint or alternating"),
        (["--schedule", "alternating", "--step-iterations", "1", "2", "3"],
         "--step-iterations 1 2 3: give 4 counts"),
        (["--schedule", "alternating", "--step-iterations", "1", "0", "1", "1"],
         "step 2 has 0"),
        (["--step-iterations", "1", "1", "1", "1"], "--step-iterations needs --schedule"),
        (["--schedule", "alternating", "--iterations", "3"], "--iterations 3: --schedule"),
    ],
)  # fmt: skip
def test_the_cli_refuses_bad_schedules_in_one_line(tmp_path, capsys, options, named):
    out = tmp_path / "run"
    status, _, err = run(["train", *SMALL_ARGS, "--out", str(out), "--no-progress", *options],
                         capsys)  # fmt: skip
    assert status == 2
    assert named in error_line(err, "train")
    assert not out.exists()


def test_the_cli_trains_alternating_and_resumes_a_finished_run(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = ["train", *SMALL_ARGS, "--schedule", "alternating", "--step-iterations", "1", "1",
            "1", "2", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    for step, n in enumerate((1, 1, 1, 2), start=1):
        assert read_meta(step_checkpoint(str(out), step))["iteration"] == n
    before = weights(model_from_checkpoint(str(out / "checkpoint.npz"))[0])
    assert main([*argv, "--resume"]) == 0  # nothing left to train: the same final model
    after = weights(model_from_checkpoint(str(out / "checkpoint.npz"))[0])
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)

    for path in ("checkpoint.npz", "step4/checkpoint.npz", "step3/checkpoint.npz"):
        os.remove(out / path)  # as if killed in step 3, before its first save

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(workflow, "train", killed)
    status, _, err = run([*argv, "--resume"], capsys)
    assert status == 130
    assert f"--resume continues from {out / 'step2' / 'checkpoint.npz'}" in error_line(err, "train")
