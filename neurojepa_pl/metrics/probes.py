"""Linear probes of frozen features under repeated subject-grouped cross-validation, and how to compare them.

The statistics behind ``neurojepa learning-curve`` (and the online monitor's ``probe="linear"`` mode):

* :func:`repeated_grouped_folds`: ``n_repeats`` x ``n_splits`` folds in which no subject is ever on both sides
  (scikit-learn's ``StratifiedGroupKFold`` for binary labels, ``GroupKFold`` for continuous ones, reshuffled per
  repeat from ``seed``). Every feature set of one label is scored on the *same* folds, so fold scores pair up.
* :func:`fit_linear_probe`: standardisation + logistic regression (binary) or ridge regression (continuous), with the
  L2 strength chosen by an inner subject-grouped CV on the training rows only (nested: test rows never choose it).
* :func:`cross_validated_scores`: the probe's test metric on every fold (AUROC for binary labels, R² for continuous;
  R² is taken per test fold, against that fold's own mean, so folds of a handful of scans score a probe that only
  knows the training mean well below 0).
* :func:`noise_band`: the spread of several random-init encoders (what differs between random seeds alone).
* :func:`paired_fold_difference`: mean paired fold difference of two feature sets with a 95% CI from the corrected
  resampled t-test (Nadeau & Bengio 2003), because the folds of repeated CV share training rows and a plain t-interval
  over them is far too narrow.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import sklearn
from scipy import stats
from sklearn.linear_model import LogisticRegressionCV, RidgeCV
from sklearn.metrics import r2_score, roc_auc_score
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.parallel import Parallel, delayed

__all__ = [
    "ProbeTask",
    "METRICS",
    "LOGISTIC_CS",
    "RIDGE_ALPHAS",
    "Fold",
    "repeated_grouped_folds",
    "fit_linear_probe",
    "probe_scores",
    "probe_metric",
    "cross_validated_scores",
    "NoiseBand",
    "noise_band",
    "PairedDifference",
    "paired_fold_difference",
]

ProbeTask = Literal["binary", "continuous"]

METRICS: dict[str, str] = {"binary": "auroc", "continuous": "r2"}
"""The metric each task is scored with (AUROC: 0.5 is chance; R²: 0 is the training mean)."""

LOGISTIC_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 1, 6))
"""Inverse L2 strengths the inner CV chooses from (on standardised features)."""

RIDGE_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-2, 5, 8))
"""Ridge L2 strengths the inner CV chooses from (on standardised features)."""


def _seed(*words: int) -> int:
    # A 32-bit seed that is a pure function of the words, independent streams for different words.
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1)[0])


def _check_task(task: str) -> None:
    if task not in METRICS:
        raise ValueError(f"probe task must be one of {sorted(METRICS)}; got {task!r}.")


@dataclass(frozen=True)
class Fold:
    """One train/test split of repeated cross-validation: row indices into the probed arrays.

    Attributes:
        repeat: repetition index (0-based); each repetition partitions the rows anew.
        index: fold index within the repetition.
        train: int64 row indices ``[n_train]``.
        test: int64 row indices ``[n_test]``.
    """

    repeat: int
    index: int
    train: np.ndarray
    test: np.ndarray


def _splitter(task: str, n_splits: int, seed: int) -> GroupKFold | StratifiedGroupKFold:
    if task == "binary":
        return StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return GroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)


def _check_groups(y: np.ndarray, groups: np.ndarray, task: str, n_splits: int, what: str) -> None:
    n_groups = np.unique(groups).size
    if n_groups < n_splits:
        raise ValueError(
            f"{what}: {n_groups} subjects cannot fill {n_splits} subject-grouped folds; use fewer folds "
            "(--folds) or more subjects."
        )
    if task == "binary":
        classes = np.unique(y)
        if classes.size != 2:
            raise ValueError(f"{what}: a binary probe needs both classes 0 and 1; found {classes.tolist()}.")
        for value in classes:
            n = np.unique(groups[y == value]).size
            if n < n_splits:
                raise ValueError(
                    f"{what}: class {value:g} occurs in only {n} subjects, fewer than the {n_splits} folds, so some "
                    "test folds would lack it (AUROC undefined); use fewer folds (--folds) or more subjects."
                )


def repeated_grouped_folds(
    y: np.ndarray, groups: Sequence, task: ProbeTask, n_splits: int = 5, n_repeats: int = 5, seed: int = 0
) -> list[Fold]:
    """Repeated subject-grouped K-fold splits: all rows of a subject are on one side of every fold.

    Args:
        y: labels ``[n]`` (0/1 for ``binary``; stratified so that each test fold holds both classes).
        groups: subject of each row ``[n]``.
        task: ``"binary"`` or ``"continuous"``.
        n_splits: folds per repetition.
        n_repeats: repetitions, each a fresh shuffled partition.
        seed: the folds are a pure function of ``(y, groups, seed)``.

    Returns:
        ``n_repeats * n_splits`` folds, repetition-major; each repetition's test folds partition the rows.

    Raises:
        ValueError: with fewer subjects (or, for binary labels, fewer subjects of a class) than folds.
    """
    _check_task(task)
    y, groups = np.asarray(y), np.asarray(groups)
    if y.ndim != 1 or groups.shape != y.shape:
        raise ValueError(f"y and groups must be 1-D of one length; got shapes {y.shape} and {groups.shape}.")
    if n_splits < 2 or n_repeats < 1:
        raise ValueError(f"need n_splits >= 2 and n_repeats >= 1; got {n_splits} and {n_repeats}.")
    _check_groups(y, groups, task, n_splits, "cross-validation")
    folds = []
    for repeat in range(n_repeats):
        splitter = _splitter(task, n_splits, _seed(seed, repeat))
        for index, (train, test) in enumerate(splitter.split(np.zeros((y.size, 1)), y, groups)):
            folds.append(Fold(repeat, index, train.astype(np.int64), test.astype(np.int64)))
    return folds


def _logistic_kwargs() -> dict:
    # scikit-learn >= 1.8 warns unless these are stated; older releases (>= 1.4, the project's floor) lack them.
    params = inspect.signature(LogisticRegressionCV).parameters
    extra: dict = {}
    if "use_legacy_attributes" in params:
        extra["use_legacy_attributes"] = False
    if "l1_ratios" in params and params["l1_ratios"].default == "warn":
        extra["l1_ratios"] = (0.0,)  # pure L2
    return extra


def fit_linear_probe(
    x: np.ndarray, y: np.ndarray, groups: Sequence, task: ProbeTask, inner_splits: int = 3, seed: int = 0
) -> Pipeline:
    """Standardise, then fit logistic (binary) or ridge (continuous) regression with a nested choice of L2 strength.

    The strength (:data:`LOGISTIC_CS` / :data:`RIDGE_ALPHAS`) is chosen by ``inner_splits``-fold subject-grouped CV
    on these rows, then the probe is refit on all of them. Feature sets of different widths (64 ViT channels, 576
    average-pool cells) each get the regularisation that suits them, so none is handicapped by one fixed strength.
    The choice scores log-loss / squared error rather than the reported AUROC / R²: on the few scans of an inner
    fold, a proper scoring rule is far less noisy than a rank statistic or a fold-relative R².

    Args:
        x: features ``[n, C]``.
        y: labels ``[n]``.
        groups: subject of each row ``[n]`` (the inner folds never split a subject either).
        task: ``"binary"`` or ``"continuous"``.
        inner_splits: folds of the inner CV.
        seed: seed of the inner folds.

    Returns:
        The fitted scikit-learn pipeline.
    """
    _check_task(task)
    x, y, groups = np.asarray(x, dtype=np.float64), np.asarray(y), np.asarray(groups)
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or Inf; check the encoder's output (a diverged checkpoint?).")
    _check_groups(y, groups, task, inner_splits, "inner cross-validation of the probe")
    inner = list(_splitter(task, inner_splits, seed).split(x, y, groups))
    if task == "binary":
        estimator = LogisticRegressionCV(
            Cs=list(LOGISTIC_CS), cv=inner, scoring="neg_log_loss", max_iter=2000, **_logistic_kwargs()
        )
    else:
        estimator = RidgeCV(alphas=RIDGE_ALPHAS, cv=inner, scoring="neg_mean_squared_error")
    return make_pipeline(StandardScaler(), estimator).fit(x, y.astype(np.int64 if task == "binary" else np.float64))


def probe_scores(probe: Pipeline, x: np.ndarray, task: ProbeTask) -> np.ndarray:
    """Scores ``[n]`` of a fitted probe: P(y = 1) for binary labels, the predicted value for continuous ones."""
    x = np.asarray(x, dtype=np.float64)
    return probe.predict_proba(x)[:, 1] if task == "binary" else probe.predict(x)


def probe_metric(task: ProbeTask, y_true: np.ndarray, scores: np.ndarray) -> float:
    """AUROC (binary) or R² (continuous) of scores; NaN for a binary fold with a single class."""
    _check_task(task)
    y_true = np.asarray(y_true)
    if task == "binary":
        return float(roc_auc_score(y_true, scores)) if np.unique(y_true).size == 2 else float("nan")
    return float(r2_score(y_true, scores))


def _fold_score(
    x: np.ndarray, y: np.ndarray, groups: np.ndarray, task: ProbeTask, fold: Fold, inner_splits: int, seed: int
) -> float:
    # The inputs were checked once by the caller; scikit-learn's per-call validation of the many small fits and
    # scorer calls of the inner CV would otherwise cost more than the fits themselves.
    with sklearn.config_context(skip_parameter_validation=True, assume_finite=True):
        probe = fit_linear_probe(
            x[fold.train], y[fold.train], groups[fold.train], task, inner_splits, _seed(seed, fold.repeat, fold.index)
        )
        return probe_metric(task, y[fold.test], probe_scores(probe, x[fold.test], task))


def cross_validated_scores(
    x: np.ndarray,
    y: np.ndarray,
    groups: Sequence,
    task: ProbeTask,
    folds: Sequence[Fold],
    inner_splits: int = 3,
    seed: int = 0,
    n_jobs: int | None = None,
) -> np.ndarray:
    """Test metric of :func:`fit_linear_probe` on every fold.

    Args:
        x: features ``[n, C]``.
        y: labels ``[n]``.
        groups: subject of each row ``[n]``.
        task: ``"binary"`` or ``"continuous"``.
        folds: from :func:`repeated_grouped_folds` on the same rows.
        inner_splits: inner-CV folds of each probe.
        seed: seed of the inner folds (combined with the fold's position).
        n_jobs: folds fitted in parallel (joblib; None or 1: sequentially). The result does not depend on it.

    Returns:
        float64 ``[len(folds)]``: AUROC or R² on each test fold.
    """
    _check_task(task)
    x, y, groups = np.asarray(x, dtype=np.float64), np.asarray(y), np.asarray(groups)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"features must be [n, C] with n = {y.shape[0]} labels; got shape {x.shape}.")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or Inf; check the encoder's output (a diverged checkpoint?).")
    scores = Parallel(n_jobs=n_jobs)(
        delayed(_fold_score)(x, y, groups, task, fold, inner_splits, seed) for fold in folds
    )
    return np.asarray(scores, dtype=np.float64)


@dataclass(frozen=True)
class NoiseBand:
    """What random initialisation alone does: the CV-mean metric of each random-init encoder and their spread.

    Attributes:
        members: CV-mean metric of each member, in the order given.
        low / high / mean: min, max and mean over the members.
        best: index of the best member (the one pretraining has to beat).
    """

    members: tuple[float, ...]
    low: float
    high: float
    mean: float
    best: int


def noise_band(member_scores: Sequence[np.ndarray]) -> NoiseBand:
    """The band of ``member_scores`` (each the fold scores ``[F]`` of one random-init encoder); needs >= 2 members."""
    if len(member_scores) < 2:
        raise ValueError(f"a noise band needs at least 2 random-init members; got {len(member_scores)}.")
    means = tuple(float(np.nanmean(s)) for s in member_scores)
    return NoiseBand(means, min(means), max(means), float(np.mean(means)), int(np.argmax(means)))


@dataclass(frozen=True)
class PairedDifference:
    """Mean of paired fold differences ``a - b`` with a confidence interval.

    Attributes:
        mean: mean difference over the folds.
        ci_low / ci_high: bounds of the interval (``level``, two-sided).
        n_folds: folds used (both scores finite).
        level: confidence level.
        method: how the interval was computed.
    """

    mean: float
    ci_low: float
    ci_high: float
    n_folds: int
    level: float
    method: str = "corrected resampled t (Nadeau & Bengio 2003)"

    @property
    def above_zero(self) -> bool:
        """Whether the whole interval lies above 0 (``a`` beats ``b`` at this level)."""
        return bool(math.isfinite(self.ci_low) and self.ci_low > 0)


def paired_fold_difference(
    a: np.ndarray, b: np.ndarray, folds: Sequence[Fold], level: float = 0.95
) -> PairedDifference:
    """Paired difference of two feature sets scored on the same folds, with a corrected repeated-CV interval.

    The folds of repeated K-fold CV overlap in their training rows, so their scores are correlated and the plain
    variance of the differences understates the uncertainty. The corrected resampled t-test (Nadeau & Bengio 2003;
    Bouckaert & Frank 2004 for repeated K-fold) inflates it: ``var = (1/J + n_test/n_train) * s^2`` over the ``J``
    paired differences, with a t quantile on ``J - 1`` degrees of freedom. scikit-learn and SciPy have no such test,
    hence written here.

    Args:
        a: fold scores ``[F]`` of the candidate (e.g. a checkpoint).
        b: fold scores ``[F]`` of the reference (e.g. the best random init), on the same folds.
        folds: the folds (for the test/train size ratio).
        level: confidence level of the interval.

    Returns:
        The :class:`PairedDifference`; NaN bounds with fewer than 2 finite pairs.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.shape != (len(folds),):
        raise ValueError(f"need one score per fold for both sets; got shapes {a.shape}, {b.shape}, {len(folds)} folds.")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level}.")
    keep = np.isfinite(a) & np.isfinite(b)
    diffs = (a - b)[keep]
    j = int(diffs.size)
    if j < 2:
        mean = float(diffs.mean()) if j else float("nan")
        return PairedDifference(mean, float("nan"), float("nan"), j, level)
    ratio = float(np.mean([f.test.size / f.train.size for f, k in zip(folds, keep) if k]))
    half = float(stats.t.ppf(0.5 + level / 2, df=j - 1) * math.sqrt((1.0 / j + ratio) * diffs.var(ddof=1)))
    mean = float(diffs.mean())
    return PairedDifference(mean, mean - half, mean + half, j, level)
