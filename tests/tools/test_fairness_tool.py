"""`neurojepa fairness RUN`: subgroup table and gaps of a test run, columns from the manifest recorded in
metrics.json, merged into metrics.json."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from neurojepa_pl.errors import UserKeyError, UserValueError
from neurojepa_pl.metrics.predictions import write_predictions
from neurojepa_pl.metrics.report import write_metrics_json
from neurojepa_pl.tools.fairness import main

N = 60


@pytest.fixture
def run(tmp_path):
    """A binary test run of 60 scans on 3 sites (site-2 has 6 scans) with sex and age in the manifest only."""
    rng = np.random.default_rng(0)
    target = np.arange(N) % 2
    site = np.array(["site-0"] * 30 + ["site-1"] * 24 + ["site-2"] * 6)
    score = 1 / (1 + np.exp(-(np.where(site == "site-0", 1.5, 0.5) * (2 * target - 1) + rng.standard_normal(N))))
    paths = [f"/data/sub-{i:03d}/anat/T1w.nii.gz" for i in range(N)]
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(
        {"subject_id": [f"{i:03d}" for i in range(N)], "session_id": "ses-01", "modality": "T1w", "path": paths,
         "site": site, "sex": np.where(np.arange(N) % 4 < 2, "F", "M"), "age": np.linspace(20, 85, N)}
    ).to_csv(manifest, index=False)  # fmt: skip
    folder = tmp_path / "run"
    meta = {"subject_id": [f"{i:03d}" for i in range(N)], "session_id": ["ses-01"] * N, "path": paths}
    write_predictions(folder / "predictions.csv", "binary", {"target": target, "score": score}, meta)
    write_metrics_json(folder / "metrics.json", {"auroc": (0.7, 0.6, 0.8)}, n=N, task="binary",
                       extra={"manifest": str(manifest)})  # fmt: skip
    return folder, target, score, site


def test_fairness_cli_reports_groups_gaps_and_flags(run, capsys):
    folder, target, score, site = run
    assert main([str(folder), "--n-boot", "200"]) == 0  # default columns: age, sex, site (from the manifest)
    text = capsys.readouterr().out
    assert "site-2" in text and "FLAGGED: n=6 < 10" in text and "gap (max - min over site-0, site-1)" in text
    fairness = json.loads((folder / "metrics.json").read_text())["fairness"]
    assert list(fairness["columns"]) == ["age", "sex", "site"]
    assert [g["group"] for g in fairness["columns"]["age"]["groups"]] == ["0-45", "45-65", "65+"]
    by_hand = [roc_auc_score(target[site == s], score[site == s]) for s in ("site-0", "site-1")]
    gap = fairness["columns"]["site"]["gap"]["auroc"]
    assert gap["value"] == pytest.approx(max(by_hand) - min(by_hand), abs=1e-6)
    assert gap["ci_low"] <= gap["value"] <= gap["ci_high"]
    assert (folder / "figures" / "fairness.png").is_file()


def test_fairness_cli_explains_missing_columns(run, tmp_path):
    folder, *_ = run
    with pytest.raises(UserKeyError, match="scanner"):
        main([str(folder), "--columns", "scanner", "--no-figure"])
    with pytest.raises(UserValueError, match="no predictions.csv"):
        main([str(tmp_path)])
