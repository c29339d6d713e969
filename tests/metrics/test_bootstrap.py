"""Percentile bootstrap: brackets the point estimate, matches the analytic spread of a mean, stratifies, seeds."""

import numpy as np
import pytest

from neurojepa_pl.metrics.bootstrap import bootstrap_ci, bootstrap_indices, bootstrap_metrics
from neurojepa_pl.metrics.classification import classification_metrics


def test_ci_brackets_point_and_matches_standard_error_of_the_mean():
    rng = np.random.default_rng(1)
    x = rng.normal(loc=3.0, scale=2.0, size=400)
    point, low, high = bootstrap_ci(np.mean, x, n_boot=2000, seed=0)
    assert point == pytest.approx(x.mean())
    assert low < point < high
    # Normal theory: the 95% interval is mean +- 1.96 * sd / sqrt(n).
    half_width = 1.96 * x.std(ddof=1) / np.sqrt(x.size)
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.1)


def test_same_seed_same_interval_and_different_seed_differs():
    x = np.random.default_rng(0).normal(size=50)
    assert bootstrap_ci(np.mean, x, n_boot=200, seed=3) == bootstrap_ci(np.mean, x, n_boot=200, seed=3)
    assert bootstrap_ci(np.mean, x, n_boot=200, seed=3) != bootstrap_ci(np.mean, x, n_boot=200, seed=4)


def test_stratified_indices_keep_stratum_sizes():
    strata = np.array([0] * 7 + [1] * 3)
    idx = bootstrap_indices(10, 50, np.random.default_rng(0), stratify=strata)
    assert idx.shape == (50, 10)
    assert (strata[idx] == 1).sum(axis=1).tolist() == [3] * 50


def test_multi_metric_bootstrap_of_auroc_with_stratification():
    rng = np.random.default_rng(0)
    y = np.array([0] * 40 + [1] * 10)
    scores = np.clip(0.3 * y + rng.normal(0.4, 0.2, size=50), 0, 1)
    out = bootstrap_metrics(lambda t, s: classification_metrics("binary", t, s), y, scores, n_boot=300, stratify=y)
    for name in ("auroc", "ap", "balanced_accuracy", "selection"):
        value, low, high = out[name]
        assert low <= value <= high
    assert out["auroc"][0] == pytest.approx(classification_metrics("binary", y, scores)["auroc"])


def _sometimes_undefined(defined_fraction, seed=0):
    """A mean that is defined on the full data (first call) and on about ``defined_fraction`` of later calls."""
    rng = np.random.default_rng(seed)
    calls = []

    def metric(a):
        calls.append(1)
        return float(a.mean()) if len(calls) == 1 or rng.random() < defined_fraction else float("nan")

    return metric


def test_undefined_resamples_warn_or_raise():
    x = np.random.default_rng(0).normal(size=20)
    with pytest.raises(ValueError, match="stratify"):
        bootstrap_ci(_sometimes_undefined(0.3), x, n_boot=200)
    with pytest.warns(UserWarning, match="reported as NaN"):
        point, low, high = bootstrap_ci(_sometimes_undefined(0.3), x, n_boot=200, too_few_finite="nan")
    assert point == pytest.approx(x.mean()) and np.isnan(low) and np.isnan(high)
    with pytest.warns(UserWarning, match="left out of the interval"):
        point, low, high = bootstrap_ci(_sometimes_undefined(0.8), x, n_boot=200)
    assert low < point < high


def test_mismatched_rows_raise():
    with pytest.raises(ValueError, match="same number of rows"):
        bootstrap_ci(lambda a, b: 0.0, np.zeros(3), np.zeros(4))
