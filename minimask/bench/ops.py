"""``python -m minimask.bench ops``: RoIAlign, RoIPool and NMS against torchvision, one table.

Goal: ratio (minimask time / torchvision time) at most 1.0 on every row.
"""

from __future__ import annotations

import importlib

from minimask.bench import roi_cases
from minimask.bench.timing import run_cases


def main(repeat: int = 9) -> None:
    cases = roi_cases.cases()
    try:
        nms_cases = importlib.import_module("minimask.bench.nms_cases")
    except ModuleNotFoundError as error:
        print(f"(NMS rows skipped: {error})\n")
    else:
        cases += nms_cases.cases()
    run_cases(
        cases, repeat=repeat, title="Detection ops: forward + backward vs torchvision", goal=1.0
    )


if __name__ == "__main__":
    main()
