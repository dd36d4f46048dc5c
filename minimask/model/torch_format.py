"""Reading and writing PyTorch ``.pth`` files without torch, and without running their code.

What ``torch.save(model.state_dict(), "model.pth")`` writes (torch >= 1.6) is a zip archive,
stored uncompressed, whose members sit in one folder (named after the file; "archive" here)::

    archive/data.pkl       the object, pickled: an OrderedDict {name: tensor}
    archive/data/0         the raw bytes of storage "0" (a flat array of numbers)
    archive/data/1         ...
    archive/byteorder      "little" (the byte order of the storages)
    archive/version        "3"

A tensor inside ``data.pkl`` is not its numbers but a recipe, a call the unpickler makes::

    torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks)

where ``storage`` comes from a *persistent id*, ``('storage', torch.FloatStorage, '0', 'cpu',
numel)``, that names the member ``data/0`` and its element type. Element ``(i, j)`` of a 2-d tensor
is ``storage[storage_offset + i * stride[0] + j * stride[1]]``: a slice or a transpose is the same
storage read with another offset and other strides, and two tensors may share one storage.

Older files (torch < 1.6, e.g. torchvision's 2019 COCO weights) are the "legacy" format: one file
of consecutive pickles (a magic number, the protocol version, system info, the object, the list of
storage keys) followed by each storage's element count (int64) and bytes. Both are read here.

Why not ``pickle.load``? Unpickling *runs code*: a pickle can ask for any importable function
(``os.system``, ``builtins.eval``) and call it with arguments of its choosing; that is how
``__reduce__`` works. So :class:`_StateDictUnpickler` answers ``find_class`` only for the few names
a state dict needs (the tensor recipe, ``OrderedDict``, the storage types) and refuses every other
with a :class:`WeightsError` naming the file and the global, before anything is called. Tensors
become NumPy arrays (bfloat16, which NumPy lacks, is widened to float32 exactly).

:func:`save_pth` goes the other way, writing the pickle opcodes by hand so that
``torch.load(path, weights_only=True)`` returns an OrderedDict of tensors equal to the arrays.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import tempfile
import zipfile
from collections import Counter, OrderedDict
from collections.abc import Callable

import numpy as np


class WeightsError(ValueError):
    """A weights file that cannot be read or used; the message is one line naming the file."""


# torch's storage classes and the NumPy type of their elements. "bfloat16" has no NumPy type: it is
# read as uint16 and widened (see _widen_bfloat16).
STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "UntypedStorage": np.dtype(np.uint8),  # raw bytes
}
# The writer's inverse: the storage class of each NumPy type it can write.
WRITE_STORAGE = {dtype: name for name, dtype in STORAGE_DTYPES.items() if name != "UntypedStorage"}
del WRITE_STORAGE["bfloat16"]

# The number pickled first in a legacy file (its 10 bytes follow a pickle's first opcodes).
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


# ---------------------------------------------------------------------------- reading
class _StorageType:
    """What ``find_class`` returns for ``torch.FloatStorage`` etc.: just the element type."""

    def __init__(self, name: str):
        self.name, self.dtype = name, STORAGE_DTYPES[name]


class _LazyTensor:
    """A tensor recipe met during unpickling; its storage's bytes may not be read yet (legacy)."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class Record:
    """An inert stand-in for ``argparse.Namespace`` (torchvision's reference scripts pickle their
    command-line ``args`` next to the model): it only holds the attributes it was given."""

    def __setstate__(self, state) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"Record({self.__dict__})"


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, meta=None):
    return _LazyTensor(storage, offset, size, stride)


def _rebuild_tensor(storage, offset, size, stride):  # the pre-1.0 recipe
    return _LazyTensor(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=True, hooks=None, state=None):
    return data  # a Parameter is its tensor (the requires_grad flag means nothing here)


# Every global a checkpoint may name, and what we hand back for it. Nothing else is ever imported.
ALLOWED_GLOBALS: dict[tuple[str, str], Callable] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("collections", "Counter"): Counter,  # in MultiStepLR's state (reference-script checkpoints)
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("argparse", "Namespace"): Record,
}


class _StateDictUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that can build state dicts and nothing else (see the docstring).

    ``storage(dtype, key, numel)`` returns (or promises, for the legacy format) the flat storage.
    """

    def __init__(self, file, path: str, storage: Callable):
        super().__init__(file)
        self.path, self.storage = path, storage

    def find_class(self, module: str, name: str):
        if module in ("torch", "torch.storage") and name.endswith("Storage"):
            if name not in STORAGE_DTYPES:
                raise WeightsError(f"{self.path}: tensors of type torch.{name} are not supported")
            return _StorageType(name)
        if (module, name) not in ALLOWED_GLOBALS:
            raise WeightsError(
                f"{self.path}: refused to unpickle: it asks for the global {module}.{name}, which a"
                " state dict never needs (a pickle can call any global it names, so only tensors,"
                " dicts, lists and numbers are let through)"
            )
        return ALLOWED_GLOBALS[(module, name)]

    def persistent_load(self, pid):
        # ('storage', storage type, key, location, numel[, view metadata of the legacy format])
        if not (
            isinstance(pid, tuple)
            and len(pid) in (5, 6)
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[4], int)
        ):
            raise WeightsError(f"{self.path}: unexpected persistent id {pid!r} in the pickle")
        _, kind, key, _location, numel = pid[:5]  # location ("cpu", "cuda:0") is ignored
        storage = self.storage(kind.dtype, str(key), numel)
        view = pid[5] if len(pid) == 6 else None
        if view is not None:  # legacy storage views: (view key, offset, size) into the root
            _, view_offset, view_size = view
            storage = ("view", storage, int(view_offset), int(view_size))
        return storage


def _widen_bfloat16(raw: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: shift the 16 bits up to get the float32 exactly."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def _storage_array(data: bytes, dtype, numel: int, little_endian: bool, where: str) -> np.ndarray:
    """The flat storage (numel,) from raw bytes, in native byte order."""
    raw_dtype = np.dtype(np.uint16) if dtype == "bfloat16" else dtype
    if len(data) < numel * raw_dtype.itemsize:
        raise WeightsError(
            f"{where} holds {len(data)} bytes, fewer than its {numel} elements need (truncated?)"
        )
    order = "<" if little_endian else ">"
    flat = np.frombuffer(data, dtype=raw_dtype.newbyteorder(order), count=numel)
    flat = flat.astype(raw_dtype.newbyteorder("="))  # a native, writable copy
    return _widen_bfloat16(flat) if dtype == "bfloat16" else flat


def _materialise(lazy: _LazyTensor, storages: dict, path: str) -> np.ndarray:
    """The tensor as an array of its own: ``storage[offset + sum(index_k * stride_k)]``."""
    storage, offset = lazy.storage, int(lazy.offset)
    if isinstance(storage, tuple):  # a legacy view: shift into its root storage
        _, root, view_offset, _ = storage
        storage, offset = root, offset + view_offset
    flat = storages[storage] if isinstance(storage, str) else storage
    size = tuple(int(s) for s in lazy.size)
    stride = tuple(int(s) for s in lazy.stride)
    if len(size) != len(stride) or min(size + stride, default=0) < 0 or offset < 0:
        raise WeightsError(f"{path}: a tensor has size {size}, stride {stride}, offset {offset}")
    if 0 in size:
        return np.zeros(size, dtype=flat.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))  # the furthest element read
    if last >= flat.size:
        raise WeightsError(
            f"{path}: a tensor reads element {last} of a storage of {flat.size} (damaged file?)"
        )
    # as_strided is safe here: every element it can reach was checked to lie inside the storage.
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=[s * flat.itemsize for s in stride]
    )
    return view.copy()


def _resolve(obj, storages: dict, path: str):
    """Replace every tensor recipe in the unpickled tree by its array."""
    if isinstance(obj, _LazyTensor):
        return _materialise(obj, storages, path)
    if isinstance(obj, dict):  # OrderedDict, Counter and plain dicts keep their type
        out = type(obj)()
        for k, v in obj.items():
            out[k] = _resolve(v, storages, path)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v, storages, path) for v in obj)
    if isinstance(obj, Record):
        obj.__dict__.update({k: _resolve(v, storages, path) for k, v in obj.__dict__.items()})
    return obj


def _unpickle(file, path: str, storage: Callable):
    """Run the restricted unpickler; any failure other than our own becomes a WeightsError."""
    try:
        return _StateDictUnpickler(file, path, storage).load()
    except WeightsError:
        raise
    except Exception as e:  # a damaged pickle raises anything from EOFError to KeyError
        raise WeightsError(f"{path}: damaged pickle ({type(e).__name__}: {e})") from None


def _load_zip(path: str):
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise WeightsError(f"{path}: truncated or damaged zip archive ({e})") from None
    with archive:
        names = archive.namelist()
        pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise WeightsError(f"{path}: a zip archive, but not a PyTorch file (no data.pkl)")
        root = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if root + "byteorder" in names:
            byteorder = archive.read(root + "byteorder").decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise WeightsError(f"{path}: unknown byte order {byteorder!r}")
        storages: dict[str, np.ndarray] = {}

        def storage(dtype, key: str, numel: int) -> str:
            if key not in storages:
                member = f"{root}data/{key}"
                if member not in names:
                    raise WeightsError(f"{path}: the pickle names storage {key!r}, not in the zip")
                where = f"{path}: storage {key!r}"
                data = archive.read(member)
                storages[key] = _storage_array(data, dtype, numel, byteorder == "little", where)
            return key

        try:
            obj = _unpickle(io.BytesIO(archive.read(pickles[0])), path, storage)
            return _resolve(obj, storages, path)
        except (zipfile.BadZipFile, EOFError, OSError) as e:
            raise WeightsError(f"{path}: truncated or damaged zip archive ({e})") from None


def _load_legacy(path: str):
    with open(path, "rb") as f:
        promised: dict[str, tuple] = {}  # key -> (dtype, numel), filled in after the pickle

        def storage(dtype, key: str, numel: int) -> str:
            promised.setdefault(key, (dtype, numel))
            return key

        def plain(what: str):
            return _unpickle(f, f"{path} ({what})", storage)

        if plain("magic number") != LEGACY_MAGIC or plain("protocol version") != 1001:
            raise WeightsError(f"{path}: not a legacy PyTorch file (wrong magic number)")
        sys_info = plain("system info")
        little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
        obj = _unpickle(f, path, storage)
        keys = plain("storage keys")
        if not isinstance(keys, list):
            raise WeightsError(f"{path}: damaged storage list")
        storages = {}
        for key in keys:
            if key not in promised:
                raise WeightsError(f"{path}: storage {key!r} is listed but never used")
            dtype, _ = promised[key]
            count = f.read(8)
            if len(count) < 8:
                raise WeightsError(f"{path}: truncated (storage {key!r} is missing)")
            numel = struct.unpack("<q" if little else ">q", count)[0]
            itemsize = 2 if dtype == "bfloat16" else dtype.itemsize
            where = f"{path}: storage {key!r}"
            storages[key] = _storage_array(f.read(numel * itemsize), dtype, numel, little, where)
        missing = sorted(set(promised) - set(storages))
        if missing:
            raise WeightsError(f"{path}: truncated (storages {missing} are missing)")
        return _resolve(obj, storages, path)


def is_legacy_pth(head: bytes) -> bool:
    """Whether a file's first 32 bytes are a pickle (opcode PROTO) of the legacy magic number."""
    return head.startswith(b"\x80") and LEGACY_MAGIC.to_bytes(10, "little") in head[:32]


def load_pth(path: str | os.PathLike):
    """The object saved by ``torch.save`` in ``path`` (zip or legacy), tensors as NumPy arrays.

    Only state-dict-like content unpickles (tensors, dicts, lists, numbers, strings); a file that
    asks for any other global raises :class:`WeightsError` and nothing of it is executed.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(32)
    if is_legacy_pth(head):
        return _load_legacy(path)
    return _load_zip(path)


# ---------------------------------------------------------------------------- writing
# The few pickle opcodes the writer needs (protocol 2; see the standard library's pickletools).
PROTO, STOP, MARK, TUPLE, EMPTY_TUPLE = b"\x80\x02", b".", b"(", b"t", b")"
REDUCE, BINPERSID, SETITEMS, NEWFALSE = b"R", b"Q", b"u", b"\x89"


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(text: str) -> bytes:
    data = text.encode("utf-8")
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def _int(n: int) -> bytes:
    if 0 <= n < 2**31:
        return b"J" + struct.pack("<i", n)  # BININT
    data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data  # LONG1


def _int_tuple(values) -> bytes:
    return MARK + b"".join(_int(int(v)) for v in values) + TUPLE


def _tensor_pickle(storage_class: str, key: str, shape: tuple) -> bytes:
    """``_rebuild_tensor_v2(<storage key>, 0, shape, contiguous strides, False, OrderedDict())``."""
    numel = int(np.prod(shape, dtype=np.int64))
    strides = [int(np.prod(shape[i + 1 :], dtype=np.int64)) for i in range(len(shape))]
    persistent_id = (
        MARK + _str("storage") + _global("torch", storage_class) + _str(key) + _str("cpu")
    )
    persistent_id += _int(numel) + TUPLE + BINPERSID
    hooks = _global("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE
    arguments = persistent_id + _int(0) + _int_tuple(shape) + _int_tuple(strides) + NEWFALSE
    return _global("torch._utils", "_rebuild_tensor_v2") + MARK + arguments + hooks + TUPLE + REDUCE


def state_dict_pickle(state: dict[str, np.ndarray]) -> tuple[bytes, list[np.ndarray]]:
    """The ``data.pkl`` of a state dict, and the storages "0", "1", ... its tensors point to."""
    body, storages = [], []
    for name, array in state.items():
        array = np.asarray(array)
        if array.dtype.newbyteorder("=") not in WRITE_STORAGE:
            raise WeightsError(f"{name!r} has dtype {array.dtype}, which a .pth cannot hold")
        key = str(len(storages))
        storages.append(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")))
        storage_class = WRITE_STORAGE[array.dtype.newbyteorder("=")]
        body.append(_str(name) + _tensor_pickle(storage_class, key, array.shape))
    odict = _global("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE
    return PROTO + odict + MARK + b"".join(body) + SETITEMS + STOP, storages


def atomic_write(path: str | os.PathLike, write: Callable) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it onto ``path``.

    ``os.replace`` is atomic: a crash leaves the old file or the new one, never half of one.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_pth(path: str | os.PathLike, state: dict[str, np.ndarray]) -> None:
    """Write ``state`` ({name: array}) as a ``.pth`` that ``torch.load`` reads as tensors.

    The zip layout is the one in the module docstring; arrays are written contiguous and
    little-endian, one storage each. The file is written atomically (:func:`atomic_write`).
    """
    pkl, storages = state_dict_pickle(state)

    def write(f) -> None:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as archive:
            archive.writestr("archive/data.pkl", pkl)  # first: torch finds the folder name here
            archive.writestr("archive/byteorder", "little")
            for key, array in enumerate(storages):
                archive.writestr(f"archive/data/{key}", array.tobytes())
            archive.writestr("archive/version", "3\n")

    atomic_write(path, write)
