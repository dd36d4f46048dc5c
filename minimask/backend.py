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
import time
from contextlib import contextmanager
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


# ---------------------------------------------------------------------------- CPU threads
# NumPy's matrix products run on a BLAS library (OpenBLAS in NumPy's wheels) with a pool of
# threads, one per core by default. Its threads spin while they wait for work, and a matrix
# product split between two threads waits for the slower half. So when two processes share the
# cores, each one's spinning threads take the cores the other's working threads need: two `tiny`
# trainings started together on 2 cores took 6-10x their time alone, where fair sharing is 2x.
#
# The policy: MINIMASK_THREADS=N (or set_threads(N)) fixes N threads. Otherwise (the default,
# "auto") the training loop calls adapt_threads() once per step, which counts the threads of
# *other* processes ready to run (Linux: /proc/loadavg less our own running threads) and gives
# the BLAS the cores that are left, at least one. Alone, that is every core; beside another busy
# process on 2 cores, one thread, which shares fairly (two trainings together: ~1.5-2x). Where
# /proc is missing, auto keeps the BLAS's default. threadpoolctl is the standard way to set the
# pool's size at run time (OPENBLAS_NUM_THREADS works only before NumPy is imported, and each
# BLAS names its variable differently).
THREADS_VARIABLE = "MINIMASK_THREADS"
ADAPT_EVERY = 1.0  # seconds between two changes of the thread count (one sample per call)
SAMPLES = 5  # the count follows the median of the last few samples, not one noisy reading


class _ThreadPolicy:
    """The state of the policy above (one per process)."""

    def __init__(self):
        self.fixed: int | None = None  # threads set by set_threads or MINIMASK_THREADS
        self.samples: list[int] = []  # recent counts of other processes' runnable threads
        self.changed_at = 0.0  # time.monotonic() of the last change
        self.blas = None  # threadpoolctl's controllers of the BLAS libraries, found once
        self.started = False  # set_threads has run (MINIMASK_THREADS read)

    def controllers(self):
        if self.blas is None:
            from threadpoolctl import ThreadpoolController  # noqa: PLC0415

            self.blas = ThreadpoolController().select(user_api="blas").lib_controllers
        return self.blas

    def current(self) -> int:
        return max((c.get_num_threads() for c in self.controllers()), default=1)

    def apply(self, threads: int) -> int:
        for c in self.controllers():
            if c.get_num_threads() != threads:
                c.set_num_threads(threads)
        return threads


_policy = _ThreadPolicy()


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def runnable_elsewhere() -> int | None:
    """Threads of other processes that are running or ready to run now; None without /proc.

    ``/proc/loadavg``'s fourth field counts the runnable threads of the whole machine (``R/T``),
    from which our own running threads (``/proc/self/task/*/stat``, state ``R``) are taken.
    """
    try:
        with open("/proc/loadavg") as f:
            runnable = int(f.read().split()[3].split("/")[0])
        own = 0
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/stat") as f:
                    own += f.read().rsplit(")", 1)[1].split()[0] == "R"
            except OSError:  # the thread ended meanwhile
                continue
    except (OSError, ValueError, IndexError):
        return None
    return max(runnable - own, 0)


def blas_threads() -> int:
    """The number of threads NumPy's BLAS uses now."""
    return _policy.current()


@contextmanager
def single_threaded_blas():
    """Within the block, NumPy's BLAS runs on the calling thread alone (then back to its count).

    For code that splits a product between Python threads itself (NumPy releases the GIL in a
    matrix product), so that the BLAS does not split each part again.
    """
    before = _policy.current()
    if before == 1:
        yield
        return
    _policy.apply(1)
    try:
        yield
    finally:
        _policy.apply(before)


def set_threads(threads: int | None = None) -> int:
    """Fix the number of threads of NumPy's BLAS, or return to the policy; returns the count.

    Args:
        threads: a positive count (fixed until the next call), or None for the policy:
            ``MINIMASK_THREADS`` when set, else "auto" (every core until :func:`adapt_threads`
            sees other processes running).

    Raises:
        ValueError: ``threads`` (or ``MINIMASK_THREADS``) is not a positive integer.
    """
    _policy.started = True
    if threads is None:
        value = os.environ.get(THREADS_VARIABLE, "").strip()
        if value and value.lower() != "auto":
            threads = _positive_int(value, THREADS_VARIABLE)
    if threads is None:
        _policy.fixed, _policy.samples = None, []
        return _policy.apply(cores())
    _policy.fixed = _positive_int(threads, "threads")
    return _policy.apply(_policy.fixed)


def adapt_threads() -> int:
    """The auto policy's step (see above): call once per training step; returns the count.

    Does nothing when the count is fixed. Costs about 0.1 ms (a few small reads of /proc).
    """
    if not _policy.started:
        set_threads(None)
    if _policy.fixed is not None:
        return _policy.fixed
    others = runnable_elsewhere()
    if others is None:
        return _policy.current()
    _policy.samples = (_policy.samples + [others])[-SAMPLES:]
    now = time.monotonic()
    if now - _policy.changed_at < ADAPT_EVERY:
        return _policy.current()
    busy = sorted(_policy.samples)[len(_policy.samples) // 2]  # the median
    threads = max(1, cores() - busy)
    if threads != _policy.current():
        _policy.changed_at = now
        _policy.apply(threads)
    return threads


def _positive_int(value, name: str) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"{name}={value!r} is not a positive integer (a number of threads)")
    return number
