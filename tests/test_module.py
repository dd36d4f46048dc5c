"""Module: registration, state_dict and its .npz round trip, load errors, shared parameters."""

from __future__ import annotations

import os

import numpy as np
import pytest

from minimask import nn
from minimask.engine import Tensor


class TwoLayer(nn.Module):
    """A small model with a parameter, a buffer and sub-modules at two depths."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(np.array([2.0], dtype=np.float32))
        self.register_buffer("offset", np.array([0.5], dtype=np.float32))
        self.body = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.body(x)) * self.scale + self.offset


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_registration_names_parameters_buffers_and_modules():
    m = TwoLayer()
    assert [n for n, _ in m.named_parameters()] == [
        "scale",
        "body.0.weight",
        "body.0.bias",
        "head.weight",
        "head.bias",
    ]
    assert [n for n, _ in m.named_buffers()] == ["offset"]
    assert set(m.state_dict()) == {n for n, _ in m.named_parameters()} | {"offset"}
    assert all(p.requires_grad for p in m.parameters())
    assert not m.offset.requires_grad
    assert m.num_parameters() == 1 + 3 * 4 + 4 + 4 * 2 + 2
    assert [type(c).__name__ for c in m.children()] == ["Sequential", "Linear"]
    assert len(list(m.modules())) == 5  # self, body, body.0, body.1, head


def test_reassigning_a_buffer_keeps_it_a_buffer_and_plain_attributes_stay_plain():
    m = TwoLayer()
    m.offset = np.array([3.0], dtype=np.float32)
    assert isinstance(m.offset, Tensor) and m.state_dict()["offset"][0] == 3.0
    m.note = "not state"
    assert "note" not in m.state_dict()
    del m.head
    assert not any(n.startswith("head.") for n in m.state_dict())


def test_assignment_before_init_is_a_clear_error():
    class Broken(nn.Module):
        def __init__(self):
            self.w = nn.Parameter(np.zeros(1))  # forgot super().__init__()

    with pytest.raises(AttributeError, match="super\\(\\).__init__"):
        Broken()


def test_train_eval_and_zero_grad_reach_every_submodule():
    m = TwoLayer()
    assert all(sub.training for sub in m.modules())
    assert m.eval() is m and not any(sub.training for sub in m.modules())
    m.train()
    assert all(sub.training for sub in m.modules())
    m(Tensor(np.ones((2, 3), dtype=np.float32))).sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    m.zero_grad()
    assert all(p.grad is None for p in m.parameters())


def test_to_casts_parameters_and_buffers_in_place():
    m = TwoLayer()
    params = list(m.parameters())
    m.to("cpu", dtype=np.float64)
    assert all(p is q for p, q in zip(m.parameters(), params))  # the same Parameter objects
    assert all(v.dtype == np.float64 for v in m.state_dict().values())
    assert m(Tensor(np.ones((1, 3)))).dtype == np.float64


@pytest.mark.gpu
def test_to_gpu_and_back():
    m = TwoLayer().to("gpu")
    from minimask.backend import device_of

    assert all(device_of(v) == "gpu" for v in m.state_dict().values())
    m.to("cpu")
    assert all(isinstance(v, np.ndarray) for v in m.state_dict().values())


def test_state_dict_round_trip_through_npz(tmp_path):
    a, b = TwoLayer(), TwoLayer()
    a.offset = np.array([-1.25], dtype=np.float32)
    assert not _state_equal(a.state_dict(), b.state_dict())
    path = str(tmp_path / "ckpt.weights")  # no .npz suffix: the path is used as given
    a.save(path)
    assert os.listdir(tmp_path) == ["ckpt.weights"]  # no temporary file left behind
    b_params = list(b.parameters())
    result = b.load(path)
    assert result == nn.LoadResult([], [])
    assert _state_equal(a.state_dict(), b.state_dict())
    assert all(p is q for p, q in zip(b.parameters(), b_params))  # loaded in place
    x = Tensor(np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32))
    np.testing.assert_array_equal(a(x).data, b(x).data)


def test_save_overwrites_atomically(tmp_path):
    path = str(tmp_path / "model.npz")
    m = TwoLayer()
    m.save(path)
    m.offset = np.array([9.0], dtype=np.float32)
    m.save(path)
    with np.load(path) as f:
        assert f["offset"][0] == 9.0
    assert sorted(os.listdir(tmp_path)) == ["model.npz"]


def test_load_errors_name_missing_unexpected_and_mismatched_keys():
    m = TwoLayer()
    before = {k: v.copy() for k, v in m.state_dict().items()}
    state = {k: v + 1 for k, v in m.state_dict().items()}
    del state["head.bias"]
    state["head.extra"] = np.zeros(2)
    with pytest.raises(KeyError) as err:
        m.load_state_dict(state)
    assert "head.bias" in str(err.value) and "head.extra" in str(err.value)
    assert _state_equal(m.state_dict(), before)  # nothing was written

    result = m.load_state_dict(state, strict=False)
    assert result.missing_keys == ["head.bias"] and result.unexpected_keys == ["head.extra"]
    np.testing.assert_array_equal(m.head.weight.data, before["head.weight"] + 1)

    bad = {k: v.copy() for k, v in before.items()}
    bad["body.0.weight"] = np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"body\.0\.weight.*\(4, 3\).*\(3, 4\)"):
        m.load_state_dict(bad)
    with pytest.raises(ValueError, match="shape mismatch"):
        m.load_state_dict(bad, strict=False)


def test_a_parameter_used_twice_gets_the_sum_of_both_gradients():
    w = nn.Parameter(np.array([[1.0, 2.0], [3.0, 4.0]]))
    x = Tensor(np.array([[1.0, -1.0]]))
    # y = (x @ w.T) @ w.T, so dy/dw has one term from each use
    y = nn.linear(nn.linear(x, w), w).sum()
    y.backward()
    h = x.data @ w.data.T  # the first use's output, [[-1, -1]]
    g_out = np.ones((1, 2))
    expected = g_out.T @ h + (g_out @ w.data).T @ x.data  # second use + first use
    np.testing.assert_allclose(w.grad, expected)


def test_a_shared_parameter_is_listed_once_but_named_twice():
    first = nn.Linear(3, 3)
    second = nn.Linear(3, 3)
    second.weight = first.weight  # tie the weights
    model = nn.Sequential(first, second)
    names = [n for n, _ in model.named_parameters()]
    assert names == ["0.weight", "0.bias", "1.bias"]
    assert {"0.weight", "1.weight"} <= set(model.state_dict())
    x = Tensor(np.ones((1, 3)), dtype=np.float32)
    model(x).sum().backward()
    # both uses add into the one gradient
    assert first.weight.grad is second.weight.grad


def test_sequential_and_module_list():
    seq = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    assert len(seq) == 3 and isinstance(seq[1], nn.ReLU) and isinstance(seq[-1], nn.Linear)
    assert [type(m).__name__ for m in seq] == ["Linear", "ReLU", "Linear"]
    layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(2)]).append(nn.Linear(2, 5))
    assert len(layers) == 3 and layers[2].out_features == 5
    assert [n for n, _ in layers.named_parameters()][-1] == "2.bias"
    assert "Linear(2, 5, bias=True)" in repr(layers)


def test_parameter_and_module_repr_are_readable():
    assert "shape=(4, 3)" in repr(nn.Linear(3, 4).weight)
    text = repr(TwoLayer())
    assert "(body): Sequential(" in text and "(head): Linear(4, 2, bias=True)" in text
