"""Views of a learning-curve report (the dict ``neurojepa learning-curve`` writes as ``learning_curve.json``).

* :func:`result_rows`: one flat row per label, modality, pooling and source (checkpoint step, random init, raw
  baseline), for ``learning_curve.csv``;
* :func:`write_tensorboard`: the curve, the band and the baselines as scalars at each checkpoint's step;
* :func:`learning_curve_figure`: metric vs pretraining step for one label, one panel per modality, the random band
  shaded, baselines as horizontal lines;
* :func:`format_summary_table`: the Markdown table the tool prints.

Report layout (values ``null`` where undefined)::

    {"settings": {...}, "run": {"checkpoints": [{"step", "path"}], "init": ..., ...},
     "results": [{"label", "modality", "task", "metric", "n_scans", "n_subjects", "n_folds", ...,
                  "baselines": {name: {"mean", "std", "folds"}},
                  "poolings": {pooling: {"random": {"members": [{"seed", "mean", "std", "folds"}],
                                                    "band": {"low", "high", "mean", "best_seed"}},
                                         "curve": [{"step", "checkpoint", "mean", "std", "folds",
                                                    "vs_best_random": {"mean", "ci_low", "ci_high", "above_zero"},
                                                    "vs_init": {...} or null}]}}}]}
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

__all__ = ["result_rows", "write_tensorboard", "learning_curve_figure", "format_summary_table"]

_BASELINE_STYLES = {"histogram": ":", "avgpool": "-."}
_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple")


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)


def result_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Flat rows: ``label, modality, task, metric, pooling, source, step, seed, mean, std`` and, for checkpoints,
    the paired difference to the best random init (``diff_vs_best_random``, ``ci_low``, ``ci_high``,
    ``beats_random``)."""
    rows: list[dict[str, Any]] = []
    for entry in report["results"]:
        base = {k: entry[k] for k in ("label", "modality", "task", "metric")}
        for name, scores in entry["baselines"].items():
            rows.append(
                {**base, "pooling": None, "source": f"baseline:{name}", "mean": scores["mean"], "std": scores["std"]}
            )
        for pooling, block in entry["poolings"].items():
            for member in block["random"]["members"]:
                rows.append(
                    {
                        **base,
                        "pooling": pooling,
                        "source": "random",
                        "seed": member["seed"],
                        "mean": member["mean"],
                        "std": member["std"],
                    }
                )
            for point in block["curve"]:
                diff = point["vs_best_random"]
                rows.append(
                    {
                        **base,
                        "pooling": pooling,
                        "source": "checkpoint",
                        "step": point["step"],
                        "mean": point["mean"],
                        "std": point["std"],
                        "diff_vs_best_random": diff["mean"],
                        "ci_low": diff["ci_low"],
                        "ci_high": diff["ci_high"],
                        "beats_random": diff["above_zero"],
                    }
                )
    return rows


def write_tensorboard(report: dict[str, Any], log_dir: str | Path) -> Path:
    """Write the report as TensorBoard scalars into ``log_dir`` (earlier event files there are replaced).

    Tags, per label, modality and pooling (``<label>/<modality>/<pooling>/...``): ``pretrained`` (CV mean of each
    checkpoint at its step), ``random_low`` / ``random_high`` / ``random_mean`` (the band, repeated at each step so
    it draws as lines), ``diff_vs_best_random`` with ``diff_ci_low`` / ``diff_ci_high``; per label and modality:
    ``<label>/<modality>/baseline_<name>``.
    """
    from torch.utils.tensorboard import SummaryWriter

    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    for old in log_dir.glob("events.out.tfevents.*"):
        old.unlink()  # a rerun into the same folder would otherwise draw two curves
    writer = SummaryWriter(str(log_dir))
    try:
        for entry in report["results"]:
            head = f"{entry['label']}/{entry['modality']}"
            for pooling, block in entry["poolings"].items():
                band = block["random"]["band"]
                for point in block["curve"]:
                    step, diff = point["step"], point["vs_best_random"]
                    values = {
                        "pretrained": point["mean"],
                        "random_low": band["low"],
                        "random_high": band["high"],
                        "random_mean": band["mean"],
                        "diff_vs_best_random": diff["mean"],
                        "diff_ci_low": diff["ci_low"],
                        "diff_ci_high": diff["ci_high"],
                    }
                    for name, value in values.items():
                        writer.add_scalar(f"{head}/{pooling}/{name}", _number(value), step)
            steps = sorted({p["step"] for block in entry["poolings"].values() for p in block["curve"]})
            for name, scores in entry["baselines"].items():
                for step in steps:
                    writer.add_scalar(f"{head}/baseline_{name}", _number(scores["mean"]), step)
    finally:
        writer.close()
    return log_dir


def learning_curve_figure(report: dict[str, Any], label: str) -> Figure:
    """Metric vs pretraining step for ``label``: one panel per modality; per pooling the checkpoints' CV means
    (circled where the CI of the paired difference to the best random init lies above 0), the random-init band
    (min-max shaded, mean dashed); raw baselines as grey lines."""
    entries = [e for e in report["results"] if e["label"] == label]
    if not entries:
        raise ValueError(f"the report has no results for label {label!r}.")
    fig = Figure(figsize=(5.2 * len(entries) + 2.6, 4.0), constrained_layout=True)
    axes = fig.subplots(1, len(entries), squeeze=False)[0]
    for ax, entry in zip(axes, entries):
        steps = sorted({p["step"] for block in entry["poolings"].values() for p in block["curve"]})
        span = (steps[0], steps[-1]) if steps[-1] > steps[0] else (steps[0] - 0.5, steps[0] + 0.5)
        for colour, (pooling, block) in zip(_COLOURS, entry["poolings"].items()):
            band = block["random"]["band"]
            n_members = len(block["random"]["members"])
            ax.fill_between(
                span,
                _number(band["low"]),
                _number(band["high"]),
                color=colour,
                alpha=0.15,
                label=f"{pooling}: random init band (n={n_members})",
            )
            ax.plot(span, [_number(band["mean"])] * 2, color=colour, linestyle="--", linewidth=1)
            curve = block["curve"]
            # No per-point error bars: the fold SD is not an interval for the mean, and the claim that matters, the
            # paired difference to the best random init, is marked below (its CI is in the JSON and the table).
            ax.plot(
                [p["step"] for p in curve],
                [_number(p["mean"]) for p in curve],
                color=colour,
                marker="o",
                label=f"{pooling}: pretrained",
            )
            beats = [p for p in curve if p["vs_best_random"]["above_zero"]]
            if beats:
                ax.scatter(
                    [p["step"] for p in beats],
                    [_number(p["mean"]) for p in beats],
                    s=90,
                    facecolors="none",
                    edgecolors=colour,
                    label=f"{pooling}: CI of diff. to best random > 0",
                )
        for name, scores in entry["baselines"].items():
            ax.axhline(
                _number(scores["mean"]),
                color="0.35",
                linestyle=_BASELINE_STYLES.get(name, "-"),
                linewidth=1.2,
                label=f"raw baseline: {name}",
            )
        chance = 0.5 if entry["metric"] == "auroc" else 0.0
        ax.axhline(chance, color="0.75", linewidth=0.8)
        ax.set_title(f"{label} on {entry['modality']} ({entry['n_scans']} scans, {entry['n_subjects']} subjects)")
        ax.set_xlabel("pretraining step")
        ax.set_ylabel(f"{entry['metric']} (mean over {entry['n_folds']} grouped CV folds)")
    # One legend for all panels (they share the styles), outside the last one so that it hides no point.
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return fig


def _fmt(value: Any, digits: int = 3) -> str:
    number = _number(value)
    return "nan" if not math.isfinite(number) else f"{number:.{digits}f}"


def format_summary_table(report: dict[str, Any]) -> str:
    """Markdown table, one row per label, modality and pooling: the init (step 0, if present), the last checkpoint,
    the random band, the raw baselines, and the last checkpoint minus the best random init with its CI."""
    baseline_names = list(report["settings"]["baselines"])
    header = [
        "label",
        "modality",
        "pooling",
        "metric",
        "init (step 0)",
        "last step",
        "last",
        "random band [min, max] (mean)",
        *baseline_names,
        "last - best random [95% CI]",
        "beats random",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for entry in report["results"]:
        for pooling, block in entry["poolings"].items():
            curve, band = block["curve"], block["random"]["band"]
            init = next((p for p in curve if p["step"] == 0), None)
            last = curve[-1]
            diff = last["vs_best_random"]
            cells = [
                entry["label"],
                entry["modality"],
                pooling,
                entry["metric"],
                _fmt(init["mean"]) if init is not None else "n/a",
                str(last["step"]),
                _fmt(last["mean"]),
                f"[{_fmt(band['low'])}, {_fmt(band['high'])}] ({_fmt(band['mean'])})",
                *(_fmt(entry["baselines"][n]["mean"]) if n in entry["baselines"] else "n/a" for n in baseline_names),
                f"{_fmt(diff['mean'], 3)} [{_fmt(diff['ci_low'], 3)}, {_fmt(diff['ci_high'], 3)}]",
                "yes" if diff["above_zero"] else "no",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
