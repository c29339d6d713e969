"""What a cohort join did: counts, every dropped split row with its reason, every unused scan, and file anomalies.

Nothing is dropped silently: each row of the published split files that does not reach the manifest is in
:attr:`CohortReport.dropped` with a ``category`` and a human ``reason``; each scan found on disk (or in the scan table)
that no split row uses is in :attr:`CohortReport.unused_scans`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .spec import SPLITS

DROP_CATEGORIES = ("leakage", "duplicate", "no_scan", "missing_label", "nonpositive_time")
DROPPED_COLUMNS = ("split", "subject_id", "scan_id", "source_file", "source_row", "category", "reason")
UNUSED_COLUMNS = ("subject", "session", "modality", "path", "reason")


class CohortLeakageError(ValueError):
    """The published split files put one subject in two splits; carries the :class:`CohortReport`."""

    def __init__(self, message: str, report: CohortReport):
        super().__init__(message)
        self.report = report


def _empty_frame(columns: tuple[str, ...]) -> pd.DataFrame:
    return pd.DataFrame({column: pd.Series(dtype=object) for column in columns})


@dataclass
class CohortReport:
    """Outcome of :func:`neurojepa_pl.data_modules.cohorts.build_cohort_manifest`.

    Attributes:
        cohort / task / modality: the registry key.
        split_files: split -> path of the published file read.
        data_source: the BIDS root or scan table the scans came from.
        rows_in_split_files: split -> data rows in the published file.
        manifest_rows: split -> rows written to the manifest.
        manifest_subjects: split -> distinct subjects in the manifest.
        column_notes: differences between the split files' columns (aliases renamed, extra columns).
        leakage: ``"train&val"`` etc. -> raw subject IDs present in both splits of the published files.
        leakage_action: ``"none"``, ``"error"`` or ``"removed from the later split"``.
        ambiguous_subjects: subjects joined per visit whose rows carry different labels (NACC): the label of the k-th
            row went to the k-th session in sorted order, which the files cannot confirm.
        missing_files: scan-table paths that do not exist (their rows are dropped as ``no_scan``).
        dropped: one row per dropped split row (columns :data:`DROPPED_COLUMNS`).
        unused_scans: one row per scan not used by any split row (columns :data:`UNUSED_COLUMNS`).
    """

    cohort: str
    task: str
    modality: str
    split_files: dict[str, str]
    data_source: str = ""
    rows_in_split_files: dict[str, int] = field(default_factory=dict)
    manifest_rows: dict[str, int] = field(default_factory=dict)
    manifest_subjects: dict[str, int] = field(default_factory=dict)
    column_notes: list[str] = field(default_factory=list)
    leakage: dict[str, list[str]] = field(default_factory=dict)
    leakage_action: str = "none"
    ambiguous_subjects: list[dict] = field(default_factory=list)
    missing_files: list[str] = field(default_factory=list)
    dropped: pd.DataFrame = field(default_factory=lambda: _empty_frame(DROPPED_COLUMNS))
    unused_scans: pd.DataFrame = field(default_factory=lambda: _empty_frame(UNUSED_COLUMNS))

    # ---- views -------------------------------------------------------------------------------------------------
    def dropped_by(self, category: str) -> pd.DataFrame:
        """Dropped rows of one category (one of :data:`DROP_CATEGORIES`)."""
        if category not in DROP_CATEGORIES:
            raise ValueError(f"unknown drop category {category!r}; expected one of {DROP_CATEGORIES}.")
        return self.dropped[self.dropped["category"] == category]

    @property
    def ids_without_scans(self) -> pd.DataFrame:
        """Split rows whose scan was not found (category ``no_scan``)."""
        return self.dropped_by("no_scan")

    @property
    def scans_without_ids(self) -> pd.DataFrame:
        """Scans on disk / in the scan table that no split row uses."""
        return self.unused_scans

    @property
    def leaked_subjects(self) -> list[str]:
        """Distinct raw subject IDs found in more than one split."""
        return sorted({subject for subjects in self.leakage.values() for subject in subjects})

    def dropped_counts(self) -> dict[str, dict[str, int]]:
        """category -> split -> number of dropped rows (only non-zero entries)."""
        counts: dict[str, dict[str, int]] = {}
        for (category, split), n in self.dropped.groupby(["category", "split"]).size().items():
            counts.setdefault(category, {})[split] = int(n)
        return counts

    # ---- output ------------------------------------------------------------------------------------------------
    def summary(self, max_examples: int = 3) -> dict:
        """JSON-friendly summary with counts and a few examples of each anomaly."""

        def examples(frame: pd.DataFrame) -> list[dict]:
            return frame.head(max_examples).to_dict(orient="records")

        return {
            "cohort": self.cohort,
            "task": self.task,
            "modality": self.modality,
            "split_files": self.split_files,
            "data_source": self.data_source,
            "rows_in_split_files": self.rows_in_split_files,
            "manifest_rows": self.manifest_rows,
            "manifest_subjects": self.manifest_subjects,
            "column_notes": self.column_notes,
            "leakage": {pair: len(ids) for pair, ids in self.leakage.items()},
            "leaked_subjects": self.leaked_subjects,
            "leakage_action": self.leakage_action,
            "dropped_counts": self.dropped_counts(),
            "dropped_examples": {
                category: examples(self.dropped_by(category))
                for category in DROP_CATEGORIES
                if (self.dropped["category"] == category).any()
            },
            "unused_scans": int(len(self.unused_scans)),
            "unused_scan_examples": examples(self.unused_scans),
            "ambiguous_subjects": len(self.ambiguous_subjects),
            "ambiguous_subject_examples": self.ambiguous_subjects[:max_examples],
            "missing_files": len(self.missing_files),
            "missing_file_examples": self.missing_files[:max_examples],
        }

    def write(self, out_dir: str | Path, stem: str) -> dict[str, Path]:
        """Write ``<stem>_report.json`` (summary), ``<stem>_dropped.csv`` and ``<stem>_unused_scans.csv`` (all rows).

        Returns:
            name -> written path.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "report": out / f"{stem}_report.json",
            "dropped": out / f"{stem}_dropped.csv",
            "unused_scans": out / f"{stem}_unused_scans.csv",
        }
        paths["report"].write_text(json.dumps(self.summary(max_examples=10), indent=2, default=str) + "\n")
        self.dropped.to_csv(paths["dropped"], index=False)
        self.unused_scans.to_csv(paths["unused_scans"], index=False)
        return paths

    def __str__(self) -> str:
        lines = [f"Cohort {self.cohort} task={self.task} modality={self.modality} (scans from {self.data_source})"]
        for split in SPLITS:
            lines.append(
                f"  {split:<5}: {self.rows_in_split_files.get(split, 0):>6} rows in the split file -> "
                f"{self.manifest_rows.get(split, 0):>6} manifest rows ({self.manifest_subjects.get(split, 0)} subjects)"
            )
        for note in self.column_notes:
            lines.append(f"  columns: {note}")
        if self.leakage:
            pairs = ", ".join(f"{pair}: {len(ids)}" for pair, ids in self.leakage.items())
            lines.append(f"  leakage ({self.leakage_action}): {pairs}; e.g. {self.leaked_subjects[:3]}")
        for category, per_split in self.dropped_counts().items():
            first = self.dropped_by(category).iloc[0]
            lines.append(
                f"  dropped {category}: {per_split}; e.g. {first['source_file']}:{first['source_row']} "
                f"{first['subject_id']!r}: {first['reason']}"
            )
        if len(self.unused_scans):
            first = self.unused_scans.iloc[0]
            lines.append(f"  unused scans: {len(self.unused_scans)}; e.g. {first['path']}: {first['reason']}")
        if self.ambiguous_subjects:
            lines.append(
                f"  ambiguous per-visit labels: {len(self.ambiguous_subjects)} subjects; "
                f"e.g. {self.ambiguous_subjects[0]}"
            )
        if self.missing_files:
            lines.append(f"  scan-table files missing: {len(self.missing_files)}; e.g. {self.missing_files[0]}")
        return "\n".join(lines)
