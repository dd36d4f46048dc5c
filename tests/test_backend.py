"""The backend: choosing NumPy or CuPy, and the few array helpers where the two differ."""

from __future__ import annotations

import types

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minimask import backend
from minimask.backend import (
    DeviceError,
    default_device,
    device_of,
    get_array_module,
    get_xp,
    gpu_available,
    rng,
    scatter_add,
    to_device,
    to_host,
)


@pytest.fixture
def no_cupy(monkeypatch):
    """Pretend CuPy is not installed, whatever this machine has."""
    monkeypatch.setattr(backend, "_import_cupy", lambda: None)


@pytest.fixture
def cupy_without_gpu(monkeypatch):
    """Pretend CuPy is installed but sees no CUDA device."""

    def no_devices():
        raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=types.SimpleNamespace()))
    fake.cuda.runtime.getDeviceCount = no_devices
    monkeypatch.setattr(backend, "_import_cupy", lambda: fake)


# ---------------------------------------------------------------------------- choosing a device
def test_numpy_is_the_default(monkeypatch):
    monkeypatch.delenv("MINIMASK_DEVICE", raising=False)
    assert default_device() == "cpu"
    assert get_xp() is np
    assert get_xp("cpu") is np
    assert get_xp(" CPU ") is np  # case and spaces do not matter


@pytest.mark.parametrize("value", ["cpu", "CPU", "", " cpu "])
def test_minimask_device_cpu(monkeypatch, value):
    monkeypatch.setenv("MINIMASK_DEVICE", value)
    assert get_xp() is np


def test_gpu_from_the_environment_without_cupy_is_a_clear_error(monkeypatch, no_cupy):
    monkeypatch.setenv("MINIMASK_DEVICE", "gpu")
    assert default_device() == "gpu"
    with pytest.raises(DeviceError, match=r"CuPy is not installed.*pip install"):
        get_xp()
    assert get_xp("cpu") is np  # an explicit device wins over the environment


def test_gpu_by_name_without_cupy_is_a_clear_error(no_cupy):
    with pytest.raises(DeviceError, match="MINIMASK_DEVICE=gpu.*CuPy is not installed"):
        get_xp("gpu")
    assert not gpu_available()


def test_gpu_with_cupy_but_no_device_is_a_clear_error(cupy_without_gpu):
    assert not gpu_available()
    with pytest.raises(DeviceError, match="no CUDA device is visible.*nvidia-smi"):
        get_xp("gpu")


def test_device_error_is_a_runtime_error():
    assert issubclass(DeviceError, RuntimeError)


@pytest.mark.parametrize("name", ["tpu", "cuda", "gpu0", "numpy"])
def test_unknown_device_names(monkeypatch, name):
    with pytest.raises(DeviceError, match=f"device={name!r} is not a device"):
        get_xp(name)
    monkeypatch.setenv("MINIMASK_DEVICE", name)
    with pytest.raises(DeviceError, match=f"MINIMASK_DEVICE={name!r} is not a device"):
        get_xp()


# ---------------------------------------------------------------------------- arrays
def test_get_array_module_and_device_of_on_the_cpu():
    assert get_array_module(np.ones(2)) is np
    assert get_array_module(np.ones(2), 3.0, None, [1, 2]) is np
    assert get_array_module() is np
    assert device_of(np.ones(2)) == "cpu"
    assert device_of(1.0) == "cpu"


def test_to_host_and_to_device_on_the_cpu():
    a = np.arange(3.0)
    assert to_host(a) is a  # no copy on the host
    np.testing.assert_array_equal(to_host([1, 2]), [1, 2])
    assert isinstance(to_host(np.float32(1.0)), np.ndarray)
    assert to_device(a, "cpu") is a
    with pytest.raises(DeviceError):
        to_device(a, "tpu")


# ---------------------------------------------------------------------------- scatter-add
def test_scatter_add_adds_every_duplicate():
    target = np.zeros(4)
    scatter_add(target, np.array([0, 0, 2, 0]), np.array([1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_array_equal(target, [7.0, 0.0, 3.0, 0.0])
    naive = np.zeros(4)
    naive[np.array([0, 0, 2, 0])] += np.array([1.0, 2.0, 3.0, 4.0])  # keeps only one of the 0s
    assert naive[0] != 7.0


def test_scatter_add_with_tuple_index_and_slices():
    target = np.zeros((3, 2))
    scatter_add(target, (np.array([1, 1, 2]), slice(None)), np.ones((3, 2)))
    np.testing.assert_array_equal(target, [[0, 0], [2, 2], [1, 1]])


@st.composite
def scatter_cases(draw):
    n = draw(st.integers(1, 10))
    k = draw(st.integers(0, 20))
    index = draw(hnp.arrays(np.int64, (k,), elements=st.integers(0, n - 1)))
    values = draw(hnp.arrays(np.float64, (k,), elements=st.floats(-10, 10)))
    return n, index, values


def loop_reference(n, index, values):
    out = np.zeros(n)
    for i, v in zip(index, values):
        out[i] += v
    return out


@given(scatter_cases())
def test_scatter_add_matches_a_loop(case):
    n, index, values = case
    target = np.zeros(n)
    scatter_add(target, index, values)
    np.testing.assert_allclose(target, loop_reference(n, index, values), atol=1e-12)


# ---------------------------------------------------------------------------- random numbers
def test_rng_is_deterministic_for_a_seed():
    a = rng(123).standard_normal(5)
    b = rng(123).standard_normal(5)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, rng(124).standard_normal(5))
    assert isinstance(rng(0), np.random.Generator)


# ---------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
def test_gpu_backend():
    import cupy as cp  # noqa: PLC0415 - only on a machine with a GPU

    assert gpu_available()
    assert get_xp("gpu") is cp
    x = to_device(np.arange(6.0), "gpu")
    assert isinstance(x, cp.ndarray)
    assert get_array_module(np.ones(1), x) is cp
    assert device_of(x) == "gpu"
    assert isinstance(to_host(x), np.ndarray)

    target = cp.zeros(4)
    scatter_add(target, cp.asarray([0, 0, 2]), cp.asarray([1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(to_host(target), [3.0, 0.0, 3.0, 0.0])

    a = to_host(rng(7, cp).standard_normal(4))
    np.testing.assert_array_equal(a, to_host(rng(7, cp).standard_normal(4)))
