"""The GPU benchmark and ``make gpu-check`` where there is no GPU: the refusal and the report."""

import sys

import pytest

from minimask.bench import gpu, gpu_check


def test_the_gpu_benchmark_without_cupy_stops_with_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` raises ImportError
    with pytest.raises(SystemExit) as stop:
        gpu.main(repeat=1)
    message = str(stop.value)
    assert "needs CuPy" in message and "pip install" in message and "\n" not in message


def test_the_gpu_check_report(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "train_has_device_option", lambda python: False)
    (tmp_path / "tests.log").write_text("sss\n3 skipped in 1.0s\n")
    (tmp_path / "bench.log").write_text("python -m minimask.bench gpu needs CuPy\n")
    (tmp_path / "train.log").write_text("".join(f"line {i}\n" for i in range(100)))
    results = []
    for part in gpu_check.parts("python", "coco-mini", tmp_path, 300):
        result = dict(part, status=1 if part["log"] == "bench.log" else 0, seconds=2.0)
        results.append(dict(result, notes=gpu_check.notes(result, tmp_path)))
    report = gpu_check.report(results, tmp_path)
    assert report.startswith("# minimask GPU check\n")
    assert "- date: " in report and "- commit: " in report
    assert "no GPU test passed" in report  # every GPU test skipped: said, not hidden
    assert "nothing in this report shows that the training ran on the GPU" in report
    assert "needs CuPy" in report  # the benchmark's whole output
    assert "line 99" in report and "line 39" not in report  # the training's last 60 lines
    assert "(the last 60 of 100 lines; all in train.log)" in report
    assert "`MINIMASK_DEVICE=gpu python -m minimask train --dataset coco" in report
