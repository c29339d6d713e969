"""Reading the published train/val/test split CSVs of one :class:`CohortSpec` into one checked table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .spec import SPLITS, CohortSpec

# Prefix of the per-modality scan-ID columns of the combined split table.
SCAN_ID_PREFIX = "scan_id__"
SCAN_KEY_PREFIX = "scan_key__"
PATH_PREFIX = "path__"


PUBLISHED_SPLITS_DIR = Path(__file__).resolve().parent / "published_splits"
"""The authors' published split CSVs, shipped as package data (MIT licence and checksums beside them)."""


def default_split_dir() -> Path:
    """The published split CSVs that ship with the package (``published_splits/``: ``unimodal/``, ``multimodal/``).

    Raises:
        FileNotFoundError: when the installed package lacks them (a broken install); reinstall, or pass ``split_dir``.
    """
    if not PUBLISHED_SPLITS_DIR.is_dir():
        raise FileNotFoundError(
            f"The published split files are missing from the installed package ({PUBLISHED_SPLITS_DIR}). Reinstall "
            "neurojepa_pl, or pass split_dir= (a folder holding unimodal/ and multimodal/ with the published "
            "<COHORT>_..._{train,val,test}.csv files)."
        )
    return PUBLISHED_SPLITS_DIR


def split_file_paths(spec: CohortSpec, split_dir: str | Path) -> dict[str, Path]:
    """split -> path of the published file of ``spec`` (all three must exist).

    Raises:
        FileNotFoundError: naming the missing files and the pattern they were expected at.
    """
    root = Path(split_dir)
    paths = {split: root / spec.split_pattern.format(split=split) for split in SPLITS}
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{spec.key}: split files not found: {missing} (pattern {spec.split_pattern!r} under {root}). "
            "Check split_dir points at the folder holding unimodal/ and multimodal/."
        )
    return paths


def _integral_labels(values: pd.Series, column: str, path: Path) -> pd.Series:
    finite = values.dropna()
    if not np.all(np.isclose(finite, np.round(finite))):
        bad = finite[~np.isclose(finite, np.round(finite))]
        raise ValueError(
            f"{path}: label column {column!r} must hold whole numbers; "
            f"line {int(bad.index[0]) + 2} has {bad.iloc[0]!r}."
        )
    return values.round().astype("Int64")


def _check_label_range(values: pd.Series, spec: CohortSpec, column: str, path: Path) -> None:
    label = spec.label(column)
    finite = values.dropna()
    if label.kind in ("binary", "event"):
        allowed = {0, 1}
    elif label.kind == "categorical":
        allowed = set(range(int(label.num_classes)))
    else:
        return
    bad = finite[~finite.isin(allowed)]
    if len(bad):
        raise ValueError(
            f"{path}: label column {column!r} ({label.kind}) must be in {sorted(allowed)}; "
            f"line {int(bad.index[0]) + 2} "
            f"has {bad.iloc[0]!r}. Fix the file or the CohortSpec label kind."
        )


def _read_one(spec: CohortSpec, split: str, path: Path, notes: list[str]) -> pd.DataFrame:
    raw = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    columns = list(raw.columns)
    rename: dict[str, str] = {}
    for label in spec.labels:
        if label.column in columns:
            continue
        present = [alias for alias in label.aliases if alias in columns]
        if present:
            rename[present[0]] = label.column
            notes.append(
                f"{split} file {path.name} names label {label.column!r} as {present[0]!r} "
                f"(the other files say {label.column!r}); renamed."
            )
    raw = raw.rename(columns=rename)
    wanted = [spec.subject_column, *dict.fromkeys([*spec.scan_columns.values(), *spec.path_columns.values()])]
    wanted += [label.column for label in spec.labels]
    wanted += [c for c in (spec.site_column, *spec.extra_columns) if c]
    missing = [column for column in wanted if column not in raw.columns]
    if missing:
        raise ValueError(
            f"{path}: expected columns {missing} for {spec.key}, found {columns}. The published file may have changed; "
            "update the CohortSpec in data_modules/cohorts/registry.py (or pass a GenericCohort spec)."
        )
    extra = [column for column in raw.columns if column not in wanted]
    if extra:
        notes.append(f"{split} file {path.name} has columns not used by this spec: {extra} (ignored).")

    table = pd.DataFrame(index=raw.index)
    table["split"] = split
    table["source_file"] = str(path)
    table["source_row"] = raw.index + 2  # line number in the file (line 1 is the header)
    subject = raw[spec.subject_column]
    if subject.isna().any():
        line = int(subject.index[subject.isna()][0]) + 2
        raise ValueError(f"{path}: line {line} has an empty subject ID in column {spec.subject_column!r}.")
    table["subject_id"] = subject.str.strip()
    for modality, column in spec.scan_columns.items():
        scan = raw[column]
        if scan.isna().any():
            line = int(scan.index[scan.isna()][0]) + 2
            raise ValueError(f"{path}: line {line} has an empty {modality} scan ID in column {column!r}.")
        table[SCAN_ID_PREFIX + modality] = scan.str.strip()
    for modality, column in spec.path_columns.items():
        table[PATH_PREFIX + modality] = raw[column].str.strip()
    for label in spec.labels:
        try:
            values = pd.to_numeric(raw[label.column], errors="raise").astype(float)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{path}: label column {label.column!r} is not numeric ({error}).") from error
        if label.kind in ("binary", "categorical", "event"):
            values = _integral_labels(values, label.column, path)
            _check_label_range(values, spec, label.column, path)
        table[label.column] = values
    if spec.site_column:
        table["site"] = raw[spec.site_column]
    for column in spec.extra_columns:
        table[column] = raw[column]
    return table


def read_split_files(spec: CohortSpec, split_dir: str | Path) -> tuple[pd.DataFrame, dict[str, Path], list[str]]:
    """Read and check the three split files of ``spec``.

    Args:
        spec: the cohort/task/modality.
        split_dir: folder holding ``unimodal/`` and ``multimodal/``.

    Returns:
        ``(table, paths, notes)``: ``table`` has one row per data row of the three files, in train, val, test order,
        with columns ``split``, ``source_file``, ``source_row`` (line number), ``subject_id`` (raw), ``subject_key``,
        ``scan_id__<modality>`` / ``scan_key__<modality>`` (scan-level specs), the label columns (binary/categorical/
        event as nullable ``Int64``, others float), ``site`` and the spec's extra columns. ``notes`` lists column
        differences between the files.

    Raises:
        ValueError: a required column is missing, an ID is empty, a label is out of range, or two different raw subject
            IDs collapse onto one normalised key.
    """
    from .spec import normalise_id  # local: keeps the public surface of this module small

    paths = split_file_paths(spec, split_dir)
    notes: list[str] = []
    table = pd.concat([_read_one(spec, split, path, notes) for split, path in paths.items()], ignore_index=True)
    table["subject_key"] = table["subject_id"].map(normalise_id)
    for modality in spec.scan_columns:
        table[SCAN_KEY_PREFIX + modality] = table[SCAN_ID_PREFIX + modality].map(spec.scan_key)
    raw_per_key = table.groupby("subject_key")["subject_id"].nunique()
    clashing = raw_per_key[raw_per_key > 1]
    if len(clashing):
        key = clashing.index[0]
        raws = sorted(table.loc[table["subject_key"] == key, "subject_id"].unique())
        raise ValueError(
            f"{spec.key}: different subject IDs {raws} normalise to the same join key {key!r}; the join would merge "
            "them. Rename the subjects in the data or use a scan table with the exact IDs."
        )
    return table, paths, notes
