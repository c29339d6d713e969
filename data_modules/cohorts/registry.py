"""The registry of published cohort splits (docs/method.md §11): one :class:`CohortSpec` per cohort/task/modality.

Every entry was written from the header of the split CSVs in ``published_splits/`` (checked by the tests for
every entry). Known quirks are encoded here rather than patched in the files:

* ADNI amyloid FLAIR: the test file spells the label ``AMYLOID`` where train/val say ``AMYLPET`` (an alias, renamed
  and reported), and one subject is in both train and val (leakage, an error unless ``allow_leakage=True``).
* NACC amyloid T1w/T2w/FLAIR share 2/2/3 subjects across splits (same handling).
* NACC has no scan ID at all (``NACCID, NACCADC, label``) and several rows per subject: the join is per subject, row
  by row in session order (README: "per-subject join").
* ADHD-200's ID column is ``ScanDir ID``; ADNI amyloid uses ``subject_id``/``image_id`` with bare image numbers.
* OASIS-3 files repeat some (subject, MR session) rows verbatim: collapsed and reported.
"""

from __future__ import annotations

from .spec import CohortSpec, LabelColumn

BIND_MGH_FINDINGS = (
    "Astrocytoma", "Atrophy", "Cyst", "Edema", "Enhancement", "Hematoma", "Infarct", "Ischemic", "Mass_effect",
    "Midline_shift", "Multiple_Sclerosis", "Schwannoma", "Cancer", "glioblastoma_multiforme", "gliosis",
)  # fmt: skip

ICSPR_LABELS = (
    LabelColumn("90days-mRS-binary", "binary"),
    LabelColumn("Lesion-type", "categorical", num_classes=3),
    LabelColumn("LoS_gt_8", "binary"),
)
# Endpoints shared across cohorts (CohortSpec.endpoint): the label definitions the paper's cross-cohort transfer matches
# (Supplementary F.1: NACC -> ADNI for Alzheimer's disease and for amyloid positivity).
ALZHEIMERS_DISEASE = "alzheimers_disease"
AMYLOID_POSITIVITY = "amyloid_positivity"

MCSA_LABELS = (
    LabelColumn("Cog", "categorical", num_classes=3),
    LabelColumn("Stroke", "binary"),
    LabelColumn("Hypertension", "binary"),
    LabelColumn("Dyslipidemia", "binary"),
)


def _binary(column: str, *aliases: str) -> tuple[LabelColumn, ...]:
    return (LabelColumn(column, "binary", aliases=tuple(aliases)),)


def _abide() -> list[CohortSpec]:
    return [
        CohortSpec(
            "ABIDE", "asd", "T1w", "unimodal/ABIDE/ABIDE_T1w_{split}.csv", "Subject", "binary",
            _binary("Autism_label"), ("Autism_label",), {"T1w": "Image Data ID"}, "loni_image",
            description="autism spectrum disorder vs control",
        )
    ]  # fmt: skip


def _adhd200() -> list[CohortSpec]:
    return [
        CohortSpec(
            "ADHD-200", "adhd", "T1w", "unimodal/ADHD-200/ADHD-200_{split}.csv", "ScanDir ID", "binary",
            _binary("ADHD_DX"), ("ADHD_DX",), description="ADHD vs control (one scan per participant)",
        )
    ]  # fmt: skip


def _adni() -> list[CohortSpec]:
    specs = [
        CohortSpec(
            "ADNI", "ad", "T1w", "unimodal/ADNI/ADNI1_AD_T1w_{split}.csv", "Subject", "binary", _binary("AD"), ("AD",),
            {"T1w": "Image Data ID"}, "loni_image", description="ADNI1 Alzheimer's disease vs control",
            endpoint=ALZHEIMERS_DISEASE,
        ),
        CohortSpec(
            "ADNI", "tte", "T1w", "unimodal/ADNI/ADNI1_tte_T1w_{split}.csv", "Subject", "survival",
            (LabelColumn("days_until_conversion", "time"), LabelColumn("conversion_label", "event")),
            ("days_until_conversion", "conversion_label"), {"T1w": "Image Data ID"}, "loni_image",
            time_column="days_until_conversion", event_column="conversion_label",
            extra_columns=("baseline_img_date",), description="MCI to AD conversion (days)",
        ),
    ]  # fmt: skip
    for modality in ("T1w", "T2w", "FLAIR"):
        specs.append(
            CohortSpec(
                "ADNI", "amyloid", modality, f"unimodal/ADNI/ADNI_AMYLOID_{modality}_{{split}}.csv", "subject_id",
                "binary", _binary("AMYLPET", "AMYLOID"), ("AMYLPET",), {modality: "image_id"}, "loni_image",
                description="ADNI4 amyloid-PET positivity", endpoint=AMYLOID_POSITIVITY,
            )
        )  # fmt: skip
    return specs


def _bind_mgh() -> list[CohortSpec]:
    labels = tuple(LabelColumn(name, "binary") for name in BIND_MGH_FINDINGS)
    specs = []
    for modality in ("T1w", "T2w", "FLAIR", "T1w+T2w", "T1w+FLAIR"):
        pattern = (
            "multimodal/BIND-MGH/BIND-MGH_{split}.csv" if "+" in modality
            else f"unimodal/BIND-MGH/BIND-MGH_{modality}_{{split}}.csv"
        )  # fmt: skip
        specs.append(
            CohortSpec(
                "BIND-MGH", "findings", modality, pattern, "Bdsp_patient_id", "multilabel", labels, BIND_MGH_FINDINGS,
                {m: "Session_id" for m in modality.split("+")},
                description="15 radiology-report findings (multilabel), one row per session",
            )
        )  # fmt: skip
    return specs


def _cnp() -> list[CohortSpec]:
    return [
        CohortSpec(
            "CNP", "diagnosis", "T1w", "unimodal/CNP/CNP_{split}.csv", "participant_id", "multiclass",
            (LabelColumn("diagnosis_label", "categorical", num_classes=3),), ("diagnosis_label",), num_classes=3,
            description="control / ADHD / bipolar or schizophrenia",
        )
    ]  # fmt: skip


def _icspr() -> list[CohortSpec]:
    tasks = {"mrs": ("90days-mRS-binary", "binary", None), "lesion_type": ("Lesion-type", "multiclass", 3),
             "los": ("LoS_gt_8", "binary", None)}  # fmt: skip
    specs = []
    for task, (column, task_type, num_classes) in tasks.items():
        for modality in ("T1w", "T2w", "FLAIR", "DWI", "T1w+FLAIR"):
            kind = "multimodal" if "+" in modality else "unimodal"
            specs.append(
                CohortSpec(
                    "ICSPR", task, modality, f"{kind}/ICSPR/ICSPR_{modality}_{{split}}.csv", "participant_id",
                    task_type, ICSPR_LABELS, (column,), num_classes=num_classes,
                    description={"mrs": "90-day mRS 3-6 vs 0-2", "lesion_type": "absent / ischemic / hemorrhagic",
                                 "los": "length of stay > 8 days"}[task],
                )
            )  # fmt: skip
    return specs


def _mcsa() -> list[CohortSpec]:
    tasks = {
        "cog": ("Cog", "multiclass", 3),
        "stroke": ("Stroke", "binary", None),
        "hypertension": ("Hypertension", "binary", None),
        "dyslipidemia": ("Dyslipidemia", "binary", None),
    }
    scan_columns = {"T1w": {"T1w": "Ses_ID_t1w"}, "FLAIR": {"FLAIR": "Ses_ID_flair"},
                    "T1w+FLAIR": {"T1w": "Ses_ID_t1w", "FLAIR": "Ses_ID_flair"}}  # fmt: skip
    specs = []
    for task, (column, task_type, num_classes) in tasks.items():
        for modality, columns in scan_columns.items():
            kind = "multimodal" if "+" in modality else "unimodal"
            specs.append(
                CohortSpec(
                    "MCSA", task, modality, f"{kind}/MCSA/MCSA_MM_{modality}_{{split}}.csv", "MCSA_ID", task_type,
                    MCSA_LABELS, (column,), columns, "loni_image", num_classes=num_classes,
                    description=f"{column} (Mayo Clinic Study of Aging)",
                )
            )  # fmt: skip
    return specs


def _nacc() -> list[CohortSpec]:
    specs = []
    for modality in ("T1w", "T2w", "FLAIR", "T1w+T2w"):
        kind = "multimodal" if "+" in modality else "unimodal"
        specs.append(
            CohortSpec(
                "NACC", "ad", modality, f"{kind}/NACC/NACC_AD_{modality}_{{split}}.csv", "NACCID", "binary",
                _binary("AD"), ("AD",), site_column="NACCADC",
                description="Alzheimer's disease vs control (per-visit rows, no scan ID)", endpoint=ALZHEIMERS_DISEASE,
            )
        )  # fmt: skip
    for modality in ("T1w", "T2w", "FLAIR"):
        specs.append(
            CohortSpec(
                "NACC", "amyloid", modality, f"unimodal/NACC/NACC_AMYLOID_{modality}_{{split}}.csv", "NACCID",
                "binary", _binary("AMYLOID"), ("AMYLOID",), site_column="NACCADC",
                description="amyloid-PET positivity (published splits leak subjects: allow_leakage=True)",
                endpoint=AMYLOID_POSITIVITY,
            )
        )  # fmt: skip
    return specs


def _oasis3() -> list[CohortSpec]:
    specs = []
    for modality in ("T1w", "T2w", "FLAIR", "T1w+T2w"):
        if "+" in modality:
            pattern = "multimodal/OASIS3/OASIS3_AD_T1w+T2w_{split}.csv"
            columns = {"T1w": "MR_ID_t1w", "T2w": "MR_ID_t2w"}
        else:
            pattern, columns = f"unimodal/OASIS3/OASIS3_AD_{modality}_{{split}}.csv", {modality: "MR_ID"}
        specs.append(
            CohortSpec(
                "OASIS3", "ad", modality, pattern, "SUBJECT_ID", "binary", _binary("AD"), ("AD",), columns,
                "oasis_session", description="Alzheimer's disease vs control",
            )
        )  # fmt: skip
    return specs


def _openbhb() -> list[CohortSpec]:
    return [
        CohortSpec(
            "OpenBHB", "age", "T1w", "unimodal/OpenBHB/OpenBHB_{split}.csv", "participant_id", "regression",
            (LabelColumn("age", "continuous"),), ("age",), description="brain age (years)",
        )
    ]  # fmt: skip


def _ppmi() -> list[CohortSpec]:
    diagnosis = (LabelColumn("Diagnosis", "categorical", num_classes=3),)
    specs = []
    for modality in ("T1w", "T2w", "FLAIR", "T1w+T2w"):
        if "+" in modality:
            pattern = "multimodal/PPMI/PPMI_PD_T1w+T2w_{split}.csv"
            columns = {"T1w": "Image Data ID_t1w", "T2w": "Image Data ID_t2w"}
        else:
            pattern, columns = f"unimodal/PPMI/PPMI_{modality}_{{split}}.csv", {modality: "Image Data ID"}
        specs.append(
            CohortSpec(
                "PPMI", "diagnosis", modality, pattern, "Subject", "multiclass", diagnosis, ("Diagnosis",), columns,
                "loni_image", num_classes=3, description="Parkinson's / prodromal / control",
            )
        )  # fmt: skip
    for modality in ("T1w", "FLAIR"):
        specs.append(
            CohortSpec(
                "PPMI", "tte", modality, f"unimodal/PPMI/PPMI_tte_{modality}_{{split}}.csv", "Subject", "survival",
                (LabelColumn("time_months", "time"), LabelColumn("event", "event")), ("time_months", "event"),
                time_column="time_months", event_column="event", extra_columns=("bl_date",),
                description="prodromal to PD conversion (months)",
            )
        )  # fmt: skip
    return specs


def _soop() -> list[CohortSpec]:
    specs = []
    for modality in ("T1w", "FLAIR", "T1w+FLAIR"):
        kind = "multimodal" if "+" in modality else "unimodal"
        specs.append(
            CohortSpec(
                "SOOP", "rankin", modality, f"{kind}/SOOP/SOOP_gs-rankin_{modality}_{{split}}.csv", "participant_id",
                "binary", _binary("gs_rankin_binary"), ("gs_rankin_binary",),
                description="discharge modified Rankin 3-6 vs 0-2",
            )
        )  # fmt: skip
    return specs


def _ucsf_pdgm() -> list[CohortSpec]:
    specs = []
    for modality in ("T1w", "T2w", "FLAIR", "DWI", "T1w+FLAIR"):
        kind = "multimodal" if "+" in modality else "unimodal"
        specs.append(
            CohortSpec(
                "UCSF-PDGM", "idh", modality, f"{kind}/UCSF-PDGM/UCSF-PDGM_{modality}_{{split}}.csv", "ID", "binary",
                _binary("mutation"), ("mutation",), description="IDH mutation",
            )
        )  # fmt: skip
    for modality in ("T1w", "T2w", "FLAIR"):
        specs.append(
            CohortSpec(
                "UCSF-PDGM", "survival", modality, f"unimodal/UCSF-PDGM/UCSF-PDGM_{modality}_tte_{{split}}.csv", "ID",
                "survival", (LabelColumn("OS", "time"), LabelColumn("survival", "event")), ("OS", "survival"),
                time_column="OS", event_column="survival", description="overall survival (days)",
            )
        )  # fmt: skip
    return specs


def _build_registry() -> dict[tuple[str, str, str], CohortSpec]:
    registry: dict[tuple[str, str, str], CohortSpec] = {}
    for factory in (_abide, _adhd200, _adni, _bind_mgh, _cnp, _icspr, _mcsa, _nacc, _oasis3, _openbhb, _ppmi, _soop,
                    _ucsf_pdgm):  # fmt: skip
        for spec in factory():
            if spec.key in registry:
                raise RuntimeError(f"duplicate cohort registry entry {spec.key}")
            registry[spec.key] = spec
    return registry


COHORT_SPECS: dict[tuple[str, str, str], CohortSpec] = _build_registry()
COHORTS: tuple[str, ...] = tuple(dict.fromkeys(key[0] for key in COHORT_SPECS))


def _canonical(name: str) -> str:
    return name.replace("-", "").replace("_", "").lower()


def list_cohort_specs(cohort: str | None = None) -> list[CohortSpec]:
    """All registered specs, or those of one cohort (name matched ignoring case, ``-`` and ``_``)."""
    if cohort is None:
        return list(COHORT_SPECS.values())
    return [spec for spec in COHORT_SPECS.values() if _canonical(spec.cohort) == _canonical(cohort)]


def get_cohort_spec(cohort: str, task: str, modality: str) -> CohortSpec:
    """Look up one registered spec.

    Args:
        cohort: cohort name, e.g. ``"ADNI"``, ``"BIND-MGH"``, ``"ucsf_pdgm"`` (case, ``-`` and ``_`` ignored).
        task: task name, e.g. ``"amyloid"``.
        modality: ``"T1w"``, ``"T2w"``, ``"FLAIR"``, ``"DWI"`` or a pair like ``"T1w+FLAIR"``.

    Raises:
        KeyError: naming the tasks and modalities that exist for that cohort.
    """
    specs = list_cohort_specs(cohort)
    if not specs:
        raise KeyError(f"unknown cohort {cohort!r}; registered cohorts: {', '.join(COHORTS)}.")
    for spec in specs:
        if spec.task == task and spec.modality == modality:
            return spec
    available = sorted({f"task={spec.task!r} modality={spec.modality!r}" for spec in specs})
    raise KeyError(
        f"cohort {specs[0].cohort!r} has no split files for task={task!r} modality={modality!r}. "
        f"Available: {'; '.join(available)}."
    )
