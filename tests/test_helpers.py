"""The test helpers themselves: a missing torch skips the references, a broken one fails loudly."""

import sys
import textwrap

import pytest
from helpers import _optional


def test_a_missing_package_is_none():
    assert _optional("minimask_no_such_package") is None


def test_a_package_blocked_in_sys_modules_counts_as_missing(monkeypatch):
    # ``sys.modules[name] = None`` makes ``import name`` fail as if it were not installed.
    monkeypatch.setitem(sys.modules, "torch", None)
    assert _optional("torch") is None


def _broken_torch(tmp_path, monkeypatch, init: str) -> None:
    """Shadow torch, for this test only, with a package whose ``__init__`` runs ``init``."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(textwrap.dedent(init))
    monkeypatch.syspath_prepend(str(tmp_path))  # found before the real torch
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # restored after the test


def test_a_torch_that_fails_to_load_raises(tmp_path, monkeypatch):
    # Installed, but its shared library is gone.
    _broken_torch(tmp_path, monkeypatch, """
        raise OSError("libtorch_cpu.so: cannot open shared object file")
    """)  # fmt: skip
    with pytest.raises(OSError, match="libtorch_cpu.so"):
        _optional("torch")


def test_a_torch_missing_one_of_its_modules_raises(tmp_path, monkeypatch):
    # Installed, but a part of it is missing: a ModuleNotFoundError, but not one for torch.
    _broken_torch(tmp_path, monkeypatch, """
        import torch._minimask_missing_part
    """)  # fmt: skip
    with pytest.raises(ModuleNotFoundError, match="_minimask_missing_part"):
        _optional("torch")
