"""C-index wraps sksurv (and has the right sign), Kaplan-Meier median split and log-rank."""

import numpy as np
import pytest
from sksurv.metrics import concordance_index_censored

from neurojepa_pl.metrics.survival import concordance_index, kaplan_meier_by_risk_group


def test_hand_example_sign():
    time = np.array([1.0, 2.0, 3.0, 4.0])
    event = np.array([1, 1, 0, 1])
    # Comparable pairs (event at the earlier time): (0,1) (0,2) (0,3) (1,2) (1,3); (2,3) is not (2 censored).
    assert concordance_index(time, event, risk=np.array([4.0, 3.0, 2.0, 1.0])) == 1.0
    assert concordance_index(time, event, risk=np.array([1.0, 2.0, 3.0, 4.0])) == 0.0
    # Risk ties count one half: pair (0,1) tied -> 4.5 / 5.
    assert concordance_index(time, event, risk=np.array([3.0, 3.0, 2.0, 1.0])) == pytest.approx(0.9)


def test_equals_sksurv_on_random_predictions():
    rng = np.random.default_rng(0)
    time = rng.integers(1, 20, size=200).astype(float)
    event = rng.random(200) < 0.6
    risk = -time + rng.normal(scale=5, size=200)
    expected = concordance_index_censored(event, time, risk)[0]
    assert concordance_index(time, event.astype(int), risk) == pytest.approx(expected, abs=1e-15)
    assert concordance_index(time, event, risk) > 0.6


def test_undefined_cases_are_nan():
    assert np.isnan(concordance_index([1.0, 2.0], [0, 0], [1.0, 2.0]))
    assert np.isnan(concordance_index([1.0, 1.0], [1, 1], [1.0, 2.0]))


def test_kaplan_meier_median_split_separates_groups():
    rng = np.random.default_rng(0)
    risk = np.repeat([0.0, 1.0], 50)
    time = np.where(risk > 0, rng.exponential(2.0, 100), rng.exponential(20.0, 100))
    event = rng.random(100) < 0.9
    split = kaplan_meier_by_risk_group(time, event, risk + rng.normal(scale=1e-3, size=100))
    assert split.n_low == split.n_high == 50
    assert split.logrank_p < 1e-6
    # Survival is a non-increasing step function starting at or below 1, and the high-risk group dies faster.
    assert np.all(np.diff(split.high_survival) <= 0) and split.high_survival[0] <= 1
    t = 3.0
    s_low = split.low_survival[split.low_time <= t][-1]
    s_high = split.high_survival[split.high_time <= t][-1]
    assert s_high < s_low
    with pytest.raises(ValueError, match="group empty"):
        kaplan_meier_by_risk_group(time, event, np.ones(100))
