"""Reliability warnings of test metrics: test sets too small for a number to mean much, and degenerate bootstrap
intervals (docs/method.md §8.9).

A metric on a handful of cases is not wrong, but its value and interval do not say what they seem to say. With 3
positive scans, a perfect ranking gives AUROC 1.0, and a class-stratified bootstrap redraws those same 3 positives
in every resample, so the "95% CI" is [1.0, 1.0]. That reads as certainty, but it only means there were too few cases
for the resamples to differ. So every metric in ``metrics.json`` carries a ``warnings`` list, empty when nothing is
wrong, and the printed table marks flagged metrics (:func:`neurojepa_pl.metrics.report.format_metrics_table`).

Each warning has a machine-readable ``code`` and a sentence with the numbers (:class:`MetricWarning`):

=======================  =====================================================================================
code                     raised when
=======================  =====================================================================================
``few_positives``        binary / multilabel: a (label's) positive class has < ``MIN_CLASS_CASES`` cases
``few_negatives``        binary / multilabel: a (label's) negative class has < ``MIN_CLASS_CASES`` cases
``few_cases_per_class``  multiclass: a class has < ``MIN_CLASS_CASES`` test cases
``few_samples``          regression: < ``MIN_REGRESSION_SAMPLES`` test samples
``few_events``           survival: < ``MIN_EVENTS`` observed events
``undefined``            the metric itself is NaN on the test set (e.g. a class that has a single target value)
``ci_undefined``         the value is finite but the bootstrap gave no interval (too few finite resamples)
``few_valid_resamples``  the interval comes from < ``MIN_VALID_RESAMPLE_FRACTION`` of the resamples
``degenerate_ci``        the interval has zero width (ci_low == ci_high)
=======================  =====================================================================================

The thresholds are rules of thumb, not a power analysis. They are named constants so a study can quote them.
Written by hand: no library in the stack (torchmetrics, scikit-learn, scikit-survival) flags small-sample metrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "MIN_CLASS_CASES",
    "MIN_REGRESSION_SAMPLES",
    "MIN_EVENTS",
    "MIN_VALID_RESAMPLE_FRACTION",
    "DEGENERATE_CI_RTOL",
    "WARNING_CODES",
    "MetricWarning",
    "MetricResults",
    "sample_size_warnings",
    "interval_warnings",
    "merge_warnings",
]

# Below ~10 cases in a class, one case moves AUROC/AP/recall by about 0.1 or more. The Hanley-McNeil standard error
# of an AUROC of 0.8 with 10 positives and 10 negatives is already about 0.1, and the class-stratified bootstrap keeps
# the class counts, so its resamples redraw the same few cases and understate that spread.
MIN_CLASS_CASES = 10
# MAE/RMSE/R² of fewer than ~20 samples follow one or two outliers (and R² is undefined for a near-constant target).
MIN_REGRESSION_SAMPLES = 20
# Harrell's C needs a comparable pair to have an event at the earlier time. With fewer than ~10 events it rests on few
# pairs. This is the events-per-variable rule of survival modelling (Peduzzi et al. 1995) applied to one risk score.
MIN_EVENTS = 10
# The bootstrap (neurojepa_pl/metrics/bootstrap.py) refuses an interval when fewer than half of the resamples give a
# finite value. Between half and this fraction it reports one, but that interval only describes the resamples in which
# the metric happened to be defined (those that drew both classes), so it is biased and usually too narrow.
MIN_VALID_RESAMPLE_FRACTION = 0.9
# Relative width under which an interval counts as zero-width (float32 rounding of metrics computed in torchmetrics).
DEGENERATE_CI_RTOL = 1e-6

WARNING_CODES: dict[str, str] = {
    "few_positives": f"fewer than {MIN_CLASS_CASES} positive cases",
    "few_negatives": f"fewer than {MIN_CLASS_CASES} negative cases",
    "few_cases_per_class": f"a class with fewer than {MIN_CLASS_CASES} test cases",
    "few_samples": f"fewer than {MIN_REGRESSION_SAMPLES} test samples",
    "few_events": f"fewer than {MIN_EVENTS} observed events",
    "undefined": "the metric is undefined on this test set",
    "ci_undefined": "no bootstrap interval",
    "few_valid_resamples": f"the interval rests on fewer than {MIN_VALID_RESAMPLE_FRACTION:.0%} of the resamples",
    "degenerate_ci": "zero-width bootstrap interval",
}
"""Every warning code with a short description (the legend of the printed table)."""


@dataclass(frozen=True)
class MetricWarning:
    """One reliability warning of one metric.

    Attributes:
        code: one of :data:`WARNING_CODES`.
        message: a sentence with the numbers behind it, for people.
    """

    code: str
    message: str

    def __post_init__(self) -> None:
        if self.code not in WARNING_CODES:
            raise ValueError(f"unknown metric warning code {self.code!r}; known: {sorted(WARNING_CODES)}.")

    def to_json(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


Warnings = dict[str, list[MetricWarning]]


class MetricResults(dict[str, tuple[float, float, float]]):
    """``{metric: (value, ci_low, ci_high)}``, the bootstrap's result, plus what is known about its reliability.

    A plain dict for every existing reader. :func:`neurojepa_pl.metrics.report.write_metrics_json` also reads the
    attributes.

    Attributes:
        warnings: ``{metric: [MetricWarning, ...]}`` (every metric has a list, possibly empty).
        n_boot: resamples drawn (``None`` when unknown).
        n_finite: ``{metric: resamples with a finite value}`` (empty when unknown).
    """

    def __init__(
        self,
        results: Mapping[str, tuple[float, float, float]],
        warnings: Mapping[str, Sequence[MetricWarning]] | None = None,
        n_boot: int | None = None,
        n_finite: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__(results)
        self.n_boot = n_boot
        self.n_finite = dict(n_finite or {})
        self.warnings: Warnings = {name: list((warnings or {}).get(name, ())) for name in self}

    def add_warnings(self, extra: Mapping[str, Sequence[MetricWarning]], first: bool = False) -> None:
        """Add warnings per metric (``first``: before the existing ones, e.g. a cause before its symptom)."""
        self.warnings = merge_warnings(extra, self.warnings) if first else merge_warnings(self.warnings, extra)
        self.warnings = {name: self.warnings.get(name, []) for name in self}


def merge_warnings(*parts: Mapping[str, Sequence[MetricWarning]]) -> Warnings:
    """Concatenate per-metric warning lists, dropping exact duplicates, keeping first-seen order."""
    out: Warnings = {}
    for part in parts:
        for name, items in part.items():
            bucket = out.setdefault(name, [])
            bucket.extend(w for w in items if w not in bucket)
    return out


def _names(count: int, class_names: Sequence[str] | None) -> list[str]:
    return [str(c) for c in class_names] if class_names is not None else [str(i) for i in range(count)]


def _group(metric_names: Sequence[str], suffix: str | None) -> list[str]:
    """The metrics a per-class / per-label fact concerns: those named ``<metric>/<suffix>`` (``None``: the rest)."""
    if suffix is None:
        return [m for m in metric_names if "/" not in m]
    return [m for m in metric_names if m.endswith(f"/{suffix}")]


def _binary_counts(target: np.ndarray) -> tuple[int, int]:
    positives = int((target == 1).sum())
    return positives, int(target.size - positives)


def _two_class_warnings(positives: int, negatives: int, where: str) -> list[MetricWarning]:
    out = []
    for code, count, kind in (("few_positives", positives, "positive"), ("few_negatives", negatives, "negative")):
        if count < MIN_CLASS_CASES:
            out.append(
                MetricWarning(
                    code,
                    f"{where}{count} {kind} case{'s' if count != 1 else ''} in the test set (fewer than "
                    f"{MIN_CLASS_CASES}): the value and its interval rest on too few cases to be trusted; "
                    f"evaluate on at least {MIN_CLASS_CASES} {kind} cases.",
                )
            )
    return out


def sample_size_warnings(
    task: str,
    arrays: Mapping[str, np.ndarray],
    metric_names: Sequence[str],
    class_names: Sequence[str] | None = None,
) -> Warnings:
    """Warnings for test sets too small for the task's metrics.

    Args:
        task: ``binary``, ``multiclass``, ``multilabel``, ``regression`` or ``survival``.
        arrays: the task's canonical arrays (:mod:`neurojepa_pl.metrics.tasks`): ``target`` (+ ``score``, ``mask``)
            or ``time``/``event``.
        metric_names: the metric keys to flag (``auroc``, ``auroc/<class>``, ...).
        class_names: class / label names of the per-class keys (default ``"0"``, ``"1"``, ...).

    Returns:
        ``{metric: [MetricWarning, ...]}`` for every name in ``metric_names``. A per-class or per-label metric
        (``<metric>/<name>``) gets that class's warnings, and a macro metric gets one warning per code that names
        every class or label concerned.
    """
    out: Warnings = {name: [] for name in metric_names}

    def add(names: Sequence[str], warnings: Sequence[MetricWarning]) -> None:
        for name in names:
            out[name].extend(warnings)

    if task == "binary":
        positives, negatives = _binary_counts(np.asarray(arrays["target"]).reshape(-1))
        add(list(metric_names), _two_class_warnings(positives, negatives, "only "))
    elif task == "multiclass":
        target = np.asarray(arrays["target"]).reshape(-1)
        n_classes = np.asarray(arrays["score"]).shape[1]
        counts = {name: int((target == c).sum()) for c, name in enumerate(_names(n_classes, class_names))}
        small = {name: count for name, count in counts.items() if count < MIN_CLASS_CASES}
        for name, count in small.items():
            add(
                _group(metric_names, name),
                [
                    MetricWarning(
                        "few_cases_per_class",
                        f"class {name!r} has {count} test case{'s' if count != 1 else ''} (fewer than "
                        f"{MIN_CLASS_CASES}): its value and interval rest on too few cases to be trusted.",
                    )
                ],
            )
        if small:
            listed = ", ".join(f"{name!r} ({count})" for name, count in small.items())
            add(
                _group(metric_names, None),
                [
                    MetricWarning(
                        "few_cases_per_class",
                        f"class{'es' if len(small) > 1 else ''} {listed} of {len(counts)} "
                        f"{'have' if len(small) > 1 else 'has'} fewer than {MIN_CLASS_CASES} test cases: the macro "
                        "average includes per-class values resting on too few cases to be trusted.",
                    )
                ],
            )
    elif task == "multilabel":
        label_target = np.asarray(arrays["target"])
        mask = np.asarray(arrays["mask"], dtype=bool) if "mask" in arrays else np.ones(label_target.shape, dtype=bool)
        small_labels: dict[str, list[tuple[str, int]]] = {"few_positives": [], "few_negatives": []}
        for j, name in enumerate(_names(label_target.shape[1], class_names)):
            positives, negatives = _binary_counts(label_target[mask[:, j], j])
            warnings = _two_class_warnings(positives, negatives, f"label {name!r}: only ")
            add(_group(metric_names, name), warnings)
            for w in warnings:
                small_labels[w.code].append((name, positives if w.code == "few_positives" else negatives))
        for code, labels in small_labels.items():
            if labels:
                kind = "positive" if code == "few_positives" else "negative"
                listed = ", ".join(f"{name!r} ({count})" for name, count in labels)
                add(
                    _group(metric_names, None),
                    [
                        MetricWarning(
                            code,
                            f"label{'s' if len(labels) > 1 else ''} {listed} of {label_target.shape[1]} "
                            f"{'have' if len(labels) > 1 else 'has'} fewer than {MIN_CLASS_CASES} {kind} cases: "
                            "the macro average includes per-label values resting on too few cases to be trusted.",
                        )
                    ],
                )
    elif task == "regression":
        n = int(np.asarray(arrays["target"]).reshape(-1).size)
        if n < MIN_REGRESSION_SAMPLES:
            add(
                list(metric_names),
                [
                    MetricWarning(
                        "few_samples",
                        f"only {n} test sample{'s' if n != 1 else ''} (fewer than {MIN_REGRESSION_SAMPLES}): the "
                        "error metrics follow a few cases and their interval is unreliable.",
                    )
                ],
            )
    elif task == "survival":
        event = np.asarray(arrays["event"]).reshape(-1).astype(bool)
        events = int(event.sum())
        if events < MIN_EVENTS:
            add(
                list(metric_names),
                [
                    MetricWarning(
                        "few_events",
                        f"only {events} observed event{'s' if events != 1 else ''} among {event.size} test cases "
                        f"(fewer than {MIN_EVENTS}): the C-index rests on few comparable pairs and its interval is "
                        "unreliable.",
                    )
                ],
            )
    else:
        raise ValueError(f"task must be binary, multiclass, multilabel, regression or survival; got {task!r}.")
    return out


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) >= 1e3 or (x != 0 and abs(x) < 1e-3) else f"{x:.3f}"


def interval_warnings(
    results: Mapping[str, tuple[float, float, float]],
    n_finite: Mapping[str, int] | None = None,
    n_boot: int | None = None,
) -> Warnings:
    """Warnings read off the point values and bootstrap intervals alone.

    Args:
        results: ``{metric: (value, ci_low, ci_high)}``.
        n_finite: ``{metric: resamples with a finite value}``. Without it (or ``n_boot``), ``few_valid_resamples``
            cannot be checked.
        n_boot: resamples drawn.

    Returns:
        ``{metric: [MetricWarning, ...]}`` for every metric: ``undefined``, ``ci_undefined``,
        ``few_valid_resamples``, ``degenerate_ci``.
    """
    out: Warnings = {}
    for name, (value, low, high) in results.items():
        value, low, high = float(value), float(low), float(high)
        warnings: list[MetricWarning] = []
        finite = (n_finite or {}).get(name)
        of = f" ({finite} of {n_boot} resamples finite)" if finite is not None and n_boot else ""
        if not math.isfinite(value):
            warnings.append(
                MetricWarning(
                    "undefined",
                    "undefined on this test set (e.g. a class or label with a single target value, or no "
                    "comparable pair).",
                )
            )
        elif not (math.isfinite(low) and math.isfinite(high)):
            warnings.append(
                MetricWarning(
                    "ci_undefined",
                    f"no bootstrap interval: the metric is undefined in too many resamples{of}; the test set is too "
                    "small or too unbalanced for it.",
                )
            )
        else:
            if finite is not None and n_boot and finite < MIN_VALID_RESAMPLE_FRACTION * n_boot:
                warnings.append(
                    MetricWarning(
                        "few_valid_resamples",
                        f"the interval rests on only {finite} of {n_boot} resamples (fewer than "
                        f"{MIN_VALID_RESAMPLE_FRACTION:.0%}): it describes the resamples where the metric happened to "
                        "be defined and is biased, usually too narrow.",
                    )
                )
            # "Zero width" up to float32 rounding: torchmetrics' AUROC of a perfect ranking can come out as 1 - 6e-8.
            # A genuine interval is never that narrow (its width shrinks like 1/sqrt(n)).
            if math.isclose(low, high, rel_tol=DEGENERATE_CI_RTOL, abs_tol=DEGENERATE_CI_RTOL):
                warnings.append(
                    MetricWarning(
                        "degenerate_ci",
                        f"the bootstrap interval [{_fmt(low)}, {_fmt(high)}] has zero width: every resample gave the "
                        "same value, which on a small test set means too few cases to vary, not certainty.",
                    )
                )
        out[name] = warnings
    return out
