"""One LightningDataModule per cohort: the published splits joined to your scans, then ``FinetuneDataModule``.

``ADNI(task="amyloid", modality="FLAIR", data_root="/data/ADNI_BIDS", allow_leakage=True, batch_size=16)`` builds
the manifest of that split family with :func:`build_cohort_manifest` in ``prepare_data`` (rank 0) into ``work_dir``
(default: ``<trainer.default_root_dir>/cohort_manifests``), writes the join report next to it, and from then on behaves
exactly like :class:`neurojepa_pl.data_modules.finetune.FinetuneDataModule` (every keyword of that class and of
:class:`neurojepa_pl.data_modules.base.MRIDataModule` is accepted). Multimodal split files (``modality="T1w+FLAIR"``) go
through :class:`MultimodalCohort`, built on :class:`neurojepa_pl.data_modules.multimodal.MultimodalDataModule`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

from neurojepa_pl.data_modules.finetune import FinetuneDataModule
from neurojepa_pl.data_modules.multimodal import MultimodalDataModule

from .generic import generic_cohort_spec
from .join import build_cohort_manifest
from .registry import get_cohort_spec, list_cohort_specs
from .report import CohortReport
from .spec import CohortSpec

log = logging.getLogger(__name__)


def _resolve_task(cohort: str, task: str | None) -> str:
    tasks = sorted({spec.task for spec in list_cohort_specs(cohort)})
    if task is not None:
        return task
    if len(tasks) == 1:
        return tasks[0]
    raise ValueError(f"cohort {cohort!r} has several tasks {tasks}; pass task=...")


def _label_columns(spec: CohortSpec, labels: list[str] | None) -> list[str]:
    """The spec's task labels, or a subset of them (e.g. one BIND-MGH finding)."""
    if labels is None:
        return [c for c in spec.task_labels if c not in (spec.time_column, spec.event_column)]
    unknown = [c for c in labels if c not in spec.task_labels]
    if unknown:
        raise ValueError(f"{spec.key}: labels {unknown} are not task labels of this cohort; choose from "
                         f"{list(spec.task_labels)}.")  # fmt: skip
    return list(labels)


class _CohortManifest:
    """Builds the joined manifest of a spec into a work folder (shared by the unimodal and multimodal modules)."""

    def _init_cohort(self, spec: CohortSpec, data_root, split_dir, scan_table, work_dir, allow_leakage, duplicates):
        if data_root is None and scan_table is None and not spec.path_columns:
            raise ValueError(
                f"{spec.key}: pass data_root (BIDS-like tree) or scan_table (subject_id, [session_id,] modality, "
                "path); see data_modules/cohorts/README.md for the expected layout."
            )
        self.spec = spec
        self.cohort_options = {
            "data_root": data_root,
            "split_dir": split_dir,
            "scan_table": scan_table,
            "allow_leakage": allow_leakage,
            "duplicates": duplicates,
        }
        self.work_dir = work_dir
        self.cohort_report: CohortReport | None = None
        # Lightning merges the model's and the data module's hyper-parameters when it logs them and refuses keys that
        # differ: the model's `task` / `num_classes` are the task type and head width, so record those here too and
        # keep the cohort's own task name under `cohort_task`.
        task_type = getattr(self, "task", None)
        if task_type is not None:
            outputs = getattr(self, "num_classes", self.hparams.get("num_classes"))
            recorded = {"task": task_type, "num_classes": outputs, "cohort_task": spec.task}
            self.save_hyperparameters({**self.hparams, **recorded})

    @property
    def manifest_stem(self) -> str:
        cohort, task, modality = self.spec.key
        return f"{cohort}_{task}_{modality}".replace("+", "-")

    def manifest_path(self) -> Path:
        """``<work_dir>/<cohort>_<task>_<modality>_manifest.csv`` (the same on every rank)."""
        if self.work_dir is not None:
            root = Path(self.work_dir)
        elif self.trainer is not None:
            root = Path(self.trainer.default_root_dir) / "cohort_manifests"
        else:
            root = Path("runs") / "cohort_manifests"
        return root / f"{self.manifest_stem}_manifest.csv"

    def build_manifest(self) -> Path:
        """Join the split files to the scans; write the manifest and the report files; returns the manifest path."""
        path = self.manifest_path()
        manifest, report = build_cohort_manifest(self.spec, **self.cohort_options)
        path.parent.mkdir(parents=True, exist_ok=True)
        manifest.to_csv(path, index=False)
        report.write(path.parent, self.manifest_stem)
        self.cohort_report = report
        log.info("%s\nmanifest written to %s", report, path)
        return path

    def prepare_data(self) -> None:
        self.hparams.manifest = str(self.build_manifest())

    def setup(self, stage: str | None = None) -> None:
        path = self.manifest_path()
        if not path.is_file():  # used without a Trainer, or prepare_data was skipped
            self.build_manifest()
        self.hparams.manifest = str(path)
        super().setup(stage)


class CohortDataModule(_CohortManifest, FinetuneDataModule):
    """A registered cohort's published splits as a fine-tuning data module (unimodal split files).

    Args:
        task: task of the cohort (``None`` when the cohort has one), e.g. ADNI ``"ad"``, ``"amyloid"``, ``"tte"``.
        modality: ``"T1w"``, ``"T2w"``, ``"FLAIR"`` or ``"DWI"`` (what the cohort publishes).
        data_root: BIDS-like tree of the scans (README: data layout per cohort).
        split_dir: folder of the published split CSVs (default: the copy shipped with the package,
            ``published_splits/``).
        scan_table: instead of ``data_root``: CSV with ``subject_id``, [``session_id``,] ``modality``, ``path``.
        work_dir: where the manifest and join report go (default ``<trainer.default_root_dir>/cohort_manifests``).
        allow_leakage: accept split files that put a subject in two splits (NACC/ADNI amyloid); the subject is kept
            in its earliest split only, and the report lists it.
        duplicates: ``"collapse"`` or ``"keep"`` verbatim repeated rows (OASIS-3).
        labels: train on a subset of the task's labels (e.g. ``["Edema"]`` of BIND-MGH's 15 findings).
        **kwargs: :class:`FinetuneDataModule` / ``MRIDataModule`` arguments (batch_size, cache_dir, spatial_size, ...).
    """

    cohort_name: ClassVar[str] = ""

    def __init__(
        self,
        task: str | None = None,
        modality: str = "T1w",
        data_root: str | None = None,
        split_dir: str | None = None,
        scan_table: str | None = None,
        work_dir: str | None = None,
        allow_leakage: bool = False,
        duplicates: str = "collapse",
        labels: list[str] | None = None,
        **kwargs: Any,
    ):
        if not self.cohort_name:
            raise TypeError("use a cohort class (ADNI, NACC, ...) or GenericCohort, not CohortDataModule itself.")
        if "+" in modality:
            raise ValueError(f"modality {modality!r} is a multimodal split family: use MultimodalCohort.")
        spec = get_cohort_spec(self.cohort_name, _resolve_task(self.cohort_name, task), modality)
        task_type = spec.task_type
        columns = _label_columns(spec, labels)
        if task_type == "multilabel" and len(columns) == 1:
            task_type = "binary"  # one finding of a multi-label cohort is a binary task
        super().__init__(
            manifest="",  # set in prepare_data/setup, once the run folder is known
            task=task_type,
            label_columns=columns,
            num_classes=spec.num_classes,
            time_column=spec.time_column,
            event_column=spec.event_column,
            modality=spec.modality,
            **kwargs,
        )
        self._init_cohort(spec, data_root, split_dir, scan_table, work_dir, allow_leakage, duplicates)


class MultimodalCohort(_CohortManifest, MultimodalDataModule):
    """A registered cohort's multimodal split files (one row = one pair) for the fusion heads.

    Args:
        cohort: e.g. ``"SOOP"``, ``"MCSA"``, ``"OASIS3"``.
        task: the cohort's task (``None`` when it has one).
        modality: the pair as published, e.g. ``"T1w+FLAIR"``; the first modality is the anchor.
        labels: a subset of the task's labels (BIND-MGH: one finding, since fusion heads are classifiers).
        Other arguments: as :class:`CohortDataModule`; ``**kwargs`` go to ``MultimodalDataModule``.
    """

    def __init__(
        self,
        cohort: str,
        task: str | None = None,
        modality: str = "T1w+FLAIR",
        data_root: str | None = None,
        split_dir: str | None = None,
        scan_table: str | None = None,
        work_dir: str | None = None,
        allow_leakage: bool = False,
        duplicates: str = "collapse",
        labels: list[str] | None = None,
        **kwargs: Any,
    ):
        spec = get_cohort_spec(cohort, _resolve_task(cohort, task), modality)
        if not spec.is_multimodal:
            raise ValueError(f"{spec.key} is unimodal: use the cohort's own data module (e.g. {spec.cohort}).")
        columns = _label_columns(spec, labels)
        task_type = "binary" if spec.task_type == "multilabel" and len(columns) == 1 else spec.task_type
        super().__init__(
            manifest="",
            modalities=list(spec.modalities),
            anchor=spec.modalities[0],
            task=task_type,
            label_columns=columns,
            num_classes=spec.num_classes,
            **kwargs,
        )
        self._init_cohort(spec, data_root, split_dir, scan_table, work_dir, allow_leakage, duplicates)


class GenericCohort(_CohortManifest, FinetuneDataModule):
    """Your own cohort's split CSVs (e.g. institutional multi-label EHR labels) as a fine-tuning data module.

    Args:
        name: cohort name (file names, reports).
        split_dir: folder of the split files.
        split_pattern: file name pattern with ``{split}``, e.g. ``"{split}_MRI_T1w_labels.csv"``.
        subject_column: patient ID column.
        label_columns: label columns (all EHR findings for ``task="multilabel"``).
        task: ``multilabel`` (default), ``binary``, ``multiclass``, ``regression`` or ``survival``.
        modality: the modality of the files.
        path_columns: modality -> column holding image paths (relative to ``data_root`` or the split dir).
        scan_columns: modality -> scan/session ID column (with ``data_root`` BIDS tree or ``scan_table``).
        label_kinds / num_classes / time_column / event_column / site_column: see :func:`generic_cohort_spec`.
        Other arguments: as :class:`CohortDataModule`.
    """

    def __init__(
        self,
        name: str,
        split_dir: str,
        split_pattern: str,
        subject_column: str,
        label_columns: list[str],
        task: str = "multilabel",
        modality: str = "T1w",
        path_columns: dict[str, str] | None = None,
        scan_columns: dict[str, str] | None = None,
        label_kinds: dict[str, str] | None = None,
        num_classes: int | None = None,
        time_column: str | None = None,
        event_column: str | None = None,
        site_column: str | None = None,
        data_root: str | None = None,
        scan_table: str | None = None,
        work_dir: str | None = None,
        allow_leakage: bool = False,
        duplicates: str = "collapse",
        **kwargs: Any,
    ):
        spec = generic_cohort_spec(
            name, split_pattern, subject_column, label_columns, modality=modality, task_type=task,
            label_kinds=label_kinds, num_classes=num_classes, scan_columns=scan_columns, path_columns=path_columns,
            time_column=time_column, event_column=event_column, site_column=site_column,
        )  # fmt: skip
        super().__init__(
            manifest="",
            task=task,
            label_columns=[c for c in label_columns if c not in (time_column, event_column)],
            num_classes=num_classes,
            time_column=time_column,
            event_column=event_column,
            modality=modality,
            **kwargs,
        )
        self._init_cohort(spec, data_root, split_dir, scan_table, work_dir, allow_leakage, duplicates)


class ABIDE(CohortDataModule):
    """ABIDE: autism vs control (task ``asd``), T1w."""

    cohort_name = "ABIDE"


class ADHD200(CohortDataModule):
    """ADHD-200: ADHD vs control (task ``adhd``), T1w; ID column ``ScanDir ID``."""

    cohort_name = "ADHD-200"


class ADNI(CohortDataModule):
    """ADNI: ``ad`` (ADNI1, T1w), ``amyloid`` (ADNI4; T1w/T2w/FLAIR), ``tte`` (MCI to AD, T1w)."""

    cohort_name = "ADNI"


class BINDMGH(CohortDataModule):
    """BIND-MGH: 15 radiology findings (task ``findings``, multilabel); T1w/T2w/FLAIR."""

    cohort_name = "BIND-MGH"


class CNP(CohortDataModule):
    """CNP: control / ADHD / bipolar or schizophrenia (task ``diagnosis``), T1w."""

    cohort_name = "CNP"


class ICSPR(CohortDataModule):
    """ICSPR stroke: ``mrs``, ``lesion_type``, ``los``; T1w/T2w/FLAIR/DWI."""

    cohort_name = "ICSPR"


class MCSA(CohortDataModule):
    """MCSA: ``cog``, ``stroke``, ``hypertension``, ``dyslipidemia``; T1w/FLAIR."""

    cohort_name = "MCSA"


class NACC(CohortDataModule):
    """NACC: ``ad``, ``amyloid`` (the amyloid splits leak 2-3 subjects: allow_leakage=True); T1w/T2w/FLAIR."""

    cohort_name = "NACC"


class OASIS3(CohortDataModule):
    """OASIS-3: AD vs control (task ``ad``); T1w/T2w/FLAIR."""

    cohort_name = "OASIS3"


class OpenBHB(CohortDataModule):
    """OpenBHB: brain age regression (task ``age``), T1w."""

    cohort_name = "OpenBHB"


class PPMI(CohortDataModule):
    """PPMI: ``diagnosis`` (PD / prodromal / control; T1w/T2w/FLAIR), ``tte`` (prodromal to PD; T1w/FLAIR)."""

    cohort_name = "PPMI"


class SOOP(CohortDataModule):
    """SOOP: discharge modified Rankin (task ``rankin``); T1w/FLAIR."""

    cohort_name = "SOOP"


class UCSFPDGM(CohortDataModule):
    """UCSF-PDGM: ``idh`` (T1w/T2w/FLAIR/DWI), ``survival`` (T1w/T2w/FLAIR)."""

    cohort_name = "UCSF-PDGM"


COHORT_DATAMODULES: dict[str, type[CohortDataModule]] = {
    cls.cohort_name: cls
    for cls in (
        ABIDE,
        ADHD200,
        ADNI,
        BINDMGH,
        CNP,
        ICSPR,
        MCSA,
        NACC,
        OASIS3,
        OpenBHB,
        PPMI,
        SOOP,
        UCSFPDGM,
    )  # fmt: skip
}
