"""SynthBrain: the embedded default cohort (skull-stripped, MNI-registered T1w/T2w/FLAIR, optionally DWI, with known
labels).

Built from nilearn's packaged MNI ICBM152 2009a maps (no download). See docs/method.md §13.

- ``generate_cohort(out_dir, n_subjects, ...)`` writes NIfTI + ``manifest.csv`` and returns the manifest;
- ``generate_subject(seed, index, ...)`` renders one subject in memory;
- ``sample_subject_labels(seed, index, ...)`` draws a subject's labels without rendering.

Module map: ``grids`` (grid specs, affines), ``atlas`` (template maps per grid), ``fields`` (smooth noise, blurs),
``anatomy`` (warp, atrophy, mass effect), ``pathology`` (lesions), ``contrast`` (intensities, site effects),
``labels`` (subject plans, survival model), ``nifti`` (deterministic writing), ``cohort`` (rendering and writing).

Output of ``generate_cohort``: ``sub-XXXX/ses-YY/anat/sub-XXXX_ses-YY_<T1w|T2w|FLAIR>.nii.gz`` and, with DWI,
``sub-XXXX/ses-YY/dwi/sub-XXXX_ses-YY_dwi.nii.gz`` (int16, RAS affine of the grid, zero outside the intracranial
volume), ``participants.tsv``, ``dataset_description.json`` (all synthesis parameters, including the survival model) and
``manifest.csv`` with one row per scan::

    subject_id, session_id, modality, path, site, age, sex, wmh, tumour, haemorrhage, infarct, acute_infarct,
    any_lesion, wmh_volume_ml, tumour_volume_ml, acute_infarct_volume_ml, survival_time, survival_event[, split]

Lesion volumes are measured on the painted maps (they match the plan's nominal volumes to a few %);
``survival_time`` is in days from that session's scan; ``age`` in years at that session.
"""

from .atlas import Atlas, load_atlas
from .cohort import SynthSession, SynthSubject, generate_cohort, generate_subject, iter_sessions, scan_path
from .contrast import MODALITIES, STRUCTURAL
from .grids import MNI_SHAPE, MODEL_SHAPE, normalize_grid
from .labels import DEFAULT_PREVALENCE, SURVIVAL_MODEL, SubjectPlan, SurvivalModel, sample_subject_labels

__all__ = [
    "Atlas",
    "DEFAULT_PREVALENCE",
    "MNI_SHAPE",
    "MODALITIES",
    "MODEL_SHAPE",
    "STRUCTURAL",
    "SURVIVAL_MODEL",
    "SubjectPlan",
    "SurvivalModel",
    "SynthSession",
    "SynthSubject",
    "generate_cohort",
    "generate_subject",
    "iter_sessions",
    "load_atlas",
    "normalize_grid",
    "sample_subject_labels",
    "scan_path",
]
