"""Manifest schema: columns, modalities, label specifications, and reading a manifest CSV.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

from neurojepa_pl.errors import UserFileNotFoundError, UserValueError

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
            raise UserValueError(
                f"LabelSpec kind must be one of binary, categorical, continuous, time, event; found {self.kind!r}.",
                "use one of those kinds.",
            )
        if self.kind == "categorical" and (self.num_classes is None or self.num_classes < 2):
            raise UserValueError(
                f"LabelSpec('categorical') needs num_classes >= 2; found {self.num_classes!r}.",
                "write it as 'categorical:N' (e.g. categorical:3).",
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
            raise UserValueError(f"empty label spec {text!r}.", "write e.g. 'binary' or 'categorical:3'.")
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
            reason = err.message if isinstance(err, UserValueError) else str(err)
            raise UserValueError(
                f"cannot parse label spec {text!r}: {reason}",
                "write binary | categorical:N | continuous[:MIN:MAX] | time | event, optionally followed by ':nan' "
                "to allow empty cells.",
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
    "acute_infarct": LabelSpec("binary"),
    "any_lesion": LabelSpec("binary"),
    "wmh_volume_ml": LabelSpec("continuous", minimum=0.0, maximum=float("inf")),
    "tumour_volume_ml": LabelSpec("continuous", minimum=0.0, maximum=float("inf")),
    "acute_infarct_volume_ml": LabelSpec("continuous", minimum=0.0, maximum=float("inf")),
    "survival_time": LabelSpec("time"),
    "survival_event": LabelSpec("event"),
    # Demographics are commonly missing in real cohorts, so empty cells are allowed there.
    "age": LabelSpec("continuous", minimum=0.0, maximum=130.0, allow_nan=True),
}
"""Checks applied to the SynthBrain label columns (and ``age``) when present and no ``label_specs`` are given."""


def as_label_spec(column: str, spec: LabelSpec | str) -> LabelSpec:
    if isinstance(spec, LabelSpec):
        return spec
    if isinstance(spec, str):
        return LabelSpec.parse(spec)
    raise TypeError(f"label spec for column {column!r} must be a LabelSpec or a string, found {type(spec).__name__}.")


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------
def is_blank(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip() == ""


def resolve_path(value: object, base: Path) -> object:
    if is_blank(value):
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
        raise UserFileNotFoundError(
            f"manifest {path} does not exist" + (" (it is a directory)" if path.is_dir() else ""),
            "pass the CSV written by `neurojepa synth` or your own manifest with the columns subject_id, session_id, "
            "modality, path (e.g. --data.init_args.manifest PATH).",
        )
    header = pd.read_csv(path, nrows=0).columns
    dtypes = {c: str for c in _STRING_COLUMNS if c in header}
    df = pd.read_csv(path, dtype=dtypes, skipinitialspace=True)
    base = path.resolve().parent
    for col in ("path", *PATH_COLUMNS.values()):
        if col in df.columns:
            df[col] = [resolve_path(v, base) for v in df[col]]
    df.attrs["manifest_path"] = str(path.resolve())
    return df


def detect_form(df: pd.DataFrame) -> str | None:
    """``per_scan`` if the frame has a ``path`` column, ``paired`` if it has modality path columns, else ``None``."""
    if "path" in df.columns or "modality" in df.columns:
        return "per_scan"
    if any(c in df.columns for c in PATH_COLUMNS.values()):
        return "paired"
    return None
