"""Linear probes under repeated subject-grouped CV: folds, planted signals, noise bands, paired differences."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from neurojepa_pl.metrics.probes import (
    cross_validated_scores,
    fit_linear_probe,
    noise_band,
    paired_fold_difference,
    probe_metric,
    probe_scores,
    repeated_grouped_folds,
)


def _cohort(n_subjects: int = 30, seed: int = 0):
    """1-3 sessions per subject; a per-subject binary label and a per-session continuous one."""
    rng = np.random.default_rng(seed)
    sessions = rng.integers(1, 4, size=n_subjects)
    groups = np.repeat([f"sub-{i:02d}" for i in range(n_subjects)], sessions)
    subject_label = rng.permutation(np.arange(n_subjects) % 2)
    y_binary = np.repeat(subject_label, sessions)
    y_continuous = rng.normal(50.0, 10.0, size=groups.size)
    return groups, y_binary, y_continuous, rng


@pytest.mark.parametrize("task", ["binary", "continuous"])
def test_folds_never_split_a_subject_and_partition_each_repeat(task):
    groups, y_binary, y_continuous, _ = _cohort()
    y = y_binary if task == "binary" else y_continuous
    folds = repeated_grouped_folds(y, groups, task, n_splits=5, n_repeats=3, seed=7)
    assert len(folds) == 15 and [(f.repeat, f.index) for f in folds[:6]] == [(0, i) for i in range(5)] + [(1, 0)]
    for fold in folds:
        assert not set(groups[fold.train]) & set(groups[fold.test])  # no subject on both sides
        assert np.intersect1d(fold.train, fold.test).size == 0
        assert fold.train.size + fold.test.size == y.size
        if task == "binary":
            assert set(y[fold.test]) == {0, 1}  # stratified: AUROC defined on every test fold
    for repeat in range(3):
        tests = np.concatenate([f.test for f in folds if f.repeat == repeat])
        np.testing.assert_array_equal(np.sort(tests), np.arange(y.size))
    # Repeats are different partitions; the same seed gives the same folds, another seed other folds.
    assert not all(np.array_equal(a.test, b.test) for a, b in zip(folds[:5], folds[5:10]))
    again = repeated_grouped_folds(y, groups, task, n_splits=5, n_repeats=3, seed=7)
    assert all(np.array_equal(a.test, b.test) for a, b in zip(folds, again))
    other = repeated_grouped_folds(y, groups, task, n_splits=5, n_repeats=3, seed=8)
    assert not all(np.array_equal(a.test, b.test) for a, b in zip(folds, other))


def test_fold_errors_name_the_fix():
    groups, y_binary, y_continuous, _ = _cohort(n_subjects=4)
    with pytest.raises(ValueError, match="4 subjects cannot fill 5"):
        repeated_grouped_folds(y_continuous, groups, "continuous", n_splits=5)
    y_rare = np.zeros(groups.size, dtype=int)
    y_rare[groups == groups[0]] = 1
    with pytest.raises(ValueError, match="class 1 occurs in only 1 subjects"):
        repeated_grouped_folds(y_rare, groups, "binary", n_splits=3)
    with pytest.raises(ValueError, match="task"):
        repeated_grouped_folds(y_binary, groups, "survival", n_splits=2)


@pytest.mark.parametrize("task", ["binary", "continuous"])
def test_planted_signal_is_found_and_shuffled_labels_are_at_chance(task):
    groups, y_binary, y_continuous, rng = _cohort(n_subjects=40)
    y = y_binary if task == "binary" else y_continuous
    noise = rng.standard_normal((y.size, 20))
    signal = (y - y.mean()) / y.std()
    x = np.column_stack([signal + 0.05 * rng.standard_normal(y.size), noise])  # column 0 encodes the label
    folds = repeated_grouped_folds(y, groups, task, n_splits=5, n_repeats=3, seed=0)
    planted = cross_validated_scores(x, y, groups, task, folds, seed=0)
    assert planted.shape == (15,) and np.isfinite(planted).all()
    assert planted.mean() > 0.98  # AUROC or R² near 1

    # Shuffled labels, made exactly uncorrelated with the planted column so that chance is chance in this sample
    # too: binary, half of each class's subjects relabelled 1; continuous, a permutation minus its projection on y.
    # One small cohort's CV score of a signal-free probe scatters by ~0.08 AUROC, so four shuffles are averaged.
    chance = [
        cross_validated_scores(x, y_s, groups, task, _folds(y_s, groups, task), seed=0).mean()
        for y_s in _shuffles(y, groups, task, rng, 4)
    ]
    if task == "binary":
        assert abs(np.mean(chance) - 0.5) < 0.1 and all(0.25 < c < 0.75 for c in chance)
    else:
        assert np.mean(chance) < 0.05 and max(chance) < 0.15  # R² of a probe without signal: at or below 0
    # Reproducible: the same folds and seed give the same scores.
    np.testing.assert_array_equal(planted, cross_validated_scores(x, y, groups, task, folds, seed=0))


def _folds(y, groups, task):
    return repeated_grouped_folds(y, groups, task, n_splits=5, n_repeats=1, seed=0)


def _shuffles(y, groups, task, rng, n):
    out = []
    for _ in range(n):
        if task == "binary":
            subjects, first = np.unique(groups, return_index=True)
            relabelled = {}
            for value in (0, 1):
                members = rng.permutation(subjects[y[first] == value])
                relabelled.update({s: int(i < members.size // 2) for i, s in enumerate(members)})
            out.append(np.array([relabelled[g] for g in groups]))
        else:
            permuted, centred = y[rng.permutation(y.size)] - y.mean(), y - y.mean()
            out.append(y.mean() + permuted - centred * (permuted @ centred) / (centred @ centred))
    return out


def test_probe_standardises_and_scores():
    groups, y, _, rng = _cohort(n_subjects=20)
    x = np.column_stack([1e4 * (y + 0.3 * rng.standard_normal(y.size)), rng.standard_normal(y.size)])
    probe = fit_linear_probe(x, y, groups, "binary")
    scores = probe_scores(probe, x, "binary")
    assert scores.shape == y.shape and ((scores >= 0) & (scores <= 1)).all()
    assert probe_metric("binary", y, scores) > 0.9
    assert math.isnan(probe_metric("binary", np.ones(4), np.linspace(0, 1, 4)))  # one class: undefined
    with pytest.raises(ValueError, match="NaN or Inf"):
        fit_linear_probe(np.full_like(x, np.nan), y, groups, "binary")


def test_noise_band_spans_its_members():
    members = [np.array([0.6, 0.7]), np.array([0.5, 0.5]), np.array([0.8, 0.9])]
    band = noise_band(members)
    assert band.members == pytest.approx((0.65, 0.5, 0.85))
    assert (band.low, band.high, band.mean, band.best) == (
        pytest.approx(0.5),
        pytest.approx(0.85),
        pytest.approx(2 / 3),
        2,
    )
    with pytest.raises(ValueError, match="at least 2"):
        noise_band(members[:1])


def test_paired_difference_uses_the_corrected_repeated_cv_variance():
    groups, _, y, rng = _cohort(n_subjects=30)
    folds = repeated_grouped_folds(y, groups, "continuous", n_splits=5, n_repeats=4, seed=0)
    b = rng.uniform(0.5, 0.7, size=len(folds))
    a = b + 0.05 + 0.01 * rng.standard_normal(len(folds))
    diff = paired_fold_difference(a, b, folds)
    d = a - b
    j = d.size
    ratio = np.mean([f.test.size / f.train.size for f in folds])
    half = stats.t.ppf(0.975, j - 1) * math.sqrt((1 / j + ratio) * d.var(ddof=1))
    assert diff.mean == pytest.approx(d.mean())
    assert (diff.ci_low, diff.ci_high) == (pytest.approx(d.mean() - half), pytest.approx(d.mean() + half))
    naive = stats.t.ppf(0.975, j - 1) * d.std(ddof=1) / math.sqrt(j)
    assert half > 2 * naive  # the correction matters: folds share training rows
    assert diff.above_zero and diff.n_folds == j

    # No real difference: the interval covers 0. Identical scores: a zero-width interval that is not above 0.
    noise = b + 0.01 * rng.standard_normal(len(folds))
    assert paired_fold_difference(noise, b, folds).ci_low < 0 < paired_fold_difference(noise, b, folds).ci_high
    same = paired_fold_difference(b, b, folds)
    assert same.mean == 0 and not same.above_zero
    # Undefined folds drop out of the pairing.
    a_nan = a.copy()
    a_nan[0] = np.nan
    assert paired_fold_difference(a_nan, b, folds).n_folds == j - 1
    with pytest.raises(ValueError, match="one score per fold"):
        paired_fold_difference(a[:-1], b, folds)
