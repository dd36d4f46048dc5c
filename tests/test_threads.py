"""The thread policy of NumPy's BLAS (minimask.backend): fixed counts, the env var, auto."""

from unittest import mock

import pytest

from minimask import backend


@pytest.fixture(autouse=True)
def restore_policy(monkeypatch):
    monkeypatch.delenv(backend.THREADS_VARIABLE, raising=False)
    before = backend.blas_threads()
    yield
    backend.set_threads(before)


def test_fixed_count_is_used_and_not_adapted():
    assert backend.set_threads(1) == 1 == backend.blas_threads()
    with mock.patch.object(backend, "runnable_elsewhere", return_value=0):
        assert backend.adapt_threads() == 1


def test_env_variable_fixes_the_count(monkeypatch):
    monkeypatch.setenv(backend.THREADS_VARIABLE, "1")
    assert backend.set_threads() == 1
    monkeypatch.setenv(backend.THREADS_VARIABLE, "auto")
    assert backend.set_threads() == backend.cores()


@pytest.mark.parametrize("bad", ["0", "-2", "two", "1.5"])
def test_bad_counts_are_refused_with_the_name(monkeypatch, bad):
    monkeypatch.setenv(backend.THREADS_VARIABLE, bad)
    with pytest.raises(ValueError, match=backend.THREADS_VARIABLE):
        backend.set_threads()
    with pytest.raises(ValueError, match="threads"):
        backend.set_threads(0)


@pytest.mark.parametrize("busy, expected", [(0, 2), (1, 1), (5, 1)])
def test_auto_gives_the_cores_no_one_else_uses(busy, expected):
    backend.set_threads(None)
    with (
        mock.patch.object(backend, "cores", return_value=2),
        mock.patch.object(backend, "runnable_elsewhere", return_value=busy),
        mock.patch.object(backend._policy, "changed_at", 0.0),
    ):
        for _ in range(backend.SAMPLES):
            backend._policy.changed_at = 0.0  # no waiting between changes in this test
            threads = backend.adapt_threads()
    assert threads == expected
    if backend.blas_threads() >= expected:  # a BLAS built for fewer threads caps the count
        assert backend.blas_threads() == expected


def test_auto_without_proc_keeps_the_count():
    backend.set_threads(None)
    before = backend.blas_threads()
    with mock.patch.object(backend, "runnable_elsewhere", return_value=None):
        assert backend.adapt_threads() == before


def test_runnable_elsewhere_reads_a_count_on_linux():
    others = backend.runnable_elsewhere()
    assert others is None or others >= 0


def test_single_threaded_blas_gives_the_count_back_even_after_an_error():
    if backend.set_threads(2) != 2 or backend.blas_threads() != 2:
        pytest.skip("this BLAS does not take 2 threads")
    with backend.single_threaded_blas():
        assert backend.blas_threads() == 1
    assert backend.blas_threads() == 2
    with pytest.raises(RuntimeError), backend.single_threaded_blas():
        raise RuntimeError("inside")
    assert backend.blas_threads() == 2
