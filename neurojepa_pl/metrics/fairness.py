"""Metrics per subgroup and fairness gaps of a test run (the paper's Appendix H.3).

For each subgroup column (age bins, sex, site or scanner; any manifest column), the test predictions are split by
the column's values with fairlearn's :class:`fairlearn.metrics.MetricFrame`, the task metrics of
:mod:`neurojepa_pl.metrics.tasks` are computed per group, and the **fairness gap** of each metric is the largest minus
the smallest group value (``MetricFrame.difference(method="between_groups")``; the paper's max - min AUROC).

Uncertainty: percentile-bootstrap CIs (:func:`neurojepa_pl.metrics.bootstrap.bootstrap_metrics`) of every group's
metrics and of the gaps, from the same resamples. The resampling is stratified by group x class (binary /
multiclass), group x event (survival) or group (regression, multilabel), so every resample keeps each group's size
and class balance and the group metrics stay defined.

Small groups are flagged, not silently reported: a group with fewer than ``min_samples`` scans, or (classification)
fewer than ``min_positives`` scans of its rarest class, or (survival) fewer than ``min_positives`` events, or whose
metric is undefined, is listed with the reasons and its point values but no CI, and is left out of the gap (a gap
over groups of a few scans measures noise). A column with fewer than two eligible groups has no gap, and says why.

How a column becomes groups (:class:`SubgroupColumn`): given bin edges (``"age:0:45:65:inf"``), numeric values fall
into half-open bins ``[a, b)`` named ``"a-b"`` (``"65+"`` for the last open bin); ``age`` without edges uses
:data:`DEFAULT_AGE_EDGES`; any other column is categorical (its values as strings). Empty cells are counted as
missing and left out of that column's analysis.

:func:`evaluate_run_fairness` applies this to a run folder written by ``neurojepa test``: it reads
``predictions.csv``, takes the subgroup columns from it or joins them from the manifest (the one in ``metrics.json``
or given) on ``path`` (else ``subject_id`` + ``session_id``), merges the result into ``metrics.json`` under
``"fairness"`` (other keys untouched) and draws ``figures/fairness.png``.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from neurojepa_pl.metrics.bootstrap import bootstrap_metrics
from neurojepa_pl.metrics.tasks import PRIMARY_METRIC, TASK_ARRAYS, task_metric_fn

__all__ = [
    "DEFAULT_AGE_EDGES",
    "FAIRNESS_METRICS",
    "SubgroupColumn",
    "subgroup_fairness",
    "fairness_report",
    "fairness_figure",
    "join_subgroup_columns",
    "evaluate_run_fairness",
]

DEFAULT_AGE_EDGES: tuple[float, ...] = (0.0, 45.0, 65.0, math.inf)
"""Age bins used when ``age`` is given without edges: under 45, 45-64, 65 and over (years)."""

FAIRNESS_METRICS: dict[str, tuple[str, ...]] = {
    "binary": ("auroc", "ap", "balanced_accuracy"),
    "multiclass": ("auroc", "balanced_accuracy"),
    "multilabel": ("auroc", "ap"),
    "regression": ("mae", "mean_error"),
    "survival": ("cindex",),
}
"""Metrics reported per group by default; ``mean_error`` (prediction - target, e.g. the brain-age bias) is the signed
counterpart of the MAE."""

MISSING = "missing"


def _edge_text(value: float) -> str:
    return f"{value:g}"


@dataclass(frozen=True)
class SubgroupColumn:
    """A column of the predictions / manifest and how its values become groups.

    Attributes:
        name: the column.
        edges: increasing bin edges for a numeric column (``None``: categorical; ``age`` defaults to
            :data:`DEFAULT_AGE_EDGES`).
    """

    name: str
    edges: tuple[float, ...] | None = None

    @classmethod
    def parse(cls, text: str) -> SubgroupColumn:
        """``"site"``, ``"age"`` (default bins) or ``"age:0:40:60:inf"`` (explicit edges)."""
        name, *edges = [part.strip() for part in str(text).split(":")]
        if not name:
            raise ValueError(f"empty subgroup column in {text!r}; write e.g. 'site' or 'age:0:45:65:inf'.")
        if not edges:
            return cls(name, DEFAULT_AGE_EDGES if name == "age" else None)
        try:
            values = tuple(float(e) for e in edges)
        except ValueError as err:
            raise ValueError(f"bin edges of {text!r} must be numbers (or inf): {err}") from err
        if len(values) < 2 or any(b <= a for a, b in zip(values, values[1:])):
            raise ValueError(f"bin edges of {text!r} must be at least two increasing numbers, e.g. age:0:45:65:inf.")
        return cls(name, values)

    def spec(self) -> str:
        """The text form :meth:`parse` reads back."""
        return self.name if self.edges is None else ":".join([self.name, *map(_edge_text, self.edges)])

    def bin_names(self) -> list[str]:
        """Names of the bins, in order (numeric columns only)."""
        if self.edges is None:
            return []
        names = []
        for low, high in zip(self.edges, self.edges[1:]):
            names.append(f"{_edge_text(low)}+" if math.isinf(high) else f"{_edge_text(low)}-{_edge_text(high)}")
        return names

    def labels(self, values: pd.Series) -> pd.Series:
        """Group label of every row (``None`` where the value is missing or outside the bins)."""
        if self.edges is None:
            text = values.astype("string").str.strip()
            keep = (values.notna() & (text != "")).fillna(False).to_numpy(dtype=bool)
            return pd.Series(np.where(keep, text.astype(object), None), index=values.index, dtype=object)
        numeric = pd.to_numeric(values, errors="coerce")
        if values.notna().any() and numeric.notna().sum() == 0:
            raise ValueError(f"column {self.name!r} has no numeric value; bin edges need numbers.")
        binned = pd.cut(numeric, bins=list(self.edges), right=False, labels=self.bin_names())
        return binned.astype(object).where(binned.notna(), None)


# ----------------------------------------------------------------------------------------------------------------------
# One column
# ----------------------------------------------------------------------------------------------------------------------
def _metric_fns(
    task: str, arrays: Mapping[str, np.ndarray], metrics: Sequence[str], class_names: Sequence[str] | None
) -> dict[str, Callable[[Any, Any], float]]:
    """fairlearn metric callables ``f(rows, rows) -> value``.

    MetricFrame hands each group's ``y_true`` / ``y_pred`` to a metric; here both are the group's row numbers, so
    every task (2-D scores, label masks, survival triples) goes through fairlearn's grouping unchanged. The task's
    metric dict is computed once per group and shared by its metrics (MetricFrame calls one function per metric).
    """
    fn = task_metric_fn(task, class_names)
    order = TASK_ARRAYS[task]
    cache: dict[bytes, dict[str, float]] = {}

    def values(rows: Any) -> dict[str, float]:
        rows = np.asarray(rows, dtype=np.int64)
        key = rows.tobytes()
        if key not in cache:
            if len(cache) > 64:
                cache.clear()
            picked = [np.asarray(arrays[name])[rows] for name in order]
            out = dict(fn(*picked))
            if task == "regression":
                out["mean_error"] = float(np.mean(picked[1] - picked[0]))
            cache[key] = out
        return cache[key]

    def metric(name: str) -> Callable[[Any, Any], float]:
        def compute(rows: Any, _: Any) -> float:
            result = values(rows)
            if name not in result:
                raise KeyError(f"metric {name!r} is not computed for task {task!r}; choose from {sorted(result)}.")
            return float(result[name])

        return compute

    return {name: metric(name) for name in metrics}


def _size_fns(task: str, arrays: Mapping[str, np.ndarray]) -> dict[str, Callable[[Any, Any], float]]:
    """Group sizes: ``n`` and, where it matters, the scans of the rarest class (``min_class``) or the events."""

    def n(rows: Any, _: Any) -> float:
        return float(len(rows))

    out: dict[str, Callable[[Any, Any], float]] = {"n": n}
    if task in ("binary", "multiclass"):
        target = np.asarray(arrays["target"]).astype(np.int64)
        classes = np.unique(target)

        def min_class(rows: Any, _: Any) -> float:
            picked = target[np.asarray(rows, dtype=np.int64)]
            return float(min((picked == c).sum() for c in classes))

        out["min_class"] = min_class
        if task == "binary":

            def positives(rows: Any, _: Any) -> float:
                return float(target[np.asarray(rows, dtype=np.int64)].sum())

            out["positives"] = positives
    elif task == "multilabel":
        target = np.asarray(arrays["target"]).astype(np.int64)
        mask = np.asarray(arrays["mask"]).astype(bool)

        def min_class_multilabel(rows: Any, _: Any) -> float:
            r = np.asarray(rows, dtype=np.int64)
            pos = ((target[r] == 1) & mask[r]).sum(0)
            neg = ((target[r] == 0) & mask[r]).sum(0)
            return float(np.minimum(pos, neg).min())

        out["min_class"] = min_class_multilabel
    elif task == "survival":
        event = np.asarray(arrays["event"]).astype(np.int64)

        def events(rows: Any, _: Any) -> float:
            return float(event[np.asarray(rows, dtype=np.int64)].sum())

        out["events"] = events
    return out


def _strata(task: str, arrays: Mapping[str, np.ndarray], groups: np.ndarray) -> np.ndarray:
    if task in ("binary", "multiclass"):
        inner = np.asarray(arrays["target"]).astype(np.int64)
    elif task == "survival":
        inner = np.asarray(arrays["event"]).astype(np.int64)
    else:
        return groups.astype(str)
    return np.asarray([f"{g}\x1f{c}" for g, c in zip(groups, inner)])


def _frame(metrics: Mapping[str, Callable[[Any, Any], float]], rows: np.ndarray, groups: np.ndarray, name: str) -> Any:
    from fairlearn.metrics import MetricFrame

    return MetricFrame(metrics=dict(metrics), y_true=rows, y_pred=rows, sensitive_features=pd.Series(groups, name=name))


def _group_replicate(
    fns: Mapping[str, Callable[[Any, Any], float]], labels: np.ndarray, groups: Sequence[str]
) -> Callable[[np.ndarray], dict[str, float]]:
    """One bootstrap replicate: the metrics of ``groups`` and their max - min, for resampled row numbers.

    The same metric callables as the MetricFrame, applied per group directly: a MetricFrame costs about 35 ms to build
    (pandas group-apply per metric and group, measured on 120 rows and 3 groups), which at 1000 resamples per column
    would dominate ``neurojepa test``; this costs the metric evaluations only. ``tests/metrics/test_fairness.py``
    checks that on the unresampled rows it reproduces the MetricFrame's ``by_group`` and ``difference`` exactly.
    """

    def replicate(picked: np.ndarray) -> dict[str, float]:
        here = labels[picked]
        out: dict[str, float] = {}
        for group in groups:
            members = picked[here == group]
            for name, fn in fns.items():
                out[f"{name}\x1f{group}"] = float(fn(members, members))
        for name in fns:
            finite = [v for g in groups if math.isfinite(v := out[f"{name}\x1f{g}"])]
            # pandas' max / min skip NaN, as MetricFrame.difference does.
            out[f"{name}\x1fgap"] = max(finite) - min(finite) if finite else math.nan
        return out

    return replicate


def _interval(point: float, low: float = math.nan, high: float = math.nan) -> dict[str, float | None]:
    def clean(v: float) -> float | None:
        return float(v) if math.isfinite(float(v)) else None

    return {"value": clean(point), "ci_low": clean(low), "ci_high": clean(high)}


def subgroup_fairness(
    task: str,
    arrays: Mapping[str, np.ndarray],
    groups: Sequence[object] | np.ndarray,
    column: str = "group",
    metrics: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    min_samples: int = 10,
    min_positives: int = 5,
    order: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Per-group metrics and fairness gaps of one subgroup column.

    Args:
        task: the downstream task.
        arrays: the task's canonical arrays over all test rows (:mod:`neurojepa_pl.metrics.tasks`).
        groups: ``[n]`` group label of each row; ``None`` / NaN marks a missing value (left out).
        column: the column's name (reports).
        metrics: metric names (default :data:`FAIRNESS_METRICS` of the task).
        class_names: class names of multiclass / multilabel tasks.
        n_boot: bootstrap resamples (0: no CIs).
        alpha: 1 - CI level.
        seed: bootstrap seed.
        min_samples: groups with fewer scans are flagged.
        min_positives: classification groups with fewer scans of their rarest class, and survival groups with fewer
            events, are flagged.
        order: report order of the groups (default: sorted; groups not listed follow, sorted).

    Returns:
        ``{"column", "n", "n_missing", "metrics", "groups": [{"group", "n", ..., "metrics": {m: {"value",
        "ci_low", "ci_high"}}, "flags": [...], "eligible"}], "gap": {m: {"value", "ci_low", "ci_high"}} | None,
        "gap_groups": [...], "note"}``.
    """
    metrics = list(metrics or FAIRNESS_METRICS[task])
    labels = np.asarray([None if pd.isna(g) else str(g) for g in groups], dtype=object)
    n_total = labels.shape[0]
    rows = np.flatnonzero(labels != None)  # noqa: E711 - elementwise comparison on an object array
    result: dict[str, Any] = {
        "column": column,
        "n": int(rows.size),
        "n_missing": int(n_total - rows.size),
        "metrics": metrics,
        "min_samples": int(min_samples),
        "min_positives": int(min_positives),
        "groups": [],
        "gap": None,
        "gap_groups": [],
        "note": "",
    }
    if rows.size == 0:
        result["note"] = f"no test scan has a value in column {column!r}."
        return result
    fns = _metric_fns(task, arrays, metrics, class_names)
    sizes = _size_fns(task, arrays)
    with warnings.catch_warnings():
        # Undefined metrics of tiny groups are NaN by design (flagged below); their RuntimeWarnings add nothing.
        warnings.simplefilter("ignore", RuntimeWarning)
        table = _frame({**sizes, **fns}, rows, labels[rows], column).by_group
    present = [str(g) for g in table.index]
    ordered = [g for g in (order or []) if g in present] + sorted(g for g in present if g not in (order or []))
    flags: dict[str, list[str]] = {}
    for group in ordered:
        entry = table.loc[group]
        reasons = []
        if entry["n"] < min_samples:
            reasons.append(f"n={int(entry['n'])} < {min_samples}")
        if "min_class" in entry and entry["min_class"] < min_positives:
            reasons.append(f"rarest class has {int(entry['min_class'])} < {min_positives} scans")
        if "events" in entry and entry["events"] < min_positives:
            reasons.append(f"{int(entry['events'])} < {min_positives} events")
        undefined = [m for m in metrics if not math.isfinite(float(entry[m]))]
        if undefined:
            reasons.append(f"undefined {', '.join(undefined)}")
        flags[group] = reasons
    eligible = [g for g in ordered if not flags[g]]

    intervals: dict[str, tuple[float, float, float]] = {}
    if len(eligible) >= 2:
        keep = rows[np.isin(labels[rows], eligible)]
        # The gap is fairlearn's: max - min over the eligible groups' MetricFrame.
        gaps = _frame(fns, keep, labels[keep], column).difference(method="between_groups")
        if n_boot > 0:
            replicate = _group_replicate(fns, labels, eligible)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                intervals = dict(
                    bootstrap_metrics(
                        replicate, keep, n_boot=n_boot, alpha=alpha, seed=seed,
                        stratify=_strata(task, arrays, labels)[keep], too_few_finite="nan",
                    )
                )  # fmt: skip
        # Point values are MetricFrame's (the table and the gaps); the bootstrap adds the bounds.
        for m in metrics:
            for group in eligible:
                low, high = intervals.get(f"{m}\x1f{group}", (math.nan, math.nan, math.nan))[1:]
                intervals[f"{m}\x1f{group}"] = (float(table.loc[group, m]), low, high)
            low, high = intervals.get(f"{m}\x1fgap", (math.nan, math.nan, math.nan))[1:]
            intervals[f"{m}\x1fgap"] = (float(gaps[m]), low, high)
        result["gap"] = {m: _interval(*intervals[f"{m}\x1fgap"]) for m in metrics}
        result["gap_groups"] = eligible
    else:
        result["note"] = (
            f"fewer than two groups of {column!r} pass the size checks ({len(eligible)} of {len(ordered)}); no gap."
        )
    for group in ordered:
        entry = table.loc[group]
        sizes_out = {k: int(entry[k]) for k in sizes}
        values = {m: _interval(*intervals.get(f"{m}\x1f{group}", (float(entry[m]),))) for m in metrics}
        result["groups"].append(
            {"group": group, **sizes_out, "metrics": values, "flags": flags[group], "eligible": group in eligible}
        )
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Several columns, a run folder
# ----------------------------------------------------------------------------------------------------------------------
def fairness_report(
    task: str,
    arrays: Mapping[str, np.ndarray],
    frame: pd.DataFrame,
    columns: Sequence[str | SubgroupColumn],
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`subgroup_fairness` of several columns of ``frame`` (one row per test scan, aligned with ``arrays``).

    Args:
        task: the downstream task.
        arrays: canonical arrays.
        frame: the rows' columns (predictions joined with the manifest).
        columns: column specs (``"site"``, ``"age:0:45:65:inf"``) or :class:`SubgroupColumn`.
        **kwargs: options of :func:`subgroup_fairness` (metrics, n_boot, alpha, seed, min_samples, ...).

    Returns:
        ``{"task", "n", "metrics", "n_bootstrap", "ci_level", "columns": {name: result}}``.
    """
    specs = [c if isinstance(c, SubgroupColumn) else SubgroupColumn.parse(c) for c in columns]
    missing = [s.name for s in specs if s.name not in frame.columns]
    if missing:
        raise KeyError(f"subgroup columns {missing} are not in the predictions (found {list(frame.columns)}).")
    n_boot = int(kwargs.get("n_boot", 1000))
    alpha = float(kwargs.get("alpha", 0.05))
    out: dict[str, Any] = {
        "task": task,
        "n": int(len(frame)),
        "metrics": list(kwargs.get("metrics") or FAIRNESS_METRICS[task]),
        "n_bootstrap": n_boot,
        "ci_level": 1.0 - alpha,
        "columns": {},
    }
    for spec in specs:
        labels = spec.labels(frame[spec.name]).to_numpy()
        result = subgroup_fairness(task, arrays, labels, column=spec.name, order=spec.bin_names() or None, **kwargs)
        result["spec"] = spec.spec()
        out["columns"][spec.name] = result
    return out


def join_subgroup_columns(
    predictions: pd.DataFrame, columns: Sequence[str], manifest: pd.DataFrame | None
) -> pd.DataFrame:
    """``predictions`` with the subgroup ``columns`` it lacks taken from the manifest.

    Rows are matched on ``path`` when every prediction's path is in the manifest (per-scan runs; multimodal runs
    carry their anchor scan's path), else on ``subject_id`` + ``session_id`` (first manifest row of a session).

    Raises:
        KeyError: a column is in neither table, or no manifest is given for columns the predictions lack.
        ValueError: some prediction rows have no manifest row.
    """
    wanted = [c for c in dict.fromkeys(columns) if c not in predictions.columns]
    if not wanted:
        return predictions
    if manifest is None:
        raise KeyError(f"predictions lack the columns {wanted} and no manifest was given to take them from.")
    absent = [c for c in wanted if c not in manifest.columns]
    if absent:
        raise KeyError(f"columns {absent} are in neither the predictions nor the manifest ({list(manifest.columns)}).")
    if (
        "path" in predictions.columns
        and "path" in manifest.columns
        and predictions["path"].isin(manifest["path"]).all()
    ):
        keys = ["path"]
    else:
        keys = ["subject_id", "session_id"]
        for key in keys:
            if key not in predictions.columns or key not in manifest.columns:
                raise KeyError(f"cannot join predictions and manifest: {key!r} is missing from one of them.")
    lookup = manifest[[*keys, *wanted]].copy()
    for key in keys:
        lookup[key] = lookup[key].astype(str)
    lookup = lookup.drop_duplicates(subset=keys, keep="first")
    left = predictions.copy()
    for key in keys:
        left[key] = left[key].astype(str)
    joined = left.merge(lookup, on=keys, how="left", validate="many_to_one", indicator=True)
    unmatched = int((joined["_merge"] != "both").sum())
    if unmatched:
        raise ValueError(f"{unmatched} of {len(joined)} prediction rows have no manifest row (joined on {keys}).")
    joined = joined.drop(columns="_merge")
    joined.index = predictions.index
    return joined


def fairness_figure(report: Mapping[str, Any], metric: str | None = None) -> Figure:
    """One panel per subgroup column: each group's metric with its CI (flagged groups hollow and grey), and the gap
    with its CI in the title."""
    metric = metric or PRIMARY_METRIC.get(report["task"], report["metrics"][0])
    if metric not in report["metrics"]:
        metric = report["metrics"][0]
    columns = list(report["columns"].values())
    fig = Figure(figsize=(max(4.0, 3.6 * len(columns)), 3.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, max(1, len(columns)), squeeze=False)[0])
    for ax, result in zip(axes, columns):
        names = [g["group"] for g in result["groups"]]
        for x, group in enumerate(result["groups"]):
            value = group["metrics"][metric]
            if value["value"] is None:
                continue
            low, high = value["ci_low"], value["ci_high"]
            colour = "tab:blue" if group["eligible"] else "tab:gray"
            if low is not None and high is not None:
                ax.errorbar(x, value["value"], yerr=[[value["value"] - low], [high - value["value"]]], fmt="none",
                            ecolor=colour, capsize=3)  # fmt: skip
            ax.plot(x, value["value"], "o", color=colour, mfc=colour if group["eligible"] else "white")
        ax.set_xticks(range(len(names)), [f"{n}\n(n={g['n']})" for n, g in zip(names, result["groups"])],
                      fontsize="small")  # fmt: skip
        gap = (result["gap"] or {}).get(metric)
        if gap and gap["value"] is not None:
            ci = f" [{gap['ci_low']:.3f}, {gap['ci_high']:.3f}]" if gap["ci_low"] is not None else ""
            title = f"{result['column']}: gap {gap['value']:.3f}{ci}"
        else:
            title = f"{result['column']}: no gap"
        ax.set_title(title, fontsize="small")
        ax.set_ylabel(metric)
        ax.set_xlim(-0.5, len(names) - 0.5)
    fig.suptitle(f"{metric} by subgroup (hollow grey: flagged small group, left out of the gap)", fontsize="small")
    return fig


def _json_clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_clean(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def evaluate_run_fairness(
    run_dir: str | Path,
    columns: Sequence[str | SubgroupColumn],
    manifest: str | Path | None = None,
    task: str | None = None,
    class_names: Sequence[str] | None = None,
    figure: bool = True,
    **kwargs: Any,
) -> dict[str, Any]:
    """Fairness of a ``neurojepa test`` run folder, merged into its ``metrics.json`` under ``"fairness"``.

    Args:
        run_dir: folder holding ``predictions.csv`` and ``metrics.json``.
        columns: subgroup column specs (see :class:`SubgroupColumn`).
        manifest: where to take columns the predictions lack (default: the ``manifest`` recorded in
            ``metrics.json``).
        task: override the task inferred from the predictions' columns.
        class_names: class names (default: those recorded in ``metrics.json``).
        figure: also write ``figures/fairness.png``.
        **kwargs: options of :func:`subgroup_fairness` (metrics, n_boot, alpha, seed, min_samples, min_positives).

    Returns:
        The ``"fairness"`` entry written (its ``manifest`` key says where the columns came from).
    """
    from neurojepa_pl.data.schema import load_manifest
    from neurojepa_pl.metrics.predictions import read_predictions

    run = Path(run_dir)
    metrics_path = run / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"no metrics.json in {run}; run `neurojepa test` for this run first.")
    payload = json.loads(metrics_path.read_text())
    task, arrays, frame, names = read_predictions(run, task)
    class_names = class_names or payload.get("class_names") or names
    specs = [c if isinstance(c, SubgroupColumn) else SubgroupColumn.parse(c) for c in columns]
    needed = [s.name for s in specs if s.name not in frame.columns]
    source = manifest or (payload.get("manifest") if needed else None)
    table = None
    if needed:
        if source is None:
            raise KeyError(
                f"predictions.csv of {run} lacks the columns {needed} and metrics.json records no manifest; pass one."
            )
        if not Path(source).is_file():
            raise FileNotFoundError(f"manifest {source} (to take {needed} from) does not exist; pass the right one.")
        table = load_manifest(source)
    joined = join_subgroup_columns(frame, [s.name for s in specs], table)
    report = fairness_report(task, arrays, joined, specs, class_names=class_names, **kwargs)
    report["manifest"] = str(source) if source is not None else None
    if figure:
        (run / "figures").mkdir(parents=True, exist_ok=True)
        fairness_figure(report).savefig(run / "figures" / "fairness.png", dpi=110)
        report["figure"] = "figures/fairness.png"
    report = _json_clean(report)
    payload["fairness"] = report
    metrics_path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    return report
