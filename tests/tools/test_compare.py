"""`neurojepa compare`: joins two runs' predictions and reports delta, CIs and the permutation p-value."""

from __future__ import annotations

import json

import numpy as np
import pytest

from neurojepa_pl.metrics.classification import classification_metrics
from neurojepa_pl.metrics.predictions import read_predictions, write_predictions
from neurojepa_pl.tools.compare import compare_runs, main


def _binary_runs(tmp_path, n=60):
    rng = np.random.default_rng(0)
    y = np.arange(n) % 2
    good = np.clip(0.25 + 0.5 * y + rng.normal(0, 0.15, n), 0, 1)
    bad = rng.random(n)
    meta = {
        "subject_id": [f"s{i}" for i in range(n)],
        "session_id": ["ses-01"] * n,
        "path": [f"/d/s{i}.nii.gz" for i in range(n)],
    }
    write_predictions(tmp_path / "a" / "predictions.csv", "binary", {"target": y, "score": good}, meta)
    # Run B lists the scans in another order: the join must pair them by path.
    order = rng.permutation(n)
    meta_b = {k: [v[i] for i in order] for k, v in meta.items()}
    write_predictions(tmp_path / "b" / "predictions.csv", "binary", {"target": y[order], "score": bad[order]}, meta_b)
    return y, good, bad


def test_binary_comparison_pairs_by_path_and_prints(tmp_path, capsys):
    y, good, bad = _binary_runs(tmp_path)
    assert (
        main(
            [
                str(tmp_path / "a"),
                str(tmp_path / "b"),
                "--n-perm",
                "199",
                "--n-boot",
                "200",
                "--json",
                str(tmp_path / "cmp.json"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "A - B" in printed and "p = 0.005" in printed  # 1 / (199 + 1): no permutation beats the observed gap
    result = json.loads((tmp_path / "cmp.json").read_text())
    expected = classification_metrics("binary", y, good)["auroc"] - classification_metrics("binary", y, bad)["auroc"]
    assert result["delta"][0] == pytest.approx(expected)
    assert result["delta"][1] <= result["delta"][0] <= result["delta"][2]
    assert result["n"] == 60 and result["metric"] == "auroc"


def test_same_run_has_zero_delta_and_p_one(tmp_path):
    _binary_runs(tmp_path)
    result = compare_runs(tmp_path / "a", tmp_path / "a" / "predictions.csv", metric="ap", n_perm=50, n_boot=50)
    assert result["delta"][0] == 0.0 and result["p_value"] == 1.0


def test_regression_and_survival_roundtrip(tmp_path):
    rng = np.random.default_rng(1)
    n = 40
    meta = {"path": [f"p{i}" for i in range(n)]}
    age = rng.uniform(20, 80, n)
    write_predictions(tmp_path / "ra.csv", "regression", {"target": age, "prediction": age + rng.normal(0, 2, n)}, meta)
    write_predictions(tmp_path / "rb.csv", "regression", {"target": age, "prediction": age + rng.normal(0, 8, n)}, meta)
    result = compare_runs(tmp_path / "ra.csv", tmp_path / "rb.csv", n_perm=199, n_boot=100)
    assert result["metric"] == "mae" and result["delta"][0] < 0 and result["p_value"] < 0.05
    time, event = rng.exponential(100, n), (rng.random(n) < 0.7).astype(int)
    write_predictions(tmp_path / "sa.csv", "survival", {"time": time, "event": event, "risk": -time}, meta)
    write_predictions(tmp_path / "sb.csv", "survival", {"time": time, "event": event, "risk": rng.normal(size=n)}, meta)
    task, arrays, _, _ = read_predictions(tmp_path / "sa.csv")
    assert task == "survival" and arrays["event"].tolist() == event.tolist()
    result = compare_runs(tmp_path / "sa.csv", tmp_path / "sb.csv", n_perm=199, n_boot=100)
    assert result["metric"] == "cindex" and result["a"][0] == 1.0 and result["p_value"] < 0.05


def test_mismatched_targets_and_tasks_are_refused(tmp_path):
    meta = {"path": ["x", "y", "z", "w"]}
    write_predictions(tmp_path / "a.csv", "binary", {"target": np.array([0, 1, 0, 1]), "score": np.full(4, 0.5)}, meta)
    write_predictions(tmp_path / "b.csv", "binary", {"target": np.array([1, 1, 0, 1]), "score": np.full(4, 0.5)}, meta)
    with pytest.raises(ValueError, match="different targets"):
        compare_runs(tmp_path / "a.csv", tmp_path / "b.csv", n_perm=10, n_boot=10)
    write_predictions(tmp_path / "r.csv", "regression", {"target": np.ones(4), "prediction": np.ones(4)}, meta)
    with pytest.raises(ValueError, match="same task"):
        compare_runs(tmp_path / "a.csv", tmp_path / "r.csv", n_perm=10, n_boot=10)
    with pytest.raises(FileNotFoundError, match="neurojepa test"):
        compare_runs(tmp_path / "missing", tmp_path / "a.csv")


def test_rank_metrics_permute_within_model_ranks_so_score_scales_do_not_matter(tmp_path):
    # A ranks well with probabilities in 0.6-1; B is uninformative with every probability in 0.50-0.51 (as a barely
    # trained probe against a fusion model in the multimodal demo). Swapping raw scores puts every A value above every
    # B value, so a swapped array's AUROC says which samples were swapped, not how good either model is, and the gap
    # drowns; swapping ranks does not.
    rng = np.random.default_rng(3)
    n = 50
    y = np.arange(n) % 2
    a = 0.6 + 0.4 * np.clip(0.3 + 0.4 * y + rng.normal(0, 0.15, n), 0, 1)
    b = 0.5 + 0.01 * rng.random(n)
    meta = {
        "subject_id": [f"s{i}" for i in range(n)],
        "session_id": ["ses-01"] * n,
        "path": [f"/d/s{i}.nii.gz" for i in range(n)],
    }
    for name, score in (("a", a), ("b", b)):
        write_predictions(tmp_path / name / "predictions.csv", "binary", {"target": y, "score": score}, meta)
    result = compare_runs(tmp_path / "a", tmp_path / "b", "auroc", n_perm=999, n_boot=200)
    expected = classification_metrics("binary", y, a)["auroc"] - classification_metrics("binary", y, b)["auroc"]
    assert result["delta"][0] == pytest.approx(expected) and expected > 0.35  # ranks leave the observed gap as is
    assert result["permuted"] == "within-model ranks"
    assert result["p_value"] < 0.01 and result["delta"][1] > 0
    # The same data through a raw-score swap: an order of magnitude larger p-value (0.019 here; 0.148 vs 0.001 on the
    # multimodal demo's late-fusion vs T1w-only test predictions).
    from neurojepa_pl.metrics.permutation import paired_permutation_test

    raw = paired_permutation_test(lambda t, s: classification_metrics("binary", t, s)["auroc"], y, a, b, n_perm=999)
    assert raw[1] > 10 * result["p_value"]
    thresholded = compare_runs(tmp_path / "a", tmp_path / "b", "balanced_accuracy", n_perm=99, n_boot=50)
    assert thresholded["permuted"] == "raw predictions"  # not rank-invariant: the scores themselves are swapped
