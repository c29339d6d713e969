"""Specs for cohorts that are not in the registry: institutional multi-label EHR cohorts and any other split CSVs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .spec import CohortSpec, LabelColumn

_DEFAULT_KIND = {"binary": "binary", "multilabel": "binary", "multiclass": "categorical", "regression": "continuous"}


def generic_cohort_spec(
    name: str,
    split_pattern: str,
    subject_column: str,
    label_columns: Sequence[str],
    modality: str = "T1w",
    task: str = "labels",
    task_type: str = "multilabel",
    label_kinds: Mapping[str, str] | None = None,
    num_classes: int | None = None,
    scan_columns: Mapping[str, str] | None = None,
    path_columns: Mapping[str, str] | None = None,
    scan_key_rule: str = "generic",
    time_column: str | None = None,
    event_column: str | None = None,
    site_column: str | None = None,
    extra_columns: Sequence[str] = (),
) -> CohortSpec:
    """Describe a cohort's own split CSVs (e.g. an institution's ``{split}_MRI_T1w_labels.csv`` EHR label files).

    Args:
        name: cohort name used in reports and file names.
        split_pattern: split-file path relative to the split dir with ``{split}`` for train/val/test,
            e.g. ``"{split}_MRI_T1w_labels.csv"``.
        subject_column: the patient ID column (patient-level splits are checked on it).
        label_columns: label columns the task trains on (all of them for a multi-label EHR cohort).
        modality: ``"T1w"`` ... or a pair ``"T1w+FLAIR"``.
        task: task name for reports.
        task_type: ``multilabel`` (default: one binary label per EHR finding), ``binary``, ``multiclass``,
            ``regression`` or ``survival``.
        label_kinds: column -> kind overriding the default of the task type (binary for binary/multilabel,
            categorical for multiclass, continuous for regression; time/event for the survival columns).
        num_classes: classes of a multiclass task.
        scan_columns: modality -> scan/session ID column, when scans are found in a BIDS tree or scan table.
        path_columns: modality -> column already holding the image path (e.g. ``{"T1w": "img_path"}``).
        scan_key_rule: key rule for scan IDs (see :mod:`.spec`).
        time_column / event_column: survival columns.
        site_column: column copied to ``site``.
        extra_columns: other columns copied as they are.

    Returns:
        A :class:`CohortSpec` for :func:`build_cohort_manifest` and the cohort data modules.
    """
    kinds = dict(label_kinds or {})
    columns = list(label_columns)
    if task_type == "survival":
        if not (time_column and event_column):
            raise ValueError("a survival GenericCohort needs time_column and event_column.")
        kinds.setdefault(time_column, "time")
        kinds.setdefault(event_column, "event")
        columns = list(dict.fromkeys([*columns, time_column, event_column]))
    if not columns:
        raise ValueError(f"GenericCohort {name!r}: label_columns is empty; name the label columns of the split files.")
    labels = []
    for column in columns:
        kind = kinds.get(column, _DEFAULT_KIND.get(task_type))
        if kind is None:
            raise ValueError(f"GenericCohort {name!r}: give label_kinds[{column!r}] (task_type {task_type!r}).")
        labels.append(LabelColumn(column, kind, num_classes=num_classes if kind == "categorical" else None))
    modalities = modality.split("+")
    return CohortSpec(
        cohort=name,
        task=task,
        modality=modality,
        split_pattern=split_pattern,
        subject_column=subject_column,
        task_type=task_type,
        labels=tuple(labels),
        task_labels=tuple(columns),
        scan_columns=dict(scan_columns or {}),
        scan_key_rule=scan_key_rule,
        path_columns={m: path_columns[m] for m in modalities} if path_columns else {},
        time_column=time_column,
        event_column=event_column,
        site_column=site_column,
        extra_columns=tuple(extra_columns),
        num_classes=num_classes,
        description=f"user-defined cohort {name}",
    )
