"""The graph machinery of the engine: the cases a naive autograd gets wrong.

A node used twice, broadcasting, long chains, accumulation across ``backward()`` calls, diamonds,
``no_grad``/``detach``, clear errors, dtypes that stay float32, and ties split like torch.
"""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
from helpers import requires_torch, torch

from minimask.engine import (
    Function,
    Tensor,
    as_tensor,
    is_grad_enabled,
    maximum,
    minimum,
    no_grad,
    stack,
    where,
)


def leaf(values, dtype=np.float64):
    return Tensor(np.array(values, dtype=dtype), requires_grad=True)


# ---------------------------------------------------------------------------- graph shapes
def test_a_node_used_twice_gets_both_gradients():
    a = leaf([1.0, -2.0, 3.0])
    b = a + a  # b = 2a
    c = b * b  # c = 4a^2, dc/da = 8a
    c.sum().backward()
    np.testing.assert_allclose(a.grad, 8 * a.data)


def test_diamond_graph():
    a = leaf([0.5, 2.0])
    left, right = a * 2.0, a.exp()  # two paths from a ...
    d = left * right  # ... that meet again: d = 2a e^a, dd/da = 2e^a (1 + a)
    d.sum().backward()
    np.testing.assert_allclose(a.grad, 2 * np.exp(a.data) * (1 + a.data))


def test_a_leaf_used_by_two_ops_of_different_depth():
    a = leaf([3.0])
    deep = a
    for _ in range(5):
        deep = deep * 1.0  # a long path ...
    (deep + a).sum().backward()  # ... and a short one to the same leaf
    np.testing.assert_array_equal(a.grad, [2.0])


@pytest.mark.parametrize(
    ("shape_a", "shape_b"),
    [((3, 1), (1, 4)), ((), (2, 3)), ((4,), (3, 4)), ((2, 1, 3), (4, 1)), ((1, 1), (5,))],
)
def test_broadcast_gradients_are_summed_back(shape_a, shape_b):
    rng = np.random.default_rng(0)
    a, b = leaf(rng.standard_normal(shape_a)), leaf(rng.standard_normal(shape_b))
    out = a * b + a
    out.sum().backward()
    out_shape = np.broadcast_shapes(shape_a, shape_b)
    assert a.grad.shape == shape_a and b.grad.shape == shape_b
    # d/da sum(a*b + a): every output element adds b + 1 into the a element it came from
    expected_a = np.broadcast_to(b.data + 1, out_shape)
    expected_b = np.broadcast_to(a.data, out_shape)
    extra_a, extra_b = len(out_shape) - len(shape_a), len(out_shape) - len(shape_b)
    np.testing.assert_allclose(a.grad, _sum_to(expected_a, shape_a, extra_a))
    np.testing.assert_allclose(b.grad, _sum_to(expected_b, shape_b, extra_b))


def _sum_to(x, shape, extra):
    x = x.sum(axis=tuple(range(extra))) if extra else x
    return x.sum(axis=tuple(i for i, n in enumerate(shape) if n == 1), keepdims=True)


def test_scalar_plus_matrix_gives_a_scalar_gradient_array():
    s = Tensor(2.0, requires_grad=True)  # a Python float: float32, shape ()
    m = Tensor(np.ones((3, 4), dtype=np.float32))
    (s * m + s).sum().backward()
    assert isinstance(s.grad, np.ndarray)  # not a NumPy scalar
    assert s.grad.shape == () and s.grad.dtype == np.float32
    assert s.grad == 24.0


def test_a_chain_of_10000_ops_needs_no_recursion():
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(200)  # a recursive topological sort would fail long before 10,000
    try:
        a = leaf([1.0])
        x = a
        for _ in range(10_000):
            x = x * 1.0001
        x.sum().backward()
    finally:
        sys.setrecursionlimit(limit)
    np.testing.assert_allclose(a.grad, [1.0001**10_000])
    del x  # freeing a deep graph must not overflow the C stack either


def test_gradients_accumulate_across_backward_calls_until_zeroed():
    a = leaf([1.0, 2.0])
    (a * 3.0).sum().backward()
    (a * 3.0).sum().backward()
    np.testing.assert_array_equal(a.grad, [6.0, 6.0])
    loss = (a * a).sum()
    loss.backward()
    loss.backward()  # the same graph twice: it is kept, as with retain_graph=True
    np.testing.assert_array_equal(a.grad, [6.0 + 4.0, 6.0 + 8.0])
    a.zero_grad()
    assert a.grad is None
    (a * 3.0).sum().backward()
    np.testing.assert_array_equal(a.grad, [3.0, 3.0])


def test_accumulated_gradient_is_a_fresh_array():
    a = leaf([1.0, 2.0])
    g = np.array([5.0, 7.0])
    (a * 1.0).backward(g)
    a.grad += 1  # an optimizer may work in place ...
    np.testing.assert_array_equal(g, [5.0, 7.0])  # ... without touching the caller's array


def test_only_leaves_keep_gradients():
    a = leaf([1.0, 2.0])
    b = a * 2.0
    (b * b).sum().backward()
    assert b.grad is None and not b.is_leaf
    assert a.is_leaf and a.grad is not None


def test_tensors_without_requires_grad_get_nothing():
    a, c = leaf([1.0, 2.0]), Tensor(np.array([3.0, 4.0]))
    out = a * c
    assert out.requires_grad
    out.sum().backward()
    assert c.grad is None
    assert not (c * c).requires_grad and (c * c).is_leaf  # no graph without a requiring input


def test_backward_with_an_explicit_gradient():
    a = leaf([[1.0, 2.0], [3.0, 4.0]])
    out = a * a
    out.backward(Tensor(np.array([[1.0, 0.0], [0.0, 2.0]])))
    np.testing.assert_array_equal(a.grad, [[2.0, 0.0], [0.0, 16.0]])


# ---------------------------------------------------------------------------- no_grad / detach
def test_no_grad_context_records_nothing_and_restores():
    a = leaf([1.0])
    with no_grad():
        assert not is_grad_enabled()
        b = a * 2.0
    assert is_grad_enabled()
    assert not b.requires_grad and b.is_leaf
    with pytest.raises(ValueError), no_grad():
        raise ValueError("an error inside the block")
    assert is_grad_enabled()


def test_no_grad_nests():
    with no_grad():
        with no_grad():
            pass
        assert not is_grad_enabled()
    assert is_grad_enabled()


def test_no_grad_as_decorator():
    @no_grad()
    def double(x):
        assert not is_grad_enabled()
        return x * 2.0

    a = leaf([1.0])
    assert not double(a).requires_grad
    assert not double(a).requires_grad  # a decorator works on every call, not just the first
    assert (a * 2.0).requires_grad


def test_no_grad_is_per_thread():
    seen = []
    with no_grad():
        thread = threading.Thread(target=lambda: seen.append(is_grad_enabled()))
        thread.start()
        thread.join()
    assert seen == [True]


def test_detach_cuts_the_graph_and_shares_data():
    a = leaf([1.0, 2.0])
    d = (a * 3.0).detach()
    assert not d.requires_grad and d.is_leaf
    out = (a * d).sum()  # gradient flows to a only through the first factor
    out.backward()
    np.testing.assert_array_equal(a.grad, d.data)
    assert a.detach().data is a.data


# ---------------------------------------------------------------------------- clear errors
def test_backward_on_a_non_scalar_without_grad_is_a_clear_error():
    out = leaf([1.0, 2.0]) * 2.0
    with pytest.raises(RuntimeError, match=r"non-scalar tensor of shape \(2,\)"):
        out.backward()


def test_backward_without_requires_grad_is_a_clear_error():
    with pytest.raises(RuntimeError, match="does not require grad"):
        Tensor(np.array(1.0)).backward()
    a = leaf([1.0])
    with no_grad():
        b = a * 2.0
    with pytest.raises(RuntimeError, match="no_grad"):
        b.backward()


def test_backward_with_a_gradient_of_the_wrong_shape():
    out = leaf([1.0, 2.0]) * 2.0
    with pytest.raises(ValueError, match="shape"):
        out.backward(np.ones(3))


def test_a_function_returning_a_wrong_shape_is_named():
    class Broken(Function):
        def forward(self, a):
            return a * 2

        def backward(self, g):
            return (g.sum(),)  # forgot to keep the shape

    a = leaf([1.0, 2.0])
    with pytest.raises(RuntimeError, match=r"Broken.backward.*shape \(\).*shape \(2,\)"):
        Broken.apply(a).sum().backward()


def test_a_new_function_needs_only_forward_and_backward():
    class Cube(Function):
        def forward(self, a):
            self.a = a
            return a**3

        def backward(self, g):
            return (3 * self.a**2 * g,)

    a = leaf([1.0, -2.0])
    Cube.apply(a).sum().backward()
    np.testing.assert_array_equal(a.grad, [3.0, 12.0])


def test_item():
    assert Tensor(np.array([[2.5]])).item() == 2.5
    with pytest.raises(ValueError, match="one element"):
        Tensor(np.ones(2)).item()


# ---------------------------------------------------------------------------- dtypes
def _float32_expressions(t):
    """Every way a Python number can meet a float32 tensor."""
    return {
        "t + 1": t + 1,
        "1 + t": 1 + t,
        "t - 0.5": t - 0.5,
        "2.5 - t": 2.5 - t,
        "t * 2.0": t * 2.0,
        "3 * t": 3 * t,
        "t / 3": t / 3,
        "3 / t": 3 / t,
        "t ** 2": t**2,
        "t ** 0.5": t**0.5,
        "-t": -t,
        "t.mean()": t.mean(),
        "t * np.float64(2)": t * np.float64(2.0),
        "np.float64(2) * t": np.float64(2.0) * t,
        "maximum(t, 0.0)": maximum(t, 0.0),
        "minimum(1.0, t)": minimum(1.0, t),
        "where(t > 1, t, 0.0)": where(t.data > 1, t, 0.0),
        "t.clip(0.5, 1.5)": t.clip(0.5, 1.5),
        "t.sigmoid()": t.sigmoid(),
        "stack([t, t])": stack([t, t]),
    }


def test_float32_stays_float32_next_to_python_numbers():
    t = leaf([1.0, 2.0], dtype=np.float32)
    for text, out in _float32_expressions(t).items():
        assert out.dtype == np.float32, text
        out.sum().backward()
        assert t.grad.dtype == np.float32, text
        t.zero_grad()


def test_python_data_becomes_float32():
    assert Tensor(1.5).dtype == np.float32
    assert Tensor([1.0, 2.0]).dtype == np.float32
    assert Tensor([1, 2]).dtype.kind == "i"
    assert Tensor(np.ones(2)).dtype == np.float64  # arrays keep theirs
    assert Tensor([1.0], dtype=np.float64).dtype == np.float64


def test_a_leaf_gradient_has_the_leaf_dtype():
    t = leaf([1.0, 2.0], dtype=np.float32)
    (t * np.array([3.0, 4.0])).sum().backward()  # a float64 array: the product is float64
    assert t.grad.dtype == np.float32
    np.testing.assert_array_equal(t.grad, [3.0, 4.0])


def test_integer_tensors_with_float_numbers():
    i = Tensor(np.array([1, 2, 3]))
    np.testing.assert_allclose((i * 0.5).data, [0.5, 1.0, 1.5])  # not truncated to int
    np.testing.assert_allclose((i / 2).data, [0.5, 1.0, 1.5])  # true division
    np.testing.assert_allclose(i.mean().data, 2.0)
    assert (i + 1).dtype == i.dtype


def test_arrays_on_the_left_defer_to_tensors():
    t = leaf([1.0, 2.0])
    for out in (np.ones(2) + t, np.ones(2) - t, np.ones(2) * t, np.ones(2) / t):
        assert isinstance(out, Tensor) and out.requires_grad


def test_as_tensor():
    t = Tensor(np.ones(2, dtype=np.float32))
    assert as_tensor(t) is t
    assert as_tensor(2.0, like=t).dtype == np.float32
    assert as_tensor([1.0, 2.0], like=t).dtype == np.float32
    assert as_tensor(np.ones(2), like=t).dtype == np.float64


# ---------------------------------------------------------------------------- ties
def test_maximum_and_minimum_split_ties_equally():
    a, b = leaf([1.0, 2.0, 3.0]), leaf([1.0, 5.0, 3.0])
    (maximum(a, b) + minimum(a, b) * 10.0).sum().backward()
    np.testing.assert_array_equal(a.grad, [5.5, 10.0, 5.5])
    np.testing.assert_array_equal(b.grad, [5.5, 1.0, 5.5])


def test_max_splits_ties_equally_among_the_maxima():
    x = leaf([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]])
    x.max(axis=1).sum().backward()
    np.testing.assert_allclose(x.grad, [[0.0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]])


@requires_torch
def test_ties_like_torch():
    a_np = np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]])
    b_np = np.array([[1.0, 3.0, 0.0], [2.0, 5.0, 2.0]])
    a, b = leaf(a_np), leaf(b_np)
    ta = torch.tensor(a_np, requires_grad=True)
    tb = torch.tensor(b_np, requires_grad=True)
    ours = maximum(a, b).sum() + a.max(axis=1).sum() * 2.0 + a.max().sum() * 3.0
    theirs = torch.maximum(ta, tb).sum() + ta.amax(dim=1).sum() * 2.0 + ta.amax() * 3.0
    ours.backward()
    theirs.backward()
    np.testing.assert_allclose(a.grad, ta.grad.numpy())
    np.testing.assert_allclose(b.grad, tb.grad.numpy())


def test_only_floating_point_tensors_require_grad():
    with pytest.raises(ValueError, match="floating-point"):
        Tensor(np.array([1, 2]), requires_grad=True)  # its gradient would be truncated
    x = leaf([1.5, 2.5])
    assert not x.astype(np.int64).requires_grad  # a cast to int ends the graph, as in torch
