"""The ablation benchmark: its table's arithmetic, and a tiny study that stores and resumes."""

from __future__ import annotations

import json

from minimask.bench import ablations
from minimask.bench.ablations import STUDIES, Setting, table


def _run(ap, ap75):
    return {"segm": {"AP": ap, "AP50": ap + 0.1, "AP75": ap75}, "bbox": {}, "train_seconds": 1}


def test_table_reports_mean_spread_and_the_direction_of_each_study():
    worse, better = (
        Setting("pool", "tiny", {"pooler": "roi_pool"}, (1, 2, 3)),
        Setting("align", "tiny"),
    )
    study = [("pool vs align", "Table X", [worse, better])]
    results = {worse.key: {"0": _run(0.30, 0.20), "1": _run(0.34, 0.24)},
               better.key: {"0": _run(0.40, 0.35), "1": _run(0.42, 0.37)}}  # fmt: skip
    text = table(results, [0, 1], study)
    lines = text.splitlines()
    assert "| pool vs align (Table X) | pool (2 seeds) | 32.0 ± 2.0 |" in lines[2]
    assert lines[3].endswith("AP +9.0, AP50 +9.0, AP75 +14.0: as the paper |")
    flipped = {worse.key: results[better.key], better.key: results[worse.key]}
    assert table(flipped, [0, 1], study).endswith("opposite to the paper |")
    assert "n/a" in table({}, [0], study)  # no run yet: nothing invented


def test_every_study_compares_two_settings_that_differ():
    for _, _, (worse, better) in STUDIES:
        assert worse.key != better.key
        assert len(worse.paper) == len(better.paper) == 3


def test_a_study_trains_stores_and_resumes(tmp_path, capsys):
    args = ["--iterations", "2", "--batch-size", "1", "--val-images", "2", "--seeds", "0",
            "--studies", "5", "--jobs", "1", "--out", str(tmp_path)]  # fmt: skip
    ablations.main(argv=args)
    stored = json.loads((tmp_path / "results.json").read_text())
    assert len(stored["results"]) == 2  # MLP and FCN, one seed each
    for runs in stored["results"].values():
        assert set(runs["0"]["segm"]) == {"AP", "AP50", "AP75"}
    capsys.readouterr()
    ablations.main(argv=args)  # everything stored: nothing to train
    assert "0 runs to train" in capsys.readouterr().out
