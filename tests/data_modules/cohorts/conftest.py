"""Fixtures for the cohort tests: the published split dir and fake scan inventories built from the split files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from neurojepa_pl.data_modules.cohorts import default_split_dir, read_split_files
from neurojepa_pl.data_modules.cohorts.spec import CohortSpec
from neurojepa_pl.data_modules.cohorts.split_files import SCAN_ID_PREFIX


@pytest.fixture(scope="session")
def split_dir() -> Path:
    """The authors' published splits, shipped with the package."""
    return default_split_dir()


def fake_scan_table(spec: CohortSpec, split_dir: Path, root: str = "/fake") -> pd.DataFrame:
    """A scan table with one scan per split row (and per modality), paths that need not exist.

    Scan-level specs: the session is the row's scan ID as written in the file. Subject-level specs: a subject with k
    rows in the three files gets sessions ``v1..vk`` holding every modality of the spec.
    """
    table, _, _ = read_split_files(spec, split_dir)
    records = []
    if spec.join_level == "scan":
        for modality in spec.modalities:
            for subject, scan_id in zip(table["subject_id"], table[SCAN_ID_PREFIX + modality]):
                records.append((subject, scan_id, modality, f"{root}/{subject}/{scan_id}/{modality}.nii.gz"))
    else:
        for subject, count in table.groupby("subject_id").size().items():
            for visit in range(1, count + 1):
                for modality in spec.modalities:
                    records.append((subject, f"v{visit}", modality, f"{root}/{subject}/v{visit}/{modality}.nii.gz"))
    frame = pd.DataFrame(records, columns=["subject_id", "session_id", "modality", "path"])
    return frame.drop_duplicates(ignore_index=True)


@pytest.fixture
def make_scan_table():
    return fake_scan_table
