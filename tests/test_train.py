"""The training loop: exact resume, atomic checkpoints, loss logs, and a NaN that names its op."""

import json
from dataclasses import replace

import numpy as np
import pytest

from minimask.data.shapes import ShapesConfig, shapes_batches
from minimask.model.checkpoint import model_from_checkpoint
from minimask.model.config import tiny
from minimask.model.mask_rcnn import MaskRCNN
from minimask.nn import Module, Parameter, init
from minimask.train import NonFiniteLossError, TrainConfig, fit, load_checkpoint

SMALL = ShapesConfig(image_size=64, min_size=12, max_size=28, max_shapes=3)
CONFIG = TrainConfig(
    iterations=4, lr=0.01, warmup_iters=2, milestones=(3,), checkpoint_every=2, seed=0
)


def small_model():
    init.manual_seed(0)
    return MaskRCNN(tiny().replace(min_size=64, max_size=64))


def params(model):
    return {k: v.copy() for k, v in model.state_dict().items()}


def test_resume_after_a_crash_continues_exactly(tmp_path):
    straight = small_model()
    fit(straight, shapes_batches(0, 2, SMALL), CONFIG, str(tmp_path / "a"), progress=False)

    batches = shapes_batches(0, 2, SMALL)

    def crashing(i):
        if i == 3:
            raise KeyboardInterrupt("power cut")
        return batches(i)

    crashed = small_model()
    with pytest.raises(KeyboardInterrupt):
        fit(crashed, crashing, CONFIG, str(tmp_path / "b"), progress=False)
    resumed = small_model()  # a fresh process would rebuild the model like this
    fit(resumed, batches, CONFIG, str(tmp_path / "b"), resume=True, progress=False)

    a, b = params(straight), params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    log = [json.loads(line) for line in open(tmp_path / "b" / "losses.jsonl")]
    assert [r["iteration"] for r in log] == [1, 2, 3, 4]  # no duplicated or missing lines
    straight_log = [json.loads(line) for line in open(tmp_path / "a" / "losses.jsonl")]
    assert [r["total"] for r in log] == [r["total"] for r in straight_log]


def test_outputs_checkpoint_and_reload(tmp_path):
    model = small_model()
    meta = {"model_config": {k: v for k, v in vars(model.config).items()}, "classes": ["a"] * 4}
    fit(model, shapes_batches(0, 2, SMALL), CONFIG, str(tmp_path), progress=False, meta=meta)
    for name in ("losses.jsonl", "loss_curve.png", "checkpoint.npz"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert not list(tmp_path.glob("*.tmp*"))  # the atomic writer left no temporary file
    fresh = small_model()
    assert load_checkpoint(str(tmp_path / "checkpoint.npz"), fresh)["iteration"] == 4
    for k, v in params(model).items():
        np.testing.assert_array_equal(fresh.state_dict()[k], v)
    rebuilt, meta = model_from_checkpoint(str(tmp_path / "checkpoint.npz"))
    assert rebuilt.config == model.config and not rebuilt.training


def test_resume_without_a_checkpoint_starts_afresh_with_a_note(tmp_path):
    notes = []
    records = fit(small_model(), shapes_batches(0, 2, SMALL), CONFIG, str(tmp_path),
                  resume=True, progress=False, log=notes.append)  # fmt: skip
    assert [r["iteration"] for r in records] == list(range(1, CONFIG.iterations + 1))
    assert len(notes) == 1 and "no checkpoint" in notes[0] and "iteration 0" in notes[0]


def test_a_nan_stops_training_and_names_the_op_where_it_arose(tmp_path):
    model = small_model()
    batches = shapes_batches(0, 2, SMALL)

    def poisoned(i):
        if i == 2:  # something corrupts one weight of the box classifier after a checkpoint
            model.roi_heads.predictor.cls_score.weight.data[1, 3] = np.nan
        return batches(i)

    with pytest.raises(NonFiniteLossError) as info:
        fit(model, poisoned, CONFIG, str(tmp_path), progress=False)
    message = str(info.value)
    assert "iteration 3" in message
    # The corrupted weight is a leaf: the first op to see it is its transpose in linear().
    assert "Permute" in message and "layers.py" in message and "already non-finite" in message
    assert "checkpoint.npz" in message  # the last good checkpoint (iteration 2)
    assert load_checkpoint(str(tmp_path / "checkpoint.npz"), small_model())["iteration"] == 2


def test_clip_norm_zero_trains_without_clipping(tmp_path):
    # 0 turns clipping off: the same steps as a bound the gradients never reach.
    off = small_model()
    records = fit(off, shapes_batches(0, 2, SMALL), replace(CONFIG, clip_norm=0.0),
                  str(tmp_path / "off"), progress=False)  # fmt: skip
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    never = small_model()
    fit(never, shapes_batches(0, 2, SMALL), replace(CONFIG, clip_norm=1e30),
        str(tmp_path / "never"), progress=False)  # fmt: skip
    a, b = params(off), params(never)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


class SqrtOfZero(Module):
    """A finite loss, sqrt(p) at p = 0, whose gradient 1 / (2 sqrt(p)) is infinite."""

    def __init__(self):
        super().__init__()
        self.p = Parameter(np.zeros(3))

    def forward(self, images, targets):
        return {"loss": self.p.sqrt().sum()}


@pytest.mark.parametrize("clip_norm", [0.0, 10.0])
def test_a_non_finite_gradient_stops_training_with_or_without_clipping(tmp_path, clip_norm):
    with pytest.raises(NonFiniteLossError) as info, np.errstate(divide="ignore"):
        fit(SqrtOfZero(), lambda i: (None, None), replace(CONFIG, clip_norm=clip_norm),
            str(tmp_path), progress=False)  # fmt: skip
    message = str(info.value)
    assert "iteration 1" in message and "'loss': 0.0" in message
    assert "Sqrt" in message  # the detective names the op whose gradient is infinite


def test_a_nan_objectness_logit_reaches_the_loss_and_its_explanation(tmp_path):
    # NaN logits are scores of the RPN's NMS during training: it must order them (as torchvision
    # does), not refuse them, so that the loop can stop with its explanation.
    model = small_model()
    batches = shapes_batches(0, 2, SMALL)

    def poisoned(i):
        if i == 2:
            model.rpn.head.cls_logits.bias.data[0] = np.nan  # every logit of the first anchor
        return batches(i)

    with pytest.raises(NonFiniteLossError) as info:
        fit(model, poisoned, CONFIG, str(tmp_path), progress=False)
    message = str(info.value)
    assert "iteration 3" in message and "'loss_objectness': nan" in message
    assert "Conv2d" in message and "1 NaN" in message  # the detective names the poisoned conv
