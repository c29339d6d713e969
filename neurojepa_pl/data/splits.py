"""Patient-level train/val/test splits."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from neurojepa_pl.data.schema import SPLITS, is_blank
from neurojepa_pl.errors import UserValueError

log = logging.getLogger(__name__)


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
        raise ValueError(
            f"fractions must be three non-negative numbers summing to 1 (train, val, test); got {fractions}."
        )
    if "split" in df.columns and not df["split"].map(is_blank).all() and not overwrite:
        raise ValueError(
            "the manifest already has a split column; pass overwrite=True to replace it or drop the column first."
        )
    if "subject_id" not in df.columns or df["subject_id"].map(is_blank).any():
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
        raise UserValueError(
            f"cannot split {len(subjects)} subject(s) into {n_nonzero} non-empty splits.",
            "add subjects, set a fraction to 0 (split_fractions), or give the manifest a split column.",
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
        raise UserValueError(
            f"stratified split by {stratify!r} failed ({err}); a stratum has too few subjects.",
            "use stratify=None or merge rare classes.",
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
