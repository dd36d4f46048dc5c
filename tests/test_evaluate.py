"""COCO evaluation: a number COCOeval has no ground truth for is absent (None, n/a), never 0."""

import json

import numpy as np
import pytest

from minimask.evaluate import (
    STAT_NAMES,
    coco_evaluate,
    detections_to_results,
    format_stat,
    ground_truth_coco,
)
from minimask.workflow import summary_table

CLASSES = ("__background__", "object")
# COCO's area ranges (in pixels of mask area) and the stats measured on each
AREA_RANGES = {"s": (0, 32**2), "m": (32**2, 96**2), "l": (96**2, np.inf)}


def sample(boxes):
    """One 120x200 image whose objects fill the given (x1, y1, x2, y2) boxes."""
    boxes = np.array(boxes, dtype=np.float32).reshape(-1, 4)
    masks = np.zeros((len(boxes), 120, 200), dtype=np.uint8)
    for m, (x1, y1, x2, y2) in zip(masks, boxes.astype(int)):
        m[y1:y2, x1:x2] = 1
    return {"image": np.zeros((3, 120, 200), np.float32), "boxes": boxes,
            "labels": np.ones(len(boxes), np.int64), "masks": masks, "image_id": 1}  # fmt: skip


def perfect_detections(s):
    n = len(s["boxes"])
    det = {"boxes": s["boxes"], "scores": np.linspace(0.9, 0.5, n), "labels": s["labels"],
           "masks": s["masks"]}  # fmt: skip
    return detections_to_results(s["image_id"], det)


def has_objects(s, size: str) -> bool:
    low, high = AREA_RANGES[size]
    areas = s["masks"].sum(axis=(1, 2))
    return bool(((areas >= low) & (areas < high)).any())


def test_area_ranges_without_objects_are_absent_not_zero():
    s = sample([[10, 10, 50, 50], [100, 20, 150, 60]])  # 1600 and 2000 pixels: medium only
    metrics = coco_evaluate(ground_truth_coco([s], CLASSES), perfect_detections(s))
    for task, m in metrics.items():
        assert m["AP"] == pytest.approx(1.0) and m["AR100"] == pytest.approx(1.0), task
        for size in AREA_RANGES:
            for name in (f"AP{size}", f"AR{size}"):
                if has_objects(s, size):
                    assert m[name] == pytest.approx(1.0), (task, name)
                else:
                    assert m[name] is None, (task, name)
    assert json.loads(json.dumps(metrics)) == metrics  # None is JSON's null


def test_no_detections_score_zero_only_where_there_are_objects():
    s = sample([[10, 10, 20, 20], [60, 10, 180, 110]])  # 100 and 12000 pixels: small and large
    metrics = coco_evaluate(ground_truth_coco([s], CLASSES), [])
    for task, m in metrics.items():
        for name in STAT_NAMES:
            size = name[-1] if name[-1] in AREA_RANGES else None
            if size is None or has_objects(s, size):
                assert m[name] == 0.0, (task, name)
            else:
                assert m[name] is None, (task, name)


def cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def check_row(cells_, values):
    for cell, value in zip(cells_, values, strict=True):
        if value is None:
            assert cell == "n/a"
        else:
            assert float(cell) == pytest.approx(value, abs=5e-4)


@pytest.mark.parametrize(
    "objects, found",
    [([[10, 10, 50, 50]], [[10, 10, 50, 50]]),  # one medium object, found: no s or l numbers
     ([], [[5, 5, 40, 40]])],  # no object at all, one false detection: no number at all
)  # fmt: skip
def test_tables_print_absent_numbers_as_n_a(objects, found):
    s, results = sample(objects), perfect_detections(sample(found))
    metrics = coco_evaluate(ground_truth_coco([s], CLASSES), results)
    assert any(v is None for m in metrics.values() for v in m.values())
    lines = summary_table(metrics).splitlines()
    assert cells(lines[0])[1:] == list(STAT_NAMES)
    for line, (task, m) in zip(lines[2:], metrics.items(), strict=True):
        assert cells(line)[0] == task
        check_row(cells(line)[1:], [m[n] for n in STAT_NAMES])
    short = summary_table(metrics, ("AP", "AP50", "AP75"))
    for line, task in zip(short.splitlines()[2:], ("bbox", "segm"), strict=True):
        check_row(cells(line)[1:], [metrics[task][n] for n in ("AP", "AP50", "AP75")])


def test_format_stat():
    assert format_stat(None) == "n/a"
    assert format_stat(0.12345) == "0.123"
    assert format_stat(0.5, ".1%") == "50.0%"
