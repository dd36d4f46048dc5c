"""The lessons' two editions: the teacher's (``lessons/*.ipynb``, answers in) and the student's.

An exercise is two code cells, in nbgrader's markup:

* the **solution cell** holds the answer between ``### BEGIN SOLUTION`` and ``### END SOLUTION``
  lines (inside a ``def`` or at the top level);
* the **check cell**, the next code cell, tests the answer with ``assert``.

The student edition replaces each solution region with ``raise NotImplementedError()`` at the
region's indentation (nbgrader's stub), and clears the outputs of the solution and check cells,
so no answer shows. Everything else, pictures included, is kept. nbgrader itself is not needed:
a notebook is JSON, and this module reads and writes it with ``json`` only.

    python -m minimask.lessons_tool student lessons build/student    # what `make student` runs
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
STUB = "raise NotImplementedError()"
_MARK = re.compile(r"^([ \t]*)### (BEGIN|END) SOLUTION[ \t]*$")


def cell_source(cell: dict) -> str:
    """A cell's source as one string (notebook JSON may store it as a list of lines)."""
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def is_solution_cell(cell: dict) -> bool:
    """True for a code cell with at least one solution region."""
    return cell.get("cell_type") == "code" and any(
        _MARK.match(line) for line in cell_source(cell).splitlines()
    )


def stub_source(source: str) -> str:
    """Replace every ``BEGIN``/``END SOLUTION`` region of ``source`` by an indented stub.

    Raises ValueError, naming the line, on a region that is not closed, a nested ``BEGIN``, or
    an ``END`` without its ``BEGIN``.
    """
    out, indent = [], None
    for number, line in enumerate(source.splitlines(), start=1):
        mark = _MARK.match(line)
        if mark and mark.group(2) == "BEGIN":
            if indent is not None:
                raise ValueError(f"line {number}: {BEGIN} inside another solution region")
            indent = mark.group(1)
            out.append(f"{indent}# YOUR CODE HERE")
            out.append(f"{indent}{STUB}")
        elif mark:
            if indent is None:
                raise ValueError(f"line {number}: {END} without its {BEGIN}")
            indent = None
        elif indent is None:
            out.append(line)
    if indent is not None:
        raise ValueError(f"a {BEGIN} region is never closed by {END}")
    return "\n".join(out) + ("\n" if source.endswith("\n") else "")


def exercise_pairs(cells: list[dict]) -> list[tuple[int, int]]:
    """``(solution cell index, check cell index)`` of each exercise, in notebook order.

    The check is the first code cell after the solution cell. Raises ValueError when a solution
    cell has no code cell after it.
    """
    pairs = []
    for i, cell in enumerate(cells):
        if not is_solution_cell(cell):
            continue
        after = [j for j in range(i + 1, len(cells)) if cells[j].get("cell_type") == "code"]
        if not after:
            raise ValueError(f"cell {i}: a solution cell with no check cell after it")
        pairs.append((i, after[0]))
    return pairs


def student_notebook(notebook: dict) -> dict:
    """The student edition of a notebook (a new dict; the input is not changed)."""
    student = json.loads(json.dumps(notebook))  # a deep copy of plain JSON
    cells = student["cells"]
    for solution, check in exercise_pairs(cells):
        for index in (solution, check):
            cells[index]["outputs"] = []
            cells[index]["execution_count"] = None
        try:
            cells[solution]["source"] = stub_source(cell_source(cells[solution]))
        except ValueError as error:
            raise ValueError(f"cell {solution}: {error}") from None
    return student


def write_student_edition(source_dir: Path, out_dir: Path) -> list[Path]:
    """Write the student edition of every ``NN_*.ipynb`` in ``source_dir`` to ``out_dir``."""
    notebooks = sorted(Path(source_dir).glob("[0-9][0-9]_*.ipynb"))
    if not notebooks:
        raise FileNotFoundError(f"no lessons (NN_*.ipynb) in {source_dir}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in notebooks:
        notebook = json.loads(path.read_text(encoding="utf-8"))
        try:
            student = student_notebook(notebook)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        target = out_dir / path.name
        target.write_text(json.dumps(student, indent=1, ensure_ascii=False) + "\n", "utf-8")
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minimask.lessons_tool", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    student = commands.add_parser("student", help="write the student edition of the lessons")
    student.add_argument("source", type=Path, help="folder of the lessons (lessons/)")
    student.add_argument("out", type=Path, help="folder to write them to (build/student/)")
    args = parser.parse_args(argv)
    try:
        written = write_student_edition(args.source, args.out)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} student notebooks to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
