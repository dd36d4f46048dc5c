"""The lessons: every ``lessons/*.ipynb`` runs top to bottom, unedited, in at most 90 seconds.

Each notebook is executed fresh in a new kernel (nbclient, so it runs inside the normal pytest
run), with ``lessons/`` as the working directory, as a student would open it. A cell that raises,
including an exercise's self-check, fails the test and names the cell. New lessons are picked up
by the glob: nothing to register.

Executing a lesson rewrites its picture in ``docs/images/lesson_NN.png``; the figures are
deterministic, so that leaves the tree unchanged.

The cheap checks below hold the committed notebooks to the form the lessons promise: saved with
their outputs (so the pictures show when opened), small, and listed in ``docs/lessons.md``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from minimask.data import paths

MISSING = "is not installed (pip install -e .[dev])"
nbformat = pytest.importorskip("nbformat", reason=f"nbformat {MISSING}")
nbclient = pytest.importorskip("nbclient", reason=f"nbclient {MISSING}")

REPO = Path(__file__).resolve().parents[1]
LESSONS = REPO / "lessons"
NOTEBOOKS = sorted(LESSONS.glob("[0-9][0-9]_*.ipynb"))
TIME_LIMIT_S = 90  # per notebook, top to bottom, on a 2-core CPU
MAX_BYTES = 1_000_000  # a committed notebook, outputs included


def _ids(path: Path) -> str:
    return path.stem


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_lesson_runs_top_to_bottom(path: Path):
    notebook = nbformat.read(path, as_version=4)
    deadline = time.monotonic() + TIME_LIMIT_S
    client = nbclient.NotebookClient(
        notebook,
        kernel_name="python3",
        resources={"metadata": {"path": str(LESSONS)}},  # the working directory: lessons/
        # One budget for the whole notebook: each cell may use what the earlier ones left.
        timeout_func=lambda cell: max(1, int(deadline - time.monotonic())),
    )
    start = time.monotonic()
    try:
        client.execute()
    except nbclient.exceptions.CellTimeoutError:
        pytest.fail(f"{path.name} did not finish within {TIME_LIMIT_S} s")
    except nbclient.exceptions.CellExecutionError as error:
        pytest.fail(f"{path.name}: a cell raised\n{error}")
    elapsed = time.monotonic() - start
    assert elapsed <= TIME_LIMIT_S, f"{path.name} took {elapsed:.0f} s (limit {TIME_LIMIT_S} s)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_lesson_is_committed_with_outputs_and_small(path: Path):
    notebook = nbformat.read(path, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code" and c.source.strip()]
    assert code, f"{path.name} has no code"
    unrun = [i for i, c in enumerate(code) if c.execution_count is None]
    assert not unrun, f"{path.name}: code cells {unrun} were never run; run `make lessons`"
    assert any(
        "image/png" in o.get("data", {}) or "image/jpeg" in o.get("data", {})
        for c in code
        for o in c.outputs
    ), f"{path.name} shows no picture"
    size = path.stat().st_size
    assert size < MAX_BYTES, f"{path.name} is {size / 1e6:.1f} MB; use smaller figures"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_lesson_imports_what_it_teaches_and_has_exercises(path: Path):
    notebook = nbformat.read(path, as_version=4)
    source = "\n".join(c.source for c in notebook.cells if c.cell_type == "code")
    imports = re.search(r"^\s*(from|import) minimask", source, re.M)
    assert imports, f"{path.name} imports nothing from minimask"
    markdown = "\n".join(c.source for c in notebook.cells if c.cell_type == "markdown")
    exercises = set(re.findall(r"Exercise\s+(\d+)", markdown))
    assert 2 <= len(exercises) <= 4, f"{path.name} has {len(exercises)} exercises (want 2 to 4)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_lesson_is_listed_in_docs(path: Path):
    index = (REPO / "docs" / "lessons.md").read_text(encoding="utf-8")
    assert f"lessons/{path.name}" in index, f"docs/lessons.md has no row for {path.name}"


def test_coco_mini_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.COCO_MINI_ENV, str(tmp_path))
    assert paths.coco_mini_root() == tmp_path
    monkeypatch.setenv(paths.COCO_MINI_ENV, str(tmp_path / "absent"))
    assert paths.coco_mini_root() is None
    monkeypatch.delenv(paths.COCO_MINI_ENV)
    default = paths.REPO_ROOT.parent / "shared" / "data" / "coco-mini"
    assert paths.coco_mini_root() == (default if default.is_dir() else None)
