"""Shared test tools: finite-difference gradient checks and the optional torch reference.

Every differentiable op is checked three ways (see DEVELOPERS.md): central finite differences in
float64 (:func:`check_gradients`), a plain-loop reference written from the paper (in each op's
test file), and torch/torchvision when installed (:data:`torch`, :data:`requires_torch`).
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from minimask.engine import Tensor


def _optional(name):
    """The module ``name``, or None when it is not installed.

    Only a missing package skips the reference tests. A package that is installed but does not
    import (a missing shared library, a half-finished upgrade, a module missing inside it) raises
    its error here, so the tests fail loudly instead of quietly skipping their references.
    """
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name != name:  # something the package needs is missing: a broken install
            raise
        return None


torch = _optional("torch")
torchvision = _optional("torchvision") if torch is not None else None
requires_torch = pytest.mark.skipif(
    torch is None, reason="torch is not installed (pip install -e .[reference])"
)
requires_torchvision = pytest.mark.skipif(
    torchvision is None, reason="torchvision is not installed (pip install -e .[reference])"
)


def numerical_gradients(f, arrays, eps: float = 1e-6):
    """Central differences ``(f(x + eps) - f(x - eps)) / 2 eps`` of a scalar ``f(*arrays)``.

    ``arrays`` must be float64; each element is perturbed in turn (keep them small).
    """
    grads = []
    for a in arrays:
        g = np.zeros_like(a)
        flat, gflat = a.reshape(-1), g.reshape(-1)  # views: perturb in place
        for i in range(flat.size):
            old = flat[i]
            flat[i] = old + eps
            up = f(*arrays)
            flat[i] = old - eps
            down = f(*arrays)
            flat[i] = old
            gflat[i] = (up - down) / (2 * eps)
        grads.append(g)
    return grads


def check_gradients(fn, *arrays, seed: int = 0, rtol: float = 1e-5, atol: float = 1e-7, eps=1e-6):
    """Backprop through ``fn(*tensors)`` agrees with central finite differences in float64.

    The output is reduced to a scalar along a random direction ``w`` (``sum(fn(x) * w)``), so every
    output element contributes with its own weight. Returns the analytic gradients.
    """
    arrays = [np.array(a, dtype=np.float64) for a in arrays]
    probe = fn(*[Tensor(a) for a in arrays])
    w = np.random.default_rng(seed).standard_normal(probe.shape)

    def scalar(*xs):
        return float((fn(*[Tensor(x) for x in xs]).data * w).sum())

    tensors = [Tensor(a.copy(), requires_grad=True) for a in arrays]
    out = fn(*tensors)
    out.backward(w)
    numeric = numerical_gradients(scalar, arrays, eps=eps)
    for i, (t, n) in enumerate(zip(tensors, numeric)):
        analytic = np.zeros_like(n) if t.grad is None else t.grad
        np.testing.assert_allclose(
            analytic, n, rtol=rtol, atol=atol, err_msg=f"gradient of input {i}"
        )
    return [t.grad for t in tensors]
