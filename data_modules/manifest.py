"""Manifest schema, validation, patient-level splits and modality pairing.

A manifest is a CSV with one row per scan (the *per-scan* form)::

    subject_id, session_id, modality, path[, split, site, age, sex, <label columns>...]

or one row per session with one path column per modality (the *paired* form produced by :func:`pair_modalities`)::

    subject_id, session_id, t1w_path, t2w_path, flair_path[, split, <label columns>...]

Paths are absolute or relative to the manifest file's directory. ``split`` is patient-level (all rows of a subject in
one of ``train``/``val``/``test``). :func:`validate_manifest` checks everything a training run would otherwise trip over
hours later and reports each problem with its row, path and fix.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

MODALITIES: tuple[str, ...] = ("T1w", "T2w", "FLAIR", "DWI")
"""Modalities a manifest may name (BIDS suffixes, case-sensitive)."""

MANIFEST_COLUMNS: tuple[str, ...] = ("subject_id", "session_id", "modality", "path")
"""Required columns of the per-scan form."""

OPTIONAL_COLUMNS: tuple[str, ...] = ("split", "site", "age", "sex")
SPLITS: tuple[str, ...] = ("train", "val", "test")
SEX_VALUES: tuple[str, ...] = ("M", "F")

PATH_COLUMNS: dict[str, str] = {"T1w": "t1w_path", "T2w": "t2w_path", "FLAIR": "flair_path", "DWI": "dwi_path"}
"""Path column of each modality in the paired form."""

PAIRED_COLUMNS: tuple[str, ...] = ("subject_id", "session_id")
"""Required columns of the paired form (plus at least one of :data:`PATH_COLUMNS`)."""

# Identifier columns are read as strings so that "001" stays "001" (pandas would make it the integer 1).
_STRING_COLUMNS = ("subject_id", "session_id", "modality", "path", "split", "site", "sex", *PATH_COLUMNS.values())

LabelKind = Literal["binary", "categorical", "continuous", "time", "event"]


# ----------------------------------------------------------------------------------------------------------------------
# Label specifications
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelSpec:
    """What values a label column may hold.

    Args:
        kind: ``binary`` ({0, 1}), ``categorical`` ({0..num_classes-1}), ``continuous`` (optionally within
            [minimum, maximum]), ``time`` (> 0, e.g. days to event) or ``event`` ({0, 1}, 1 = event observed).
        num_classes: number of classes; required for ``categorical``.
        minimum: inclusive lower bound for ``continuous``.
        maximum: inclusive upper bound for ``continuous``.
        allow_nan: whether empty cells are acceptable (e.g. multilabel cohorts with partially missing labels).
    """

    kind: LabelKind
    num_classes: int | None = None
    minimum: float | None = None
    maximum: float | None = None
    allow_nan: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("binary", "categorical", "continuous", "time", "event"):
            raise ValueError(
                f"LabelSpec kind must be one of binary, categorical, continuous, time, event; found {self.kind!r}."
            )
        if self.kind == "categorical" and (self.num_classes is None or self.num_classes < 2):
            raise ValueError(
                f"LabelSpec('categorical') needs num_classes >= 2; found {self.num_classes!r}. "
                "Write it as 'categorical:N' (e.g. categorical:3)."
            )

    @classmethod
    def parse(cls, text: str) -> LabelSpec:
        """Parse the command-line form ``kind[:args][:nan]``.

        Examples: ``binary``, ``categorical:3``, ``continuous``, ``continuous:0:120``, ``time``, ``event``,
        ``binary:nan`` (NaN allowed).
        """
        parts = [p.strip() for p in text.split(":") if p.strip() != ""]
        allow_nan = bool(parts) and parts[-1].lower() == "nan"
        if allow_nan:
            parts = parts[:-1]
        if not parts:
            raise ValueError(f"empty label spec {text!r}; expected e.g. 'binary' or 'categorical:3'.")
        kind, args = parts[0], parts[1:]
        try:
            if kind == "categorical":
                if len(args) != 1:
                    raise ValueError("categorical takes exactly one argument, the number of classes")
                return cls("categorical", num_classes=int(args[0]), allow_nan=allow_nan)
            if kind == "continuous":
                if len(args) not in (0, 2):
                    raise ValueError("continuous takes no argument or two (minimum and maximum)")
                lo, hi = (float(args[0]), float(args[1])) if args else (None, None)
                return cls("continuous", minimum=lo, maximum=hi, allow_nan=allow_nan)
            if args:
                raise ValueError(f"{kind} takes no arguments")
            return cls(kind, allow_nan=allow_nan)  # type: ignore[arg-type]
        except ValueError as err:
            raise ValueError(
                f"cannot parse label spec {text!r}: {err}. Expected binary | categorical:N | continuous[:MIN:MAX] | "
                "time | event, optionally followed by ':nan' to allow empty cells."
            ) from err

    def describe(self) -> str:
        """Human-readable statement of the allowed values."""
        if self.kind in ("binary", "event"):
            return "0 or 1"
        if self.kind == "categorical":
            return f"an integer class in 0..{self.num_classes - 1}"
        if self.kind == "time":
            return "a time > 0"
        if self.minimum is not None and self.maximum is not None:
            return f"a number in [{self.minimum:g}, {self.maximum:g}]"
        return "a finite number"


DEFAULT_LABEL_SPECS: dict[str, LabelSpec] = {
    "wmh": LabelSpec("binary"),
    "tumour": LabelSpec("binary"),
    "haemorrhage": LabelSpec("binary"),
    "infarct": LabelSpec("binary"),
    "any_lesion": LabelSpec("binary"),
    "wmh_volume_ml": LabelSpec("continuous", minimum=0.0, maximum=float("inf")),
    "tumour_volume_ml": LabelSpec("continuous", minimum=0.0, maximum=float("inf")),
    "survival_time": LabelSpec("time"),
    "survival_event": LabelSpec("event"),
    # Demographics are commonly missing in real cohorts, so empty cells are allowed there.
    "age": LabelSpec("continuous", minimum=0.0, maximum=130.0, allow_nan=True),
}
"""Checks applied to the SynthBrain label columns (and ``age``) when present and no ``label_specs`` are given."""


def _as_label_spec(column: str, spec: LabelSpec | str) -> LabelSpec:
    if isinstance(spec, LabelSpec):
        return spec
    if isinstance(spec, str):
        return LabelSpec.parse(spec)
    raise TypeError(f"label spec for column {column!r} must be a LabelSpec or a string, found {type(spec).__name__}.")


# ----------------------------------------------------------------------------------------------------------------------
# Problems and reports
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    """One finding of :func:`validate_manifest`.

    Attributes:
        kind: short machine-readable category, e.g. ``missing_file`` or ``leakage``.
        row: DataFrame index of the offending row (0-based data row), or ``None`` for manifest-wide problems.
        path: the scan path concerned, if any.
        message: what is wrong (expected vs found).
        fix: how to fix it.
        severity: ``error`` (blocks training) or ``warning``.
    """

    kind: str
    row: int | None
    path: str | None
    message: str
    fix: str
    severity: Literal["error", "warning"] = "error"

    def format(self, source: str | None = None) -> str:
        where = []
        if self.row is not None:
            # Data row i sits on CSV line i + 2 (line 1 is the header).
            where.append(f"row {self.row} (line {self.row + 2}{' of ' + source if source else ''})")
        if self.path:
            where.append(f"path {self.path}")
        head = f"[{self.severity}] {self.kind}" + (": " + ", ".join(where) if where else "")
        return f"{head}\n    {self.message}\n    fix: {self.fix}"


class ManifestError(ValueError):
    """Raised when a manifest has errors; ``str()`` is the full report."""

    def __init__(self, report: ValidationReport):
        super().__init__(str(report))
        self.report = report


@dataclass
class ValidationReport:
    """All problems found in one manifest.

    Attributes:
        problems: every finding, errors and warnings, in check order.
        source: the manifest path (for messages), if known.
        n_rows: number of data rows checked.
        form: ``per_scan`` or ``paired`` (``None`` if the form could not be recognised).
    """

    problems: list[Problem] = field(default_factory=list)
    source: str | None = None
    n_rows: int = 0
    form: str | None = None
    max_listed_per_kind: int = 20

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings are allowed)."""
        return not self.errors

    def kinds(self) -> dict[str, int]:
        """Number of problems of each kind."""
        counts: dict[str, int] = {}
        for p in self.problems:
            counts[p.kind] = counts.get(p.kind, 0) + 1
        return counts

    def raise_if_errors(self) -> None:
        """Raise :class:`ManifestError` (whose message is this report) if there is any error."""
        if not self.ok:
            raise ManifestError(self)

    def __str__(self) -> str:
        name = self.source or "manifest"
        lines = [
            f"{name}: {self.n_rows} rows ({self.form or 'unrecognised form'}), "
            f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)"
        ]
        shown: dict[str, int] = {}
        for p in self.problems:
            shown[p.kind] = shown.get(p.kind, 0) + 1
            if shown[p.kind] <= self.max_listed_per_kind:
                lines.append(p.format(Path(self.source).name if self.source else None))
        for kind, count in self.kinds().items():
            if count > self.max_listed_per_kind:
                lines.append(f"... and {count - self.max_listed_per_kind} more problem(s) of kind {kind!r}")
        if self.ok:
            lines.append("OK: no errors.")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------
def _is_blank(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip() == ""


def _resolve(value: object, base: Path) -> object:
    if _is_blank(value):
        return value
    p = Path(str(value)).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def load_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest CSV (either form) and resolve relative paths against the manifest's directory.

    Identifier columns (``subject_id``, ``session_id``, ``modality``, paths, ``split``, ``site``, ``sex``) are read as
    strings. The returned frame keeps the CSV row order with a 0-based index (data row i is CSV line i + 2) and records
    its source in ``df.attrs["manifest_path"]``. No validation happens here: call :func:`validate_manifest`.

    Args:
        path: the CSV file.

    Returns:
        The manifest as a DataFrame.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"manifest {path} does not exist (or is not a file); pass the CSV written by `neurojepa synth` or your own "
            "manifest with columns subject_id, session_id, modality, path."
        )
    header = pd.read_csv(path, nrows=0).columns
    dtypes = {c: str for c in _STRING_COLUMNS if c in header}
    df = pd.read_csv(path, dtype=dtypes, skipinitialspace=True)
    base = path.resolve().parent
    for col in ("path", *PATH_COLUMNS.values()):
        if col in df.columns:
            df[col] = [_resolve(v, base) for v in df[col]]
    df.attrs["manifest_path"] = str(path.resolve())
    return df


# ----------------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------------
def detect_form(df: pd.DataFrame) -> str | None:
    """``per_scan`` if the frame has a ``path`` column, ``paired`` if it has modality path columns, else ``None``."""
    if "path" in df.columns or "modality" in df.columns:
        return "per_scan"
    if any(c in df.columns for c in PATH_COLUMNS.values()):
        return "paired"
    return None


def _first_path(df: pd.DataFrame, row: int) -> str | None:
    if "path" in df.columns and not _is_blank(df.at[row, "path"]):
        return str(df.at[row, "path"])
    for col in PATH_COLUMNS.values():
        if col in df.columns and not _is_blank(df.at[row, col]):
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
    have = df[~df["split"].map(_is_blank) & ~df["subject_id"].map(_is_blank)]
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


def _check_values(df: pd.DataFrame, form: str) -> list[Problem]:
    problems: list[Problem] = []
    required = MANIFEST_COLUMNS if form == "per_scan" else PAIRED_COLUMNS
    for col in required:
        for row in df.index[df[col].map(_is_blank)]:
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
            if _is_blank(value) or value in MODALITIES:
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
        for row in df.index[df[path_cols].map(_is_blank).all(axis=1)]:
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
    if "split" not in df.columns or df["split"].map(_is_blank).all():
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
        if _is_blank(value):
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
        key = tuple(None if _is_blank(v) else v for v in values)
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
            if _is_blank(value):
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
        blank = df[col].map(_is_blank)
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
            if not _is_blank(value) and value not in SEX_VALUES:
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


def _read_problems(path: str, row: int, mode: str | bool) -> list[Problem]:
    # Imported here: nibabel is only needed when files are actually opened.
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    fix_reexport = "re-export or re-copy the file (it is corrupt or truncated), or remove the row."
    try:
        img = nib.load(path)
        shape = tuple(int(s) for s in img.shape)
        spatial = shape[:3] if len(shape) == 4 and shape[3] == 1 else shape
        if len(spatial) != 3:
            return [
                Problem(
                    "bad_shape",
                    row,
                    path,
                    f"expected one 3D volume, found image shape {shape}",
                    "give one 3D volume per row (split 4D series or pick one volume, e.g. the b0 or trace of a DWI).",
                )
            ]
        if mode == "header":
            return []
        data = np.asanyarray(img.dataobj)
    except (OSError, EOFError, zlib.error, ImageFileError, ValueError) as err:
        return [Problem("unreadable", row, path, f"cannot read the image: {type(err).__name__}: {err}", fix_reexport)]
    bad = int(data.size - np.count_nonzero(np.isfinite(data))) if np.issubdtype(data.dtype, np.floating) else 0
    if bad:
        return [
            Problem(
                "non_finite",
                row,
                path,
                f"{bad} of {data.size} voxels are NaN or Inf",
                "fix the export; training skips this scan (counted against max_failed_fraction) unless "
                "nan_policy='zero' is set explicitly.",
            )
        ]
    return []


def _check_files(df: pd.DataFrame, form: str, check_readable: bool | str) -> list[Problem]:
    problems: list[Problem] = []
    path_cols = ["path"] if form == "per_scan" else [c for c in PATH_COLUMNS.values() if c in df.columns]
    checked: set[str] = set()
    for row in df.index:
        for col in path_cols:
            value = df.at[row, col]
            if _is_blank(value) or value in checked:
                continue
            checked.add(value)
            p = Path(value)
            if not p.is_file():
                problems.append(
                    Problem(
                        "missing_file",
                        int(row),
                        str(value),
                        "the file does not exist" + (" (it is a directory)" if p.is_dir() else ""),
                        "correct the path (relative paths are resolved against the manifest's folder) or remove the "
                        "row.",
                    )
                )
            elif check_readable:
                problems.extend(_read_problems(str(value), int(row), check_readable))
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
        check_readable: ``True`` reads every file fully (corrupt/truncated gzip, NaN/Inf voxels, non-3D shape);
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
        report.problems.append(
            Problem("empty", None, None, "the manifest has no rows", "add at least one scan.")
        )
        return report
    report.problems += _check_values(df, form)
    report.problems += _check_splits(df)
    report.problems += _check_duplicates(df, form)
    explicit = label_specs is not None
    specs = (
        {c: _as_label_spec(c, s) for c, s in label_specs.items()} if explicit else dict(DEFAULT_LABEL_SPECS)
    )
    report.problems += _check_labels(df, specs, explicit)
    if check_files:
        report.problems += _check_files(df, form, check_readable)
    return report


# ----------------------------------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------------------------------
def assign_patient_splits(
    df: pd.DataFrame,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    stratify: str | None = None,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Assign a patient-level train/val/test split.

    Subjects (not rows) are split, so all rows of a subject land in the same split. The result depends only on the set
    of subjects, their stratification labels, ``fractions`` and ``seed`` (not on row order).

    Args:
        df: a manifest (either form) with ``subject_id``.
        fractions: (train, val, test) fractions summing to 1; a zero fraction leaves that split empty.
        seed: random seed.
        stratify: optional label column; each subject's stratum is the value on its first row (sorted by the frame
            index), and missing values form their own stratum.
        overwrite: replace an existing non-empty ``split`` column instead of raising.

    Returns:
        A copy of ``df`` with a ``split`` column.
    """
    from sklearn.model_selection import train_test_split

    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1 (train, val, test); got {fractions}.")
    if "split" in df.columns and not df["split"].map(_is_blank).all() and not overwrite:
        raise ValueError(
            "the manifest already has a split column; pass overwrite=True to replace it or drop the column first."
        )
    if "subject_id" not in df.columns or df["subject_id"].map(_is_blank).any():
        raise ValueError("assign_patient_splits needs a subject_id on every row; run validate_manifest first.")
    first_rows = df.sort_index().groupby("subject_id", sort=True).head(1).set_index("subject_id").sort_index()
    subjects = np.asarray(first_rows.index, dtype=object)
    strata = None
    if stratify is not None:
        if stratify not in df.columns:
            raise ValueError(f"stratify column {stratify!r} is not in the manifest; found {list(df.columns)}.")
        strata = first_rows[stratify].astype(str).to_numpy()
    n_nonzero = sum(f > 0 for f in fractions)
    if len(subjects) < n_nonzero:
        raise ValueError(
            f"cannot split {len(subjects)} subject(s) into {n_nonzero} non-empty splits; add subjects or set a "
            "fraction to 0."
        )
    train_f, val_f, test_f = fractions
    assignment: dict[str, str] = {}
    try:
        rest, rest_strata = subjects, strata
        if test_f > 0:
            rest, test, rest_strata, _ = _split(subjects, strata, test_f, seed, train_test_split)
            assignment.update(dict.fromkeys(test, "test"))
        if val_f > 0:
            if train_f > 0:
                train, val, _, _ = _split(rest, rest_strata, val_f / (train_f + val_f), seed, train_test_split)
            else:
                train, val = np.asarray([], dtype=object), rest
            assignment.update(dict.fromkeys(val, "val"))
            rest = train
        assignment.update(dict.fromkeys(rest, "train"))
    except ValueError as err:
        raise ValueError(
            f"stratified split by {stratify!r} failed ({err}); a stratum has too few subjects. Use stratify=None or "
            "merge rare classes."
        ) from err
    out = df.copy()
    out["split"] = out["subject_id"].map(assignment)
    log.info(
        "assigned a patient-level split (seed %d, fractions %s%s): %s",
        seed,
        tuple(fractions),
        f", stratified by {stratify}" if stratify else "",
        {s: int((out["split"] == s).sum()) for s in SPLITS},
    )
    return out


def _split(items, strata, fraction, seed, train_test_split):
    if strata is None:
        a, b = train_test_split(items, test_size=fraction, random_state=seed, shuffle=True)
        return a, b, None, None
    return train_test_split(items, strata, test_size=fraction, random_state=seed, shuffle=True, stratify=strata)


# ----------------------------------------------------------------------------------------------------------------------
# Pairing
# ----------------------------------------------------------------------------------------------------------------------
def pair_modalities(
    df: pd.DataFrame,
    modalities: Sequence[str] = ("T1w", "FLAIR"),
    anchor: str = "T1w",
    require_all: bool = True,
) -> pd.DataFrame:
    """Turn a per-scan manifest into the paired form: one row per (subject, session).

    Args:
        df: per-scan manifest (``subject_id, session_id, modality, path`` + labels).
        modalities: modalities to pair; the output always has ``t1w_path``, ``t2w_path`` and ``flair_path`` (and
            ``dwi_path`` when DWI is requested), empty for modalities not requested or missing.
        anchor: a modality every output row must have (the paper anchors on T1w); ``None`` for no anchor.
        require_all: keep only sessions that have every requested modality (the paper's protocol).

    Returns:
        Paired DataFrame with ``subject_id``, ``session_id``, the path columns, one boolean ``<mod>_valid`` column
        per output path column, and every other column (split, labels, demographics) taken from the session's rows,
        which must agree. Dropped sessions are logged and listed in ``out.attrs["dropped_sessions"]``.
    """
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown:
        raise ValueError(f"unknown modalities {unknown}; expected a subset of {list(MODALITIES)}.")
    if anchor is not None and anchor not in modalities:
        raise ValueError(f"anchor {anchor!r} must be one of the paired modalities {list(modalities)}.")
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"pair_modalities needs a per-scan manifest; columns {missing} are missing.")
    scans = df[df["modality"].isin(modalities)]
    dup = scans.duplicated(subset=["subject_id", "session_id", "modality"], keep=False)
    if dup.any():
        rows = [int(r) for r in scans.index[dup][:10]]
        raise ValueError(
            f"several scans of one modality in one session (rows {rows}); keep one scan per modality and session "
            "before pairing."
        )
    out_mods = [m for m in MODALITIES if m in ("T1w", "T2w", "FLAIR") or m in modalities]
    shared = [c for c in df.columns if c not in ("modality", "path", "subject_id", "session_id")]
    records, dropped = [], []
    for (subject, session), group in scans.groupby(["subject_id", "session_id"], sort=True):
        present = dict(zip(group["modality"], group["path"], strict=True))
        lacking = [m for m in modalities if m not in present]
        if (anchor is not None and anchor not in present) or (require_all and lacking):
            dropped.append((subject, session, lacking))
            continue
        rec: dict[str, object] = {"subject_id": subject, "session_id": session}
        for m in out_mods:
            rec[PATH_COLUMNS[m]] = present.get(m, "") if m in modalities else ""
        for m in out_mods:
            rec[f"{m.lower()}_valid"] = bool(rec[PATH_COLUMNS[m]])
        for col in shared:
            values = group[col].dropna().unique()
            if len(values) > 1:
                raise ValueError(
                    f"column {col!r} disagrees between the scans of subject {subject!r}, session {session!r}: "
                    f"{list(values)} (rows {[int(r) for r in group.index]}); session-level columns must be identical "
                    "on every scan of a session."
                )
            rec[col] = values[0] if len(values) else group[col].iloc[0]
        records.append(rec)
    columns = ["subject_id", "session_id", *(PATH_COLUMNS[m] for m in out_mods)]
    columns += [f"{m.lower()}_valid" for m in out_mods] + shared
    out = pd.DataFrame.from_records(records, columns=columns)
    out.attrs.update(df.attrs)
    out.attrs["dropped_sessions"] = dropped
    if dropped:
        log.warning(
            "pair_modalities(%s, anchor=%s, require_all=%s): dropped %d session(s) lacking modalities, e.g. %s",
            list(modalities),
            anchor,
            require_all,
            len(dropped),
            dropped[:3],
        )
    return out
