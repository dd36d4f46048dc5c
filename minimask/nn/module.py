"""``Module``: a layer that owns its parameters, buffers and sub-layers, as ``torch.nn.Module``.

Three kinds of state hang off a module, each found by plain attribute assignment::

    self.weight = Parameter(array)        # trainable: the optimizer updates it
    self.register_buffer("mean", array)   # state that is saved but not trained (frozen BN stats)
    self.block = Conv2d(3, 8, 3)          # a sub-module; its state is nested under "block."

``state_dict()`` names every parameter and buffer by its dotted path (``"block.weight"``);
``save(path)`` writes them to one ``.npz`` file and ``load(path)`` reads them back, checking that
every name and shape matches.

A parameter may be shared by two modules (or used twice in one forward): ``parameters()`` lists it
once, and ``backward()`` adds the gradients of both uses into its one ``.grad``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np

from minimask.backend import device_of, to_device, to_host
from minimask.engine import Tensor


class Parameter(Tensor):
    """A Tensor that a :class:`Module` registers as trainable (``requires_grad=True``)."""

    __slots__ = ()

    def __init__(self, data, requires_grad: bool = True):
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self) -> str:
        return f"Parameter(shape={self.shape}, dtype={self.dtype}, device={device_of(self.data)})"


class LoadResult(NamedTuple):
    """What ``load_state_dict(strict=False)`` skipped."""

    missing_keys: list[str]
    unexpected_keys: list[str]


class Module:
    """The base class of every layer and model.

    Subclasses call ``super().__init__()`` first, assign parameters, buffers and sub-modules as
    attributes, and implement ``forward``; calling the module calls ``forward``.
    """

    def __init__(self):
        # object.__setattr__: these dicts must exist before our __setattr__ can use them.
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_buffers", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "training", True)

    # ------------------------------------------------------------------ registration
    def __setattr__(self, name: str, value) -> None:
        if "_parameters" not in self.__dict__:
            raise AttributeError(
                f"cannot assign {name!r} before Module.__init__(); call super().__init__() first"
            )
        if name in self._buffers and not isinstance(value, (Parameter, Module)):
            self._buffers[name] = value if isinstance(value, Tensor) else Tensor(value)
            return
        for table in (self._parameters, self._buffers, self._modules):
            table.pop(name, None)
        self.__dict__.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str):
        # Called only when normal lookup fails: look in the three tables.
        for table in ("_parameters", "_buffers", "_modules"):
            entries = self.__dict__.get(table, {})
            if name in entries:
                return entries[name]
        raise AttributeError(f"{type(self).__name__!r} has no attribute {name!r}")

    def __delattr__(self, name: str) -> None:
        for table in (self._parameters, self._buffers, self._modules):
            if name in table:
                del table[name]
                return
        object.__delattr__(self, name)

    def register_buffer(self, name: str, value) -> None:
        """Keep ``value`` (an array or Tensor) as non-trainable state, saved in ``state_dict``.

        Reassigning ``self.name = array`` later replaces the buffer's contents.
        """
        if name in self._parameters or name in self._modules:
            raise KeyError(f"{name!r} is already a parameter or sub-module")
        self.__dict__.pop(name, None)
        self._buffers[name] = value if isinstance(value, Tensor) else Tensor(value)

    # ------------------------------------------------------------------ forward
    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # ------------------------------------------------------------------ walking the tree
    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """This module and every sub-module, each once, with its dotted name ("" for self)."""
        seen: set[int] = set()
        stack = [(prefix, self)]
        while stack:
            name, module = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            yield name, module
            children = list(module._modules.items())
            for child_name, child in reversed(children):  # reversed: yield in definition order
                stack.append((f"{name}.{child_name}" if name else child_name, child))

    def modules(self) -> Iterator[Module]:
        for _, module in self.named_modules():
            yield module

    def children(self) -> Iterator[Module]:
        yield from self._modules.values()

    def _named_state(self, table: str, unique: bool) -> Iterator[tuple[str, Tensor]]:
        seen: set[int] = set()
        for module_name, module in self.named_modules():
            for name, value in getattr(module, table).items():
                if unique and id(value) in seen:
                    continue
                seen.add(id(value))
                yield (f"{module_name}.{name}" if module_name else name), value

    def named_parameters(self) -> Iterator[tuple[str, Parameter]]:
        """``(dotted name, parameter)`` pairs; a shared parameter appears once."""
        return self._named_state("_parameters", unique=True)

    def parameters(self) -> Iterator[Parameter]:
        for _, p in self.named_parameters():
            yield p

    def named_buffers(self) -> Iterator[tuple[str, Tensor]]:
        return self._named_state("_buffers", unique=True)

    def num_parameters(self) -> int:
        """The number of trainable scalars."""
        return sum(p.size for p in self.parameters())

    # ------------------------------------------------------------------ modes and devices
    def train(self, mode: bool = True) -> Module:
        """Set training mode on this module and every sub-module (see ``self.training``)."""
        for module in self.modules():
            object.__setattr__(module, "training", bool(mode))
        return self

    def eval(self) -> Module:
        return self.train(False)

    def zero_grad(self) -> None:
        """Forget the accumulated gradients of every parameter."""
        for p in self.parameters():
            p.grad = None

    def to(self, device: str | None = None, dtype=None) -> Module:
        """Move every parameter and buffer to ``device`` ("cpu"/"gpu"); cast floats to ``dtype``.

        The Parameter objects stay the same (only their ``.data`` changes), but create the optimizer
        *after* moving: its state arrays live on the device they were made on.
        """
        for _, t in list(self._named_state("_parameters", True)) + list(self.named_buffers()):
            data = t.data if device is None else to_device(t.data, device)
            if dtype is not None and data.dtype.kind == "f":
                data = data.astype(dtype)
            t.data = data
            if t.grad is not None:
                grad = t.grad if device is None else to_device(t.grad, device)
                t.grad = grad if dtype is None else grad.astype(dtype)
        return self

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, object]:
        """``{dotted name: array}`` for every parameter and buffer (the arrays themselves, not
        copies). A parameter shared by two modules appears under both names, as in torch."""
        state = {}
        for name, t in self._named_state("_parameters", unique=False):
            state[name] = t.data
        for name, t in self._named_state("_buffers", unique=False):
            state[name] = t.data
        return state

    def _state_tensors(self) -> dict[str, Tensor]:
        tensors = dict(self._named_state("_parameters", unique=False))
        tensors.update(self._named_state("_buffers", unique=False))
        return tensors

    def load_state_dict(self, state: dict, strict: bool = True) -> LoadResult:
        """Copy the arrays of ``state`` into this module's parameters and buffers, in place.

        Every name and shape is checked before anything is written, so a failed load leaves the
        module untouched. Values are cast to each parameter's dtype and moved to its device.

        Raises:
            KeyError: ``strict`` and some names are missing from ``state`` or not in the module.
            ValueError: some array has the wrong shape (checked whatever ``strict`` says).
        """
        own = self._state_tensors()
        missing = sorted(k for k in own if k not in state)
        unexpected = sorted(k for k in state if k not in own)
        problems = []
        if strict and missing:
            problems.append(f"missing keys (in the module, not in the state): {missing}")
        if strict and unexpected:
            problems.append(f"unexpected keys (in the state, not in the module): {unexpected}")
        if problems:
            raise KeyError(f"load_state_dict into {type(self).__name__}: " + "; ".join(problems))
        mismatched = [
            f"{k}: module has {own[k].shape}, state has {tuple(np.shape(state[k]))}"
            for k in own
            if k in state and tuple(np.shape(state[k])) != own[k].shape
        ]
        if mismatched:
            raise ValueError(
                f"load_state_dict into {type(self).__name__}: shape mismatch for "
                + "; ".join(mismatched)
            )
        for k, t in own.items():
            if k in state:
                value = to_device(to_host(state[k]), device_of(t.data))
                t.data[...] = value  # in place: the optimizer keeps pointing at the same arrays
        return LoadResult(missing, unexpected)

    def save(self, path: str) -> None:
        """Write ``state_dict()`` to ``path`` as ``.npz``, atomically (never half a file)."""
        save_npz(path, {k: to_host(v) for k, v in self.state_dict().items()})

    def load(self, path: str, strict: bool = True) -> LoadResult:
        """Read a ``.npz`` written by :meth:`save` (see :meth:`load_state_dict`)."""
        with np.load(path, allow_pickle=False) as archive:
            state = {k: archive[k] for k in archive.files}
        return self.load_state_dict(state, strict=strict)

    # ------------------------------------------------------------------ printing
    def extra_repr(self) -> str:
        """The layer's settings, shown inside its ``repr`` (override in layers)."""
        return ""

    def __repr__(self) -> str:
        lines = [f"({name}): " + repr(m).replace("\n", "\n  ") for name, m in self._modules.items()]
        if not lines:
            return f"{type(self).__name__}({self.extra_repr()})"
        head = f"{type(self).__name__}({self.extra_repr()}"
        return head + "\n  " + "\n  ".join(lines) + "\n)"


def save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez(path, **arrays)`` through a temporary file and ``os.replace`` (atomic).

    ``path`` is used as given (NumPy's silent ``.npz`` suffix is not added). The file gets the
    mode of any new file (0644 under the usual umask 022), not ``mkstemp``'s private 0600.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".npz")
    try:
        umask = os.umask(0o022)  # reading the umask means setting it: put it straight back
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class ModuleList(Module):
    """A list of sub-modules, registered as "0", "1", ... (it has no forward of its own)."""

    def __init__(self, modules: Iterable[Module] = ()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module: Module) -> ModuleList:
        setattr(self, str(len(self._modules)), module)
        return self

    def __getitem__(self, i: int) -> Module:
        return list(self._modules.values())[i]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())


class Sequential(ModuleList):
    """Modules applied one after another; they are named "0", "1", ... in the state dict."""

    def __init__(self, *modules: Module):
        super().__init__(modules)

    def forward(self, x):
        for m in self:
            x = m(x)
        return x
