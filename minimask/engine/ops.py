"""Every derivative rule of the engine, one small ``Function`` per primitive op.

Each op is a ``forward`` on arrays (saving what it needs) and a ``backward`` that turns the
gradient of the output into the gradients of the inputs. Derived ops (``a - b``, ``a / b``,
``mean``, ``stack``...) are built from these primitives at the bottom of the file and need no rule
of their own.

Broadcasting: an op like ``a + b`` may broadcast ``b`` of shape (1, C) against ``a`` of shape
(N, C). The gradient of ``b`` must then be summed over the broadcast axes back to (1, C); that is
:func:`unbroadcast`.
"""

from __future__ import annotations

import numpy as np

from minimask.backend import get_array_module, scatter_add
from minimask.engine.tensor import Function, Tensor


def unbroadcast(grad, shape: tuple[int, ...]):
    """Sum ``grad`` over the axes that broadcasting added or stretched, to get back ``shape``."""
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return grad


# ---------------------------------------------------------------------------- elementwise binary
class Add(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a + b

    def backward(self, g):
        sa, sb = self.shapes
        return (
            unbroadcast(g, sa) if self.wants(0) else None,
            unbroadcast(g, sb) if self.wants(1) else None,
        )


class Mul(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, g):
        return (
            unbroadcast(g * self.b, self.a.shape) if self.wants(0) else None,
            unbroadcast(g * self.a, self.b.shape) if self.wants(1) else None,
        )


class Maximum(Function):
    """Elementwise max. At ties the gradient is split equally between the two inputs (as torch)."""

    def forward(self, a, b):
        self.a, self.b = a, b
        return get_array_module(a).maximum(a, b)

    def backward(self, g):
        a, b = self.a, self.b
        share_a = (a > b) + 0.5 * (a == b)  # 1 where a wins, 1/2 at ties, 0 where b wins
        share_a = share_a.astype(g.dtype)
        return (
            unbroadcast(g * share_a, a.shape) if self.wants(0) else None,
            unbroadcast(g * (1 - share_a), b.shape) if self.wants(1) else None,
        )


class MatMul(Function):
    """``a @ b`` for arrays of 2 or more dims; leading (batch) dims broadcast."""

    def forward(self, a, b):
        if a.ndim < 2 or b.ndim < 2:
            raise ValueError(f"matmul needs inputs of 2 or more dims, got {a.shape} @ {b.shape}")
        self.a, self.b = a, b
        return a @ b

    def backward(self, g):
        a, b = self.a, self.b
        ga = unbroadcast(g @ b.swapaxes(-1, -2), a.shape) if self.wants(0) else None
        gb = unbroadcast(a.swapaxes(-1, -2) @ g, b.shape) if self.wants(1) else None
        return ga, gb


class Where(Function):
    """``where(cond, a, b)``; ``cond`` is a plain boolean array (no gradient)."""

    def forward(self, a, b, cond=None):
        self.cond, self.shapes = cond, (a.shape, b.shape)
        return get_array_module(a).where(cond, a, b)

    def backward(self, g):
        zero = g.dtype.type(0)
        xp = get_array_module(g)
        return (
            unbroadcast(xp.where(self.cond, g, zero), self.shapes[0]) if self.wants(0) else None,
            unbroadcast(xp.where(self.cond, zero, g), self.shapes[1]) if self.wants(1) else None,
        )


# ---------------------------------------------------------------------------- elementwise unary
class Neg(Function):
    def forward(self, a):
        return -a

    def backward(self, g):
        return (-g,)


class Pow(Function):
    """``a ** p`` for a constant number ``p``."""

    def forward(self, a, exponent=None):
        self.a, self.p = a, exponent
        return a**exponent

    def backward(self, g):
        if np.ndim(self.p) == 0 and self.p == 0:  # constant: the formula gives 0 * inf at a = 0
            return (get_array_module(g).zeros_like(g),)
        return (g * self.p * self.a ** (self.p - 1),)


class Exp(Function):
    def forward(self, a):
        self.out = get_array_module(a).exp(a)
        return self.out

    def backward(self, g):
        return (g * self.out,)


class Log(Function):
    def forward(self, a):
        self.a = a
        return get_array_module(a).log(a)

    def backward(self, g):
        return (g / self.a,)


class Sqrt(Function):
    def forward(self, a):
        self.out = get_array_module(a).sqrt(a)
        return self.out

    def backward(self, g):
        return (g / (2 * self.out),)


class Abs(Function):
    """``|a|``; the gradient at 0 is 0 (the sign), as in torch."""

    def forward(self, a):
        self.a = a
        return get_array_module(a).abs(a)

    def backward(self, g):
        return (g * get_array_module(g).sign(self.a),)


class Clip(Function):
    """``clip(a, low, high)`` with constant bounds (either may be None); the gradient passes
    where ``low <= a <= high``, bounds included (as torch.clamp)."""

    def forward(self, a, low=None, high=None):
        xp = get_array_module(a)
        inside = xp.ones(a.shape, dtype=bool)
        if low is not None:
            inside &= a >= low
        if high is not None:
            inside &= a <= high
        self.inside = inside
        return xp.clip(a, low, high)

    def backward(self, g):
        return (g * self.inside,)


class ReLU(Function):
    def forward(self, a):
        # maximum(a, 0), not a * (a > 0): that gives -0.0 for negative a (and 1 / relu(a) = -inf);
        # nor where(a > 0, a, 0), which is several times slower. NaN stays NaN, as in torch.
        self.out = get_array_module(a).maximum(a, a.dtype.type(0))
        return self.out

    def backward(self, g):
        return (g * (self.out > 0),)  # out > 0 exactly where a > 0


def sigmoid(a):
    """The array function σ(a) = 1 / (1 + e^-a), computed without overflow for large |a|."""
    xp = get_array_module(a)
    e = xp.exp(-xp.abs(a))  # in (0, 1]: never overflows
    return xp.where(a >= 0, 1 / (1 + e), e / (1 + e))


class Sigmoid(Function):
    """σ(a) (:func:`sigmoid`); its derivative is σ(a)·(1 - σ(a))."""

    def forward(self, a):
        self.out = sigmoid(a)
        return self.out

    def backward(self, g):
        return (g * self.out * (1 - self.out),)


class Tanh(Function):
    def forward(self, a):
        self.out = get_array_module(a).tanh(a)
        return self.out

    def backward(self, g):
        return (g * (1 - self.out * self.out),)


class Cast(Function):
    """Change the dtype; the gradient is cast back."""

    def forward(self, a, dtype=None):
        self.dtype = a.dtype
        return a.astype(dtype)

    def backward(self, g):
        return (g.astype(self.dtype),)


# ---------------------------------------------------------------------------- reductions
def _axes(axis, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axis = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(a % ndim for a in axis)


def _keep(g, axes, keepdims: bool):
    """Reinsert the reduced axes as size 1, so ``g`` broadcasts against the input."""
    if keepdims:
        return g
    shape = list(g.shape)
    for a in sorted(axes):
        shape.insert(a, 1)
    return g.reshape(shape)


class Sum(Function):
    def forward(self, a, axis=None, keepdims=False):
        self.shape, self.axes, self.keepdims = a.shape, _axes(axis, a.ndim), keepdims
        return a.sum(axis=self.axes, keepdims=keepdims)

    def backward(self, g):
        g = _keep(g, self.axes, self.keepdims)
        return (get_array_module(g).broadcast_to(g, self.shape),)


class Max(Function):
    """Max over axes. At ties the gradient is split equally among the maxima (as torch.amax)."""

    def forward(self, a, axis=None, keepdims=False):
        self.a, self.axes, self.keepdims = a, _axes(axis, a.ndim), keepdims
        self.out = a.max(axis=self.axes, keepdims=True)
        return (
            self.out
            if keepdims
            else self.out.reshape([n for i, n in enumerate(a.shape) if i not in self.axes])
        )

    def backward(self, g):
        g = _keep(g, self.axes, self.keepdims)
        winners = (self.a == self.out).astype(g.dtype)
        winners /= winners.sum(axis=self.axes, keepdims=True)
        return (g * winners,)


# ---------------------------------------------------------------------------- movement
class Reshape(Function):
    def forward(self, a, shape=None):
        self.shape = a.shape
        return a.reshape(shape)

    def backward(self, g):
        return (g.reshape(self.shape),)


class Permute(Function):
    def forward(self, a, axes=None):
        # axes=None reverses them (.T); negative axes count from the end, as in numpy
        self.axes = tuple(range(a.ndim))[::-1] if axes is None else _axes(axes, a.ndim)
        return a.transpose(self.axes)

    def backward(self, g):
        inverse = tuple(int(i) for i in np.argsort(self.axes))  # undoes the permutation
        return (g.transpose(inverse),)


def _is_basic_index(index) -> bool:
    """True when ``index`` selects without repeats (ints, slices, None, Ellipsis, booleans)."""
    parts = index if isinstance(index, tuple) else (index,)
    for p in parts:
        if p is None or p is Ellipsis or isinstance(p, (int, slice, np.integer)):
            continue
        if hasattr(p, "dtype") and p.dtype == bool:
            continue
        return False
    return True


class GetItem(Function):
    """``a[index]``: basic, integer-array or boolean indexing.

    Backward writes the gradient back to the selected places; integer arrays may select one
    element several times, so their gradients are *added* (scatter-add), not assigned.
    """

    def forward(self, a, index=None):
        self.shape, self.dtype, self.index = a.shape, a.dtype, index
        return a[index]

    def backward(self, g):
        xp = get_array_module(g)
        grad = xp.zeros(self.shape, dtype=g.dtype)
        if _is_basic_index(self.index):
            grad[self.index] = g
        else:
            scatter_add(grad, self.index, g)
        return (grad,)


class Concatenate(Function):
    def forward(self, *arrays, axis=0):
        self.axis = axis
        self.bounds = np.cumsum([0] + [a.shape[axis] for a in arrays])
        return get_array_module(*arrays).concatenate(arrays, axis=axis)

    def backward(self, g):
        out = []
        for i, (start, stop) in enumerate(zip(self.bounds[:-1], self.bounds[1:])):
            if not self.wants(i):
                out.append(None)
                continue
            index = [slice(None)] * g.ndim
            index[self.axis] = slice(int(start), int(stop))
            out.append(g[tuple(index)])
        return tuple(out)


class Pad(Function):
    """Constant padding; ``pad_width`` as in ``numpy.pad``: one (before, after) per axis, or the
    short forms ``n`` and ``((before, after),)`` that apply to every axis."""

    def forward(self, a, pad_width=None, value=0.0):
        widths = np.broadcast_to(np.asarray(pad_width, dtype=int), (a.ndim, 2))  # (ndim, 2)
        self.pad_width = tuple((int(lo), int(hi)) for lo, hi in widths)
        return get_array_module(a).pad(a, self.pad_width, constant_values=value)

    def backward(self, g):
        index = tuple(slice(lo, g.shape[i] - hi) for i, (lo, hi) in enumerate(self.pad_width))
        return (g[index],)


# ---------------------------------------------------------------------------- the Tensor API
def as_tensor(x, like: Tensor | None = None) -> Tensor:
    """``x`` as a Tensor, on the device of ``like`` when given.

    A number next to ``like`` follows NumPy 2's rule for Python numbers: it takes ``like``'s dtype
    when that can hold it (``float32 * 2.0`` stays float32, no float64 upcast), else the smallest
    that can (``int64 * 0.5`` is float64). NumPy scalars such as ``np.float64(2.0)`` count as
    numbers here, as 0-d tensors do in torch, so ``np.log(2)`` does not upcast a float32 model.
    """
    if isinstance(x, Tensor):
        return x
    if like is None:
        return Tensor(x)
    if isinstance(x, (bool, int, float, np.generic)):
        x = x.item() if isinstance(x, np.generic) else x
        return Tensor(like.xp.asarray(x, dtype=np.result_type(like.dtype, x)))
    if not hasattr(x, "shape"):  # a list
        return Tensor(like.xp.asarray(x, dtype=like.dtype))
    return Tensor(like.xp.asarray(x))


def add(a, b) -> Tensor:
    a = as_tensor(a, b if isinstance(b, Tensor) else None)
    return Add.apply(a, as_tensor(b, a))


def mul(a, b) -> Tensor:
    a = as_tensor(a, b if isinstance(b, Tensor) else None)
    return Mul.apply(a, as_tensor(b, a))


def sub(a, b) -> Tensor:
    a = as_tensor(a, b if isinstance(b, Tensor) else None)
    return add(a, -as_tensor(b, a))


def div(a, b) -> Tensor:
    """True division ``a * b ** -1``; integer ``b`` becomes float64 first (as ``numpy.divide``)."""
    a = as_tensor(a, b if isinstance(b, Tensor) else None)
    b = as_tensor(b, a)
    if b.dtype.kind not in "fc":
        b = b.astype(np.float64)  # ints have no negative powers
    return mul(a, b**-1)


def maximum(a, b) -> Tensor:
    a = as_tensor(a, b if isinstance(b, Tensor) else None)
    return Maximum.apply(a, as_tensor(b, a))


def minimum(a, b) -> Tensor:
    a = as_tensor(a, b if isinstance(b, Tensor) else None)
    return -maximum(-a, -as_tensor(b, a))


def where(cond, a, b) -> Tensor:
    """``a`` where ``cond`` (a boolean array or tensor) is true, else ``b``."""
    cond = cond.data if isinstance(cond, Tensor) else cond
    a = as_tensor(a, b if isinstance(b, Tensor) else None)
    return Where.apply(a, as_tensor(b, a), cond=cond)


def matmul(a: Tensor, b: Tensor) -> Tensor:
    return MatMul.apply(as_tensor(a), as_tensor(b))


def concatenate(tensors, axis: int = 0) -> Tensor:
    tensors = [as_tensor(t) for t in tensors]
    if len(tensors) == 1:
        return tensors[0]
    return Concatenate.apply(*tensors, axis=axis)


def stack(tensors, axis: int = 0) -> Tensor:
    """Join tensors of one shape along a new axis (built from reshape + concatenate)."""
    tensors = [as_tensor(t) for t in tensors]
    axis = axis % (tensors[0].ndim + 1)
    expanded = [t.reshape(t.shape[:axis] + (1,) + t.shape[axis:]) for t in tensors]
    return Concatenate.apply(*expanded, axis=axis)


def pad(a: Tensor, pad_width, value: float = 0.0) -> Tensor:
    return Pad.apply(a, pad_width=pad_width, value=value)


def _sum(self, axis=None, keepdims=False):
    return Sum.apply(self, axis=axis, keepdims=keepdims)


def _mean(self, axis=None, keepdims=False):
    count = int(np.prod([self.shape[a] for a in _axes(axis, self.ndim)]))
    return _sum(self, axis, keepdims) * (1.0 / max(count, 1))


def _max(self, axis=None, keepdims=False):
    return Max.apply(self, axis=axis, keepdims=keepdims)


def _reshape(self, *shape):
    shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    return Reshape.apply(self, shape=tuple(shape))


def _permute(self, *axes):
    axes = axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
    return Permute.apply(self, axes=tuple(axes))


def _transpose(self, axis0=-2, axis1=-1):
    """Swap two axes (default: the last two)."""
    axes = list(range(self.ndim))
    axes[axis0], axes[axis1] = axes[axis1], axes[axis0]
    return Permute.apply(self, axes=tuple(axes))


def _getitem(self, index):
    if isinstance(index, Tensor):
        index = index.data
    elif isinstance(index, tuple):
        index = tuple(i.data if isinstance(i, Tensor) else i for i in index)
    return GetItem.apply(self, index=index)


def _clip(self, low=None, high=None):
    return Clip.apply(self, low=low, high=high)


def _astype(self, dtype):
    return self if self.dtype == dtype else Cast.apply(self, dtype=dtype)


Tensor.__add__ = add
Tensor.__radd__ = lambda self, other: add(other, self)
Tensor.__sub__ = sub
Tensor.__rsub__ = lambda self, other: sub(other, self)
Tensor.__mul__ = mul
Tensor.__rmul__ = lambda self, other: mul(other, self)
Tensor.__truediv__ = div
Tensor.__rtruediv__ = lambda self, other: div(other, self)
Tensor.__neg__ = lambda self: Neg.apply(self)
Tensor.__pow__ = lambda self, p: Pow.apply(self, exponent=p)
Tensor.__matmul__ = matmul
Tensor.__rmatmul__ = lambda self, other: matmul(other, self)
Tensor.__getitem__ = _getitem
Tensor.exp = lambda self: Exp.apply(self)
Tensor.log = lambda self: Log.apply(self)
Tensor.sqrt = lambda self: Sqrt.apply(self)
Tensor.abs = lambda self: Abs.apply(self)
Tensor.relu = lambda self: ReLU.apply(self)
Tensor.sigmoid = lambda self: Sigmoid.apply(self)
Tensor.tanh = lambda self: Tanh.apply(self)
Tensor.clip = _clip
Tensor.sum = _sum
Tensor.mean = _mean
Tensor.max = _max
Tensor.reshape = _reshape
Tensor.permute = _permute
Tensor.transpose = _transpose
Tensor.T = property(lambda self: Permute.apply(self, axes=None))
Tensor.astype = _astype
Tensor.pad = pad
