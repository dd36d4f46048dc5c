"""The device is chosen in one place (``backend.check_device``) and every command honours it."""

import types

import numpy as np
import pytest

from minimask import backend
from minimask.backend import DeviceError, check_device, rng
from minimask.cli import main

COMMANDS = [
    ["demo", "--iterations", "1"],
    ["train", "--iterations", "1"],
    ["eval", "--checkpoint", "CKPT"],
    ["predict", "--checkpoint", "CKPT", "IMAGE"],
]


@pytest.fixture
def no_cupy(monkeypatch):
    monkeypatch.setattr(backend, "_import_cupy", lambda: None)


@pytest.fixture
def cupy_without_a_gpu(monkeypatch):
    runtime = types.SimpleNamespace(getDeviceCount=lambda: 0)
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))
    monkeypatch.setattr(backend, "_import_cupy", lambda: fake)


def run(argv, tmp_path, capsys):
    argv = [str(tmp_path / "x.npz") if a == "CKPT" else str(tmp_path / "x.png")
            if a == "IMAGE" else a for a in argv]  # fmt: skip
    argv += ["--out", str(tmp_path / "out")]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: a[0])
def test_gpu_without_cupy_stops_at_once_on_every_command(argv, tmp_path, capsys, no_cupy):
    status, err = run([*argv, "--device", "gpu"], tmp_path, capsys)
    assert status == 2 and "CuPy is not installed" in err and "pip install -e .[gpu]" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # stopped before doing anything


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: a[0])
def test_the_environment_variable_is_the_default(argv, tmp_path, capsys, monkeypatch,
                                                 cupy_without_a_gpu):  # fmt: skip
    monkeypatch.setenv("MINIMASK_DEVICE", "gpu")
    status, err = run(argv, tmp_path, capsys)
    assert status == 2 and "no CUDA device is visible" in err


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: a[0])
def test_an_unknown_device_is_refused(argv, tmp_path, capsys, monkeypatch):
    status, err = run([*argv, "--device", "tpu"], tmp_path, capsys)
    assert status == 2 and "'tpu' is not a device" in err
    monkeypatch.setenv("MINIMASK_DEVICE", "tpu")
    status, err = run(argv, tmp_path, capsys)
    assert status == 2 and "MINIMASK_DEVICE='tpu'" in err


def test_check_device(monkeypatch, no_cupy):
    monkeypatch.delenv("MINIMASK_DEVICE", raising=False)
    assert check_device() == "cpu" and check_device(" CPU ") == "cpu"
    with pytest.raises(DeviceError, match="CuPy is not installed"):
        check_device("gpu")


def test_one_generator_policy_for_both_devices():
    """A (seed, iteration) tuple seeds NumPy directly and CuPy through one derived integer."""
    a, b = rng((3, 7)), rng((3, 7))
    assert a.random(4).tolist() == b.random(4).tolist()  # deterministic in (seed, iteration)
    assert rng((3, 8)).random(4).tolist() != rng((3, 7)).random(4).tolist()
    seeds = []
    fake = types.SimpleNamespace(random=types.SimpleNamespace(default_rng=seeds.append))
    rng((3, 7), fake)
    rng((3, 7), fake)
    rng((3, 8), fake)
    rng(5, fake)
    assert seeds[0] == seeds[1] != seeds[2] and seeds[3] == 5
    assert all(isinstance(s, int) and 0 <= s < 2**63 for s in seeds)


def test_training_draws_the_samplers_numbers_on_the_models_device(tmp_path, monkeypatch):
    """fit hands the model a generator of the model's own array library, seeded (seed, i)."""
    from minimask import train as train_module
    from minimask.data.shapes import ShapesConfig, shapes_batches
    from minimask.model.config import tiny
    from minimask.model.mask_rcnn import MaskRCNN

    calls = []
    real = train_module.rng
    monkeypatch.setattr(train_module, "rng", lambda seed, xp=np: calls.append((seed, xp))
                        or real(seed, xp))  # fmt: skip
    model = MaskRCNN(tiny().replace(min_size=64, max_size=64))
    config = train_module.TrainConfig(iterations=2, checkpoint_every=2, seed=4)
    train_module.fit(model, shapes_batches(0, 1, ShapesConfig(image_size=64)), config,
                     str(tmp_path), progress=False)  # fmt: skip
    assert calls == [((4, 0), np), ((4, 1), np)]
