"""Which array library runs the maths: NumPy on the CPU, CuPy on an NVIDIA GPU.

Every piece of array code in minimask starts the same way::

    xp = get_array_module(x)     # numpy or cupy, whichever holds x

and then calls ``xp.zeros``, ``xp.exp``... so that one source runs on both. The few places where
NumPy and CuPy differ are wrapped here: scatter-add, moving arrays to the host, and random
generators.

Choosing the device
-------------------
NumPy is the default. Ask for the GPU with the environment variable ``MINIMASK_DEVICE=gpu`` or with
a ``device="gpu"`` argument where a function takes one. If CuPy is not installed, or no GPU is
visible, :func:`get_xp` raises :class:`DeviceError` saying which and how to fix it.
"""

from __future__ import annotations

import os
from types import ModuleType

import numpy as np

_DEVICES = ("cpu", "gpu")


class DeviceError(RuntimeError):
    """The requested device cannot be used (CuPy missing, no GPU, or an unknown name)."""


def _import_cupy() -> ModuleType | None:
    try:
        import cupy  # noqa: PLC0415 - optional dependency
    except Exception:  # ImportError, or a CUDA library that fails to load
        return None
    return cupy


def default_device() -> str:
    """The device named by ``MINIMASK_DEVICE`` (``cpu`` or ``gpu``), ``cpu`` when unset."""
    name = os.environ.get("MINIMASK_DEVICE", "cpu").strip().lower() or "cpu"
    if name not in _DEVICES:
        raise DeviceError(f"MINIMASK_DEVICE={name!r} is not a device; use one of {_DEVICES}")
    return name


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    cp = _import_cupy()
    if cp is None:
        return False
    try:
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def get_xp(device: str | None = None) -> ModuleType:
    """The array module for ``device`` (``"cpu"``, ``"gpu"``, or None for the default).

    Raises:
        DeviceError: the GPU was asked for but CuPy is not installed or no GPU is visible.
    """
    device = default_device() if device is None else str(device).strip().lower()
    if device not in _DEVICES:
        raise DeviceError(f"device={device!r} is not a device; use one of {_DEVICES}")
    if device == "cpu":
        return np
    cp = _import_cupy()
    if cp is None:
        raise DeviceError(
            "the GPU was requested (device='gpu' or MINIMASK_DEVICE=gpu) but CuPy is not "
            "installed; install it with `pip install -e .[gpu]` (cupy-cuda12x), or use the CPU"
        )
    if not gpu_available():
        raise DeviceError(
            "the GPU was requested (device='gpu' or MINIMASK_DEVICE=gpu) and CuPy is installed, "
            "but no CUDA device is visible; check `nvidia-smi`, or use the CPU"
        )
    return cp


# The CPU stand-in for CuPy that the tests run the GPU path on (minimask.testing.strict): its
# arrays refuse implicit conversion to NumPy, as CuPy's do. Its device name is "strict".
_STRICT_MODULE = "minimask.testing.strict"
STRICT_DEVICE = "strict"


def _strict_xp() -> ModuleType:
    from minimask.testing import strict  # noqa: PLC0415 - only for arrays made by the tests

    return strict.xp


def _on_device(x) -> bool:
    """True for an array that lives off the host: CuPy's, or the stand-in's."""
    module = type(x).__module__
    return module.startswith("cupy") or module == _STRICT_MODULE


def get_array_module(*arrays) -> ModuleType:
    """numpy, or cupy when any argument is a CuPy array (the stand-in's module for its arrays).
    Non-arrays are ignored."""
    for a in arrays:
        module = type(a).__module__
        if module.startswith("cupy"):
            return _import_cupy()
        if module == _STRICT_MODULE:
            return _strict_xp()
    return np


def is_cupy(xp) -> bool:
    """True when the array module ``xp`` is CuPy itself: the test before launching a CUDA kernel
    (the CPU stand-in takes the array-form path that every module has)."""
    return getattr(xp, "__name__", None) == "cupy"


def device_of(x) -> str:
    """``"gpu"`` for a CuPy array, ``"strict"`` for the stand-in's, ``"cpu"`` otherwise."""
    if type(x).__module__ == _STRICT_MODULE:
        return STRICT_DEVICE
    return "gpu" if get_array_module(x) is not np else "cpu"


def to_host(x) -> np.ndarray:
    """A NumPy copy (or view) of ``x``, wherever it lives: the explicit way off the device."""
    if _on_device(x):
        return x.get()
    return np.asarray(x)


def to_device(x, device: str | None = None):
    """``x`` as an array of ``device``'s library (a no-op when it already is).

    ``device="strict"`` is the CPU stand-in for the GPU (:mod:`minimask.testing.strict`).
    """
    if device is not None and str(device).strip().lower() == STRICT_DEVICE:
        return _strict_xp().asarray(x)
    xp = get_xp(device)
    if xp is np:
        return to_host(x)
    return xp.asarray(x)


def scatter_add(target, index, values) -> None:
    """In place ``target[index] += values``, adding every duplicate index (unbuffered).

    ``target[index] += values`` alone keeps only one of the duplicates; this is what the backward
    pass of integer-array indexing needs.
    """
    xp = get_array_module(target)
    if xp is np:
        np.add.at(target, index, values)
    elif not is_cupy(xp):  # the CPU stand-in brings its own, as CuPy brings cupyx's
        xp.scatter_add(target, index, values)
    else:
        import cupyx  # noqa: PLC0415 - only with CuPy

        cupyx.scatter_add(target, index, values)


def rng(seed=None, xp: ModuleType = np):
    """A seeded random generator of ``xp``'s kind (``numpy.random.Generator`` or CuPy's).

    The one policy for every random draw of the model (the samplers): the generator lives on the
    device of the arrays it draws for, so no random numbers cross between host and GPU, and it is
    seeded by ``seed``, an integer or a tuple such as ``(run seed, iteration)``, so a resumed
    run draws the same numbers as an uninterrupted one on either device. CuPy's generators take
    one integer: a tuple becomes one through NumPy's ``SeedSequence``, deterministically.
    (The two devices draw different streams from the same seed: exact resume holds on each.)
    """
    if xp is np:
        return np.random.default_rng(seed)
    if isinstance(seed, (tuple, list)):
        seed = int(np.random.SeedSequence(seed).generate_state(1, np.uint64)[0] >> 1)
    return xp.random.default_rng(seed)


def check_device(device: str | None = None) -> str:
    """``device`` (or ``MINIMASK_DEVICE``'s, or ``cpu``) as ``"cpu"``/``"gpu"``, after checking
    that it can be used: the one place every command asks (see :func:`get_xp` for the errors)."""
    name = default_device() if device is None else str(device).strip().lower()
    get_xp(name)
    return name
