"""What a fine-tuned model's outputs mean, and the check that test data means the same (cross-cohort transfer).

The paper's cross-cohort protocol (docs/method.md §11) fine-tunes on a source cohort and tests, without adaptation, on
a target cohort *with matched labels*: NACC -> ADNI for Alzheimer's disease and amyloid. ``neurojepa test`` of a
fine-tuned checkpoint with another data configuration runs it; this module makes sure the pairing is sound.

A :class:`LabelSignature` describes the labels a data module serves, in the terms that decide whether a head trained
on it can be scored on another one:

- ``task`` (binary / multiclass / multilabel / regression / survival) and ``num_outputs`` (head width);
- ``endpoint``: what the label measures. Cohort modules take it from their registry entry
  (``CohortSpec.endpoint``: NACC ``AD`` and ADNI ``AD`` are both ``alzheimers_disease``, NACC ``AMYLOID`` and ADNI
  ``AMYLPET`` both ``amyloid_positivity``), else ``<cohort>/<task>``; manifest modules use the label column names;
- ``classes``: the meaning of each output in order (binary ``negative, positive`` = label <= 0.5 / > 0.5; multiclass
  the class indices; multilabel the label columns in head order);
- ``cohort``, ``modality``, ``sites``, ``columns``: where the labels come from, for the report.

The fine-tuning module stores the signature of its training data in every checkpoint (``CHECKPOINT_KEY``) and, when a
checkpoint is loaded for testing on some data module, :func:`check_label_mapping` compares the two: any difference in
task, head width, endpoint or classes is a :class:`neurojepa_pl.errors.UserValueError` naming both sides and the fix;
a match returns the source/target description that goes into ``metrics.json``.

Pure data vocabulary: reads data-module attributes by name and imports nothing of Lightning.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from neurojepa_pl.errors import UserValueError

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_KEY", "LabelSignature", "check_label_mapping", "label_signature"]

CHECKPOINT_KEY = "neurojepa_label_signature"
"""Key of the training data's :class:`LabelSignature` (as a dict) in a fine-tuned checkpoint."""

BINARY_CLASSES = ("negative", "positive")
MATCHED_FIELDS = ("task", "num_outputs", "endpoint", "classes")
"""The fields that must agree between the source and the target data."""


@dataclass(frozen=True)
class LabelSignature:
    """The labels one data module serves (see the module docstring).

    Attributes:
        task: ``binary``, ``multiclass``, ``multilabel``, ``regression`` or ``survival``.
        num_outputs: head outputs the task needs (2 for binary, C, L, or 1).
        endpoint: what the label measures (matched across cohorts).
        classes: meaning of each output, in order (empty for regression / survival).
        columns: the label column(s) in this data (they may be spelled differently in another cohort).
        cohort: the cohort (registered cohort name, else the manifest's resolved path).
        modality: the modality served, if one.
        sites: the sites (``site`` column) of the source cohort (all splits) or of the target's test split, if known.
    """

    task: str
    num_outputs: int
    endpoint: str
    classes: tuple[str, ...]
    columns: tuple[str, ...]
    cohort: str
    modality: str | None = None
    sites: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain types (lists for tuples): what a checkpoint and ``metrics.json`` store."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @staticmethod
    def from_dict(values: Mapping[str, Any]) -> LabelSignature:
        """Inverse of :meth:`to_dict`."""
        fields = dict(values)
        for key in ("classes", "columns", "sites"):
            fields[key] = tuple(fields.get(key) or ())
        return LabelSignature(**fields)

    def describe(self) -> str:
        """One line: ``ADNI (T1w): binary alzheimers_disease [negative, positive] from column AD``."""
        where = self.cohort + (f" ({self.modality})" if self.modality else "")
        if self.sites:
            where += f" sites {', '.join(self.sites)}"
        classes = f" [{', '.join(self.classes)}]" if self.classes else ""
        return f"{where}: {self.task} {self.endpoint}{classes} from column(s) {', '.join(self.columns)}"


def _sites(datamodule: Any, split: str) -> tuple[str, ...]:
    frame = getattr(datamodule, "frame", None)
    if frame is None or "site" not in getattr(frame, "columns", ()) or "split" not in frame.columns:
        return ()
    rows = frame if split == "all" else frame[frame["split"] == split]
    return tuple(sorted(str(s) for s in rows["site"].dropna().unique() if str(s)))


def label_signature(datamodule: Any, split: str = "all") -> LabelSignature:
    """The :class:`LabelSignature` of a fine-tuning data module (unimodal, multimodal or a cohort module).

    Args:
        datamodule: a data module with ``task``, ``label_columns``, ``num_classes`` and ``hparams`` (the manifest,
            survival columns, modality); cohort modules also have ``spec`` (their registry entry).
        split: the split whose ``site`` values go into ``sites`` (``all``, the whole cohort, for the source; ``test``
            for the target).

    Returns:
        The signature.

    Raises:
        TypeError: when ``datamodule`` serves no task labels (e.g. a pretraining data module).
    """
    task = getattr(datamodule, "task", None)
    if task is None:
        raise TypeError(f"{type(datamodule).__name__} serves no task labels (no `task` attribute).")
    hparams = getattr(datamodule, "hparams", {}) or {}
    columns = tuple(getattr(datamodule, "label_columns", None) or ())
    if task == "survival":
        columns = tuple(c for c in (hparams.get("time_column"), hparams.get("event_column")) if c)
    num_outputs = int(getattr(datamodule, "num_classes", 1) or 1)
    spec = getattr(datamodule, "spec", None)
    if spec is not None:
        cohort = str(spec.cohort)
        endpoint = getattr(spec, "endpoint", "") or f"{spec.cohort}/{spec.task}"
        if task != "survival" and len(columns) < len(spec.task_labels):  # a subset, e.g. one BIND-MGH finding
            endpoint += f"/{'+'.join(columns)}"
    else:
        manifest = str(hparams.get("manifest") or "")
        # The resolved path: two cohorts' manifests are often both called manifest.csv.
        cohort = str(Path(manifest).resolve()) if manifest else type(datamodule).__name__
        endpoint = "+".join(columns)
    if task == "binary":
        classes: tuple[str, ...] = BINARY_CLASSES
    elif task == "multiclass":
        classes = tuple(f"class {k}" for k in range(num_outputs))
    elif task == "multilabel":
        classes = columns
    else:
        classes = ()
    modality = hparams.get("modality") or hparams.get("anchor")
    modalities = getattr(datamodule, "modalities", None) or hparams.get("modalities")
    if getattr(datamodule, "spec", None) is not None:
        modality = spec.modality
    elif modalities and len(modalities) > 1:
        modality = "+".join(modalities)
    return LabelSignature(
        task=str(task),
        num_outputs=num_outputs,
        endpoint=endpoint,
        classes=classes,
        columns=columns,
        cohort=cohort,
        modality=str(modality) if modality else None,
        sites=_sites(datamodule, split),
    )


def check_label_mapping(
    stored: Mapping[str, Any] | None, datamodule: Any, checkpoint_path: str | None = None
) -> dict[str, Any] | None:
    """Check that ``datamodule`` serves the labels a checkpoint's head was trained on.

    Args:
        stored: the checkpoint's ``CHECKPOINT_KEY`` entry (the source's signature), or None for checkpoints written
            before signatures existed (then nothing can be checked: a warning says so and None is returned).
        datamodule: the data module the checkpoint is evaluated on (after ``setup``).
        checkpoint_path: named in the error message.

    Returns:
        ``{"source": ..., "target": ..., "cross_cohort": bool}`` (signature dicts) for the test report, or None.

    Raises:
        UserValueError: when task, head width, endpoint or classes differ; the message names both sides.
    """
    if getattr(datamodule, "task", None) is None:
        return None
    target = label_signature(datamodule, split="test")
    if stored is None:
        log.warning(
            "the checkpoint %s stores no label signature (written before they existed): cannot check that %s "
            "serves the labels its head was trained on",
            checkpoint_path or "",
            target.describe(),
        )
        return None
    source = LabelSignature.from_dict(stored)
    different = [name for name in MATCHED_FIELDS if getattr(source, name) != getattr(target, name)]
    if different:
        where = f" {checkpoint_path}" if checkpoint_path else ""
        raise UserValueError(
            f"the checkpoint{where} was fine-tuned on labels that the test data does not serve ({', '.join(different)} "
            f"differ):\n  source (checkpoint): {source.describe()}\n  target (test data): {target.describe()}",
            "test on data with the same task, classes and label definition: the cohort task with the same endpoint "
            "(e.g. NACC ad -> ADNI ad, NACC amyloid -> ADNI amyloid), or a manifest whose label column has the "
            "source's name and meaning (rename the column if only the spelling differs).",
        )
    # Another cohort, or sites the source never trained on (the SynthBrain site-shift pair).
    cross = source.cohort != target.cohort or not set(target.sites) <= set(source.sites)
    if cross:
        log.info("cross-cohort test: %s -> %s", source.describe(), target.describe())
    return {"source": source.to_dict(), "target": target.to_dict(), "cross_cohort": cross}
