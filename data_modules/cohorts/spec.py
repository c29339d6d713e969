"""Declarative description of one cohort/task/modality split family, and the ID normalisation used to join it.

A :class:`CohortSpec` says everything the joiner needs to turn the authors' published split CSVs (IDs + labels only)
into a manifest: where the three split files are, which column names the patient, which column(s) name the scan of
each modality, which label columns the task uses and of what kind, and known quirks (a label column that is spelled
differently in one split file).

ID normalisation (used on both sides of every join, the split files and the scans on disk):

* :func:`normalise_id` strips surrounding blanks and a leading BIDS entity prefix (``sub-`` / ``ses-``), removes every
  character that is not a letter or a digit, and lower-cases the rest, because BIDS labels may only hold letters and
  digits: ``"011_S_0003"`` (ADNI) and the BIDS folder ``sub-011S0003`` both become ``"011s0003"``; ``"UCSF-PDGM-0005"``
  and ``sub-UCSFPDGM0005`` both become ``"ucsfpdgm0005"``; ``"sub-8a2a2a3d"`` (ICSPR) and ``sub-8a2a2a3d`` both become
  ``"8a2a2a3d"``. Leading zeros are kept (``"0010001"`` stays distinct from ``"10001"``).
* Scan keys can add one cohort rule before that, applied identically to both sides:
  :func:`loni_image_key` drops the ``I`` of LONI image IDs (``"I32237"`` and ``"32237"`` match: the ADNI amyloid files
  store bare numbers), and :func:`oasis_session_key` keeps only the ``dNNNN`` day label of an OASIS-3 MR ID
  (``"OAS30002_MR_d0653"``, ``"OAS30002MRd0653"`` and the OASIS BIDS session ``ses-d0653`` all become ``"d0653"``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

MODALITIES = ("T1w", "T2w", "FLAIR", "DWI")
TASK_TYPES = ("binary", "multiclass", "multilabel", "regression", "survival")
LABEL_KINDS = ("binary", "categorical", "continuous", "time", "event")
SPLITS = ("train", "val", "test")

_ENTITY_PREFIX = re.compile(r"^(sub|ses)-", re.IGNORECASE)
_NOT_ALNUM = re.compile(r"[^0-9A-Za-z]")
_LONI_IMAGE = re.compile(r"^[Ii](\d+)$")
_OASIS_DAY = re.compile(r"^(?:.*?MR_?)?(d\d+)$", re.IGNORECASE)


def normalise_id(value: object) -> str:
    """Normalise a subject or session identifier for joining (see the module docstring).

    Args:
        value: the raw identifier (str, or anything with a sensible ``str``).

    Returns:
        The join key: lower-case letters and digits only.
    """
    text = _ENTITY_PREFIX.sub("", str(value).strip())
    return _NOT_ALNUM.sub("", text).lower()


def loni_image_key(value: object) -> str:
    """Scan key of a LONI image ID (ADNI, PPMI, ABIDE, MCSA): ``"I32237"`` and ``"32237"`` both give ``"32237"``."""
    text = _ENTITY_PREFIX.sub("", str(value).strip())
    match = _LONI_IMAGE.match(text)
    return normalise_id(match.group(1) if match else text)


def oasis_session_key(value: object) -> str:
    """Scan key of an OASIS-3 MR session: ``"OAS30002_MR_d0653"`` and ``"ses-d0653"`` both give ``"d0653"``."""
    text = _ENTITY_PREFIX.sub("", str(value).strip())
    match = _OASIS_DAY.match(text)
    return normalise_id(match.group(1) if match else text)


SCAN_KEY_RULES: dict[str, Callable[[object], str]] = {
    "generic": normalise_id,
    "loni_image": loni_image_key,
    "oasis_session": oasis_session_key,
}


@dataclass(frozen=True)
class LabelColumn:
    """One label column of a split file.

    Attributes:
        column: the column name used in the manifest (the majority spelling in the split files).
        kind: one of ``binary`` {0,1}, ``categorical`` {0..num_classes-1}, ``continuous``, ``time`` (>0),
            ``event`` {0,1}.
        num_classes: number of classes for ``categorical``.
        aliases: other spellings of the same column in some split files (renamed to ``column`` and reported).
    """

    column: str
    kind: str
    num_classes: int | None = None
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in LABEL_KINDS:
            raise ValueError(f"LabelColumn {self.column!r}: kind must be one of {LABEL_KINDS}, found {self.kind!r}.")
        if self.kind == "categorical" and not self.num_classes:
            raise ValueError(f"LabelColumn {self.column!r}: a categorical label needs num_classes.")


@dataclass(frozen=True)
class CohortSpec:
    """Where the split files of one cohort/task/modality are and how to join them to scans.

    Attributes:
        cohort: cohort name as registered (``"ADNI"``, ``"BIND-MGH"``, ...).
        task: short task name (``"ad"``, ``"amyloid"``, ``"tte"``, ...).
        modality: ``"T1w"``, ``"T2w"``, ``"FLAIR"``, ``"DWI"``, or a multimodal pair such as ``"T1w+FLAIR"``.
        split_pattern: path of the split files relative to the split dir, with ``{split}`` for train/val/test.
        subject_column: the patient/subject ID column (the first column of every published file).
        task_type: one of :data:`TASK_TYPES`; what ``FinetuneDataModule(task=...)`` receives.
        labels: all label columns of the file (the manifest keeps them all).
        task_labels: the label columns this task trains on (``label_columns`` of the data module).
        scan_columns: modality -> column holding the scan ID of that modality. The same column may serve several
            modalities (a shared session ID, e.g. BIND-MGH ``Session_id``). Empty when the file has one row per
            participant or per visit without a scan ID; the join is then per subject (see the README).
        scan_key_rule: name in :data:`SCAN_KEY_RULES` applied to scan IDs and to session labels on disk.
        path_columns: modality -> column of the split file that already holds the image path (institutional CSVs such
            as the reference's ``img_path``/``t1w_path``); paths are taken from the file instead of being searched.
        time_column / event_column: survival columns (``task_type == "survival"``).
        site_column: a column copied to the manifest's ``site`` (NACC ``NACCADC``).
        extra_columns: other informative columns copied as they are (dates).
        num_classes: classes of a multiclass task.
        description: one line for listings and the README.
        endpoint: the clinical endpoint the task labels measure, shared by the tasks of other cohorts with the same
            label definition (``"alzheimers_disease"``: NACC ``ad`` and ADNI ``ad``); a fine-tuned model may be tested
            across cohorts only on the same endpoint (``neurojepa_pl.data.label_mapping``). Empty: the task is its own
            endpoint (``<cohort>/<task>``).
    """

    cohort: str
    task: str
    modality: str
    split_pattern: str
    subject_column: str
    task_type: str
    labels: tuple[LabelColumn, ...]
    task_labels: tuple[str, ...]
    scan_columns: Mapping[str, str] = field(default_factory=dict)
    scan_key_rule: str = "generic"
    path_columns: Mapping[str, str] = field(default_factory=dict)
    time_column: str | None = None
    event_column: str | None = None
    site_column: str | None = None
    extra_columns: tuple[str, ...] = ()
    num_classes: int | None = None
    description: str = ""
    endpoint: str = ""

    def __post_init__(self) -> None:
        for modality in self.modalities:
            if modality not in MODALITIES:
                raise ValueError(f"CohortSpec {self.key}: modality {modality!r} is not one of {MODALITIES}.")
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"CohortSpec {self.key}: task_type must be one of {TASK_TYPES}, found {self.task_type!r}.")
        if "{split}" not in self.split_pattern:
            raise ValueError(
                f"CohortSpec {self.key}: split_pattern {self.split_pattern!r} has no {{split}} placeholder."
            )
        if self.scan_key_rule not in SCAN_KEY_RULES:
            raise ValueError(
                f"CohortSpec {self.key}: scan_key_rule {self.scan_key_rule!r} is not in {list(SCAN_KEY_RULES)}."
            )
        label_names = {label.column for label in self.labels}
        unknown = [name for name in self.task_labels if name not in label_names]
        if unknown:
            raise ValueError(
                f"CohortSpec {self.key}: task labels {unknown} are not among the labels {sorted(label_names)}."
            )
        if self.scan_columns and set(self.scan_columns) != set(self.modalities):
            raise ValueError(
                f"CohortSpec {self.key}: scan_columns must name every modality {self.modalities} "
                f"(or none for a per-subject join); found {dict(self.scan_columns)}."
            )
        if self.path_columns and set(self.path_columns) != set(self.modalities):
            raise ValueError(
                f"CohortSpec {self.key}: path_columns must name every modality {self.modalities}; "
                f"found {dict(self.path_columns)}."
            )
        if self.task_type == "survival" and not (self.time_column and self.event_column):
            raise ValueError(f"CohortSpec {self.key}: a survival task needs time_column and event_column.")

    @property
    def key(self) -> tuple[str, str, str]:
        """``(cohort, task, modality)``, the registry key."""
        return (self.cohort, self.task, self.modality)

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities of one sample: ``("T1w",)`` or ``("T1w", "FLAIR")``."""
        return tuple(self.modality.split("+"))

    @property
    def is_multimodal(self) -> bool:
        """True when one row pairs several modalities."""
        return len(self.modalities) > 1

    @property
    def join_level(self) -> str:
        """``"path"`` when the file holds image paths, ``"scan"`` when it names the scan of every modality,
        ``"subject"`` otherwise."""
        if self.path_columns:
            return "path"
        return "scan" if self.scan_columns else "subject"

    def scan_key(self, value: object) -> str:
        """Normalise a scan ID from the split file or a session label from disk with this cohort's rule."""
        return SCAN_KEY_RULES[self.scan_key_rule](value)

    def label(self, column: str) -> LabelColumn:
        """The :class:`LabelColumn` of ``column``."""
        for label in self.labels:
            if label.column == column:
                return label
        raise KeyError(f"{self.key}: no label column {column!r}; labels are {[label.column for label in self.labels]}.")

    def label_specs(self) -> dict:
        """Label checks in the form ``neurojepa_pl.data.validate_manifest(label_specs=...)`` takes.

        Returns:
            ``{column: neurojepa_pl.data.LabelSpec}`` with empty cells allowed: several cohorts (ICSPR, MCSA) carry
            missing labels for the tasks a row is not used for; the join drops rows lacking the *task* labels.
        """
        from neurojepa_pl.data import LabelSpec  # the manifest module owns the validation vocabulary

        return {
            label.column: LabelSpec(label.kind, num_classes=label.num_classes, allow_nan=True)  # type: ignore[arg-type]
            for label in self.labels
        }
