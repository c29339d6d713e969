"""Patient-level subsets of a manifest: the pretraining data-fraction ablation (paper Fig. 3, Supplementary E.4).

``patient_subset(rows, 0.25, seed)`` keeps every scan of ``ceil(0.25 * n_subjects)`` subjects. Subjects are ranked by
a hash of ``(seed, subject_id)``, so for one seed

- the subsets are nested: the 10 % subjects are among the 25 %, which are among the 50 % (a scaling curve then adds
  data instead of redrawing it);
- a subject's rank does not depend on the other rows, their order, or the other subjects of the manifest.

Written by hand: scikit-learn's splitters draw a fresh random partition per fraction and so give neither property.
"""

from __future__ import annotations

import hashlib
import logging
import math

import pandas as pd

from neurojepa_pl.errors import UserValueError

log = logging.getLogger(__name__)

__all__ = ["check_fraction", "patient_subset", "subject_rank_key"]


def check_fraction(fraction: float, name: str = "subset_fraction") -> float:
    """``fraction`` as a float in (0, 1], else a :class:`neurojepa_pl.errors.UserValueError`."""
    value = float(fraction)
    if not 0.0 < value <= 1.0:
        raise UserValueError(
            f"{name} must be in (0, 1]; found {fraction}.",
            f"set {name} to the share of patients to keep, e.g. 0.1, 0.25, 0.5 (1.0 keeps everyone).",
        )
    return value


def subject_rank_key(subject_id: object, seed: int) -> str:
    """The subject's place in the ranking of ``seed``: a SHA-256 of ``"<seed>:<subject_id>"`` (hex)."""
    return hashlib.sha256(f"{int(seed)}:{subject_id}".encode()).hexdigest()


def patient_subset(rows: pd.DataFrame, fraction: float, seed: int = 0) -> pd.DataFrame:
    """The rows of the first ``ceil(fraction * n_subjects)`` subjects in the ranking of ``seed``.

    Args:
        rows: manifest rows with ``subject_id`` (any number of rows per subject).
        fraction: share of subjects to keep, in (0, 1]; at least one subject is kept.
        seed: ranking seed.

    Returns:
        The kept rows, in their original order (the index is kept).
    """
    fraction = check_fraction(fraction)
    if rows.empty or fraction == 1.0:
        return rows
    subjects = sorted(rows["subject_id"].astype(str).unique(), key=lambda s: subject_rank_key(s, seed))
    keep = set(subjects[: max(1, math.ceil(fraction * len(subjects)))])
    kept = rows[rows["subject_id"].astype(str).isin(keep)]
    log.info(
        "patient subset %.3g (seed %d): %d of %d subjects, %d of %d rows",
        fraction,
        seed,
        len(keep),
        len(subjects),
        len(kept),
        len(rows),
    )
    return kept
