"""Writing evaluation results: ``metrics.json``, ROC / PR / Kaplan-Meier / scatter figures as PNG, and the same
figures in TensorBoard when a TensorBoard logger is present.

``metrics.json`` layout::

    {"task": "binary", "n": 123, "n_bootstrap": 1000, "ci_level": 0.95,
     "metrics": {"auroc": {"value": 0.91, "ci_low": 0.86, "ci_high": 0.95, "warnings": []},
                 "ap": {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0,
                        "warnings": [{"code": "few_positives", "message": "only 3 positive cases ..."},
                                     {"code": "degenerate_ci", "message": "the bootstrap interval ..."}]},
                 ...},
     ...extra keys (checkpoint, few-shot k, ...)}

NaN values (undefined metrics) are written as JSON ``null``. ``warnings`` is always present (empty when nothing is
wrong). Its codes are listed in :mod:`neurojepa_pl.metrics.reliability`. :func:`format_metrics_table` prints a
metrics.json with a ``!`` beside every flagged metric and the warnings' sentences under the table.

Figures are built on ``matplotlib.figure.Figure`` objects directly (no pyplot state machine), so nothing global is
touched and no display backend is needed.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torchmetrics.functional.classification import binary_precision_recall_curve, binary_roc

from neurojepa_pl.metrics.reliability import MetricWarning, interval_warnings
from neurojepa_pl.metrics.survival import KaplanMeierSplit

log = logging.getLogger(__name__)

__all__ = [
    "write_metrics_json",
    "read_metrics_json",
    "format_metrics_table",
    "roc_pr_figures",
    "kaplan_meier_figure",
    "regression_scatter_figure",
    "save_figures",
    "log_figures",
]


def _json_number(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def write_metrics_json(
    path: str | Path,
    results: Mapping[str, tuple[float, float, float]],
    *,
    n: int,
    task: str,
    n_bootstrap: int | None = None,
    ci_level: float | None = None,
    extra: Mapping[str, Any] | None = None,
    warnings: Mapping[str, Sequence[MetricWarning]] | None = None,
) -> dict:
    """Write ``metrics.json`` and return the written dict; log every reliability warning.

    Args:
        path: output file.
        results: ``{metric: (value, ci_low, ci_high)}`` as returned by ``bootstrap_task_metrics`` /
            ``bootstrap_metrics`` (a :class:`~neurojepa_pl.metrics.reliability.MetricResults`, whose ``warnings``
            are written), or a plain dict.
        n: number of test samples.
        task: task name.
        n_bootstrap: number of bootstrap resamples behind the intervals.
        ci_level: confidence level of the intervals (e.g. 0.95).
        extra: additional JSON-serialisable top-level keys.
        warnings: ``{metric: [MetricWarning, ...]}`` to write; default: ``results.warnings`` when it has them,
            else the warnings readable off the intervals alone (zero-width or missing intervals, undefined values).
    """
    payload: dict[str, Any] = {"task": task, "n": int(n)}
    if n_bootstrap is not None:
        payload["n_bootstrap"] = int(n_bootstrap)
    if ci_level is not None:
        payload["ci_level"] = float(ci_level)
    if warnings is None:
        warnings = getattr(results, "warnings", None)
    if warnings is None:
        warnings = interval_warnings(results)
    payload["metrics"] = {
        name: {
            "value": _json_number(v),
            "ci_low": _json_number(lo),
            "ci_high": _json_number(hi),
            "warnings": [w.to_json() for w in warnings.get(name, ())],
        }
        for name, (v, lo, hi) in results.items()
    }
    if extra:
        overlap = set(extra) & set(payload)
        if overlap:
            raise ValueError(f"extra keys {sorted(overlap)} collide with metrics.json's own keys.")
        payload.update(extra)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    for message, names in _warnings_by_message(payload["metrics"]):
        log.warning("%s: %s: %s", path, ", ".join(names), message)
    return payload


def _warnings_by_message(metrics: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, list[str]]]:
    """``[(message, [metric, ...]), ...]`` in first-seen order: one line per distinct sentence, not per metric."""
    grouped: dict[str, list[str]] = {}
    for name, entry in metrics.items():
        for warning in entry.get("warnings") or ():
            grouped.setdefault(warning["message"], []).append(name)
    return list(grouped.items())


def _fmt_number(x: float | None) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:.3f}"


def format_metrics_table(report: Mapping[str, Any], per_class: bool = True) -> str:
    """The printed form of a ``metrics.json``: one row per metric, ``!`` and the warning codes beside flagged ones,
    and every warning's sentence under the table.

    Args:
        report: a ``metrics.json`` dict (:func:`read_metrics_json`, or the dict :func:`write_metrics_json` returns).
        per_class: include the ``<metric>/<class>`` rows.

    Returns:
        Plain text, e.g.::

            test metrics: binary, n=48, 95% CI from 1000 bootstrap resamples
            metric             value  95% CI
            auroc              1.000  [1.000, 1.000]  ! few_positives, degenerate_ci
            ...
            ! = do not trust this number as it stands (the "warnings" of metrics.json):
              auroc, ap, balanced_accuracy, selection: only 3 positive cases in the test set (fewer than 10): ...
    """
    metrics: Mapping[str, Mapping[str, Any]] = report.get("metrics", {})
    shown = {name: entry for name, entry in metrics.items() if per_class or "/" not in name}
    level = report.get("ci_level")
    ci = f"{level:.0%} CI" if level is not None else "CI"
    header = f"test metrics: {report.get('task', '?')}, n={report.get('n', '?')}"
    if report.get("n_bootstrap") is not None:
        header += f", {ci} from {report['n_bootstrap']} bootstrap resamples"
    width = max([len("metric"), *(len(name) for name in shown)])
    lines = [header, f"{'metric':<{width}}  {'value':>6}  {ci}"]
    for name, entry in shown.items():
        codes = list(dict.fromkeys(w["code"] for w in entry.get("warnings") or ()))
        row = (
            f"{name:<{width}}  {_fmt_number(entry.get('value')):>6}  "
            f"[{_fmt_number(entry.get('ci_low'))}, {_fmt_number(entry.get('ci_high'))}]"
        )
        lines.append(row + (f"  ! {', '.join(codes)}" if codes else ""))
    flagged = _warnings_by_message(shown)
    if flagged:
        lines.append('! = do not trust this number as it stands (the "warnings" of metrics.json):')
        lines += [f"  {', '.join(names)}: {message}" for message, names in flagged]
    return "\n".join(lines)


def read_metrics_json(path: str | Path) -> dict:
    """Read a ``metrics.json`` written by :func:`write_metrics_json`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}; run `neurojepa test` for that run first.")
    return json.loads(path.read_text())


def _curves(target: np.ndarray, scores: np.ndarray):
    p = torch.as_tensor(scores, dtype=torch.float64)
    t = torch.as_tensor(target, dtype=torch.long)
    fpr, tpr, _ = binary_roc(p, t)
    precision, recall, _ = binary_precision_recall_curve(p, t)
    return fpr.numpy(), tpr.numpy(), precision.numpy(), recall.numpy()


def roc_pr_figures(
    task: str,
    target: np.ndarray,
    scores: np.ndarray,
    label_mask: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
) -> dict[str, Figure]:
    """ROC and precision-recall curves (one curve per class / label for multi-output tasks).

    Args:
        task: "binary", "multiclass" or "multilabel".
        target: ``[n]`` (binary, multiclass) or ``[n, L]`` (multilabel).
        scores: ``[n]`` P(class 1) for binary, ``[n, C]`` probabilities otherwise.
        label_mask: multilabel bool ``[n, L]`` of observed labels.
        class_names: legend names.

    Returns:
        ``{"roc": Figure, "pr": Figure}``. Classes with a single target value are skipped.
    """
    target = np.asarray(target)
    scores = np.asarray(scores, dtype=np.float64)
    problems: list[tuple[str, np.ndarray, np.ndarray]] = []
    if task == "binary":
        problems.append(("positive", target.reshape(-1).astype(np.int64), scores.reshape(-1)))
    elif task == "multiclass":
        for c in range(scores.shape[1]):
            name = class_names[c] if class_names is not None else str(c)
            problems.append((name, (target == c).astype(np.int64), scores[:, c]))
    elif task == "multilabel":
        mask = np.ones(target.shape, bool) if label_mask is None else np.asarray(label_mask, bool)
        for j in range(target.shape[1]):
            name = class_names[j] if class_names is not None else str(j)
            problems.append((name, target[mask[:, j], j].astype(np.int64), scores[mask[:, j], j]))
    else:
        raise ValueError(f"roc_pr_figures: task must be binary, multiclass or multilabel; got {task!r}.")

    roc, pr = Figure(figsize=(4.5, 4.5)), Figure(figsize=(4.5, 4.5))
    ax_roc, ax_pr = roc.add_subplot(), pr.add_subplot()
    for name, t, s in problems:
        if t.size == 0 or t.min() == t.max():
            continue
        fpr, tpr, precision, recall = _curves(t, s)
        ax_roc.plot(fpr, tpr, label=name)
        ax_pr.plot(recall, precision, label=name)
    ax_roc.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC", xlim=(0, 1), ylim=(0, 1.02))
    ax_pr.set(xlabel="recall", ylabel="precision", title="precision-recall", xlim=(0, 1), ylim=(0, 1.02))
    for ax in (ax_roc, ax_pr):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize="small")
    roc.tight_layout()
    pr.tight_layout()
    return {"roc": roc, "pr": pr}


def kaplan_meier_figure(split: KaplanMeierSplit, time_unit: str = "time") -> Figure:
    """Kaplan-Meier step curves of the low- and high-risk groups, with the log-rank p-value in the title."""
    fig = Figure(figsize=(5, 4))
    ax = fig.add_subplot()
    ax.step(split.low_time, split.low_survival, where="post", label=f"low risk (n={split.n_low})")
    ax.step(split.high_time, split.high_survival, where="post", label=f"high risk (n={split.n_high})")
    p = "n/a" if not math.isfinite(split.logrank_p) else f"{split.logrank_p:.3g}"
    ax.set(
        xlabel=time_unit,
        ylabel="survival probability",
        ylim=(0, 1.02),
        title=f"Kaplan-Meier by median risk (log-rank p={p})",
    )
    ax.legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    return fig


def regression_scatter_figure(target: np.ndarray, prediction: np.ndarray, unit: str = "") -> Figure:
    """Predicted vs true values with the identity line."""
    target = np.asarray(target, dtype=np.float64).reshape(-1)
    prediction = np.asarray(prediction, dtype=np.float64).reshape(-1)
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot()
    ax.scatter(target, prediction, s=8, alpha=0.7)
    lo = float(min(target.min(), prediction.min()))
    hi = float(max(target.max(), prediction.max()))
    ax.plot([lo, hi], [lo, hi], linestyle="--", color="grey", linewidth=0.8)
    suffix = f" ({unit})" if unit else ""
    ax.set(xlabel=f"true{suffix}", ylabel=f"predicted{suffix}", title="prediction vs truth")
    fig.tight_layout()
    return fig


def save_figures(figures: Mapping[str, Figure], out_dir: str | Path) -> list[Path]:
    """Save figures as ``<out_dir>/<name>.png``; returns the written paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figures.items():
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=120)
        written.append(path)
    return written


def log_figures(loggers: Iterable[Any], figures: Mapping[str, Figure], step: int = 0, prefix: str = "test") -> int:
    """Add figures to every TensorBoard logger among ``loggers`` (Lightning loggers); returns how many were logged."""
    from lightning.pytorch.loggers import TensorBoardLogger

    logged = 0
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            for name, fig in figures.items():
                logger.experiment.add_figure(f"{prefix}/{name}", fig, global_step=step, close=False)
                logged += 1
    return logged
