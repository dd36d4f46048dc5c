"""The lessons: every ``lessons/*.ipynb``, in both editions, runs in at most 90 seconds.

Each notebook is executed fresh in a new kernel (nbclient, so it runs inside the normal pytest
run), with ``lessons/`` as the working directory, as a student would open it. A cell that raises,
including an exercise's check, fails the test and names the cell. New lessons are picked up by
the glob: nothing to register.

Both editions run in that one pass, so no lesson is executed twice. An exercise is a solution
cell (nbgrader's ``### BEGIN SOLUTION`` / ``### END SOLUTION`` markup) and the check cell after
it (see ``minimask/lessons_tool.py``). Just before the teacher's solution runs, its student stub
runs in the same kernel, then the check, which must FAIL on the stub: no check can pass on an
empty answer. Then the solution and the check run, and the check must pass. Each lesson's time
is written to ``build/lesson_times.json`` (and to pytest's ``record_property``).

Executing a lesson rewrites its picture in ``docs/images/lesson_NN.png``; the figures are
deterministic, so that leaves the tree unchanged.

The cheap checks below hold the committed notebooks to the form the lessons promise: saved with
their outputs, small, a summary and exercises in markdown, each exercise marked up with a check
that asserts, and listed in ``docs/lessons.md``.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

from minimask import lessons_tool
from minimask.data import paths

MISSING = "is not installed (pip install -e .[dev])"
nbformat = pytest.importorskip("nbformat", reason=f"nbformat {MISSING}")
nbclient = pytest.importorskip("nbclient", reason=f"nbclient {MISSING}")

REPO = Path(__file__).resolve().parents[1]
LESSONS = REPO / "lessons"
NOTEBOOKS = sorted(LESSONS.glob("[0-9][0-9]_*.ipynb"))
TIME_LIMIT_S = 90  # per notebook, top to bottom, on a 2-core CPU
TIMES = REPO / "build" / "lesson_times.json"
MAX_BYTES = 1_000_000  # a committed notebook, outputs included
# The kernel imports this checkout's minimask, whatever the environment has installed.
KERNEL_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
}
EXERCISE = re.compile(r"\*\*Exercise\s+(\d+)\.\*\*")
# Markdown smuggled into a code cell's comments: a heading or an exercise's prompt.
MARKDOWN_IN_COMMENTS = re.compile(r"^(?!### (BEGIN|END) SOLUTION)#\s*(#+\s|\*\*Exercise)", re.M)


def _ids(path: Path) -> str:
    return path.stem


def _record_time(name: str, seconds: float) -> None:
    TIMES.parent.mkdir(exist_ok=True)
    times = json.loads(TIMES.read_text()) if TIMES.exists() else {}
    times[name] = round(seconds, 1)
    TIMES.write_text(json.dumps(dict(sorted(times.items())), indent=1) + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_lesson_runs_with_answers_and_its_checks_fail_on_the_stubs(path: Path, record_property):
    notebook = nbformat.read(path, as_version=4)
    pairs = dict(lessons_tool.exercise_pairs(notebook.cells))  # solution cell -> check cell
    deadline = time.monotonic() + TIME_LIMIT_S
    client = nbclient.NotebookClient(
        notebook,
        kernel_name="python3",
        resources={"metadata": {"path": str(LESSONS)}},  # the working directory: lessons/
        # One budget for the whole notebook: each cell may use what the earlier ones left.
        timeout_func=lambda cell: max(1, int(deadline - time.monotonic())),
    )
    passing_stubs = []
    start = time.monotonic()
    try:
        client.reset_execution_trackers()
        with client.setup_kernel(env=KERNEL_ENV):
            for index, cell in enumerate(notebook.cells):
                if index in pairs:  # the student's edition first: stub, then its check
                    stub = copy.deepcopy(cell)
                    stub.source = lessons_tool.stub_source(cell.source)
                    try:
                        client.execute_cell(stub, index)
                    except nbclient.exceptions.CellExecutionError as error:
                        assert error.ename == "NotImplementedError", (
                            f"{path.name}: the stub of cell {index} raised {error.ename}"
                        )
                    try:
                        client.execute_cell(copy.deepcopy(notebook.cells[pairs[index]]), index)
                        passing_stubs.append(pairs[index])
                    except nbclient.exceptions.CellExecutionError:
                        pass  # as it should: the check fails on an empty answer
                client.execute_cell(cell, index)
    except nbclient.exceptions.CellTimeoutError:
        pytest.fail(f"{path.name} did not finish within {TIME_LIMIT_S} s")
    except nbclient.exceptions.CellExecutionError as error:
        pytest.fail(f"{path.name}: a cell raised\n{error}")
    elapsed = time.monotonic() - start
    record_property("seconds", round(elapsed, 1))
    _record_time(path.stem, elapsed)
    assert not passing_stubs, f"{path.name}: check cells {passing_stubs} pass on the student stub"
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
    # A saved widget state makes the website's page load a widget manager from a CDN.
    widgets = "widgets" in notebook.metadata or any(
        "application/vnd.jupyter.widget-view+json" in o.get("data", {})
        for c in code
        for o in c.outputs
    )
    assert not widgets, f"{path.name} stores ipywidgets state; re-run it with `make lessons`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_lesson_has_summary_and_marked_up_exercises_in_markdown(path: Path):
    notebook = nbformat.read(path, as_version=4)
    cells = notebook.cells
    source = "\n".join(c.source for c in cells if c.cell_type == "code")
    assert re.search(r"^\s*(from|import) minimask", source, re.M), f"{path.name} imports nothing"
    for i, cell in enumerate(cells):
        if cell.cell_type == "code":
            hidden = MARKDOWN_IN_COMMENTS.search(cell.source)
            assert not hidden, f"{path.name}, cell {i}: markdown in comments: {hidden.group(0)!r}"
            if re.search(r"^\s*(import ipywidgets|from ipywidgets)", cell.source, re.M):
                # Headless runs and plain installs have no widgets: the cell must say so, not fail.
                assert re.search(r"^try:\n\s+(import|from) ipywidgets", cell.source, re.M) and (
                    "except ImportError" in cell.source
                ), f"{path.name}, cell {i}: import ipywidgets inside try/except ImportError"
    headings = [c.source for c in cells if c.cell_type == "markdown"]
    for title in ("Summary", "Exercises"):
        assert any(re.search(rf"^##\s+{title}\s*$", h, re.M) for h in headings), (
            f"{path.name} has no '## {title}' heading in markdown"
        )

    pairs = lessons_tool.exercise_pairs(cells)
    assert 2 <= len(pairs) <= 4, f"{path.name} has {len(pairs)} marked-up exercises (want 2 to 4)"
    previous = 0
    for number, (solution, check) in enumerate(pairs, start=1):
        prompt = [c.source for c in cells[previous:solution] if c.cell_type == "markdown"]
        found = [int(n) for text in prompt for n in EXERCISE.findall(text)]
        assert found == [number], (
            f"{path.name}: the markdown before solution cell {solution} should state "
            f"**Exercise {number}.** once (found {found})"
        )
        assert not lessons_tool.is_solution_cell(cells[check]), (
            f"{path.name}: cell {solution}'s check (cell {check}) is itself a solution cell"
        )
        assert re.search(r"\bassert", cells[check].source), (
            f"{path.name}: the check of exercise {number} (cell {check}) asserts nothing"
        )
        previous = check + 1
    later = [int(n) for c in cells[previous:] if c.cell_type == "markdown"
             for n in EXERCISE.findall(c.source)]  # fmt: skip
    assert not later, f"{path.name}: Exercise {later} has no marked-up solution cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_widget_cells_say_so_and_run_without_ipywidgets(path: Path, monkeypatch, capsys):
    notebook = nbformat.read(path, as_version=4)
    cells = [c.source for c in notebook.cells if c.cell_type == "code" and "ipywidgets" in c.source]
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # now `import ipywidgets` raises
    for source in cells:
        exec(compile(source, path.name, "exec"), {})  # the cell alone: it must need nothing else
        assert "ipywidgets is not installed" in capsys.readouterr().out, path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_student_edition_shows_no_answers(path: Path):
    notebook = json.loads(path.read_text(encoding="utf-8"))
    student = lessons_tool.student_notebook(notebook)
    pairs = lessons_tool.exercise_pairs(notebook["cells"])
    for solution, check in pairs:
        stub = lessons_tool.cell_source(student["cells"][solution])
        assert lessons_tool.STUB in stub and lessons_tool.BEGIN not in stub
        compile(stub.replace("%", "#"), f"{path.name} cell {solution}", "exec")  # still Python
        for index in (solution, check):
            assert student["cells"][index]["outputs"] == [], f"{path.name} cell {index} output"
    untouched = set(range(len(notebook["cells"]))) - {i for pair in pairs for i in pair}
    assert all(student["cells"][i] == notebook["cells"][i] for i in untouched)


def test_stub_keeps_the_indentation_and_what_lies_outside_the_region():
    source = (
        "def f(x):\n"
        '    """Doc."""\n'
        "    ### BEGIN SOLUTION\n"
        "    y = x + 1\n"
        "    return y\n"
        "    ### END SOLUTION\n"
        "\n"
        "### BEGIN SOLUTION\n"
        "answer = 3\n"
        "### END SOLUTION\n"
    )
    assert lessons_tool.stub_source(source) == (
        "def f(x):\n"
        '    """Doc."""\n'
        "    # YOUR CODE HERE\n"
        "    raise NotImplementedError()\n"
        "\n"
        "# YOUR CODE HERE\n"
        "raise NotImplementedError()\n"
    )


@pytest.mark.parametrize(
    "source, problem",
    [
        ("### BEGIN SOLUTION\nx = 1\n", "never closed"),
        ("x = 1\n### END SOLUTION\n", "without its"),
        ("### BEGIN SOLUTION\n  ### BEGIN SOLUTION\n### END SOLUTION\n", "inside another"),
    ],
)
def test_stub_rejects_broken_markup(source, problem):
    with pytest.raises(ValueError, match=problem):
        lessons_tool.stub_source(source)


def test_student_edition_is_written_for_every_lesson(tmp_path):
    written = lessons_tool.write_student_edition(LESSONS, tmp_path)
    assert [p.name for p in written] == [p.name for p in NOTEBOOKS]
    absent = ["student", str(tmp_path / "absent"), str(tmp_path / "out")]
    assert lessons_tool.main(absent) == 2  # one line on stderr, exit 2


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
