"""Paired multimodal data (docs/method.md §8.6; paper "Multimodal Fusion Evaluation"): one session's scans, stacked.

One sample is one (subject, session) with up to M modalities in a fixed order (``modalities``, e.g. T1w + FLAIR).
Batches (dicts):

* ``images`` ``[B, M, 1, D, H, W]`` float32: a missing or dropped modality is a zero placeholder volume **and** has
  validity 0. Only the validity matters: :class:`neurojepa_pl.modules.multimodal.MultimodalModule` never encodes a
  placeholder and the fusion heads select it away, so its values (zeros here) reach no output or gradient;
* ``validity`` ``[B, M]`` bool;
* ``label`` ``[B]`` int64 (binary: label > 0.5, docs/method.md §8.3; multiclass: class index);
* metadata lists: ``subject_id``, ``session_id``, ``path`` (the anchor's path, else the first valid one),
  ``modality`` (the valid modalities joined by ``+``), one ``<modality>_path`` per slot (``''`` when missing), and
  ``site``/``sex``/``age`` when the manifest has them.

Protocol (paper): T1w is the anchor and only sessions with every requested modality are used (``require_all=True``)
so that fusion and unimodal runs see identical samples. ``require_all=False`` keeps sessions with missing modalities
(validity 0) for robustness experiments.

Modality dropout (reference p = 0.2): in TRAINING only, with probability p a sample with more than one valid modality
keeps a uniformly random non-empty proper subset of them. Evaluation is deterministic, a deliberate fix of the
reference, which applied the drop to validation and test as well (docs/method.md §8.6 [BUG/quirk]). The draw is a pure
function of (seed, epoch, position in the epoch), like the augmentations, so it does not depend on workers and resumes
exactly; the dropped scan is not even loaded.

Each modality has its own :class:`neurojepa_pl.data_modules.datasets.MRIScanDataset`, so the persistent caches of
unimodal runs are reused, and each modality of a sample gets its own augmentation draw (the reference augments
modalities independently, too).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.transforms import Compose
from torch.utils.data import Dataset

from neurojepa_pl.data import MODALITIES, PATH_COLUMNS, detect_form, is_blank, pair_modalities
from neurojepa_pl.data.transforms import IMAGE_KEY, TransformSettings
from neurojepa_pl.data_modules.base import MRIDataModule
from neurojepa_pl.data_modules.datasets import FailureLog, MRIScanDataset, SampleKey, ScanFailure
from neurojepa_pl.data_modules.finetune import FinetuneDataModule
from neurojepa_pl.errors import UserValueError
from neurojepa_pl.seeding import derive_seed

log = logging.getLogger(__name__)

MULTIMODAL_TASKS = ("binary", "multiclass")
MODALITY_DROPOUT_STREAM = "modality_dropout"


def modality_dropout(validity: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """Randomly hide modalities of one sample (training-time robustness augmentation of docs/method.md §8.6).

    With probability ``p``, a sample with k >= 2 valid modalities keeps one of the 2**k - 2 non-empty proper subsets
    of them, chosen uniformly; otherwise (or with k < 2) the validity is returned unchanged.

    Args:
        validity: ``[M]`` bool, the sample's available modalities.
        p: drop probability in [0, 1].
        rng: the random source (seed it from the sample's coordinates for reproducibility).

    Returns:
        New ``[M]`` bool validity (a copy).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"modality dropout probability must be in [0, 1]; got {p}.")
    validity = np.asarray(validity, dtype=bool)
    valid = np.flatnonzero(validity)
    if valid.size < 2 or p == 0.0 or rng.random() >= p:
        return validity.copy()
    code = int(rng.integers(1, 2**valid.size - 1))  # bit i set = keep the i-th valid modality; 0 and all-ones excluded
    keep = ((code >> np.arange(valid.size)) & 1).astype(bool)
    out = np.zeros_like(validity)
    out[valid[keep]] = True
    return out


class PairedScanDataset(Dataset):
    """The modalities of one session as one sample, on top of one :class:`MRIScanDataset` per modality.

    Args:
        records: one dict per session: ``PATH_COLUMNS[m]`` for every modality in ``modalities`` (blank when
            missing), plus labels and metadata passed through to the sample. Must not contain ``images``.
        modalities: slot order of the modalities.
        settings: loading-chain settings (shared by all modalities).
        cache_dir: persistent cache root (``None``: no cache).
        augment_factory: returns a fresh augmentation ``Compose`` (one per modality, so their random states are
            independent), or ``None``.
        failure_log: shared record of scans that failed to load.
        seed: base seed of augmentation and modality dropout.
        anchor: a modality every sample must have (``None``: no anchor).
        require_all: drop sessions that lack any modality (after load failures too).
        dropout_p: modality dropout probability (0 for evaluation datasets).
    """

    def __init__(
        self,
        records: Sequence[Mapping[str, object]],
        modalities: Sequence[str],
        settings: TransformSettings,
        cache_dir: str | None = None,
        augment_factory: Callable[[], Compose | None] | None = None,
        failure_log: FailureLog | None = None,
        seed: int = 0,
        anchor: str | None = "T1w",
        require_all: bool = True,
        dropout_p: float = 0.0,
    ):
        if anchor is not None and anchor not in modalities:
            raise ValueError(f"anchor {anchor!r} is not one of the modalities {list(modalities)}.")
        if not 0.0 <= dropout_p <= 1.0:
            raise ValueError(f"dropout_p must be in [0, 1]; got {dropout_p}.")
        self.modalities = list(modalities)
        self.settings = settings
        self.seed = int(seed)
        self.anchor = anchor
        self.require_all = bool(require_all)
        self.dropout_p = float(dropout_p)
        self.failure_log = failure_log if failure_log is not None else FailureLog()
        self._all_records = [dict(r) for r in records]
        self.scans: dict[str, MRIScanDataset] = {}
        for m in self.modalities:
            column = PATH_COLUMNS[m]
            scan_records = [
                {
                    "path": str(rec[column]),
                    "row": i,
                    "subject_id": str(rec.get("subject_id", "")),
                    "session_id": str(rec.get("session_id", "")),
                    "modality": m,
                }
                for i, rec in enumerate(self._all_records)
                if not is_blank(rec.get(column))
            ]
            self.scans[m] = MRIScanDataset(
                scan_records,
                settings,
                cache_dir=cache_dir,
                augment=augment_factory() if augment_factory is not None else None,
                failure_log=self.failure_log,
                seed=seed,
            )
        self.dropped: list[tuple[str, str, str]] = []
        self._index_sessions()

    def _index_sessions(self) -> None:
        """Map each session to its scans' indices; drop sessions the protocol cannot use (and say why)."""
        n, m = len(self._all_records), len(self.modalities)
        sub_index = np.full((n, m), -1, dtype=np.int64)
        for j, modality in enumerate(self.modalities):
            for k, rec in enumerate(self.scans[modality].records):
                sub_index[int(rec["row"]), j] = k
        present = sub_index >= 0
        reasons = []
        for i in range(n):
            lacking = [self.modalities[j] for j in range(m) if not present[i, j]]
            if not present[i].any():
                reasons.append("no loadable modality")
            elif self.anchor is not None and self.anchor in lacking:
                reasons.append(f"anchor {self.anchor} missing or failed to load")
            elif self.require_all and lacking:
                reasons.append(f"{'+'.join(lacking)} missing or failed to load (require_all)")
            else:
                reasons.append("")
        keep = np.array([r == "" for r in reasons], dtype=bool)
        self.dropped = [
            (str(rec.get("subject_id", "")), str(rec.get("session_id", "")), reason)
            for rec, reason in zip(self._all_records, reasons)
            if reason
        ]
        if self.dropped:
            log.warning(
                "dropping %d of %d session(s) that cannot be paired, e.g. %s",
                len(self.dropped),
                n,
                "; ".join(f"{s}/{t}: {r}" for s, t, r in self.dropped[:3]),
            )
        self.records = [rec for rec, k in zip(self._all_records, keep) if k]
        self._sub_index = sub_index[keep]

    def preload(self, num_workers: int = 0) -> list[ScanFailure]:
        """Run the deterministic chain over every scan of every modality once (fills the caches), drop failures.

        Returns:
            The scans that failed (also in ``failure_log``); sessions that lose a required scan are dropped.
        """
        failures = []
        for modality in self.modalities:
            failures += self.scans[modality].preload(num_workers=num_workers)
        self._index_sessions()
        return failures

    @property
    def validity(self) -> np.ndarray:
        """``[n, M]`` bool: which modalities each kept session has (before training-time modality dropout)."""
        return self._sub_index >= 0

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: SampleKey) -> dict[str, object]:
        if isinstance(key, tuple):
            epoch, position, index = (int(k) for k in key)
        else:
            epoch, position, index = 0, int(key), int(key)
        rec = self.records[index]
        validity = self._sub_index[index] >= 0
        if self.dropout_p > 0.0:
            rng = np.random.default_rng(
                derive_seed(self.seed, step=position, stream=f"{MODALITY_DROPOUT_STREAM}/epoch{epoch}")
            )
            validity = modality_dropout(validity, self.dropout_p, rng)
        m = len(self.modalities)
        images = []
        for j, modality in enumerate(self.modalities):
            if not validity[j]:
                images.append(torch.zeros(1, *self.settings.spatial_size, dtype=torch.float32))
                continue
            sub = int(self._sub_index[index, j])
            # Each (sample, modality) gets its own augmentation seed: position * M + j never repeats within an epoch.
            sub_key = (epoch, position * m + j, sub) if isinstance(key, tuple) else sub
            images.append(self.scans[modality][sub_key][IMAGE_KEY])
        sample = dict(rec)
        valid_names = [self.modalities[j] for j in range(m) if validity[j]]
        sample["images"] = torch.stack(images)
        sample["validity"] = torch.as_tensor(validity, dtype=torch.bool)
        sample["modality"] = "+".join(valid_names)
        sample["path"] = str(rec[PATH_COLUMNS[valid_names[0]]])
        return sample


class MultimodalDataModule(FinetuneDataModule):
    """Paired-modality classification data for the fusion heads (docs/method.md §8.6).

    Accepts a per-scan manifest (paired here with :func:`neurojepa_pl.data.pair_modalities`) or a manifest already
    in the paired form (``t1w_path``, ``t2w_path``, ``flair_path`` columns).

    Args:
        manifest: manifest CSV.
        modalities: the modality slots, in order (the fusion model's ``modalities`` must match), e.g.
            ``["T1w", "FLAIR"]``.
        anchor: modality every sample must have (paper: T1w); ``None`` for none.
        require_all: keep only sessions with every modality (paper protocol); ``False`` keeps incomplete sessions
            with validity 0 for the missing ones.
        modality_dropout: training-only probability of hiding a random non-empty proper subset of a sample's
            modalities (reference 0.2; 0 disables).
        task: ``binary`` or ``multiclass`` (the fusion heads are classifiers).
        label_columns: the one label column.
        num_classes: number of classes: ``None`` or 2 for binary (YAMLs set 2: Lightning refuses model and data
            hyper-parameters that share a key with different values), required for multiclass.
        **kwargs: :class:`neurojepa_pl.data_modules.finetune.FinetuneDataModule` /
            :class:`neurojepa_pl.data_modules.base.MRIDataModule` arguments (batch_size, spatial_size, cache_dir,
            class_balanced, samples_per_epoch, seed, ...), except ``modality``.
    """

    def __init__(
        self,
        manifest: str,
        modalities: list[str] | None = None,
        anchor: str | None = "T1w",
        require_all: bool = True,
        modality_dropout: float = 0.2,
        task: str = "binary",
        label_columns: list[str] | None = None,
        num_classes: int | None = None,
        **kwargs: Any,
    ):
        modalities = list(modalities) if modalities is not None else ["T1w", "FLAIR"]
        if kwargs.get("modality") is not None:
            raise UserValueError(
                "MultimodalDataModule takes `modalities` (a list of slots), not `modality`.",
                "replace data.init_args.modality with data.init_args.modalities, e.g. [T1w, FLAIR].",
            )
        if task not in MULTIMODAL_TASKS:
            raise UserValueError(
                f"multimodal fusion is defined for classification tasks {MULTIMODAL_TASKS}; got task={task!r}.",
                f"set data.init_args.task to one of {MULTIMODAL_TASKS}, or use FinetuneDataModule (one modality).",
            )
        unknown = [m for m in modalities if m not in MODALITIES]
        if unknown or len(set(modalities)) != len(modalities) or not modalities:
            raise UserValueError(
                f"modalities must be distinct names from {list(MODALITIES)}; got {modalities}.",
                "list each modality of data.init_args.modalities once, spelled as in the manifest's modality column.",
            )
        if anchor is not None and anchor not in modalities:
            raise UserValueError(
                f"anchor {anchor!r} must be one of the modalities {modalities}.",
                "set data.init_args.anchor to one of data.init_args.modalities (or null).",
            )
        if not 0.0 <= modality_dropout <= 1.0:
            raise UserValueError(
                f"modality_dropout must be in [0, 1]; got {modality_dropout}.",
                "set data.init_args.modality_dropout to a probability, e.g. 0.2.",
            )
        if task == "binary" and num_classes not in (None, 2):
            raise UserValueError(
                f"binary tasks use 2 outputs (docs/method.md §8.3); got num_classes={num_classes}.",
                "set data.init_args.num_classes: 2 (or leave it out) for task binary.",
            )
        super().__init__(
            manifest=manifest,
            modalities=modalities,
            task=task,
            label_columns=label_columns,
            num_classes=num_classes,
            **kwargs,
        )
        self.modality_names = modalities
        self.anchor = anchor
        self.require_all = bool(require_all)
        self.modality_dropout = float(modality_dropout)

    # ------------------------------------------------------------------ rows
    def prepare_frame(self, df: pd.DataFrame) -> pd.DataFrame:
        """Pair (or select) sessions, then drop rows without a usable label (reported)."""
        if detect_form(df) == "per_scan":
            # MRIDataModule's filter to the requested modalities; FinetuneDataModule's single-modality selection is
            # exactly what pairing replaces.
            df = MRIDataModule.prepare_frame(self, df)
            paired = pair_modalities(df, self.modality_names, anchor=self.anchor, require_all=self.require_all)
        else:
            paired = self._select_paired_sessions(df)
        if paired.empty:
            raise UserValueError(
                f"no session of {self.hparams.manifest} has the modalities {self.modality_names} (anchor "
                f"{self.anchor}, require_all={self.require_all}).",
                "check the manifest's modality column, or set data.init_args.require_all: false.",
            )
        drop, reason = self._unusable_rows(paired)
        if drop.any():
            self.dropped_rows = paired[drop].assign(drop_reason=reason[drop])
            log.warning(
                "dropping %d of %d session(s) without a usable label for task %r, e.g. %s",
                int(drop.sum()),
                len(paired),
                self.task,
                "; ".join(
                    f"{r['subject_id']}/{r['session_id']}: {r['drop_reason']}"
                    for _, r in self.dropped_rows.head(5).iterrows()
                ),
            )
            paired = paired[~drop]
        if paired.empty:
            raise ValueError(f"no paired session of {self.hparams.manifest} has a usable label for task {self.task!r}.")
        return paired

    def _select_paired_sessions(self, df: pd.DataFrame) -> pd.DataFrame:
        """Apply ``anchor`` / ``require_all`` to a manifest in the paired form; blank the unrequested modalities."""
        df = df.copy()
        for m, column in PATH_COLUMNS.items():
            if m not in self.modality_names and column in df.columns:
                df[column] = ""
        missing_columns = [PATH_COLUMNS[m] for m in self.modality_names if PATH_COLUMNS[m] not in df.columns]
        if missing_columns:
            raise ValueError(
                f"the paired manifest {self.hparams.manifest} has no column(s) {missing_columns} for the requested "
                f"modalities {self.modality_names}; add them (empty where a scan is missing)."
            )
        present = pd.DataFrame({m: ~df[PATH_COLUMNS[m]].map(is_blank) for m in self.modality_names})
        keep = present.all(axis=1) if self.require_all else present.any(axis=1)
        if self.anchor is not None:
            keep &= present[self.anchor]
        if (~keep).any():
            log.warning(
                "paired manifest: dropping %d of %d session(s) lacking modalities of %s (anchor %s, require_all=%s)",
                int((~keep).sum()),
                len(df),
                self.modality_names,
                self.anchor,
                self.require_all,
            )
        return df[keep]

    def record(self, row: Mapping[str, object], split: str) -> dict[str, object]:
        """Labels and metadata (via :class:`FinetuneDataModule`) plus every modality's path column."""
        paths = {
            PATH_COLUMNS[m]: "" if is_blank(row.get(PATH_COLUMNS[m])) else str(row[PATH_COLUMNS[m]])
            for m in self.modality_names
        }
        first = next(p for p in paths.values() if p)
        rec = super().record({**row, "path": first}, split)
        del rec["path"]  # set per sample from the modalities actually served
        rec.update(paths)
        return rec

    # ------------------------------------------------------------------ datasets
    def build_dataset(self, split: str) -> PairedScanDataset | None:
        rows = self.split_frame(self.load_frame(), split)
        if rows.empty:
            return None
        records = [self.record(row, split) for row in rows.to_dict("records")]
        return PairedScanDataset(
            records,
            self.modality_names,
            self.settings,
            cache_dir=self.hparams.cache_dir,
            augment_factory=lambda: self.augmentation(split),
            failure_log=self.failure_log,
            seed=self.hparams.seed,
            anchor=self.anchor,
            require_all=self.require_all,
            dropout_p=self.modality_dropout if split == "train" else 0.0,
        )
