"""``neurojepa compare RUN_A RUN_B``: paired comparison of two runs' test predictions.

Reads each run's ``predictions.csv`` (a run folder or the file), joins the rows on the scan (``path``, or
``subject_id`` + ``session_id``), checks that both runs saw the same targets, and prints for the chosen metric:
each run's value with its bootstrap CI, the paired difference A − B with a paired bootstrap CI, and the two-sided
paired permutation p-value (paper, "Statistical analysis"). For rank metrics (AUROC, AP, C-index) the permutation
swaps within-model ranks rather than raw scores (see :func:`rank_normalised`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from neurojepa_pl.metrics.bootstrap import bootstrap_metrics
from neurojepa_pl.metrics.permutation import paired_permutation_test
from neurojepa_pl.metrics.predictions import read_predictions
from neurojepa_pl.metrics.tasks import PRIMARY_METRIC, TASKS, task_metric_fn

__all__ = ["main", "compare_runs"]

# Which canonical arrays are the targets (fixed) and which the predictions (swapped by the permutation test).
_TARGETS = {
    "binary": ("target",),
    "multiclass": ("target",),
    "multilabel": ("target", "mask"),
    "regression": ("target",),
    "survival": ("time", "event"),
}
_PREDICTIONS = {
    "binary": "score",
    "multiclass": "score",
    "multilabel": "score",
    "regression": "prediction",
    "survival": "risk",
}
JOIN_KEYS = {"path": ["path"], "subject": ["subject_id", "session_id"]}
RANK_METRICS = ("auroc", "ap", "selection", "cindex")
"""Metrics that depend on each model's scores only through their order (``auroc/<class>`` etc. included)."""


def rank_normalised(pred: np.ndarray) -> np.ndarray:
    """Each column's scores replaced by their average ranks / n (in (0, 1]); ties stay ties.

    The permutation test swaps the two models' scores sample by sample. When the models' scores live on different
    scales (a probe whose probabilities all sit in 0.50-0.52 against a model spanning 0-1), swapped arrays mix the
    scales and the null distribution of a rank metric widens for no reason. Rank metrics are invariant to a monotone
    map of each model's scores, so testing on within-model ranks leaves both observed values unchanged and makes the
    swapped scores comparable. Written here because scipy/scikit-learn offer the ranks but not this use of them.
    """
    return rankdata(pred, axis=0) / len(pred)


def _joined(frame_a: pd.DataFrame, frame_b: pd.DataFrame, keys: list[str], run_a: str, run_b: str) -> np.ndarray:
    """Row indices ``[n, 2]`` of the scans present in both tables, in A's order."""
    for name, frame in ((run_a, frame_a), (run_b, frame_b)):
        missing = [k for k in keys if k not in frame.columns]
        if missing:
            raise ValueError(
                f"{name}: predictions have no column(s) {missing} to join on; use --join-on "
                f"{'subject' if keys == ['path'] else 'path'}."
            )
        if frame.duplicated(keys).any():
            raise ValueError(f"{name}: several rows share the same {keys}; cannot pair scans.")
    a = frame_a[keys].reset_index(names="_row_a")
    b = frame_b[keys].reset_index(names="_row_b")
    merged = a.merge(b, on=keys, how="inner", sort=False)
    if merged.empty:
        raise ValueError(f"{run_a} and {run_b} have no scan in common on {keys}.")
    return merged[["_row_a", "_row_b"]].to_numpy()


def _stack_targets(task: str, arrays: dict[str, np.ndarray]) -> np.ndarray:
    parts = [np.asarray(arrays[name], dtype=np.float64).reshape(len(arrays[name]), -1) for name in _TARGETS[task]]
    return np.concatenate(parts, axis=1)


def _paired_metric(task: str, metric: str, class_names) -> Callable[[np.ndarray, np.ndarray], float]:
    fn = task_metric_fn(task, class_names)

    def metric_fn(y: np.ndarray, pred: np.ndarray) -> float:
        if task in ("binary", "multiclass"):
            values = fn(y[:, 0].astype(int), pred)
        elif task == "multilabel":
            width = pred.shape[1]
            values = fn(y[:, :width].astype(int), pred, y[:, width:].astype(bool))
        elif task == "regression":
            values = fn(y[:, 0], pred)
        else:
            values = fn(y[:, 0], y[:, 1].astype(int), pred)
        if metric not in values:
            raise ValueError(f"metric {metric!r} is not computed for task {task!r}; choose one of {sorted(values)}.")
        return float(values[metric])

    return metric_fn


def compare_runs(
    run_a: str | Path,
    run_b: str | Path,
    metric: str | None = None,
    n_perm: int = 10000,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    task: str | None = None,
    join_on: str = "path",
) -> dict:
    """Paired comparison of two runs (see the module docstring).

    Returns:
        ``{"task", "metric", "n", "a": [value, low, high], "b": [...], "delta": [value, low, high], "p_value"}``.
    """
    task_a, arrays_a, frame_a, names_a = read_predictions(run_a, task)
    task_b, arrays_b, frame_b, names_b = read_predictions(run_b, task)
    if task_a != task_b:
        raise ValueError(f"{run_a} is a {task_a!r} run but {run_b} is {task_b!r}; compare runs of the same task.")
    if names_a != names_b:
        raise ValueError(f"the runs have different classes/labels: {names_a} vs {names_b}.")
    metric = metric or PRIMARY_METRIC[task_a]
    pairs = _joined(frame_a, frame_b, JOIN_KEYS[join_on], str(run_a), str(run_b))
    y_a = _stack_targets(task_a, {k: v[pairs[:, 0]] for k, v in arrays_a.items()})
    y_b = _stack_targets(task_a, {k: v[pairs[:, 1]] for k, v in arrays_b.items()})
    if not np.allclose(y_a, y_b, equal_nan=True):
        bad = int((~np.isclose(y_a, y_b, equal_nan=True)).any(axis=1).sum())
        raise ValueError(
            f"{bad} paired scan(s) have different targets in the two runs; were they tested on the same labels?"
        )
    pred_name = _PREDICTIONS[task_a]
    pred_a = np.asarray(arrays_a[pred_name])[pairs[:, 0]]
    pred_b = np.asarray(arrays_b[pred_name])[pairs[:, 1]]
    metric_fn = _paired_metric(task_a, metric, names_a)
    stratify = (
        y_a[:, 0].astype(int)
        if task_a in ("binary", "multiclass")
        else (y_a[:, 1].astype(int) if task_a == "survival" else None)
    )

    def both(y, a, b):
        value_a, value_b = metric_fn(y, a), metric_fn(y, b)
        return {"a": value_a, "b": value_b, "delta": value_a - value_b}

    boot = bootstrap_metrics(both, y_a, pred_a, pred_b, n_boot=n_boot, alpha=alpha, seed=seed, stratify=stratify)
    by_rank = metric.split("/")[0] in RANK_METRICS
    perm_a, perm_b = (rank_normalised(pred_a), rank_normalised(pred_b)) if by_rank else (pred_a, pred_b)
    delta, p_value = paired_permutation_test(metric_fn, y_a, perm_a, perm_b, n_perm=n_perm, seed=seed)
    return {
        "task": task_a,
        "metric": metric,
        "n": int(len(pairs)),
        "a": list(boot["a"]),
        "b": list(boot["b"]),
        "delta": [delta, boot["delta"][1], boot["delta"][2]],
        "p_value": p_value,
        "n_perm": n_perm,
        "n_boot": n_boot,
        "ci_level": 1 - alpha,
        "run_a": str(run_a),
        "run_b": str(run_b),
        "permuted": "within-model ranks" if by_rank else "raw predictions",
    }


def _format(result: dict) -> str:
    level = int(round(100 * result["ci_level"]))
    metric = result["metric"]
    lines = [
        f"task {result['task']}, metric {metric}, {result['n']} paired test scans",
        f"  A  {result['run_a']}: {result['a'][0]:.4f} [{result['a'][1]:.4f}, {result['a'][2]:.4f}]",
        f"  B  {result['run_b']}: {result['b'][0]:.4f} [{result['b'][1]:.4f}, {result['b'][2]:.4f}]",
        f"  A - B: {result['delta'][0]:+.4f} ({level}% paired bootstrap CI [{result['delta'][1]:+.4f}, "
        f"{result['delta'][2]:+.4f}])",
        f"  two-sided paired permutation test ({result['n_perm']} permutations of {result['permuted']}): "
        f"p = {result['p_value']:.4g}",
    ]
    if metric in ("mae", "rmse"):
        lines.append("  (lower is better for this metric: a negative difference favours A)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="neurojepa compare",
        description="Compare two runs' test predictions: per-run bootstrap CIs, the paired difference A - B with a "
        "paired bootstrap CI, and a two-sided paired permutation test.",
    )
    parser.add_argument("run_a", help="run folder holding predictions.csv (or the CSV itself)")
    parser.add_argument("run_b", help="second run folder or predictions.csv")
    parser.add_argument(
        "--metric",
        default=None,
        help="metric to compare (default: auroc for classification, mae for regression, cindex "
        "for survival; any key of metrics.json, e.g. ap, balanced_accuracy, rmse, auroc/<class>)",
    )
    parser.add_argument("--n-perm", type=int, default=10000, help="permutations (default 10000)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--alpha", type=float, default=0.05, help="1 - CI level (default 0.05)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resampling and permutations")
    parser.add_argument("--task", choices=TASKS, default=None, help="override the task inferred from the columns")
    parser.add_argument(
        "--join-on",
        choices=sorted(JOIN_KEYS),
        default="path",
        help="pair scans by 'path' (default) or by 'subject' (subject_id + session_id, e.g. two "
        "modalities of the same session)",
    )
    parser.add_argument("--json", default=None, help="also write the result to this JSON file")
    args = parser.parse_args(argv)
    result = compare_runs(
        args.run_a, args.run_b, args.metric, args.n_perm, args.n_boot, args.alpha, args.seed, args.task, args.join_on
    )
    print(_format(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
