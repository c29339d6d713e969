"""Non-parametric percentile bootstrap over held-out samples (paper, "Statistical analysis"; docs/method.md §8.9).

The resample count and CI level are stripped from the paper; defaults are 1000 resamples and a 95% interval.
Resampling is by test sample (rows of every array together), optionally stratified so each resample keeps the
stratum sizes (for classification: the class counts, which keeps AUROC/AP defined in every resample).

:func:`bootstrap_metrics` returns a :class:`neurojepa_pl.metrics.reliability.MetricResults`: the usual
``{name: (point, ci_low, ci_high)}`` dict that also carries how many resamples were finite per metric and the
interval's reliability warnings (zero-width interval, undefined metric or interval, too few valid resamples).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping

import numpy as np

from neurojepa_pl.metrics.reliability import MetricResults, interval_warnings

__all__ = ["bootstrap_ci", "bootstrap_metrics", "bootstrap_indices"]

# Fewer finite replicates than this fraction means the interval would describe a biased subset of resamples.
_MIN_FINITE_FRACTION = 0.5


def bootstrap_indices(n: int, n_boot: int, rng: np.random.Generator, stratify: np.ndarray | None = None) -> np.ndarray:
    """Draw ``n_boot`` resamples of ``n`` row indices with replacement.

    Args:
        n: number of samples.
        n_boot: number of resamples.
        rng: numpy random generator (the only source of randomness).
        stratify: optional ``[n]`` stratum labels; each resample draws, within every stratum, as many rows as the
            stratum holds.

    Returns:
        Integer array ``[n_boot, n]``.
    """
    if n < 1:
        raise ValueError("bootstrap needs at least one sample; got an empty array.")
    if stratify is None:
        return rng.integers(0, n, size=(n_boot, n))
    stratify = np.asarray(stratify)
    if stratify.shape[0] != n:
        raise ValueError(f"stratify has {stratify.shape[0]} entries but the arrays have {n} rows.")
    out = np.empty((n_boot, n), dtype=np.int64)
    start = 0
    for value in np.unique(stratify):
        members = np.flatnonzero(stratify == value)
        out[:, start : start + members.size] = members[rng.integers(0, members.size, size=(n_boot, members.size))]
        start += members.size
    return out


def _as_arrays(arrays: tuple) -> tuple[list[np.ndarray], int]:
    if not arrays:
        raise ValueError("bootstrap needs at least one array to resample.")
    arrays_np = [np.asarray(a) for a in arrays]
    n = arrays_np[0].shape[0]
    for i, a in enumerate(arrays_np):
        if a.shape[0] != n:
            raise ValueError(
                f"all arrays must have the same number of rows; array 0 has {n}, array {i} has {a.shape[0]}."
            )
    return arrays_np, n


def bootstrap_metrics(
    metric_fn: Callable[..., Mapping[str, float]],
    *arrays,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    stratify: np.ndarray | None = None,
    too_few_finite: str = "raise",
) -> MetricResults:
    """Percentile-bootstrap CIs for several metrics computed on the same resamples.

    Args:
        metric_fn: ``metric_fn(*arrays) -> {name: value}``; may return NaN where a metric is undefined for a
            resample (e.g. AUROC with one class).
        *arrays: arrays with the samples along dim 0 (targets, predictions, ...), resampled together.
        n_boot: number of bootstrap resamples.
        alpha: 1 - confidence level (0.05 -> 95% CI).
        seed: seed of the ``numpy.random.Generator`` drawing the resamples.
        stratify: optional ``[n]`` stratum labels for a stratified bootstrap.
        too_few_finite: what to do when fewer than half of the resamples give a finite value for a metric whose
            point estimate is finite (the interval would not describe the bootstrap distribution): ``"raise"`` a
            ValueError, or ``"nan"``: warn and report NaN bounds for that metric (used after training, where a
            tiny or unbalanced test set should not discard the run's other results).

    Returns:
        ``{name: (point, ci_low, ci_high)}``, the point estimate computed on the full (unresampled) data, as a
        :class:`~neurojepa_pl.metrics.reliability.MetricResults` whose ``n_finite`` counts each metric's finite
        resamples and whose ``warnings`` hold :func:`~neurojepa_pl.metrics.reliability.interval_warnings`.
    """
    arrays_np, n = _as_arrays(arrays)
    if too_few_finite not in ("raise", "nan"):
        raise ValueError(f"too_few_finite must be 'raise' or 'nan'; got {too_few_finite!r}.")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1); got {alpha}.")
    point = dict(metric_fn(*arrays_np))
    rng = np.random.default_rng(seed)
    indices = bootstrap_indices(n, n_boot, rng, stratify)
    replicates = {name: np.empty(n_boot, dtype=np.float64) for name in point}
    for b in range(n_boot):
        values = metric_fn(*(a[indices[b]] for a in arrays_np))
        for name in point:
            replicates[name][b] = values[name]
    out: dict[str, tuple[float, float, float]] = {}
    n_finite: dict[str, int] = {}
    for name, value in point.items():
        reps = replicates[name]
        finite = reps[np.isfinite(reps)]
        n_finite[name] = int(finite.size)
        if not math.isfinite(value) or finite.size == 0:
            out[name] = (float(value), float("nan"), float("nan"))
            continue
        if finite.size < _MIN_FINITE_FRACTION * n_boot:
            message = (
                f"metric {name!r}: only {finite.size} of {n_boot} bootstrap resamples are finite; the test "
                "set is too small or too unbalanced for this metric. Pass stratify=<class labels> or use more "
                "samples."
            )
            if too_few_finite == "raise":
                raise ValueError(message)
            warnings.warn(message + " Its interval is reported as NaN.", stacklevel=2)
            out[name] = (float(value), float("nan"), float("nan"))
            continue
        if finite.size < n_boot:
            warnings.warn(
                f"metric {name!r}: {n_boot - finite.size} of {n_boot} bootstrap resamples were undefined "
                "and left out of the interval.",
                stacklevel=2,
            )
        low, high = np.quantile(finite, [alpha / 2.0, 1.0 - alpha / 2.0])
        out[name] = (float(value), float(low), float(high))
    return MetricResults(out, interval_warnings(out, n_finite, n_boot), n_boot=n_boot, n_finite=n_finite)


def bootstrap_ci(
    metric_fn: Callable[..., float],
    *arrays,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    stratify: np.ndarray | None = None,
    too_few_finite: str = "raise",
) -> tuple[float, float, float]:
    """Percentile-bootstrap CI of one scalar metric over test samples.

    Args:
        metric_fn: ``metric_fn(*arrays) -> float``.
        *arrays: arrays with the samples along dim 0, resampled together.
        n_boot: number of resamples.
        alpha: 1 - confidence level.
        seed: seed of the numpy Generator.
        stratify: optional ``[n]`` stratum labels.
        too_few_finite: ``"raise"`` or ``"nan"``, see :func:`bootstrap_metrics`.

    Returns:
        ``(point, ci_low, ci_high)``.
    """
    result = bootstrap_metrics(
        lambda *a: {"value": float(metric_fn(*a))},
        *arrays,
        n_boot=n_boot,
        alpha=alpha,
        seed=seed,
        stratify=stratify,
        too_few_finite=too_few_finite,
    )
    return result["value"]
