"""`neurojepa fewshot`: t-interval summary by hand, and the full grid on the tiny SynthBrain cohort."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from downstream_tiny import tiny_overrides
from scipy import stats

from neurojepa_pl.tools.fewshot import main, summarise_runs, t_interval

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def test_t_interval_by_hand():
    values = [0.6, 0.7, 0.8, 0.9, 1.0]
    mean, low, high = t_interval(values)
    half = stats.t.ppf(0.975, 4) * math.sqrt(0.025) / math.sqrt(5)  # sd of the values is sqrt(0.025)
    assert mean == pytest.approx(0.8) and low == pytest.approx(0.8 - half) and high == pytest.approx(0.8 + half)
    assert math.isnan(t_interval([0.5])[1]) and math.isnan(t_interval([])[0])
    runs = pd.DataFrame({"k": [1, 1, 2, 2], "seed": [0, 1, 0, 1], "auroc": [0.5, 0.7, 0.8, float("nan")]})
    summary = summarise_runs(runs, ["auroc"])
    assert summary["mean"].tolist() == pytest.approx([0.6, 0.8])
    assert summary["repeats"].tolist() == [2, 1]


def test_overrides_of_the_grid_are_refused():
    with pytest.raises(SystemExit):
        main(["--config", "x.yaml", "--k", "1", "--data.init_args.k_shot", "3"])


@pytest.mark.slow
def test_fewshot_grid_on_tiny_cohort(synth_cohort, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "fs"
    code = main(
        [
            "--config",
            str(EXPERIMENTS / "fewshot" / "synth_tumour_fewshot.yaml"),
            "--k",
            "1",
            "2",
            "--repeats",
            "2",
            "--out",
            str(out),
            *tiny_overrides(synth_cohort),
            "--model.init_args.n_bootstrap",
            "10",
        ]
    )
    assert code == 0
    runs = pd.read_csv(out / "fewshot_runs.csv")
    assert sorted(zip(runs["k"], runs["seed"])) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    summary = pd.read_csv(out / "fewshot_summary.csv")
    assert set(summary["metric"]) == {"auroc", "ap"} and sorted(set(summary["k"])) == [1, 2]
    assert (out / "k2" / "seed1" / "metrics.json").is_file()
    assert "fewshot_summary.csv" in capsys.readouterr().out
