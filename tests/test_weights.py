"""Weights to and from torchvision: the torch-free .pth reader and writer, safetensors, the name
table, loading (with its checks and notes) and exporting.

The torch tests are skipped only when torch (or torchvision) is not installed; a torch that is
installed but fails to import fails this file loudly.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from minimask.model.config import get_config
from minimask.model.mask_rcnn import MaskRCNN
from minimask.model.torch_format import LEGACY_MAGIC, load_pth, save_pth
from minimask.model.weights import (
    CLASS_SPECIFIC,
    OLDER_TORCHVISION_RULES,
    RULES,
    WeightsError,
    detect_kind,
    export_weights,
    load_weights,
    read_state_dict,
    to_minimask,
    to_torchvision,
)

try:
    import torch
except ModuleNotFoundError:
    torch = None
try:
    import torchvision
except ModuleNotFoundError:
    torchvision = None

requires_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")
requires_torchvision = pytest.mark.skipif(
    torch is None or torchvision is None, reason="torch or torchvision is not installed"
)
DOCS = Path(__file__).resolve().parents[1] / "docs" / "weights.md"


def quiet(line: str) -> None:
    pass


def assert_one_line_naming(error: pytest.ExceptionInfo, path) -> None:
    message = str(error.value)
    assert str(path) in message
    assert "\n" not in message


# ---------------------------------------------------------------------------- .pth without torch
def test_save_pth_reads_back_with_own_reader(tmp_path):
    state = {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "d": np.linspace(0, 1, 5),
        "h": np.ones((2, 2), np.float16),
        "count": np.array(7, dtype=np.int64),
        "mask": np.array([True, False, True]),
        "bytes": np.arange(4, dtype=np.uint8),
        "big_endian": np.arange(3, dtype=">f4"),
        "empty": np.zeros((0, 3), np.float32),
        "strided": np.arange(20, dtype=np.int32)[::3],
    }
    save_pth(tmp_path / "a.pth", state)
    back = load_pth(tmp_path / "a.pth")
    assert isinstance(back, OrderedDict) and list(back) == list(state)
    for k, v in state.items():
        np.testing.assert_array_equal(back[k], v)
        assert back[k].dtype == v.dtype.newbyteorder("=")
    assert sorted(os.listdir(tmp_path)) == ["a.pth"]  # no temporary file left


def test_save_pth_refuses_a_dtype_it_cannot_hold(tmp_path):
    with pytest.raises(WeightsError, match="'name'.*dtype <U3"):
        save_pth(tmp_path / "a.pth", {"name": np.array(["abc"])})
    assert not (tmp_path / "a.pth").exists()


# ---------------------------------------------------------------------------- .pth with torch
@requires_torch
def test_minimask_writer_loads_in_torch_weights_only(tmp_path):
    state = {
        "f32": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32),
        "f64": np.array([1.5, -2.0]),
        "f16": np.array([0.5], np.float16),
        "i64": np.array(-(2**40), dtype=np.int64),
        "u8": np.array([0, 255], np.uint8),
        "b": np.array([[True], [False]]),
        "scalar": np.array(3.25, np.float32),
    }
    save_pth(tmp_path / "m.pth", state)
    loaded = torch.load(tmp_path / "m.pth", weights_only=True)
    assert isinstance(loaded, OrderedDict) and list(loaded) == list(state)
    for k, v in state.items():
        assert isinstance(loaded[k], torch.Tensor)
        assert loaded[k].numpy().dtype == v.dtype and loaded[k].shape == v.shape
        np.testing.assert_array_equal(loaded[k].numpy(), v)


def _tensors_for_torch_save():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    shared = torch.arange(10, dtype=torch.float64)
    tensors = {
        "f32": base,
        "f64": shared,
        "i64": torch.tensor([-1, 2**40]),
        "u8": torch.tensor([1, 200], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "strided": base[:, ::2],  # a non-contiguous view of base's storage
        "transposed": base.t(),
        "from_offset": shared[3:7],  # two tensors sharing one storage, at offsets
        "from_offset_2": shared[5:],
        "scalar": torch.tensor(2.5),
        "bf16": torch.tensor([1.5, -3.0, 1e30], dtype=torch.bfloat16),
        "f16": torch.tensor([0.25], dtype=torch.float16),
    }
    expected = {
        k: t.float().numpy() if k == "bf16" else t.numpy().copy() for k, t in tensors.items()
    }
    return tensors, expected


@requires_torch
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_save_reads_with_minimask_reader(tmp_path, zip_format):
    tensors, expected = _tensors_for_torch_save()
    path = tmp_path / "t.pth"
    torch.save(tensors, path, _use_new_zipfile_serialization=zip_format)
    state = read_state_dict(path)
    assert list(state) == list(expected)
    for k, v in expected.items():
        assert state[k].dtype == v.dtype, k
        np.testing.assert_array_equal(state[k], v, err_msg=k)
    state["from_offset"][0] = -1  # arrays own their memory: views do not leak between entries
    assert state["f64"][3] == 3


@requires_torch
def test_a_torch_module_state_dict_and_parameters_read(tmp_path):
    layer = torch.nn.BatchNorm2d(3)  # its state dict carries _metadata and a num_batches_tracked
    torch.save(layer.state_dict(), tmp_path / "bn.pth")
    state = read_state_dict(tmp_path / "bn.pth")
    assert set(state) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    torch.save(dict(layer.named_parameters()), tmp_path / "params.pth")  # Parameters, not tensors
    np.testing.assert_array_equal(read_state_dict(tmp_path / "params.pth")["weight"], np.ones(3))


@requires_torch
@pytest.mark.parametrize("wrapper", ["model", "state_dict"])
def test_checkpoint_dict_of_the_reference_scripts(tmp_path, wrapper):
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    layer(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[8, 11])
    checkpoint = {
        wrapper: layer.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),  # holds a collections.Counter
        "args": argparse.Namespace(lr=0.1, data_path="/coco"),  # read as an inert record
        "epoch": 3,
    }
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    state = read_state_dict(tmp_path / "checkpoint.pth")
    assert set(state) == {"weight", "bias"}
    np.testing.assert_array_equal(state["weight"], layer.weight.detach().numpy())


@requires_torch
def test_a_pickled_module_is_refused(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole_model.pth")  # a module, not a state dict
    with pytest.raises(WeightsError, match="torch.nn.modules.linear.Linear") as error:
        read_state_dict(tmp_path / "whole_model.pth")
    assert_one_line_naming(error, tmp_path / "whole_model.pth")


# ---------------------------------------------------------------------------- malicious pickles
class _Payload:
    """What an attacker pickles: unpickling it calls ``function(*args)``."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def _zip_pth(path, pkl: bytes) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pkl)
        archive.writestr("archive/version", "3\n")


@pytest.mark.parametrize("container", ["zip", "legacy"])
@pytest.mark.parametrize("attack", ["os.system", "builtins.eval", "inside a state dict"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, container, attack):
    marker = tmp_path / "pwned"
    command = f"touch {marker}"
    payload = {
        "os.system": _Payload(os.system, command),
        "builtins.eval": _Payload(eval, f"__import__('os').system({command!r})"),
        "inside a state dict": OrderedDict(w=_Payload(os.system, command)),
    }[attack]
    pkl = pickle.dumps(payload, protocol=2)
    path = tmp_path / "evil.pth"
    if container == "zip":
        _zip_pth(path, pkl)
    else:  # the legacy layout: magic number, protocol, system info, then the object
        head = [pickle.dumps(x, protocol=2) for x in (LEGACY_MAGIC, 1001, {"little_endian": True})]
        path.write_bytes(b"".join(head) + pkl + pickle.dumps([], protocol=2))
    with pytest.raises(WeightsError, match=r"refused to unpickle.*(system|eval)") as error:
        read_state_dict(path)
    assert_one_line_naming(error, path)
    assert not marker.exists()


# ----------------------------------------------------------------------- files that are not weights
@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (b"epoch,loss\n1,0.5\n", "not a weights file"),
        (np.random.default_rng(0).bytes(300), "not a weights file"),
        (b"PK\x03\x04" + b"\0" * 40, "zip"),
    ],
    ids=["empty", "text", "random", "broken-zip"],
)
def test_files_that_are_not_weights(tmp_path, content, message):
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=message) as error:
        read_state_dict(path)
    assert_one_line_naming(error, path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".npz"])
@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_truncated_files(tmp_path, suffix, keep):
    whole, cut = tmp_path / f"whole{suffix}", tmp_path / f"cut{suffix}"
    state = {"a": np.arange(2000, dtype=np.float32), "b": np.ones((30, 30), np.float32)}
    if suffix == ".pth":
        save_pth(whole, state)
    elif suffix == ".npz":
        np.savez(whole, **state)
    else:
        from safetensors.numpy import save_file

        save_file(state, str(whole))
    data = whole.read_bytes()
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(WeightsError) as error:
        read_state_dict(cut)
    assert_one_line_naming(error, cut)


@requires_torch
def test_truncated_legacy_pth(tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save({"a": torch.arange(1000.0)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(WeightsError, match="truncated|fewer") as error:
        read_state_dict(path)
    assert_one_line_naming(error, path)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        read_state_dict(tmp_path / "nothing.pth")


# ---------------------------------------------------------------------------- safetensors and .npz
def test_safetensors_round_trip(tmp_path):
    from safetensors.numpy import save_file

    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(4, np.int64)}
    save_file(state, str(tmp_path / "w.safetensors"))
    back = read_state_dict(tmp_path / "w.safetensors")
    assert set(back) == set(state)
    for k, v in state.items():
        np.testing.assert_array_equal(back[k], v)


@requires_torch
def test_safetensors_bfloat16_is_widened(tmp_path):
    from safetensors.torch import save_file

    values = torch.tensor([[1.5, -2.0], [3e38, 0.125]], dtype=torch.bfloat16)
    save_file({"bf": values, "f": torch.ones(2)}, str(tmp_path / "bf.safetensors"))
    back = read_state_dict(tmp_path / "bf.safetensors")
    assert back["bf"].dtype == np.float32
    np.testing.assert_array_equal(back["bf"], values.float().numpy())


@pytest.fixture(scope="module")
def tiny():
    return MaskRCNN(get_config("tiny"))


def test_npz_checkpoint_and_module_save_read(tmp_path, tiny):
    state = tiny.state_dict()
    # The layout of a training checkpoint: model/*, optim/* and a meta entry.
    arrays = {f"model/{k}": v for k, v in state.items()}
    arrays.update({"optim/step": np.array(3), "meta": np.array('{"iteration": 3}')})
    np.savez(tmp_path / "checkpoint.npz", **arrays)
    tiny.save(str(tmp_path / "module.npz"))
    for name in ("checkpoint.npz", "module.npz"):
        back = read_state_dict(tmp_path / name)
        assert list(back) == list(state)
        assert detect_kind(back) == "minimask"
        for k, v in state.items():
            np.testing.assert_array_equal(back[k], v)


# ---------------------------------------------------------------------------- loading checks (tiny)
def _copy(state):
    return {k: np.array(v, copy=True) for k, v in state.items()}


def test_load_weights_from_file_casts_float64(tmp_path, tiny):
    state = _copy(tiny.state_dict())
    rng = np.random.default_rng(1)
    file_state = {k: rng.standard_normal(v.shape) for k, v in state.items()}  # float64
    np.savez(tmp_path / "w.npz", **file_state)
    lines = []
    report = load_weights(tiny, tmp_path / "w.npz", log=lines.append)
    assert report.kind == "minimask" and report.fresh == [] and report.unused == []
    assert len(report.loaded) == len(state)
    assert lines[0].startswith(f"loaded {len(state)} of {len(state)} arrays from {tmp_path}")
    for k, v in tiny.state_dict().items():
        assert v.dtype == np.float32
        np.testing.assert_array_equal(v, file_state[k].astype(np.float32))
    tiny.load_state_dict(state)


def test_missing_and_unexpected_keys_are_listed(tiny):
    state = _copy(tiny.state_dict())
    before = _copy(state)
    del state["rpn.head.conv.weight"]
    state["fpn.extra.weight"] = np.zeros(3, np.float32)
    state["fpn.lateral.0.weight"] = state["fpn.lateral.0.weight"] + 1
    with pytest.raises(WeightsError) as error:
        load_weights(tiny, state, log=quiet)
    message = str(error.value)
    assert re.search(r"missing keys.*'rpn\.head\.conv\.weight'", message)
    assert re.search(r"unexpected keys.*'fpn\.extra\.weight'", message)
    for k, v in tiny.state_dict().items():  # nothing was written
        np.testing.assert_array_equal(v, before[k])


def test_shape_mismatch_lists_key_and_both_shapes(tiny):
    state = _copy(tiny.state_dict())
    state["fpn.smooth.1.weight"] = np.zeros((64, 64, 1, 1), np.float32)
    state["rpn.head.conv.bias"] = np.zeros(7, np.float32)
    with pytest.raises(WeightsError) as error:
        load_weights(tiny, state, log=quiet)
    message = str(error.value)
    assert "fpn.smooth.1.weight: model (64, 64, 3, 3), weights (64, 64, 1, 1)" in message
    assert "rpn.head.conv.bias: model (64,), weights (7,)" in message


@pytest.mark.parametrize(
    "bad", [np.ones(64, np.complex64), np.array(["x"] * 64)], ids=["complex", "string"]
)
def test_unconvertible_dtype_names_the_key(tiny, bad):
    state = _copy(tiny.state_dict())
    state["fpn.smooth.0.bias"] = bad
    with pytest.raises(
        WeightsError, match=rf"not real numbers: fpn\.smooth\.0\.bias \({bad.dtype}"
    ):
        load_weights(tiny, state, log=quiet)


def test_unknown_names_and_kinds(tiny):
    with pytest.raises(WeightsError, match="cannot tell"):
        to_minimask({"encoder.weight": np.zeros(1)})
    with pytest.raises(WeightsError, match="no torchvision name"):
        to_torchvision({"encoder.block.weight": np.zeros(1)})
    with pytest.raises(ValueError, match="kind="):
        to_minimask(tiny.state_dict(), kind="vgg")


def test_data_parallel_prefix_is_removed():
    state = {"module.backbone.body.conv1.weight": np.zeros(1), "module.rpn.head.conv.weight": 1}
    assert list(to_minimask(state)) == ["backbone.stem.0.weight", "rpn.head.conv.weight"]


def test_export_suffix_and_checkpoint_path(tmp_path, tiny):
    with pytest.raises(WeightsError, match="unknown suffix '.onnx'"):
        export_weights(tiny, tmp_path / "model.onnx")
    arrays = {f"model/{k}": v for k, v in tiny.state_dict().items()}
    np.savez(tmp_path / "checkpoint.npz", meta=np.array("{}"), **arrays)
    out = export_weights(tmp_path / "checkpoint.npz", tmp_path / "model.pth")
    assert "backbone.body.conv1.weight" in out and "backbone.body.bn1.weight" in out
    back = to_minimask(read_state_dict(tmp_path / "model.pth"))
    assert list(back) == list(tiny.state_dict())
    for k, v in tiny.state_dict().items():
        np.testing.assert_array_equal(back[k], v)


# ---------------------------------------------------------------------------- the name table
def test_rules_rename_both_ways_with_arithmetic():
    mm = "backbone.stages.2.5.conv3.1.running_var"
    tv = "backbone.body.layer3.5.bn3.running_var"
    out = to_torchvision({mm: np.ones(1)})
    assert list(out) == [tv, "backbone.body.layer3.5.bn3.num_batches_tracked"]
    assert out["backbone.body.layer3.5.bn3.num_batches_tracked"].dtype == np.int64
    assert list(to_minimask({tv: 1, "backbone.body.layer3.5.bn3.num_batches_tracked": 0})) == [mm]
    keypoints = {"roi_heads.keypoint_head.6.weight": 1, "roi_heads.keypoint_head.7.bias": 2}
    # conv 3 is torchvision's module 6 (ReLUs in between); module 7 would be a ReLU: no rule.
    assert list(to_minimask(keypoints)) == [
        "keypoint_head.convs.3.weight",
        "roi_heads.keypoint_head.7.bias",
    ]


def test_docs_list_every_rule():
    text = DOCS.read_text()
    for minimask, torchvision_name in RULES + OLDER_TORCHVISION_RULES:
        assert f"| `{minimask}` | `{torchvision_name}` |" in text, (minimask, torchvision_name)
    for heading in ("## Bringing your own weights", "## Outgrowing one machine"):
        assert heading in text
    assert "test_export_loads_strictly_into_torchvision" in text


# ----------------------------------------------------------------------- torchvision's models (r50)
def _numpy_state(model, seed: int) -> dict[str, np.ndarray]:
    """The model's state with every float array random and distinct, so that two same-shaped
    layers swapped by a wrong rule cannot go unnoticed (BatchNorm starts all ones and zeros)."""
    rng = np.random.default_rng(seed)
    state = {}
    for k, v in model.state_dict().items():
        a = v.numpy().copy()
        if a.dtype.kind == "f":
            a[...] = rng.standard_normal(a.shape)
            if k.endswith("running_var"):
                a[...] = np.abs(a) + 0.5
        state[k] = a
    return state


@pytest.fixture(scope="module")
def tv_maskrcnn():
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    return _numpy_state(maskrcnn_resnet50_fpn(weights=None, weights_backbone=None), seed=0)


@pytest.fixture(scope="module")
def r50():
    return MaskRCNN(get_config("r50_fpn"))


@pytest.fixture(scope="module")
def r50_3_classes():
    return MaskRCNN(get_config("r50_fpn", num_classes=3))


def _assert_loaded(model, expected: dict, keys) -> None:
    own = model.state_dict()
    for k in keys:
        np.testing.assert_array_equal(own[k], expected[k], err_msg=k)


@requires_torchvision
@pytest.mark.slow
def test_torchvision_maskrcnn_loads_strictly_every_key_used(r50, tv_maskrcnn):
    renamed = to_minimask(tv_maskrcnn)
    assert set(renamed) == set(r50.state_dict())
    report = load_weights(r50, tv_maskrcnn, log=quiet)
    assert report.kind == "maskrcnn"
    assert sorted(report.loaded) == sorted(r50.state_dict())
    assert report.fresh == [] and report.unused == [] and report.notes == []
    _assert_loaded(r50, renamed, renamed)


@requires_torchvision
@pytest.mark.slow
def test_to_torchvision_gives_torchvision_keys_and_shapes(r50, tv_maskrcnn):
    out = to_torchvision(r50.state_dict())
    assert set(out) == set(tv_maskrcnn)  # num_batches_tracked included
    for k, v in tv_maskrcnn.items():
        assert out[k].shape == v.shape, k
    assert list(to_minimask(out)) == list(r50.state_dict())  # the table is one-to-one


@requires_torchvision
@pytest.mark.slow
def test_older_torchvision_names_read(r50, tv_maskrcnn):
    """torchvision < 0.13 (its published COCO weights) named the RPN conv and mask convs so."""
    older = {}
    for k, v in tv_maskrcnn.items():
        k = k.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        k = re.sub(r"mask_head\.(\d)\.0\.", lambda m: f"mask_head.mask_fcn{int(m[1]) + 1}.", k)
        older[k] = v
    assert "roi_heads.mask_head.mask_fcn4.weight" in older
    new, old = to_minimask(tv_maskrcnn), to_minimask(older)
    assert list(old) == list(new)


@requires_torchvision
@pytest.mark.slow
def test_imagenet_resnet50_loads_as_backbone(r50, tmp_path):
    from torchvision.models import resnet50

    resnet = _numpy_state(resnet50(), seed=1)
    save_pth(tmp_path / "resnet50.pth", resnet)
    with pytest.raises(WeightsError, match="backbone_only=True"):
        load_weights(r50, tmp_path / "resnet50.pth", log=quiet)
    before = _copy(r50.state_dict())
    lines = []
    report = load_weights(r50, tmp_path / "resnet50.pth", backbone_only=True, log=lines.append)
    assert report.kind == "resnet"
    backbone = [k for k in r50.state_dict() if k.startswith("backbone.")]
    assert sorted(report.loaded) == sorted(backbone)
    assert report.unused == ["fc.weight", "fc.bias"]
    assert any("fc.weight, fc.bias dropped" in line for line in lines)
    _assert_loaded(r50, to_minimask(resnet), backbone)
    rest = [k for k in r50.state_dict() if not k.startswith("backbone.")]
    _assert_loaded(r50, before, rest)  # untouched


@requires_torchvision
@pytest.mark.slow
def test_keypointrcnn_loads_its_shared_parts(r50):
    from torchvision.models.detection import keypointrcnn_resnet50_fpn

    keypoints = _numpy_state(keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None), 2)
    renamed = to_minimask(keypoints)
    assert "keypoint_head.convs.7.weight" in renamed and "keypoint_head.logits.bias" in renamed
    before = _copy(r50.state_dict())
    lines = []
    report = load_weights(r50, keypoints, log=lines.append)
    assert report.kind == "keypointrcnn"
    kept = [k for k in r50.state_dict() if k.startswith("mask_head.")] + [
        f"{layer}.{leaf}" for layer in CLASS_SPECIFIC[:2] for leaf in ("weight", "bias")
    ]  # the mask head (absent) and the 2-class box predictor
    assert sorted(report.fresh) == sorted(kept)
    shared = [k for k in r50.state_dict() if k not in kept]
    assert sorted(report.loaded) == sorted(shared)
    assert sum(k.startswith("keypoint_head.") for k in report.unused) == 18
    assert any("keypoint_head arrays not used" in line for line in lines)
    assert any("mask_head keeps its fresh initialisation" in line for line in lines)
    _assert_loaded(r50, renamed, shared)
    _assert_loaded(r50, before, kept)


@requires_torchvision
@pytest.mark.slow
def test_other_class_count_keeps_class_layers_fresh(r50_3_classes, tv_maskrcnn):
    model = r50_3_classes
    before = _copy(model.state_dict())
    lines = []
    report = load_weights(model, tv_maskrcnn, log=lines.append)
    class_keys = [k for k in before if k.rpartition(".")[0] in CLASS_SPECIFIC]
    assert len(class_keys) == 6
    assert sorted(report.fresh) == sorted(class_keys)
    assert any(
        "roi_heads.predictor.cls_score, roi_heads.predictor.bbox_pred, mask_head.logits keep"
        " their fresh initialisation: the weights have 91 classes"
        in line
        and "the model 3" in line
        for line in lines
    )
    _assert_loaded(model, before, class_keys)
    others = [k for k in before if k not in class_keys]
    assert sorted(report.loaded) == sorted(others)
    _assert_loaded(model, to_minimask(tv_maskrcnn), others)


def _torchvision_maskrcnn(num_classes: int, frozen_bn: bool):
    from torchvision.models import resnet50
    from torchvision.models.detection import MaskRCNN as TorchMaskRCNN
    from torchvision.models.detection import maskrcnn_resnet50_fpn
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d

    if not frozen_bn:  # the plain call: BatchNorm2d layers, with num_batches_tracked
        return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes)
    body = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)  # as with pre-trained weights
    return TorchMaskRCNN(_resnet_fpn_extractor(body, 3), num_classes=num_classes)


@requires_torchvision
@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_export_loads_strictly_into_torchvision(r50_3_classes, tmp_path, suffix):
    model = r50_3_classes
    path = tmp_path / f"model{suffix}"
    export_weights(model, path)
    if suffix == ".pth":
        state = torch.load(path, weights_only=True)
    else:
        from safetensors.torch import load_file

        state = load_file(str(path))
    expected = to_torchvision(model.state_dict())
    for frozen_bn in (False, True):
        theirs = _torchvision_maskrcnn(3, frozen_bn)
        theirs.load_state_dict(state, strict=True)
        for k, v in theirs.state_dict().items():
            np.testing.assert_array_equal(v.numpy(), expected[k], err_msg=k)
    back = to_minimask(read_state_dict(path))  # and back into minimask's names
    assert set(back) == set(model.state_dict())  # (safetensors does not keep the order)
    _assert_loaded(model, back, back)
