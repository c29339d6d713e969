"""Statistics that warn (issue 18 item 6): metrics on tiny test sets and degenerate bootstrap intervals are flagged
in metrics.json, in the log and in the printed table; adequate test sets are not."""

import json
import logging

import numpy as np
import pytest

from neurojepa_pl.metrics.bootstrap import bootstrap_metrics
from neurojepa_pl.metrics.reliability import (
    MIN_CLASS_CASES,
    MIN_EVENTS,
    MIN_REGRESSION_SAMPLES,
    WARNING_CODES,
    MetricResults,
    MetricWarning,
    interval_warnings,
    sample_size_warnings,
)
from neurojepa_pl.metrics.report import format_metrics_table, read_metrics_json, write_metrics_json
from neurojepa_pl.metrics.tasks import bootstrap_task_metrics

SAMPLE_SIZE_CODES = {"few_positives", "few_negatives", "few_cases_per_class", "few_samples", "few_events"}


def _codes(entry_warnings):
    return [w["code"] if isinstance(w, dict) else w.code for w in entry_warnings]


def _report(tmp_path, task, arrays, n_boot=300, **kwargs):
    results = bootstrap_task_metrics(task, arrays, n_boot=n_boot, **kwargs)
    n = len(next(iter(arrays.values())))
    write_metrics_json(tmp_path / "metrics.json", results, n=n, task=task, n_bootstrap=n_boot, ci_level=0.95)
    return read_metrics_json(tmp_path / "metrics.json")


def test_three_positive_test_set_is_flagged_in_metrics_json_log_and_table(tmp_path, caplog):
    """The issue's case: 3 positives perfectly ranked give AUROC 1.0 with a CI of [1.0, 1.0]; now it is flagged."""
    rng = np.random.default_rng(0)
    target = np.array([1] * 3 + [0] * 45)
    score = np.where(target == 1, 0.9, 0.1) + rng.normal(0, 0.05, target.size)
    with caplog.at_level(logging.WARNING, logger="neurojepa_pl.metrics.report"):
        report = _report(tmp_path, "binary", {"target": target, "score": score})
    auroc = report["metrics"]["auroc"]
    assert auroc["value"] == 1.0 and auroc["ci_low"] == pytest.approx(1.0) and auroc["ci_high"] == 1.0
    assert _codes(auroc["warnings"]) == ["few_positives", "degenerate_ci"]
    assert auroc["warnings"][0]["message"].startswith("only 3 positive cases in the test set (fewer than 10)")
    assert "[1.000, 1.000] has zero width" in auroc["warnings"][1]["message"]
    for name in ("ap", "balanced_accuracy", "selection"):  # every binary metric rests on the same 3 positives
        assert "few_positives" in _codes(report["metrics"][name]["warnings"])
    assert all("few_negatives" not in _codes(e["warnings"]) for e in report["metrics"].values())  # 45 negatives

    table = format_metrics_table(report)
    auroc_row = next(line for line in table.splitlines() if line.startswith("auroc "))
    assert auroc_row.split() == ["auroc", "1.000", "[1.000,", "1.000]", "!", "few_positives,", "degenerate_ci"]
    assert "auroc, ap, balanced_accuracy, selection: only 3 positive cases" in table
    logged = [r.getMessage() for r in caplog.records]
    assert any("metrics.json: auroc, ap, balanced_accuracy, selection: only 3 positive cases" in m for m in logged)


def test_balanced_50_50_test_set_is_not_flagged(tmp_path, caplog):
    rng = np.random.default_rng(1)
    target = np.array([1] * 50 + [0] * 50)
    score = np.clip(0.3 * target + rng.normal(0.35, 0.2, target.size), 0, 1)
    with caplog.at_level(logging.WARNING, logger="neurojepa_pl.metrics.report"):
        report = _report(tmp_path, "binary", {"target": target, "score": score})
    assert {name: e["warnings"] for name, e in report["metrics"].items()} == {
        name: [] for name in ("auroc", "ap", "balanced_accuracy", "selection")
    }
    assert 0.8 < report["metrics"]["auroc"]["value"] < 0.95
    table = format_metrics_table(report)
    assert "!" not in table and len(table.splitlines()) == 2 + 4
    assert not caplog.records


@pytest.mark.parametrize("positives, flagged", [(MIN_CLASS_CASES - 1, True), (MIN_CLASS_CASES, False)])
def test_binary_threshold_is_ten_cases_of_each_class(positives, flagged):
    target = np.array([1] * positives + [0] * 40)
    warnings = sample_size_warnings("binary", {"target": target}, ["auroc", "ap"])
    assert (_codes(warnings["auroc"]) == ["few_positives"]) is flagged and warnings["auroc"] == warnings["ap"]
    negatives_only = sample_size_warnings("binary", {"target": 1 - target}, ["auroc"])
    assert (_codes(negatives_only["auroc"]) == ["few_negatives"]) is flagged


def test_multiclass_flags_the_small_class_and_the_macro_averages(tmp_path):
    rng = np.random.default_rng(2)
    target = np.array([0] * 30 + [1] * 25 + [2] * 4)
    score = rng.dirichlet([1.0, 1.0, 1.0], target.size)
    report = _report(tmp_path, "multiclass", {"target": target, "score": score}, class_names=["cn", "mci", "ad"])
    metrics = report["metrics"]
    for name in ("auroc/ad", "ap/ad", "balanced_accuracy/ad"):
        assert metrics[name]["warnings"][0] == {
            "code": "few_cases_per_class",
            "message": "class 'ad' has 4 test cases (fewer than 10): its value and interval rest on too few cases "
            "to be trusted.",
        }
    for name in ("auroc/cn", "auroc/mci", "ap/mci"):
        assert not set(_codes(metrics[name]["warnings"])) & SAMPLE_SIZE_CODES
    assert metrics["auroc"]["warnings"][0]["message"].startswith("class 'ad' (4) of 3 has fewer than 10 test cases")
    assert "auroc/ad" in format_metrics_table(report) and "auroc/ad" not in format_metrics_table(report, False)


def test_multilabel_counts_observed_labels_only():
    target = np.zeros((40, 2), dtype=int)
    target[:12, 0] = 1  # label 'wmh': 12 positives
    target[:15, 1] = 1  # label 'tumour': 15 positives, but only 5 of them observed
    mask = np.ones_like(target, dtype=bool)
    mask[5:15, 1] = False
    names = ["auroc", "auroc/wmh", "auroc/tumour", "ap/tumour"]
    warnings = sample_size_warnings("multilabel", {"target": target, "mask": mask}, names, ["wmh", "tumour"])
    assert warnings["auroc/wmh"] == []
    assert _codes(warnings["auroc/tumour"]) == ["few_positives"] and warnings["ap/tumour"] == warnings["auroc/tumour"]
    assert warnings["auroc/tumour"][0].message.startswith("label 'tumour': only 5 positive cases")
    assert warnings["auroc"][0].message.startswith("label 'tumour' (5) of 2 has fewer than 10 positive cases")


@pytest.mark.parametrize("n", [MIN_REGRESSION_SAMPLES - 1, MIN_REGRESSION_SAMPLES])
def test_regression_needs_twenty_samples(tmp_path, n):
    rng = np.random.default_rng(3)
    target = rng.normal(70, 10, n)
    report = _report(tmp_path, "regression", {"target": target, "prediction": target + rng.normal(0, 3, n)})
    codes = {name: _codes(e["warnings"]) for name, e in report["metrics"].items()}
    if n < MIN_REGRESSION_SAMPLES:
        assert codes == {name: ["few_samples"] for name in ("mae", "rmse", "r2", "selection")}
        assert report["metrics"]["mae"]["warnings"][0]["message"].startswith(f"only {n} test samples (fewer than 20)")
    else:
        assert codes == {name: [] for name in ("mae", "rmse", "r2", "selection")}


@pytest.mark.parametrize("events", [MIN_EVENTS - 1, MIN_EVENTS])
def test_cindex_needs_ten_events(tmp_path, events):
    rng = np.random.default_rng(4)
    n = 60
    time = rng.exponential(10, n)
    event = np.zeros(n, dtype=int)
    event[:events] = 1
    report = _report(tmp_path, "survival", {"time": time, "event": event, "risk": -time + rng.normal(0, 5, n)})
    codes = _codes(report["metrics"]["cindex"]["warnings"])
    assert ("few_events" in codes) is (events < MIN_EVENTS)
    if events < MIN_EVENTS:
        assert report["metrics"]["cindex"]["warnings"][0]["message"].startswith(
            f"only {events} observed events among {n} test cases (fewer than 10)"
        )


def _sometimes_undefined(defined_fraction, seed=0):
    rng = np.random.default_rng(seed)
    calls = []

    def metric(a):
        calls.append(1)
        return {"m": float(a.mean()) if len(calls) == 1 or rng.random() < defined_fraction else float("nan")}

    return metric


def test_bootstrap_counts_finite_resamples_and_flags_intervals_on_too_few():
    x = np.random.default_rng(0).normal(size=30)
    with pytest.warns(UserWarning, match="left out of the interval"):
        shaky = bootstrap_metrics(_sometimes_undefined(0.7), x, n_boot=400)
    assert isinstance(shaky, MetricResults) and shaky.n_boot == 400
    assert 0.6 * 400 < shaky.n_finite["m"] < 0.8 * 400
    assert _codes(shaky.warnings["m"]) == ["few_valid_resamples"]
    assert shaky.warnings["m"][0].message.startswith(f"the interval rests on only {shaky.n_finite['m']} of 400")
    with pytest.warns(UserWarning, match="reported as NaN"):
        hopeless = bootstrap_metrics(_sometimes_undefined(0.2), x, n_boot=400, too_few_finite="nan")
    assert (
        _codes(hopeless.warnings["m"]) == ["ci_undefined"] and "resamples finite" in hopeless.warnings["m"][0].message
    )
    fine = bootstrap_metrics(lambda a: {"m": float(a.mean())}, x, n_boot=400)
    assert fine.n_finite == {"m": 400} and fine.warnings == {"m": []}


def test_interval_warnings_without_bootstrap_details():
    warnings = interval_warnings(
        {
            "ok": (0.8, 0.7, 0.9),
            "flat": (1.0, 1.0, 1.0),
            "no_ci": (0.8, float("nan"), float("nan")),
            "nan": (float("nan"),) * 3,
        }
    )
    assert {k: _codes(v) for k, v in warnings.items()} == {
        "ok": [],
        "flat": ["degenerate_ci"],
        "no_ci": ["ci_undefined"],
        "nan": ["undefined"],
    }


def test_write_metrics_json_reads_warnings_from_a_plain_dict_or_an_explicit_argument(tmp_path):
    path = tmp_path / "metrics.json"
    data = write_metrics_json(path, {"auroc": (1.0, 1.0, 1.0), "ap": (0.7, 0.6, 0.8)}, n=20, task="binary")
    assert _codes(data["metrics"]["auroc"]["warnings"]) == ["degenerate_ci"] and data["metrics"]["ap"]["warnings"] == []
    explicit = {"ap": [MetricWarning("few_positives", "only 2 positive cases")]}
    data = write_metrics_json(
        path, {"auroc": (1.0, 1.0, 1.0), "ap": (0.7, 0.6, 0.8)}, n=20, task="binary", warnings=explicit
    )
    assert data["metrics"]["auroc"]["warnings"] == []
    assert data["metrics"]["ap"]["warnings"] == [{"code": "few_positives", "message": "only 2 positive cases"}]
    assert json.loads(path.read_text()) == data


def test_every_code_is_documented_and_unknown_codes_are_refused():
    assert SAMPLE_SIZE_CODES | {"undefined", "ci_undefined", "few_valid_resamples", "degenerate_ci"} == set(
        WARNING_CODES
    )
    with pytest.raises(ValueError, match="unknown metric warning code 'tiny'"):
        MetricWarning("tiny", "?")
