"""benchmarks/resample.py on a small SynthBrain grid: every path is timed and agrees with MONAI's Spacingd."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "resample.py"


def test_resample_benchmark_prints_agreeing_paths(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("resample_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--scans", "1", "--grid", "32x36x32", "--spacing", "3", "--workdir", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)

    assert report["cpu_threads"] == 1 and report["input_shape"] == [32, 36, 32]
    assert report["output_shape"] != report["input_shape"]  # a real resampling (~5.7 mm -> 3 mm)
    for stage in ("spacing", "chain"):
        scipy, separable = report[stage]["scipy"], report[stage]["separable_cpu"]
        assert scipy["s_per_scan"] > 0 and separable["scans_per_s"] == pytest.approx(1 / separable["s_per_scan"])
        assert separable["speedup_over_scipy"] == pytest.approx(scipy["s_per_scan"] / separable["s_per_scan"])
        assert separable["max_abs_diff_to_scipy"] < 1e-5
