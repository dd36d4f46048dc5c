"""The autograd engine: a ``Tensor`` that remembers how it was made, and ``backward()``.

How it works (the whole idea in four lines):

1. A :class:`Function` is one differentiable op: ``forward`` maps input arrays to an output array
   and saves what ``backward`` needs; ``backward`` maps the gradient of the output to the gradients
   of the inputs (the chain rule, one op at a time).
2. ``Function.apply(*tensors)`` runs ``forward`` and, when gradients are wanted, stores itself on
   the output as ``out._ctx``. The ``_ctx.parents`` links form a graph from the loss back to the
   leaves.
3. ``loss.backward()`` sorts that graph topologically (no recursion, so a chain of 10,000 ops is
   fine) and walks it in reverse, handing each op the gradient of its output. A node used twice
   receives the sum of both gradients before its own ``backward`` runs.
4. Leaves (tensors with ``requires_grad=True`` and no ``_ctx``: the parameters) *accumulate* into
   ``.grad`` across ``backward()`` calls until ``zero_grad`` clears them, as in PyTorch.

The ops themselves live in :mod:`minimask.engine.ops`; this file holds only the machinery.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np

from minimask.backend import get_array_module, to_host
from minimask.engine import anomaly, profiler

_state = threading.local()


def is_grad_enabled() -> bool:
    """False inside a :func:`no_grad` block."""
    return getattr(_state, "grad_enabled", True)


@contextmanager
def no_grad():
    """Run a block without recording the graph (inference, optimizer steps, metrics).

    Also usable as a decorator: ``@no_grad()``.
    """
    previous = is_grad_enabled()
    _state.grad_enabled = False
    try:
        yield
    finally:
        _state.grad_enabled = previous


class Function:
    """One differentiable op: a ``forward`` and a ``backward`` on plain arrays.

    Subclasses implement ``forward(self, *arrays, **options) -> array`` (saving what they need on
    ``self``) and ``backward(self, grad) -> tuple`` with one gradient per array input, each of that
    input's shape, or None where no gradient is needed. ``self.needs_grad[i]`` says whether input
    ``i`` wants one, so backward can skip work. ``backward`` must not change ``grad`` in place:
    the same array may also be on its way to other ops (``Add`` hands it to both inputs).

    A test can call an op alone, without tensors::

        f = Mul(); out = f.forward(a, b); ga, gb = f.backward(ones_like(out))
    """

    def __init__(self, needs_grad: tuple[bool, ...] | None = None):
        self.needs_grad = needs_grad  # None: every input wants a gradient
        self.parents: tuple[Tensor, ...] = ()
        self.created_at: str | None = None  # user code that created the output (anomaly mode)

    def wants(self, i: int) -> bool:
        return self.needs_grad is None or self.needs_grad[i]

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    def backward(self, grad):
        raise NotImplementedError

    @property
    def name(self) -> str:
        return type(self).__name__

    @classmethod
    def apply(cls, *tensors: Tensor, **options) -> Tensor:
        """Run the op on tensors and record it in the graph when gradients are wanted."""
        fn = cls()
        needs = tuple(t.requires_grad for t in tensors)
        record = is_grad_enabled() and any(needs)
        fn.needs_grad = needs
        check = anomaly.is_enabled()
        if check:
            fn.created_at = anomaly.user_frame()
        prof = profiler.active  # None unless inside `with profile():` (engine/profiler.py)
        start = prof.clock() if prof is not None else 0.0
        out = fn.forward(*[t.data for t in tensors], **options)
        if prof is not None:
            prof.add(cls.__name__, "forward", prof.clock() - start)
        if check:
            anomaly.check_forward(fn, [t.data for t in tensors], out)
        result = Tensor(out)
        if record and result.dtype.kind in "fc":  # integers (a cast to int) carry no gradient
            result.requires_grad = True
            fn.parents = tensors
            result._ctx = fn
        return result


class Tensor:
    """An n-dimensional array (NumPy or CuPy) that can track gradients.

    Attributes:
        data: the array (``numpy.ndarray`` or ``cupy.ndarray``).
        grad: the accumulated gradient, an array of ``data``'s shape, or None.
        requires_grad: whether ``backward()`` should compute a gradient for this tensor.
    """

    __slots__ = ("data", "grad", "requires_grad", "_ctx", "name", "__weakref__")
    __array_priority__ = 1000  # so that ndarray + Tensor calls Tensor.__radd__

    def __init__(self, data, requires_grad: bool = False, dtype=None, name: str | None = None):
        if isinstance(data, Tensor):
            data = data.data
        xp = get_array_module(data)
        if dtype is not None:
            data = xp.asarray(data, dtype=dtype)
        elif not hasattr(data, "dtype"):
            # Python numbers and lists: floats become float32, as in PyTorch.
            data = np.asarray(data)
            if data.dtype == np.float64:
                data = data.astype(np.float32)
        elif not isinstance(data, xp.ndarray):  # numpy scalar such as np.float32(1.0)
            data = xp.asarray(data)
        if requires_grad and data.dtype.kind not in "fc":
            raise ValueError(f"only floating-point tensors can require grad, not {data.dtype}")
        self.data = data
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._ctx: Function | None = None
        self.name = name

    # ------------------------------------------------------------------ array facts
    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return self.data.size

    @property
    def xp(self):
        """numpy or cupy, whichever holds the data."""
        return get_array_module(self.data)

    @property
    def is_leaf(self) -> bool:
        return self._ctx is None

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        op = f", op={self._ctx.name}" if self._ctx is not None else ""
        return f"Tensor({self.data!r}{grad}{op})"

    def numpy(self) -> np.ndarray:
        """The data as a NumPy array on the host (a copy when it lives on the GPU)."""
        return to_host(self.data)

    def item(self) -> float:
        return float(self.data.reshape(-1)[0]) if self.size == 1 else _not_scalar(self.shape)

    def detach(self) -> Tensor:
        """The same data, cut from the graph (no gradient flows through it)."""
        return Tensor(self.data, requires_grad=False)

    def zero_grad(self) -> None:
        self.grad = None

    # ------------------------------------------------------------------ backward
    def backward(self, grad=None) -> None:
        """Backpropagate from this tensor to every leaf that requires a gradient.

        Args:
            grad: the gradient of some scalar with respect to this tensor; defaults to 1 for a
                tensor of one element (a loss).
        """
        if not self.requires_grad:
            raise RuntimeError(
                "backward() on a tensor that does not require grad: no input of the ops that "
                "made it has requires_grad=True (or it was made under no_grad())"
            )
        xp = self.xp
        if grad is None:
            if self.size != 1:
                raise RuntimeError(
                    f"backward() needs a gradient argument for a non-scalar tensor of shape "
                    f"{self.shape}; call .sum() first or pass grad="
                )
            grad = xp.ones_like(self.data)
        grad = xp.asarray(grad.data if isinstance(grad, Tensor) else grad, dtype=self.dtype)
        if grad.shape != self.shape:
            raise ValueError(f"grad has shape {grad.shape}, tensor has shape {self.shape}")

        grads: dict[int, object] = {id(self): grad}
        for node in reversed(_topological_order(self)):
            g = grads.pop(id(node), None)
            if g is None:
                continue
            fn = node._ctx
            if fn is None:  # a leaf: accumulate
                total = g if node.grad is None else node.grad + g
                # a fresh array of the leaf's own dtype (never a view of g, never a NumPy scalar)
                node.grad = xp.array(total, dtype=node.dtype)
                continue
            prof = profiler.active  # see Function.apply
            start = prof.clock() if prof is not None else 0.0
            parent_grads = fn.backward(g)
            if prof is not None:
                prof.add(fn.name, "backward", prof.clock() - start)
            if not isinstance(parent_grads, tuple):
                parent_grads = (parent_grads,)
            if anomaly.is_enabled():
                anomaly.check_backward(fn, g, parent_grads)
            for i, (parent, pg) in enumerate(zip(fn.parents, parent_grads)):
                if pg is None or not parent.requires_grad:
                    continue
                if pg.shape != parent.shape:  # a wrong rule fails here, not ops later
                    raise RuntimeError(
                        f"{fn.name}.backward returned a gradient of shape {pg.shape} for input "
                        f"{i} of shape {parent.shape}"
                    )
                key = id(parent)
                grads[key] = pg if key not in grads else grads[key] + pg

    # ------------------------------------------------------------------ operators
    # The op classes are attached in minimask.engine.ops to keep this file about the machinery.


def _not_scalar(shape):
    raise ValueError(f"item() needs a tensor of one element, got shape {shape}")


def _topological_order(root: Tensor) -> list[Tensor]:
    """Every node that needs a gradient, parents before children, found without recursion.

    An iterative depth-first search: a node is appended after all its inputs (post-order).
    """
    order: list[Tensor] = []
    visited: set[int] = set()
    stack: list[tuple[Tensor, bool]] = [(root, False)]
    while stack:
        node, inputs_done = stack.pop()
        if inputs_done:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        if node._ctx is not None:
            for parent in node._ctx.parents:
                if parent.requires_grad and id(parent) not in visited:
                    stack.append((parent, False))
    return order
