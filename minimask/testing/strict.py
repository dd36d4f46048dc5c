"""A CPU stand-in for CuPy: "device" arrays that refuse to become host arrays unless asked.

On a GPU the arrays live in the GPU's memory. Reading one on the host (the CPU) is a
*synchronisation*: the host waits until the GPU has finished everything queued before, then
copies. A few syncs per training step cost nothing; one per op, per image or per RoI keeps the GPU
idle. CuPy makes the boundary visible: ``numpy.asarray(cupy_array)`` raises ``TypeError:
Implicit conversion to a NumPy array is not allowed``, and only ``x.get()`` (or ``float(x)`` of
a single number) copies to the host.

NumPy has no such boundary. Code that passes every CPU test may turn a device array into a NumPy
array, mix a NumPy index array into a device op, or call ``float()`` in a loop, and nothing
complains until it runs on a GPU. This module brings the boundary to the CPU, so that every test
run checks the GPU path:

* :class:`StrictArray` is a "device array": a NumPy array inside a small wrapper that is *not* an
  ``ndarray``. Its operators, indexing and methods (``x + y``, ``x[i]``, ``x.sum()``,
  ``x.astype()``, ``x.shape``...) run NumPy underneath and return StrictArrays.
* :data:`xp` is its array module, the one ``minimask.backend.get_array_module(x)`` hands out for
  a StrictArray: NumPy's functions taking and returning StrictArrays, plus what minimask uses of
  CuPy's extras (``xp.random.default_rng``, ``xp.scatter_add`` for ``cupyx.scatter_add``,
  ``xp.asnumpy``). As in CuPy, a reduction gives a 0-d array, not a NumPy scalar, and sorts are
  stable (asking for another ``kind`` is an error).

What it refuses, with a ``TypeError`` as CuPy does:

* an implicit conversion to a host array: ``np.asarray(x)``, ``np.array(x)``, or any NumPy code
  that needs the values of ``x`` as an ndarray;
* a NumPy array mixed with a device array: as an operand (``x + host``), an index
  (``x[host_index]``), an assigned value (``x[i] = host``) or an argument of an ``xp`` function.
  Upload it first with ``xp.asarray``. This catches index arrays built with NumPy on the hot path.

What it counts, on :data:`log` and on every :func:`counting` block, by kind and with the line of
minimask that caused it (:class:`SyncLog`):

* ``"get"``: an explicit download: ``x.get()``, ``minimask.backend.to_host(x)``, ``x.tolist()``,
  ``repr(x)``;
* ``"scalar"``: one number read on the host: ``float(x)``, ``int(x)``, ``bool(x)``, ``x.item()``,
  ``operator.index(x)``. CuPy allows these without ``.get()``, but they wait for the device all
  the same, so they are counted as syncs, never hidden;
* ``"size"``: an op whose result's size depends on the values (``nonzero``, ``flatnonzero``,
  ``argwhere``, ``unique``, ``compress``, boolean-mask indexing ``x[mask]``, and ``bincount``,
  which reads the largest value, twice counted as CuPy checks the smallest too): CuPy must read
  that size on the host, a sync that no line of the caller shows;
* ``"upload"``: host data copied to the device (``xp.asarray(host)``, ``to_device(x,
  "strict")``): no wait for the device, but a copy that should not sit in a loop;
* ``"refused"``: each implicit conversion refused above, so that a test can assert there were
  none even where some code catches the TypeError.

The first three are the *syncs* (:attr:`SyncLog.syncs`).

Running a function under it::

    from minimask.testing import strict

    x = strict.asarray(host_array)       # upload (or minimask.backend.to_device(a, "strict"))
    with strict.counting() as syncs:
        y = f(x)                         # a TypeError wherever f would leak to the host on CuPy
    print(syncs.summary())               # how many syncs of each kind, and from which lines
    result = y.get()                     # the explicit download

A model moves there with ``model.to("strict")``. Give it host images and targets as usual: its
transform uploads them with ``xp.asarray``, as it does for CuPy.

What it cannot do: run CUDA. A RawKernel (the bitmask NMS of :mod:`minimask.ops.nms`, RoI
kernels) needs real CuPy, so code dispatches to kernels only when
:func:`minimask.backend.is_cupy` says the module is CuPy, and runs its array-form path here. Nor
does it know which NumPy functions or keywords CuPy lacks, or how fast anything would be on a
GPU: it checks where the data goes, not what CuPy implements.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter
from dataclasses import dataclass
from types import ModuleType

import numpy as np

DEVICE = "strict"  # the device name: to_device(x, "strict"), model.to("strict")
SYNC_KINDS = ("get", "scalar", "size")  # the kinds that make the host wait for the device

IMPLICIT = (
    "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a "
    "NumPy array explicitly (minimask.backend.to_host), as CuPy requires."
)


# ---------------------------------------------------------------------------- the log
@dataclass(frozen=True)
class Event:
    """One counted event: its kind and where in the calling code it happened."""

    kind: str  # "get", "scalar", "size", "upload" or "refused"
    where: str  # "minimask/ops/roi_align.py:212 plan_blocks"


class SyncLog:
    """The events recorded while this log was listening (see the module docstring for kinds)."""

    def __init__(self):
        self.events: list[Event] = []

    def reset(self) -> None:
        self.events.clear()

    def count(self, *kinds: str) -> int:
        """The number of events of these kinds (of any kind when none are named)."""
        return sum(1 for e in self.events if not kinds or e.kind in kinds)

    @property
    def syncs(self) -> int:
        """Events that make the host wait for the device: "get", "scalar" and "size"."""
        return self.count(*SYNC_KINDS)

    @property
    def refused(self) -> int:
        """Implicit conversions to a host array that were refused (should always be 0)."""
        return self.count("refused")

    @property
    def uploads(self) -> int:
        return self.count("upload")

    def by_kind(self) -> Counter:
        return Counter(e.kind for e in self.events)

    def by_site(self, *kinds: str) -> Counter:
        """``{(kind, where): count}`` for events of these kinds (all kinds when none named)."""
        return Counter((e.kind, e.where) for e in self.events if not kinds or e.kind in kinds)

    def summary(self, *kinds: str) -> str:
        """A table: totals by kind, then every call site, most frequent first."""
        kinds = kinds or (*SYNC_KINDS, "upload", "refused")
        totals = ", ".join(f"{k} {self.count(k)}" for k in kinds)
        lines = [f"syncs {self.syncs} ({totals})"]
        for (kind, where), n in self.by_site(*kinds).most_common():
            lines.append(f"{n:6d}  {kind:<8} {where}")
        return "\n".join(lines)


log = SyncLog()  # listens always; reset it before measuring
_listeners: list[SyncLog] = [log]


@contextlib.contextmanager
def counting():
    """A fresh :class:`SyncLog` that records what happens inside the ``with`` block."""
    fresh = SyncLog()
    _listeners.append(fresh)
    try:
        yield fresh
    finally:
        _listeners.remove(fresh)


_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Plumbing between the caller and this module: an event is blamed on the line that called it.
_PLUMBING = {
    os.path.abspath(__file__),
    os.path.join(_ROOT, "minimask", "backend.py"),
    os.path.join(_ROOT, "minimask", "engine", "tensor.py"),
}


def _where() -> str:
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename in _PLUMBING:
        frame = frame.f_back
    if frame is None:
        return "?"
    path = frame.f_code.co_filename
    if path.startswith(_ROOT + os.sep):
        path = os.path.relpath(path, _ROOT)
    return f"{path}:{frame.f_lineno} {frame.f_code.co_name}"


def _record(kind: str, times: int = 1) -> None:
    event = Event(kind, _where())
    for listener in _listeners:
        listener.events.extend([event] * times)


# ---------------------------------------------------------------------------- wrapping
def _mixed(what: str) -> TypeError:
    return TypeError(
        f"{what}: a NumPy (host) array was mixed with device arrays; CuPy refuses that too. "
        "Make it on the device (xp.arange...), or upload it explicitly with xp.asarray."
    )


def _wrap(value):
    """NumPy results as device values: arrays and NumPy scalars become StrictArrays (a
    reduction gives a 0-d array, as in CuPy); tuples and lists are wrapped item by item."""
    if isinstance(value, np.ndarray):
        return StrictArray(value)
    if isinstance(value, np.generic):
        return StrictArray(np.asarray(value))
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


def _unwrap(value, what: str):
    """Arguments for NumPy: StrictArrays opened, host arrays refused, containers walked."""
    if isinstance(value, StrictArray):
        return value._array
    if isinstance(value, np.ndarray):
        raise _mixed(what)
    if isinstance(value, (tuple, list)):
        return type(value)(_unwrap(v, what) for v in value)
    return value


def _unwrap_call(args, kwargs, what: str):
    return (
        tuple(_unwrap(a, what) for a in args),
        {k: _unwrap(v, what) for k, v in kwargs.items()},
    )


def _is_mask(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, np.ndarray) and p.dtype == bool and p.ndim > 0 for p in parts)


_OPERAND_TYPES = (np.ndarray, np.generic, int, float, complex, bool)


def _stable(kwargs: dict) -> None:
    """CuPy sorts stably, and refuses to be asked for any other kind of sort."""
    if kwargs.get("kind") not in (None, "stable"):
        raise ValueError("kind can only be None or 'stable' (as in CuPy)")
    kwargs["kind"] = "stable"


# ---------------------------------------------------------------------------- the array
class StrictArray:
    """A device array on the CPU: NumPy inside, no implicit way out (module docstring).

    Make one with :func:`asarray` (an upload); never wrap an existing NumPy array by hand, which
    would share memory with the host.
    """

    __slots__ = ("_array",)

    def __init__(self, array: np.ndarray):
        self._array = array

    # ------------------------------------------------------------------ facts kept on the host
    @property
    def shape(self) -> tuple[int, ...]:
        return self._array.shape

    @property
    def dtype(self) -> np.dtype:
        return self._array.dtype

    @property
    def ndim(self) -> int:
        return self._array.ndim

    @property
    def size(self) -> int:
        return self._array.size

    @property
    def itemsize(self) -> int:
        return self._array.itemsize

    @property
    def nbytes(self) -> int:
        return self._array.nbytes

    @property
    def strides(self) -> tuple[int, ...]:
        return self._array.strides

    @property
    def flags(self):
        return self._array.flags

    @property
    def T(self) -> StrictArray:
        return StrictArray(self._array.T)

    def __len__(self) -> int:
        return len(self._array)

    # ------------------------------------------------------------------ the ways to the host
    def get(self) -> np.ndarray:
        """A NumPy copy on the host: the explicit download (a counted sync)."""
        _record("get")
        return self._array.copy()

    def tolist(self):
        _record("get")
        return self._array.tolist()

    def item(self, *args):
        _record("scalar")
        return self._array.item(*args)

    def __float__(self) -> float:
        _record("scalar")
        return float(self._array)

    def __int__(self) -> int:
        _record("scalar")
        return int(self._array)

    def __complex__(self) -> complex:
        _record("scalar")
        return complex(self._array)

    def __bool__(self) -> bool:
        _record("scalar")
        return bool(self._array)

    def __index__(self) -> int:
        _record("scalar")
        return self._array.__index__()

    def __format__(self, spec: str) -> str:
        _record("scalar" if self.ndim == 0 else "get")
        return format(self._array, spec)

    def __repr__(self) -> str:
        _record("get")
        return f"StrictArray({self._array!r})"

    __str__ = __repr__

    def __array__(self, dtype=None, copy=None):
        _record("refused")
        raise TypeError(IMPLICIT)

    __hash__ = None  # arrays are not hashable

    # ------------------------------------------------------------------ NumPy's protocols
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        """``np.exp(x)``, ``host + x`` and friends: run on the device, refuse host operands."""
        if not all(isinstance(i, (StrictArray, *_OPERAND_TYPES)) for i in inputs):
            return NotImplemented
        what = f"numpy.{ufunc.__name__}"
        inputs = tuple(_unwrap(i, what) for i in inputs)
        out = kwargs.get("out")
        if out is not None:
            if not all(isinstance(o, StrictArray) for o in out):
                raise _mixed(f"{what}(out=...)")
            kwargs["out"] = tuple(o._array for o in out)
        if "where" in kwargs:
            kwargs["where"] = _unwrap(kwargs["where"], what)
        result = getattr(ufunc, method)(*inputs, **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _wrap(result)

    def __array_function__(self, func, types, args, kwargs):
        """``np.concatenate([x, y])`` and friends run as ``xp``'s function of the same name, as
        CuPy's ``__array_function__`` does; NumPy raises a TypeError for any other."""
        if getattr(np, func.__name__, None) is not func:
            return NotImplemented  # a function of a NumPy submodule: none on this device
        return getattr(xp, func.__name__)(*args, **kwargs)

    # ------------------------------------------------------------------ indexing
    def __getitem__(self, key):
        key = _unwrap(key, "indexing")
        if _is_mask(key):
            _record("size")  # the result's length is the number of True entries
        return _wrap(self._array[key])

    def __setitem__(self, key, value) -> None:
        self._array[_unwrap(key, "indexing")] = _unwrap(value, "assignment")

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    # ------------------------------------------------------------------ methods
    def __getattr__(self, name: str):
        # Called only for names the class does not define: NumPy's methods, run on the device.
        if name.startswith("__") or name in ("_array", "flat", "ctypes", "data"):
            raise AttributeError(f"StrictArray has no attribute {name!r} (not on a device)")
        attr = getattr(self._array, name)
        if not callable(attr):
            return _wrap(attr)  # .real, .imag, .base
        counted = _SIZE_SYNCS.get(name, 0)
        sorts = name in ("sort", "argsort")

        def method(*args, **kwargs):
            if sorts:
                _stable(kwargs)
            args, kwargs = _unwrap_call(args, kwargs, f"{name}()")
            if counted:
                _record("size", counted)
            return _wrap(attr(*args, **kwargs))

        return method

    def __copy__(self) -> StrictArray:
        return StrictArray(self._array.copy())

    def __deepcopy__(self, memo) -> StrictArray:
        return StrictArray(self._array.copy())


def _binary(ufunc, reflected: bool = False, in_place: bool = False):
    """The operator method ``x <op> other`` (or ``other <op> x``, or ``x <op>= other``)."""

    def operator(self, other):
        if not isinstance(other, (StrictArray, *_OPERAND_TYPES)):
            return NotImplemented  # a Tensor, say: let the other side answer
        other = _unwrap(other, f"the operator of numpy.{ufunc.__name__}")
        if in_place:
            ufunc(self._array, other, out=self._array)
            return self
        return _wrap(ufunc(other, self._array) if reflected else ufunc(self._array, other))

    return operator


def _unary(ufunc):
    return lambda self: _wrap(ufunc(self._array))


_OPERATORS = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "truediv": np.true_divide,
    "floordiv": np.floor_divide,
    "mod": np.remainder,
    "pow": np.power,
    "matmul": np.matmul,
    "and": np.bitwise_and,
    "or": np.bitwise_or,
    "xor": np.bitwise_xor,
    "lshift": np.left_shift,
    "rshift": np.right_shift,
}
for _name, _ufunc in _OPERATORS.items():
    setattr(StrictArray, f"__{_name}__", _binary(_ufunc))
    setattr(StrictArray, f"__r{_name}__", _binary(_ufunc, reflected=True))
    setattr(StrictArray, f"__i{_name}__", _binary(_ufunc, in_place=True))
_COMPARISONS = {
    "lt": np.less,
    "le": np.less_equal,
    "gt": np.greater,
    "ge": np.greater_equal,
    "eq": np.equal,
    "ne": np.not_equal,
}
for _name, _ufunc in _COMPARISONS.items():
    setattr(StrictArray, f"__{_name}__", _binary(_ufunc))
for _name, _ufunc in {"neg": np.negative, "pos": np.positive, "abs": np.absolute}.items():
    setattr(StrictArray, f"__{_name}__", _unary(_ufunc))
StrictArray.__invert__ = _unary(np.invert)


# ---------------------------------------------------------------------------- the module
# Functions whose result's size depends on the values: CuPy syncs to learn it (times per call).
_SIZE_SYNCS = {
    "nonzero": 1,
    "flatnonzero": 1,
    "argwhere": 1,
    "unique": 1,
    "compress": 1,
    "extract": 1,
    "bincount": 2,  # CuPy reads (x < 0).any() and x.max() on the host
}
# Functions that answer about shapes and dtypes: their results stay host values.
_METADATA = {
    "shape",
    "ndim",
    "size",
    "result_type",
    "can_cast",
    "promote_types",
    "min_scalar_type",
    "issubdtype",
    "isscalar",
    "broadcast_shapes",
    "iscomplexobj",
    "isrealobj",
    "may_share_memory",
    "shares_memory",
}


def _device_function(name: str, func):
    """NumPy's ``func`` on device arrays: StrictArrays in, StrictArrays out, host arrays refused."""
    counted = _SIZE_SYNCS.get(name, 0)
    metadata = name in _METADATA
    sorts = name in ("sort", "argsort")

    def call(*args, **kwargs):
        if sorts:
            _stable(kwargs)
        out = kwargs.get("out")
        if out is not None and not isinstance(out, StrictArray):
            raise _mixed(f"xp.{name}(out=...)")
        args, kwargs = _unwrap_call(args, kwargs, f"xp.{name}")
        if counted or (name == "where" and len(args) == 1):
            _record("size", counted or 1)
        result = func(*args, **kwargs)
        if out is not None:
            return out
        if metadata or result is None:
            return result
        if isinstance(result, (bool, int, float, complex)):  # CuPy answers with a 0-d array
            return StrictArray(np.asarray(result))
        return _wrap(result)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"``numpy.{name}`` on device arrays (see minimask.testing.strict)."
    return call


class _DeviceUfunc:
    """A NumPy ufunc on device arrays: calling it, and its methods (``reduce``, ``outer``...)."""

    def __init__(self, ufunc: np.ufunc):
        self.ufunc = ufunc
        self.__name__ = ufunc.__name__
        self._call = _device_function(ufunc.__name__, ufunc)

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name: str):
        attr = getattr(self.ufunc, name)
        return _device_function(f"{self.__name__}.{name}", attr) if callable(attr) else attr


class _Generator:
    """A seeded NumPy generator whose draws land on the device (as ``cupy.random.Generator``)."""

    def __init__(self, generator: np.random.Generator):
        self._generator = generator

    def __getattr__(self, name: str):
        attr = getattr(self._generator, name)
        return _device_function(name, attr) if callable(attr) else attr


class _Random:
    """``xp.random``: what minimask uses of ``cupy.random``."""

    @staticmethod
    def default_rng(seed=None) -> _Generator:
        return _Generator(np.random.default_rng(seed))


class _ArrayModule(ModuleType):
    """NumPy's namespace for StrictArrays: what ``get_array_module`` returns for them.

    Types, dtypes and constants are NumPy's own (``xp.float32 is np.float32``, as in CuPy);
    every function takes and returns device arrays (module docstring).
    """

    ndarray = StrictArray
    random = _Random()

    def __init__(self):
        super().__init__(DEVICE, "NumPy's functions on StrictArrays (minimask.testing.strict).")

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(f"module {DEVICE!r} has no attribute {name!r}")
        if not hasattr(np, name):
            raise AttributeError(f"module {DEVICE!r} has no attribute {name!r} (nor has NumPy)")
        attr = getattr(np, name)
        if isinstance(attr, np.ufunc):
            attr = _DeviceUfunc(attr)
        elif callable(attr) and not isinstance(attr, type):
            attr = _device_function(name, attr)
        setattr(self, name, attr)  # found once, then a plain attribute
        return attr

    # ------------------------------------------------------------------ host <-> device
    @staticmethod
    def asarray(a, dtype=None, order=None) -> StrictArray:
        """``a`` on the device: device arrays as they are (cast when ``dtype`` differs), host
        data (NumPy arrays, lists, numbers) uploaded as a copy."""
        if isinstance(a, StrictArray):
            return a if dtype is None or a.dtype == np.dtype(dtype) else a.astype(dtype)
        return _upload(a, dtype, order)

    @staticmethod
    def array(a, dtype=None, copy=True, order="K", ndmin=0) -> StrictArray:
        """A new device array from device or host data (``copy=False`` may share device data)."""
        if isinstance(a, StrictArray):
            return StrictArray(np.array(a._array, dtype=dtype, copy=copy, order=order, ndmin=ndmin))
        return StrictArray(np.array(_upload(a, dtype, order)._array, ndmin=ndmin, copy=False))

    @staticmethod
    def asnumpy(a) -> np.ndarray:
        """``cupy.asnumpy``: a host copy (of a device array, a counted sync)."""
        return a.get() if isinstance(a, StrictArray) else np.asarray(a)

    @staticmethod
    def scatter_add(target: StrictArray, index, values) -> None:
        """``cupyx.scatter_add``: ``target[index] += values``, adding every duplicate index."""
        if not isinstance(target, StrictArray):
            raise _mixed("scatter_add")
        np.add.at(target._array, _unwrap(index, "scatter_add"), _unwrap(values, "scatter_add"))


def _upload(a, dtype, order) -> StrictArray:
    """A device copy of host data (device arrays inside a list are taken as they are)."""
    if isinstance(a, (tuple, list)) and _holds_device_array(a):
        return StrictArray(np.array(_unwrap(a, "xp.asarray"), dtype=dtype, order=order))
    _record("upload")
    return StrictArray(np.array(a, dtype=dtype, order=order, copy=True))


def _holds_device_array(items) -> bool:
    return any(
        isinstance(i, StrictArray) or (isinstance(i, (tuple, list)) and _holds_device_array(i))
        for i in items
    )


xp = _ArrayModule()  # the array module of the stand-in device


def asarray(a, dtype=None) -> StrictArray:
    """Upload host data to the stand-in device (``xp.asarray``)."""
    return xp.asarray(a, dtype=dtype)


def is_strict(x) -> bool:
    """True for a stand-in device array."""
    return isinstance(x, StrictArray)
