"""A site-shift transfer pair from one multi-site manifest: train on some sites, test on a held-out one.

SynthBrain draws the acquisition effects of every site independently (contrast curve, gain, noise, bias field and
resolution; ``contrast.SiteProfile``), so a site the model never saw is a scanner shift with the same labels and the
same anatomy model: the synthetic counterpart of the paper's cross-cohort transfer (fine-tune on one cohort, test on
another with the same label definition, docs/method.md §11).

- source manifest: the scans of every other site, with a patient-level train/val/test split (the in-cohort test);
- target manifest: the scans of the held-out site, all ``split = test`` (the cross-cohort test).

Paths stay relative to the folder of the input manifest, so both files are written beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from neurojepa_pl.data.splits import assign_patient_splits

__all__ = ["site_shift_manifests", "write_site_shift_manifests"]


def site_shift_manifests(
    manifest: pd.DataFrame,
    holdout_site: str,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    stratify: str | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split a per-scan manifest into the source (other sites) and target (``holdout_site``) manifests.

    Args:
        manifest: per-scan manifest with ``subject_id`` and ``site`` (a subject belongs to one site).
        holdout_site: the site kept for the cross-cohort test, e.g. ``"site-2"``.
        fractions: patient-level (train, val, test) fractions of the source sites.
        seed: split seed.
        stratify: optional label column to stratify the source split by (e.g. the task label).

    Returns:
        ``(source, target)``: copies of the rows with a ``split`` column (``target`` is all ``test``).

    Raises:
        ValueError: without a ``site`` column, for an unknown site, a site that holds every subject, or a subject
            scanned at two sites (it would be in both manifests).
    """
    if "site" not in manifest.columns:
        raise ValueError("the manifest has no site column; a site-shift pair needs one (SynthBrain writes it).")
    sites = sorted(manifest["site"].astype(str).unique())
    if holdout_site not in sites:
        raise ValueError(f"holdout site {holdout_site!r} is not in the manifest; its sites are {sites}.")
    if len(sites) < 2:
        raise ValueError(f"the manifest has one site ({sites}); hold-out needs at least two (neurojepa synth --sites).")
    per_subject = manifest.groupby("subject_id")["site"].nunique()
    if (per_subject > 1).any():
        raise ValueError(
            f"{int((per_subject > 1).sum())} subject(s) were scanned at several sites, e.g. "
            f"{per_subject[per_subject > 1].index[0]!r}; they would be in both manifests."
        )
    held = manifest["site"].astype(str) == holdout_site
    source = assign_patient_splits(
        manifest[~held].drop(columns="split", errors="ignore"), fractions=fractions, seed=seed, stratify=stratify
    )
    target = manifest[held].drop(columns="split", errors="ignore").assign(split="test")
    return source, target


def write_site_shift_manifests(
    manifest_path: str | Path,
    holdout_site: str,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    stratify: str | None = None,
) -> tuple[Path, Path]:
    """Write ``manifest_source.csv`` and ``manifest_holdout_<site>.csv`` beside ``manifest_path``.

    Args:
        manifest_path: a per-scan manifest CSV (paths relative to its folder stay valid).
        holdout_site, fractions, seed, stratify: see :func:`site_shift_manifests`.

    Returns:
        ``(source path, target path)``.
    """
    path = Path(manifest_path)
    manifest = pd.read_csv(path, dtype={"subject_id": str, "session_id": str, "site": str})
    source, target = site_shift_manifests(manifest, holdout_site, fractions, seed, stratify)
    source_path = path.with_name("manifest_source.csv")
    target_path = path.with_name(f"manifest_holdout_{holdout_site}.csv")
    source.to_csv(source_path, index=False)
    target.to_csv(target_path, index=False)
    return source_path, target_path
