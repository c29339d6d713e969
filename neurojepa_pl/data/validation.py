"""Validation of a manifest before training: columns, values, splits, duplicates, labels, files, leakage."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from neurojepa_pl.data.problems import Problem, ValidationReport
from neurojepa_pl.data.schema import (
    DEFAULT_LABEL_SPECS,
    MANIFEST_COLUMNS,
    MODALITIES,
    PAIRED_COLUMNS,
    PATH_COLUMNS,
    SEX_VALUES,
    SPLITS,
    LabelSpec,
    as_label_spec,
    detect_form,
    is_blank,
    load_manifest,
)

log = logging.getLogger(__name__)


def _first_path(df: pd.DataFrame, row: int) -> str | None:
    if "path" in df.columns and not is_blank(df.at[row, "path"]):
        return str(df.at[row, "path"])
    for col in PATH_COLUMNS.values():
        if col in df.columns and not is_blank(df.at[row, col]):
            return str(df.at[row, col])
    return None


def check_leakage(df: pd.DataFrame) -> list[Problem]:
    """Find subjects whose rows sit in more than one split.

    Args:
        df: a manifest (either form) with ``subject_id`` and ``split`` columns; rows with an empty split are ignored.

    Returns:
        One ``leakage`` error per leaking subject (its first row, the splits it appears in with row counts).
    """
    if "split" not in df.columns or "subject_id" not in df.columns:
        return []
    have = df[~df["split"].map(is_blank) & ~df["subject_id"].map(is_blank)]
    # One vectorised count first; the per-group loop then visits only the leaking subjects (a 22k-row manifest
    # took seconds when every subject was visited in Python).
    n_splits = have.groupby("subject_id", sort=True)["split"].nunique()
    leaking = have[have["subject_id"].isin(n_splits.index[n_splits > 1])]
    problems = []
    for subject, group in leaking.groupby("subject_id", sort=True):
        counts = group["split"].value_counts()
        if len(counts) > 1:
            where = ", ".join(f"{split} ({n} row(s))" for split, n in counts.sort_index().items())
            rows = [int(r) for r in group.index[:8]]
            problems.append(
                Problem(
                    "leakage",
                    rows[0],
                    _first_path(df, rows[0]),
                    f"subject {subject!r} appears in several splits: {where}; rows {rows}"
                    + (" ..." if len(group) > 8 else ""),
                    f"put every scan of subject {subject!r} in one split (splits must be patient-level), e.g. drop the "
                    "split column and let assign_patient_splits() choose.",
                )
            )
    return problems


def _check_columns(df: pd.DataFrame, form: str | None) -> list[Problem]:
    if form is None:
        return [
            Problem(
                "missing_column",
                None,
                None,
                f"the manifest has neither the per-scan columns {list(MANIFEST_COLUMNS)} nor the paired path columns "
                f"{list(PATH_COLUMNS.values())}; found columns {list(df.columns)}",
                "add the columns subject_id, session_id, modality, path (one row per scan).",
            )
        ]
    required = MANIFEST_COLUMNS if form == "per_scan" else PAIRED_COLUMNS
    return [
        Problem(
            "missing_column",
            None,
            None,
            f"required column {col!r} is missing ({form} form needs {list(required)}); found {list(df.columns)}",
            f"add a {col!r} column (see the manifest schema in the README).",
        )
        for col in required
        if col not in df.columns
    ]


def check_columns(columns: Sequence[str]) -> list[Problem]:
    """The ``missing_column`` problems of a manifest header (either form), without reading any row.

    Args:
        columns: the header's column names.
    """
    header = pd.DataFrame(columns=list(columns))
    return _check_columns(header, detect_form(header))


def _check_values(df: pd.DataFrame, form: str) -> list[Problem]:
    problems: list[Problem] = []
    required = MANIFEST_COLUMNS if form == "per_scan" else PAIRED_COLUMNS
    for col in required:
        for row in df.index[df[col].map(is_blank)]:
            problems.append(
                Problem(
                    "missing_value",
                    int(row),
                    _first_path(df, row),
                    f"column {col!r} is empty",
                    f"fill in {col!r} for this row or remove the row.",
                )
            )
    if form == "per_scan":
        lookup = {m.lower(): m for m in MODALITIES}
        for row, value in df["modality"].items():
            if is_blank(value) or value in MODALITIES:
                continue
            hint = lookup.get(str(value).strip().lower())
            problems.append(
                Problem(
                    "bad_modality",
                    int(row),
                    _first_path(df, row),
                    f"modality {value!r} is not one of {list(MODALITIES)}",
                    f"write {hint!r} (exact spelling)." if hint else f"use one of {list(MODALITIES)} or drop the row.",
                )
            )
    else:
        path_cols = [c for c in PATH_COLUMNS.values() if c in df.columns]
        for row in df.index[df[path_cols].map(is_blank).all(axis=1)]:
            problems.append(
                Problem(
                    "missing_value",
                    int(row),
                    None,
                    f"no path in any of {path_cols}",
                    "give at least one modality path or remove the row.",
                )
            )
    return problems


def _check_splits(df: pd.DataFrame) -> list[Problem]:
    if "split" not in df.columns or df["split"].map(is_blank).all():
        return [
            Problem(
                "no_split",
                None,
                None,
                "the manifest has no split column (or it is empty everywhere)",
                "nothing to do for training: the data modules assign a seeded patient-level 60/20/20 split "
                "(assign_patient_splits); add a split column to fix your own.",
                severity="warning",
            )
        ]
    problems: list[Problem] = []
    for row, value in df["split"].items():
        if is_blank(value):
            problems.append(
                Problem(
                    "missing_split",
                    int(row),
                    _first_path(df, row),
                    "split is empty here but set on other rows",
                    f"give every row one of {list(SPLITS)}, or leave the whole column empty to split automatically.",
                )
            )
        elif value not in SPLITS:
            problems.append(
                Problem(
                    "bad_split",
                    int(row),
                    _first_path(df, row),
                    f"split {value!r} is not one of {list(SPLITS)}",
                    f"use one of {list(SPLITS)} (lower case; 'valid'/'validation' must be written 'val').",
                )
            )
    return problems + check_leakage(df)


def _check_duplicates(df: pd.DataFrame, form: str) -> list[Problem]:
    problems: list[Problem] = []
    exact = df.duplicated(keep="first")
    first_of: dict[tuple, int] = {}
    for row, values in zip(df.index, df.itertuples(index=False, name=None), strict=True):
        key = tuple(None if is_blank(v) else v for v in values)
        first = first_of.setdefault(key, int(row))
        if not exact[row]:
            continue
        problems.append(
            Problem(
                "duplicate_row",
                int(row),
                _first_path(df, row),
                f"this row repeats row {first} exactly",
                "delete the repeated row.",
            )
        )
    path_cols = ["path"] if form == "per_scan" else [c for c in PATH_COLUMNS.values() if c in df.columns]
    seen: dict[str, int] = {}
    for row in df.index[~exact]:
        for col in path_cols:
            value = df.at[row, col]
            if is_blank(value):
                continue
            first = seen.get(value)
            if first is None:
                seen[value] = int(row)
            elif form == "paired" and first != row and df.at[first, "subject_id"] == df.at[row, "subject_id"]:
                # Published pairings can reuse one scan in several pairs (PPMI T1w+T2w: one T1w, several T2w);
                # each pair is its own sample of the same patient, so this is reported, not refused.
                problems.append(
                    Problem(
                        "shared_scan",
                        int(row),
                        str(value),
                        f"the file is also paired in row {first} (same subject)",
                        "fine when the pairing really reuses one scan (e.g. the published PPMI T1w+T2w pairs); "
                        "otherwise list every scan once.",
                        severity="warning",
                    )
                )
            else:
                problems.append(
                    Problem(
                        "duplicate_path",
                        int(row),
                        str(value),
                        f"the file is already listed in row {first}",
                        "list every scan once; if two sessions really share a file, the manifest is wrong.",
                    )
                )
    keys = ["subject_id", "session_id", "modality"] if form == "per_scan" else ["subject_id", "session_id"]
    unique = df[~exact]
    dup_key = unique.duplicated(subset=keys, keep="first")
    for row in unique.index[dup_key]:
        key = tuple(df.at[row, k] for k in keys)
        if form == "per_scan":
            problems.append(
                Problem(
                    "duplicate_scan",
                    int(row),
                    _first_path(df, row),
                    f"(subject, session, modality) {key} has more than one scan",
                    "fine for unimodal training; for pair_modalities keep one scan per modality and session.",
                    severity="warning",
                )
            )
        else:
            problems.append(
                Problem(
                    "duplicate_session",
                    int(row),
                    _first_path(df, row),
                    f"(subject, session) {key} has more than one row in a paired manifest",
                    "keep one row per session.",
                )
            )
    return problems


def _check_labels(df: pd.DataFrame, specs: Mapping[str, LabelSpec], explicit: bool) -> list[Problem]:
    problems: list[Problem] = []
    for col, spec in specs.items():
        if col not in df.columns:
            if explicit:
                problems.append(
                    Problem(
                        "missing_column",
                        None,
                        None,
                        f"label column {col!r} ({spec.kind}) is not in the manifest; found {list(df.columns)}",
                        f"add the {col!r} column or drop it from the label specs.",
                    )
                )
            continue
        numeric = pd.to_numeric(df[col], errors="coerce")
        blank = df[col].map(is_blank)
        for row in df.index:
            raw = df.at[row, col]
            if blank[row]:
                if not spec.allow_nan:
                    problems.append(
                        Problem(
                            "missing_label",
                            int(row),
                            _first_path(df, row),
                            f"label {col!r} is empty; expected {spec.describe()}",
                            f"fill it in, drop the row, or allow empty cells ('{col}:{spec.kind}:nan').",
                        )
                    )
                continue
            value = numeric[row]
            shown = repr(raw) if isinstance(raw, str) else f"{float(raw):g}"
            if not np.isfinite(value):
                problems.append(
                    Problem(
                        "bad_label",
                        int(row),
                        _first_path(df, row),
                        f"label {col!r} = {shown} is not a finite number; expected {spec.describe()}",
                        "write a number (no units, no text).",
                    )
                )
                continue
            ok = True
            if spec.kind in ("binary", "event"):
                ok = value in (0.0, 1.0)
            elif spec.kind == "categorical":
                ok = float(value).is_integer() and 0 <= value < spec.num_classes
            elif spec.kind == "time":
                ok = value > 0
            elif spec.kind == "continuous":
                ok = (spec.minimum is None or value >= spec.minimum) and (spec.maximum is None or value <= spec.maximum)
            if not ok:
                problems.append(
                    Problem(
                        "label_out_of_range",
                        int(row),
                        _first_path(df, row),
                        f"label {col!r} = {shown}; expected {spec.describe()}",
                        f"correct the value or the label spec of {col!r}"
                        + (" (times must be > 0; drop rows with no follow-up)" if spec.kind == "time" else "")
                        + ".",
                    )
                )
    if "sex" in df.columns:
        for row, value in df["sex"].items():
            if not is_blank(value) and value not in SEX_VALUES:
                problems.append(
                    Problem(
                        "bad_label",
                        int(row),
                        _first_path(df, row),
                        f"sex {value!r} is not one of {list(SEX_VALUES)}",
                        "write M or F, or leave the cell empty.",
                    )
                )
    return problems


FIX_REEXPORT = "re-export or re-copy the file (it is corrupt or truncated), or remove the row."
FIX_MISSING = "correct the path (relative paths are resolved against the manifest's folder) or remove the row."


def _missing_file(path: str, row: int | None) -> Problem | None:
    p = Path(path)
    if p.is_file():
        return None
    where = " (it is a directory)" if p.is_dir() else ""
    return Problem("missing_file", row, path, f"the file does not exist{where}", FIX_MISSING)


def diagnose_scan(path: str, row: int | None = None, mode: bool | str = True) -> Problem | None:
    """What is wrong with one scan file, as a :class:`Problem` (``None`` if nothing is found).

    The one place that says why a file cannot be used: ``validate_manifest`` calls it for every file, and the data
    modules call it for the scans their loading pass rejected, so a report names the same kind and fix either way.

    Kinds: ``missing_file``; ``unreadable`` (empty file, not an image, corrupt header); ``truncated`` (the compressed
    data ends early: a partial copy); ``bad_shape`` (not one 3D volume); ``non_finite`` (NaN/Inf voxels);
    ``empty_brain`` (constant volume: no voxel differs from the others, e.g. all zeros).

    Args:
        path: the image file.
        row: manifest row, for the report.
        mode: ``True`` reads the whole image; ``"header"`` only the header (shape checks).
    """
    # Imported here: nibabel is only needed when files are actually opened.
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    missing = _missing_file(path, row)
    if missing is not None:
        return missing
    try:
        img = nib.load(path)
        shape = tuple(int(s) for s in img.shape)
        spatial = shape[:3] if len(shape) == 4 and shape[3] == 1 else shape
        if len(spatial) != 3:
            return Problem(
                "bad_shape",
                row,
                path,
                f"expected one 3D volume, found image shape {shape}",
                "give one 3D volume per row (split 4D series or pick one volume, e.g. the b0 or trace of a DWI).",
            )
        if mode == "header":
            return None
        data = np.asanyarray(img.dataobj)
    except (EOFError, zlib.error) as err:
        return Problem(
            "truncated", row, path, f"the compressed data ends early ({type(err).__name__}: {err})", FIX_REEXPORT
        )
    except (OSError, ImageFileError, ValueError) as err:
        return Problem("unreadable", row, path, f"cannot read the image: {type(err).__name__}: {err}", FIX_REEXPORT)
    finite = np.isfinite(data) if np.issubdtype(data.dtype, np.floating) else np.ones(data.shape, dtype=bool)
    bad = int(data.size - np.count_nonzero(finite))
    if bad:
        return Problem(
            "non_finite",
            row,
            path,
            f"{bad} of {data.size} voxels are NaN or Inf",
            "fix the export; training skips this scan (counted against max_failed_fraction) unless "
            "nan_policy='zero' is set explicitly.",
        )
    if data.size == 0 or float(data.max()) == float(data.min()):
        value = f"{float(data.flat[0]):g}" if data.size else "none"
        return Problem(
            "empty_brain",
            row,
            path,
            f"the volume is constant (every voxel = {value}): there is no brain in it",
            "re-export the scan (the image data was lost or never written), or remove the row.",
        )
    return None


def _check_files(df: pd.DataFrame, form: str, check_readable: bool | str) -> list[Problem]:
    problems: list[Problem] = []
    path_cols = ["path"] if form == "per_scan" else [c for c in PATH_COLUMNS.values() if c in df.columns]
    checked: set[str] = set()
    for row in df.index:
        for col in path_cols:
            value = df.at[row, col]
            if is_blank(value) or value in checked:
                continue
            checked.add(value)
            if check_readable:
                found = diagnose_scan(str(value), int(row), check_readable)
            else:
                found = _missing_file(str(value), int(row))
            if found is not None:
                problems.append(found)
    return problems


def validate_manifest(
    df_or_path: pd.DataFrame | str | Path,
    label_specs: Mapping[str, LabelSpec | str] | None = None,
    check_files: bool = True,
    check_readable: bool | Literal["header"] = True,
) -> ValidationReport:
    """Check a manifest before any training.

    Checks: required columns; empty identifiers; modality names; split values, partially missing splits and
    patient leakage across splits; exact duplicate rows, files listed twice, repeated (subject, session[, modality]);
    label values against ``label_specs``; ``sex`` values; and, optionally, that every file exists and can be read.

    Args:
        df_or_path: a DataFrame from :func:`load_manifest` or the CSV path.
        label_specs: column -> :class:`LabelSpec` (or its string form, e.g. ``"categorical:3"``). ``None`` applies
            :data:`DEFAULT_LABEL_SPECS` to whichever of those columns are present.
        check_files: report files that do not exist.
        check_readable: ``True`` reads every file fully (corrupt/truncated gzip, NaN/Inf voxels, non-3D shape,
            constant volumes: see :func:`diagnose_scan`);
            ``"header"`` reads headers only (fast: shape checks); ``False`` does not open files.

    Returns:
        A :class:`ValidationReport`; call ``.raise_if_errors()`` to stop on errors.
    """
    df = load_manifest(df_or_path) if isinstance(df_or_path, (str, Path)) else df_or_path
    form = detect_form(df)
    report = ValidationReport(source=df.attrs.get("manifest_path"), n_rows=len(df), form=form)
    report.problems += _check_columns(df, form)
    if report.problems:
        return report
    if len(df) == 0:
        report.problems.append(Problem("empty", None, None, "the manifest has no rows", "add at least one scan."))
        return report
    report.problems += _check_values(df, form)
    report.problems += _check_splits(df)
    report.problems += _check_duplicates(df, form)
    explicit = label_specs is not None
    specs = {c: as_label_spec(c, s) for c, s in label_specs.items()} if explicit else dict(DEFAULT_LABEL_SPECS)
    report.problems += _check_labels(df, specs, explicit)
    if check_files:
        report.problems += _check_files(df, form, check_readable)
    return report
