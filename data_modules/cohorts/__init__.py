"""Cohort data on the authors' published patient-level splits (docs/method.md §11).

``build_cohort_manifest(cohort, task, modality, data_root, split_dir)`` joins the published split IDs to scans in a
BIDS-like tree (or a scan table) and returns a manifest plus a :class:`CohortReport` listing every dropped row and
unused scan with its reason. The LightningDataModules (``ADNI``, ``NACC``, ..., ``MultimodalCohort``,
``GenericCohort``) are importable from here too; they load Lightning and MONAI lazily, on first access, so that the
manifest API stays cheap to import. ``README.md`` in this folder lists the cohorts and the data layout each expects.
"""

from .generic import generic_cohort_spec
from .join import NO_SESSION, build_cohort_manifest, find_leakage
from .registry import COHORT_SPECS, COHORTS, get_cohort_spec, list_cohort_specs
from .report import CohortLeakageError, CohortReport
from .scans import read_scan_table, scan_bids_tree
from .spec import CohortSpec, LabelColumn, loni_image_key, normalise_id, oasis_session_key
from .split_files import default_split_dir, read_split_files

_DATAMODULES = (
    "ABIDE", "ADHD200", "ADNI", "BINDMGH", "CNP", "ICSPR", "MCSA", "NACC", "OASIS3", "OpenBHB", "PPMI", "SOOP",
    "UCSFPDGM", "COHORT_DATAMODULES", "CohortDataModule", "GenericCohort", "MultimodalCohort",
)  # fmt: skip


def __getattr__(name: str):
    if name in _DATAMODULES:
        from . import datamodules

        return getattr(datamodules, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    *_DATAMODULES,
    "COHORTS",
    "COHORT_SPECS",
    "NO_SESSION",
    "CohortLeakageError",
    "CohortReport",
    "CohortSpec",
    "LabelColumn",
    "build_cohort_manifest",
    "default_split_dir",
    "find_leakage",
    "generic_cohort_spec",
    "get_cohort_spec",
    "list_cohort_specs",
    "loni_image_key",
    "normalise_id",
    "oasis_session_key",
    "read_scan_table",
    "read_split_files",
    "scan_bids_tree",
]
