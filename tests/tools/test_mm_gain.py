"""`neurojepa mm-gain`: best multimodal minus best unimodal, paired on the shared test sessions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from neurojepa_pl.metrics.predictions import write_predictions
from neurojepa_pl.metrics.report import write_metrics_json
from neurojepa_pl.metrics.tasks import compute_task_metrics
from neurojepa_pl.tools.mm_gain import main, multimodal_gain

N = 60
TARGET = np.arange(N) % 2


def _scores(separation: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return 1.0 / (1.0 + np.exp(-(separation * (2 * TARGET - 1) + rng.standard_normal(N))))


def _run(root: Path, name: str, score: np.ndarray, fusion: str | None = None, rows=slice(None)) -> Path:
    """A run folder as the downstream/multimodal modules write it (T1w path for unimodal, session for fusion)."""
    run = root / name
    target = TARGET[rows]
    score = score[rows]
    ids = np.arange(N)[rows]
    meta = {
        "subject_id": [f"{i:03d}" for i in ids],
        "session_id": ["ses-0"] * len(ids),
        "modality": ["T1w" if fusion is None else "T1w+FLAIR"] * len(ids),
        "path": [f"/data/sub-{i:03d}_{'T1w' if fusion is None else 'T1w'}.nii.gz" for i in ids],
    }
    arrays = {"target": target, "score": score}
    point = compute_task_metrics("binary", arrays)
    extra = {"fusion": fusion} if fusion else None
    write_metrics_json(
        run / "metrics.json", {k: (v, v, v) for k, v in point.items()}, n=len(target), task="binary", extra=extra
    )
    write_predictions(run / "predictions.csv", "binary", arrays, meta)
    return run


@pytest.fixture
def runs(tmp_path):
    uni = [_run(tmp_path, "t1w", _scores(0.3, 1)), _run(tmp_path, "flair", _scores(0.8, 2))]
    mm = [_run(tmp_path, "avg", _scores(1.2, 3), "avg"), _run(tmp_path, "poe", _scores(2.0, 4), "poe")]
    return uni, mm


def test_gain_is_best_multimodal_minus_best_unimodal(runs):
    uni, mm = runs
    table = multimodal_gain(uni, mm, ["auroc", "auprc"], n_boot=300, n_perm=200)
    assert list(table["metric"]) == ["auroc", "ap"]
    best_uni, best_mm = _scores(0.8, 2), _scores(2.0, 4)
    for row, fn in zip(table.to_dict("records"), (roc_auc_score, average_precision_score)):
        assert Path(row["best_unimodal"]).name == "flair" and Path(row["best_multimodal"]).name == "poe"
        expected = fn(TARGET, best_mm) - fn(TARGET, best_uni)
        assert row["gain"] == pytest.approx(expected, abs=1e-6)
        assert row["gain"] == pytest.approx(row["multimodal_value"] - row["unimodal_value"], abs=1e-6)
        assert row["gain_ci_low"] <= row["gain"] <= row["gain_ci_high"]
        assert row["n_shared"] == N and 0 < row["p_value"] <= 1
    assert table.loc[0, "gain"] > 0 and table.loc[0, "gain_ci_low"] > 0  # a clear gain is detected


def test_gain_uses_only_shared_sessions(tmp_path, caplog):
    uni = [_run(tmp_path, "t1w", _scores(0.5, 1))]
    mm = [_run(tmp_path, "late", _scores(1.5, 3), "late", rows=slice(0, 40))]
    table = multimodal_gain(uni, mm, ["auroc"], n_boot=200, n_perm=100)
    row = table.iloc[0]
    assert row["n_shared"] == 40
    shared = slice(0, 40)
    expected = roc_auc_score(TARGET[shared], _scores(1.5, 3)[shared]) - roc_auc_score(
        TARGET[shared], _scores(0.5, 1)[shared]
    )
    assert row["gain"] == pytest.approx(expected, abs=1e-6)
    assert "shared" in caplog.text


def test_fusion_runs_given_as_unimodal_and_regression_metrics_are_rejected(runs):
    uni, mm = runs
    with pytest.raises(ValueError, match="fusion runs"):
        multimodal_gain(uni + mm[:1], mm, ["auroc"])
    with pytest.raises(ValueError, match="lower-is-better"):
        multimodal_gain(uni, mm, ["mae"])
    with pytest.raises(ValueError, match="no metric 'cindex'"):
        multimodal_gain(uni, mm, ["cindex"])


def test_cli_prints_and_writes_the_table(runs, tmp_path, capsys):
    uni, mm = runs
    out_csv, out_json = tmp_path / "gain.csv", tmp_path / "gain.json"
    args = ["--unimodal", *map(str, uni), "--multimodal", *map(str, mm), "--n-boot", "100", "--n-perm", "50"]
    assert main([*args, "--out", str(out_csv)]) == 0
    assert "best multimodal - best unimodal" in capsys.readouterr().out
    table = pd.read_csv(out_csv)
    assert list(table["metric"]) == ["auroc", "ap"]
    assert main([*args, "--metric", "auroc", "--out", str(out_json)]) == 0
    records = json.loads(out_json.read_text())
    assert len(records) == 1 and records[0]["gain"] == pytest.approx(table.loc[0, "gain"])
    with pytest.raises(SystemExit):
        main(["--help"])
