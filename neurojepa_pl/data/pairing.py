"""Pairing the scans of one session into one row per session (the paired manifest form)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pandas as pd

from neurojepa_pl.data.schema import MANIFEST_COLUMNS, MODALITIES, PATH_COLUMNS

log = logging.getLogger(__name__)


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
