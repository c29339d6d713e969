"""benchmarks/fit_throughput.py at the tiny preset on CPU: the JSON it prints is complete and self-consistent."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fit_throughput.py"


def _load():
    spec = importlib.util.spec_from_file_location("fit_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_cpu_run_prints_the_throughput_json(tmp_path, capsys):
    bench = _load()
    argv = ["--preset", "tiny", "--device", "cpu", "--workdir", str(tmp_path), "--steps", "2", "--warmup", "1",
            "--unique", "1", "--workers", "1"]  # fmt: skip
    assert bench.main(argv) == 0
    report = json.loads(capsys.readouterr().out)

    assert report["device"] == "cpu" and report["preset"] == "tiny" and report["batch"] == 2
    assert report["fit_scans_per_s"] > 0 and report["step_scans_per_s"] > 0
    assert report["ratio"] == pytest.approx(report["fit_scans_per_s"] / report["step_scans_per_s"])
    assert 0 <= report["data_wait_fraction"] < 1 and report["loader_workers"] == 1
    fit = report["fit"]
    assert len(fit["fit_step_s_all"]) == len(fit["fit_fetch_s_all"]) == 3  # warm-up + timed steps
    assert all(f <= s for f, s in zip(fit["fit_fetch_s_all"], fit["fit_step_s_all"]))  # a wait is inside its step
    # ThroughputMonitor saw every batch of the fit: 3 steps of 2 scans
    assert fit["throughput_monitor"]["samples"] == 6 and fit["throughput_monitor"]["device/samples_per_sec"] > 0
    assert len(report["step"]["step_s_all"]) == 2 and fit["flops_per_scan"] > 0
    cache = report["cache"]
    assert cache["scans"] == 2 * (1 + 2 + 1) and cache["dtype"] == "uint16" and cache["built_now"]
    assert cache["bytes_per_scan"] > 34 * 40 * 34 * 2  # uint16 voxels of the tiny chain + the sample header
    assert Path(cache["folder"]).parent == tmp_path / "tiny" / "cache"
