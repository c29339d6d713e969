"""Subgroup metrics and fairness gaps: hand computations on small tables, flags, bins, the manifest join, the
bootstrap replicate against fairlearn's MetricFrame, and the merge into a run's metrics.json."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import MetricFrame
from sklearn.metrics import mean_absolute_error, roc_auc_score

from neurojepa_pl.metrics.fairness import (
    SubgroupColumn,
    _group_replicate,
    _metric_fns,
    evaluate_run_fairness,
    fairness_report,
    join_subgroup_columns,
    subgroup_fairness,
)
from neurojepa_pl.metrics.predictions import write_predictions
from neurojepa_pl.metrics.report import write_metrics_json


def _binary_table(seed: int = 0):
    """24 scans of site A (good separation) and 20 of site B (poor), half positive, plus 4 scans of a site C."""
    rng = np.random.default_rng(seed)
    target = np.array([0, 1] * 12 + [0, 1] * 10 + [0, 1, 1, 1])
    site = np.array(["A"] * 24 + ["B"] * 20 + ["C"] * 4)
    separation = np.where(site == "A", 2.0, 0.3)
    score = 1.0 / (1.0 + np.exp(-(separation * (2 * target - 1) + rng.standard_normal(target.size))))
    return target, score, site


def test_gap_is_max_minus_min_auroc_by_hand():
    target, score, site = _binary_table()
    result = subgroup_fairness("binary", {"target": target, "score": score}, site, "site", n_boot=200)
    by_hand = {s: roc_auc_score(target[site == s], score[site == s]) for s in ("A", "B")}
    groups = {g["group"]: g for g in result["groups"]}
    for s in ("A", "B"):
        assert groups[s]["metrics"]["auroc"]["value"] == pytest.approx(by_hand[s], abs=1e-6)
        assert groups[s]["n"] == (site == s).sum() and groups[s]["eligible"]
        value = groups[s]["metrics"]["auroc"]
        assert value["ci_low"] <= value["value"] <= value["ci_high"]
    gap = result["gap"]["auroc"]
    assert gap["value"] == pytest.approx(by_hand["A"] - by_hand["B"], abs=1e-6)
    assert 0.0 <= gap["ci_low"] <= gap["value"] <= gap["ci_high"]
    assert result["gap_groups"] == ["A", "B"]
    # Site C (4 scans, 1 negative) is reported, flagged, and left out of the gap.
    c = groups["C"]
    assert not c["eligible"] and c["metrics"]["auroc"]["ci_low"] is None
    assert c["flags"] == ["n=4 < 10", "rarest class has 1 < 5 scans"]
    assert c["positives"] == 3 and c["min_class"] == 1


def test_regression_gap_of_mae_and_mean_error_by_hand():
    target = np.arange(30, dtype=float)
    error = np.where(np.arange(30) < 15, 2.0, -5.0) * np.where(np.arange(30) % 2, 1.0, 0.5)
    sex = np.array(["F"] * 15 + ["M"] * 15)
    result = subgroup_fairness("regression", {"target": target, "prediction": target + error}, sex, "sex", n_boot=0)
    groups = {g["group"]: g["metrics"] for g in result["groups"]}
    mae = {s: mean_absolute_error(target[sex == s], (target + error)[sex == s]) for s in ("F", "M")}
    assert groups["F"]["mae"]["value"] == pytest.approx(mae["F"])
    assert groups["M"]["mean_error"]["value"] == pytest.approx(error[sex == "M"].mean())
    assert result["gap"]["mae"]["value"] == pytest.approx(abs(mae["F"] - mae["M"]))
    assert result["gap"]["mean_error"]["value"] == pytest.approx(error[sex == "F"].mean() - error[sex == "M"].mean())
    assert result["gap"]["mae"]["ci_low"] is None  # n_boot=0: point values only


def test_bootstrap_replicate_reproduces_metricframe():
    target, score, site = _binary_table(1)
    arrays = {"target": target, "score": score}
    rows = np.flatnonzero(site != "C")
    fns = _metric_fns("binary", arrays, ["auroc", "ap"], None)
    frame = MetricFrame(metrics=fns, y_true=rows, y_pred=rows, sensitive_features=pd.Series(site[rows], name="site"))
    replicate = _group_replicate(fns, site.astype(object), ["A", "B"])(rows)
    for group in ("A", "B"):
        for metric in ("auroc", "ap"):
            assert replicate[f"{metric}\x1f{group}"] == frame.by_group.loc[group, metric]
    for metric, gap in frame.difference(method="between_groups").items():
        assert replicate[f"{metric}\x1fgap"] == pytest.approx(gap, abs=1e-15)


def test_too_few_eligible_groups_give_no_gap_and_missing_values_are_counted():
    target, score, site = _binary_table()
    labels = np.where(site == "A", "A", None).astype(object)
    labels[:2] = None
    result = subgroup_fairness("binary", {"target": target, "score": score}, labels, "site", n_boot=0)
    assert result["gap"] is None and "fewer than two groups" in result["note"]
    assert result["n_missing"] == 26 and result["n"] == 22


def test_columns_bins_and_report_over_several_columns():
    assert SubgroupColumn.parse("age").edges == (0.0, 45.0, 65.0, math.inf)
    age = SubgroupColumn.parse("age:0:40:inf")
    assert age.spec() == "age:0:40:inf" and age.bin_names() == ["0-40", "40+"]
    assert age.labels(pd.Series([39.9, 40.0, None, 80])).tolist() == ["0-40", "40+", None, "40+"]
    assert SubgroupColumn.parse("site").labels(pd.Series(["s1", "", None, " s2"])).tolist() == ["s1", None, None, "s2"]
    with pytest.raises(ValueError, match="increasing"):
        SubgroupColumn.parse("age:50:40")
    target, score, site = _binary_table()
    frame = pd.DataFrame({"site": site, "age": np.linspace(20, 80, site.size)})
    report = fairness_report("binary", {"target": target, "score": score}, frame, ["site", "age:0:50:inf"], n_boot=50)
    assert set(report["columns"]) == {"site", "age"} and report["n_bootstrap"] == 50
    assert [g["group"] for g in report["columns"]["age"]["groups"]] == ["0-50", "50+"]
    with pytest.raises(KeyError, match="scanner"):
        fairness_report("binary", {"target": target, "score": score}, frame, ["scanner"])


def test_join_takes_missing_columns_from_the_manifest_by_path_or_session():
    predictions = pd.DataFrame({"subject_id": ["1", "2"], "session_id": ["a", "a"], "path": ["/x/1.nii", "/x/2.nii"]})
    manifest = pd.DataFrame(
        {
            "subject_id": ["1", "1", "2"],
            "session_id": ["a", "a", "a"],
            "path": ["/x/1.nii", "/x/1b.nii", "/x/2.nii"],
            "site": ["s1", "s1", "s2"],
        }
    )
    assert join_subgroup_columns(predictions, ["site"], manifest)["site"].tolist() == ["s1", "s2"]
    fused = predictions.assign(path=["/y/1.nii", "/y/2.nii"])  # not manifest paths: joined on the session
    assert join_subgroup_columns(fused, ["site"], manifest)["site"].tolist() == ["s1", "s2"]
    with pytest.raises(ValueError, match="no manifest row"):
        join_subgroup_columns(fused.assign(session_id=["a", "b"]), ["site"], manifest)
    with pytest.raises(KeyError, match="neither"):
        join_subgroup_columns(predictions, ["sex"], manifest)


def test_run_fairness_merges_into_metrics_json(tmp_path):
    target, score, site = _binary_table()
    paths = [f"/data/sub-{i:02d}_T1w.nii.gz" for i in range(target.size)]
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(
        {"subject_id": [f"{i:02d}" for i in range(target.size)], "session_id": "ses-01", "modality": "T1w",
         "path": paths, "site": site, "sex": np.where(np.arange(target.size) % 3, "F", "M")}
    ).to_csv(manifest, index=False)  # fmt: skip
    run = tmp_path / "run"
    meta = {"subject_id": [f"{i:02d}" for i in range(target.size)], "path": paths}
    write_predictions(run / "predictions.csv", "binary", {"target": target, "score": score}, meta)
    write_metrics_json(run / "metrics.json", {"auroc": (0.8, 0.7, 0.9)}, n=target.size, task="binary",
                       extra={"manifest": str(manifest)})  # fmt: skip
    report = evaluate_run_fairness(run, ["site", "sex"], n_boot=100)
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["metrics"]["auroc"]["value"] == 0.8 and saved["manifest"] == str(manifest)  # untouched
    assert saved["fairness"] == report and report["manifest"] == str(manifest)
    assert set(saved["fairness"]["columns"]) == {"site", "sex"}
    assert (run / "figures" / "fairness.png").stat().st_size > 5_000
