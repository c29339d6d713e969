"""The data vocabulary: manifest schema, validation, patient-level splits, modality pairing, MONAI loading chains.

Pure pandas / MONAI (no Lightning), so every room can use it: the Lightning data modules
(:mod:`neurojepa_pl.data_modules`), feature extraction, QC, SynthBrain and the callbacks.

Modules: :mod:`~neurojepa_pl.data.schema` (columns, label specs, reading a CSV), :mod:`~neurojepa_pl.data.problems`
(problems and the validation report), :mod:`~neurojepa_pl.data.validation`, :mod:`~neurojepa_pl.data.splits`,
:mod:`~neurojepa_pl.data.pairing`, :mod:`~neurojepa_pl.data.transforms` (the MONAI chains; imported on demand, since
MONAI and torch are slow to import).
"""

from neurojepa_pl.data.pairing import pair_modalities
from neurojepa_pl.data.problems import ManifestError, Problem, ValidationReport
from neurojepa_pl.data.schema import (
    MANIFEST_COLUMNS,
    MODALITIES,
    PAIRED_COLUMNS,
    PATH_COLUMNS,
    SPLITS,
    LabelSpec,
    detect_form,
    is_blank,
    load_manifest,
)
from neurojepa_pl.data.splits import assign_patient_splits
from neurojepa_pl.data.validation import check_leakage, validate_manifest

__all__ = [
    "MANIFEST_COLUMNS",
    "MODALITIES",
    "PAIRED_COLUMNS",
    "PATH_COLUMNS",
    "SPLITS",
    "LabelSpec",
    "ManifestError",
    "Problem",
    "ValidationReport",
    "assign_patient_splits",
    "check_leakage",
    "detect_form",
    "is_blank",
    "load_manifest",
    "pair_modalities",
    "validate_manifest",
]
