"""Data: manifest schema and validation, MONAI loading chain and cache, pretraining and fine-tuning data modules.

Modules: ``manifest`` (schema, validation, splits, pairing; pandas only), ``transforms`` (MONAI chains),
``datasets`` (cached scan dataset), ``base`` / ``pretrain`` / ``finetune`` (Lightning data modules).
The package top level re-exports the manifest API only, so that importing it stays cheap (no torch/MONAI).
"""

from neurojepa_pl.data import (
    MANIFEST_COLUMNS,
    MODALITIES,
    PATH_COLUMNS,
    LabelSpec,
    ManifestError,
    Problem,
    ValidationReport,
    assign_patient_splits,
    check_leakage,
    load_manifest,
    pair_modalities,
    validate_manifest,
)

__all__ = [
    "MANIFEST_COLUMNS",
    "MODALITIES",
    "PATH_COLUMNS",
    "LabelSpec",
    "ManifestError",
    "Problem",
    "ValidationReport",
    "assign_patient_splits",
    "check_leakage",
    "load_manifest",
    "pair_modalities",
    "validate_manifest",
]
