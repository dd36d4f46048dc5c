"""The NaN detective (anomaly mode): it names the first op whose output or gradient went bad."""

from __future__ import annotations

import inspect
import os
import threading

import numpy as np
import pytest

from minimask.engine import AnomalyError, Tensor, detect_anomaly, set_detect_anomaly, where
from minimask.engine.anomaly import is_enabled

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # log(0), 0/0: on purpose

HERE = os.path.basename(__file__)


def next_line() -> str:
    """``test_anomaly.py:N`` for the line after the caller's: where the bad op is written."""
    return f"{HERE}:{inspect.currentframe().f_back.f_lineno + 1}"


# ---------------------------------------------------------------------------- forward
def test_forward_names_the_op_the_input_shapes_and_the_line():
    x = Tensor(np.array([[1.0, 0.0, 2.0], [3.0, 4.0, 0.0]]), requires_grad=True)
    with detect_anomaly():
        y = x * 2.0  # finite: passes
        with pytest.raises(AnomalyError) as error:
            where_ = next_line()
            y.log()  # log(0) = -inf
    message = str(error.value)
    assert message.startswith("Log produced 2 inf of 6 values in its forward pass")
    assert "it made them from finite inputs" in message
    assert "input 0: shape (2, 3)" in message
    assert where_ in message and "y.log()" in message


def test_forward_stops_at_the_first_bad_op():
    x = Tensor(np.array([-1.0, 4.0]))
    with detect_anomaly(), pytest.raises(AnomalyError, match=r"^Sqrt produced 1 NaN"):
        (x.sqrt() * 2.0).exp()  # sqrt(-1) is the first; Mul and Exp never run


def test_the_line_is_the_callers_even_through_a_helper_function():
    def loss_fn(x):
        return (x / x).sum()  # 0 / 0 in Mul (div is x * x**-1): inf first, from Pow

    x = Tensor(np.array([0.0, 1.0]))
    with detect_anomaly(), pytest.raises(AnomalyError) as error:
        loss_fn(x)
    assert "Pow produced 1 inf" in str(error.value)
    assert "in loss_fn: return (x / x).sum()" in str(error.value)


def test_a_nan_in_the_input_data_is_reported_as_such():
    data = Tensor(np.array([1.0, np.nan, 3.0]))
    with detect_anomaly(), pytest.raises(AnomalyError) as error:
        data * 2.0
    message = str(error.value)
    assert "already non-finite when it arrived" in message
    assert "input data" in message
    assert "input 0: shape (3,) holding 1 NaN of 3 values" in message


def test_integer_and_boolean_arrays_are_never_anomalies():
    with detect_anomaly():
        i = Tensor(np.array([1, 2, 3]))
        (i * 2).sum()
        where(np.array([True, False]), Tensor(np.ones(2)), 0.0)


# ---------------------------------------------------------------------------- backward
def test_backward_sqrt_at_zero_names_the_op():
    x = Tensor(np.array([0.0, 4.0]), requires_grad=True)
    with detect_anomaly():
        where_ = next_line()
        y = x.sqrt()  # forward is fine: sqrt(0) = 0
        with pytest.raises(AnomalyError) as error:
            y.sum().backward()  # d sqrt/dx = 1 / (2 sqrt(x)) = inf at 0
    message = str(error.value)
    assert message.startswith("Sqrt backward produced 1 inf of 2 values in the gradient of input 0")
    assert "its own backward rule made it" in message
    assert "input shapes: (2,)" in message
    assert where_ in message


def test_backward_log_at_zero_behind_a_where_names_log():
    """The classic trap: ``where`` hides log(0) = -inf from the loss, but not from the gradient.

    Where sends a gradient of 0 to the masked entries; Log's backward computes 0 / 0 = NaN there.
    The forward runs outside anomaly mode (inside, Log's -inf output would raise first).
    """
    x = Tensor(np.array([0.0, 2.0]), requires_grad=True)
    safe = where(x.data > 0, x.log(), 0.0)
    assert np.isfinite(safe.data).all()
    with detect_anomaly(), pytest.raises(AnomalyError) as error:
        safe.sum().backward()
    message = str(error.value)
    assert message.startswith("Log backward produced 1 NaN")
    assert "forward pass ran outside detect_anomaly" in message  # no line without it


def test_a_non_finite_gradient_arriving_from_the_caller_is_reported_as_such():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    with detect_anomaly():
        y = x * 3.0
        with pytest.raises(AnomalyError, match="the gradient it received was already non-finite"):
            y.backward(np.array([np.inf, 1.0]))


def test_finite_graphs_pass_untouched():
    x = Tensor(np.array([0.5, 2.0]), requires_grad=True)
    with detect_anomaly():
        loss = (x.log() * x.sqrt()).sum()
        loss.backward()
    expected = np.sqrt(x.data) * (1 / x.data + np.log(x.data) / (2 * x.data))
    np.testing.assert_allclose(x.grad, expected)


# ---------------------------------------------------------------------------- switching
def test_off_by_default():
    assert not is_enabled()
    x = Tensor(np.array([0.0]), requires_grad=True)
    y = x.log()  # -inf, silently, as numpy does
    assert np.isneginf(y.data).all()
    x.sqrt().sum().backward()  # inf gradient, silently
    assert np.isinf(x.grad).all()


def test_the_context_restores_the_previous_state_even_after_an_error():
    with pytest.raises(AnomalyError), detect_anomaly():
        Tensor(np.array([-1.0])).log()
    assert not is_enabled()
    with detect_anomaly():
        with detect_anomaly(enabled=False):
            assert not is_enabled()
            Tensor(np.array([-1.0])).log()  # switched off inside: no raise
        assert is_enabled()
    assert not is_enabled()


def test_set_detect_anomaly():
    try:
        set_detect_anomaly(True)
        with pytest.raises(AnomalyError):
            Tensor(np.array([0.0])).log()
    finally:
        set_detect_anomaly(False)
    assert not is_enabled()


def test_anomaly_mode_is_per_thread():
    seen = []
    with detect_anomaly():
        thread = threading.Thread(target=lambda: seen.append(is_enabled()))
        thread.start()
        thread.join()
    assert seen == [False]


def test_anomaly_error_is_a_floating_point_error():
    assert issubclass(AnomalyError, FloatingPointError)
