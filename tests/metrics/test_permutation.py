"""Paired permutation test: uniform p-values under the null, small p-values for a real difference."""

import numpy as np
import pytest
from scipy import stats

from neurojepa_pl.metrics.permutation import paired_permutation_test


def _mae(y, pred):
    return float(np.abs(y - pred).mean())


def test_p_values_are_uniform_under_the_null():
    rng = np.random.default_rng(0)
    p_values = []
    for replicate in range(200):
        y = rng.normal(size=30)
        # Two exchangeable models: same noise distribution around the truth.
        a = y + rng.normal(size=30)
        b = y + rng.normal(size=30)
        p_values.append(paired_permutation_test(_mae, y, a, b, n_perm=99, seed=replicate)[1])
    p_values = np.asarray(p_values)
    assert stats.kstest(p_values, "uniform").pvalue > 0.01
    assert 0.01 <= (p_values <= 0.05).mean() <= 0.11


def test_real_difference_gives_small_p_and_signed_delta():
    rng = np.random.default_rng(1)
    y = rng.normal(size=80)
    good = y + 0.2 * rng.normal(size=80)
    bad = y + 1.0 * rng.normal(size=80)
    delta, p = paired_permutation_test(_mae, y, good, bad, n_perm=999, seed=0)
    assert delta == pytest.approx(_mae(y, good) - _mae(y, bad))
    assert delta < 0
    assert p == pytest.approx(1 / 1000)  # no permutation is as extreme: the smallest attainable p


def test_identical_models_give_p_one_and_multi_column_predictions_swap_rows():
    y = np.arange(10) % 2
    probs = np.random.default_rng(0).random((10, 3))
    delta, p = paired_permutation_test(lambda t, s: float(s[np.arange(10), t].mean()), y, probs, probs, n_perm=50)
    assert delta == 0.0 and p == 1.0
    with pytest.raises(ValueError, match="same shape"):
        paired_permutation_test(_mae, y, probs, probs[:, :2])
