"""One entry point per downstream task: point metrics, bootstrap CIs and figures from named prediction arrays.

Canonical arrays of each task (rows = test samples):

==============  ==========================================================================================
task            arrays
==============  ==========================================================================================
binary          ``target`` [n] 0/1, ``score`` [n] P(class 1)
multiclass      ``target`` [n] class index, ``score`` [n, C] probabilities
multilabel      ``target`` [n, L] 0/1, ``score`` [n, L] probabilities, ``mask`` [n, L] bool (label observed)
regression      ``target`` [n], ``prediction`` [n] (target units, e.g. years)
survival        ``time`` [n], ``event`` [n] 0/1, ``risk`` [n] (log-risk; higher = earlier event)
==============  ==========================================================================================

Every metric dict holds ``selection`` (higher is better): 0.5·AUROC + 0.5·AP (classification), −MAE (regression),
C-index (survival).

:func:`bootstrap_task_metrics` also attaches reliability warnings to every metric
(:mod:`neurojepa_pl.metrics.reliability`): too few positives / negatives / cases per class / samples / events for the
task, and degenerate bootstrap intervals. ``write_metrics_json`` writes them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from neurojepa_pl.metrics.bootstrap import bootstrap_metrics
from neurojepa_pl.metrics.classification import classification_metrics
from neurojepa_pl.metrics.regression import regression_metrics
from neurojepa_pl.metrics.reliability import MetricResults, sample_size_warnings
from neurojepa_pl.metrics.report import kaplan_meier_figure, regression_scatter_figure, roc_pr_figures
from neurojepa_pl.metrics.survival import concordance_index, kaplan_meier_by_risk_group

__all__ = [
    "TASKS",
    "TASK_ARRAYS",
    "PRIMARY_METRIC",
    "task_metric_fn",
    "compute_task_metrics",
    "bootstrap_task_metrics",
    "task_figures",
]

TASK_ARRAYS: dict[str, tuple[str, ...]] = {
    "binary": ("target", "score"),
    "multiclass": ("target", "score"),
    "multilabel": ("target", "score", "mask"),
    "regression": ("target", "prediction"),
    "survival": ("time", "event", "risk"),
}
TASKS = tuple(TASK_ARRAYS)
PRIMARY_METRIC = {
    "binary": "auroc",
    "multiclass": "auroc",
    "multilabel": "auroc",
    "regression": "mae",
    "survival": "cindex",
}
"""The metric a comparison uses when none is named."""


def _check_task(task: str) -> None:
    if task not in TASK_ARRAYS:
        raise ValueError(f"task must be one of {TASKS}; got {task!r}.")


def task_metric_fn(task: str, class_names: Sequence[str] | None = None) -> Callable[..., dict[str, float]]:
    """``fn(*arrays in TASK_ARRAYS[task] order) -> {metric: value}`` for bootstrapping."""
    _check_task(task)
    if task in ("binary", "multiclass"):
        return lambda target, score: classification_metrics(task, target, score, class_names=class_names)
    if task == "multilabel":
        return lambda target, score, mask: classification_metrics(task, target, score, mask, class_names)
    if task == "regression":
        return regression_metrics

    def survival(time, event, risk):
        c = concordance_index(time, event, risk)
        return {"cindex": c, "selection": c}

    return survival


def _ordered(task: str, arrays: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    missing = [name for name in TASK_ARRAYS[task] if name not in arrays]
    if missing:
        raise ValueError(f"task {task!r} needs arrays {TASK_ARRAYS[task]}; missing {missing}.")
    return [np.asarray(arrays[name]) for name in TASK_ARRAYS[task]]


def compute_task_metrics(
    task: str, arrays: Mapping[str, np.ndarray], class_names: Sequence[str] | None = None
) -> dict[str, float]:
    """Point metrics of one task (see the module docstring for the arrays)."""
    return task_metric_fn(task, class_names)(*_ordered(task, arrays))


def bootstrap_task_metrics(
    task: str,
    arrays: Mapping[str, np.ndarray],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    too_few_finite: str = "nan",
) -> MetricResults:
    """Point metrics with percentile-bootstrap CIs and reliability warnings.

    Resampling is stratified by class for binary/multiclass (every resample keeps the class counts, so AUROC stays
    defined) and by event status for survival (the number of events is kept); plain for the other tasks. A metric
    that is undefined in most resamples (e.g. a rare label of a tiny test set) gets NaN bounds and a warning
    (``too_few_finite="raise"`` makes it an error instead).

    Returns:
        ``{metric: (value, ci_low, ci_high)}`` as a :class:`~neurojepa_pl.metrics.reliability.MetricResults` whose
        ``warnings`` hold, per metric, the sample-size warnings of the task followed by the interval warnings.
    """
    ordered = _ordered(task, arrays)
    stratify = None
    if task in ("binary", "multiclass"):
        stratify = arrays["target"]
    elif task == "survival":
        stratify = np.asarray(arrays["event"]).astype(int)
    results = bootstrap_metrics(
        task_metric_fn(task, class_names),
        *ordered,
        n_boot=n_boot,
        alpha=alpha,
        seed=seed,
        stratify=stratify,
        too_few_finite=too_few_finite,
    )
    # The cause (too few cases) before its symptom (e.g. a zero-width interval).
    named = dict(zip(TASK_ARRAYS[task], ordered))
    results.add_warnings(sample_size_warnings(task, named, list(results), class_names), first=True)
    return results


def task_figures(
    task: str, arrays: Mapping[str, np.ndarray], class_names: Sequence[str] | None = None, unit: str = ""
) -> dict[str, Figure]:
    """ROC + PR curves (classification), prediction scatter (regression), Kaplan-Meier by median risk (survival).

    Survival returns no figure when the median split leaves a group empty (all risks equal).
    """
    a = dict(zip(TASK_ARRAYS[task], _ordered(task, arrays)))
    if task in ("binary", "multiclass", "multilabel"):
        return roc_pr_figures(task, a["target"], a["score"], a.get("mask"), class_names)
    if task == "regression":
        return {"scatter": regression_scatter_figure(a["target"], a["prediction"], unit)}
    risk = np.asarray(a["risk"], dtype=float)
    if np.unique(risk).size < 2:
        return {}
    return {
        "kaplan_meier": kaplan_meier_figure(kaplan_meier_by_risk_group(a["time"], a["event"], risk), unit or "time")
    }
