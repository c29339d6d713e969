"""Base MRI data module: manifest -> validation -> patient splits -> cached, validated scan datasets -> loaders.

Subclasses (:class:`neurojepa_pl.data_modules.pretrain.PretrainDataModule`,
:class:`neurojepa_pl.data_modules.finetune.FinetuneDataModule`) choose the rows, the per-sample record (labels) and the
augmentation of each split.

Reproducibility: the training sampler is an :class:`EpochSampler`, whose order is a pure function of
``(seed, epoch)`` and which hands the dataset ``(epoch, position, index)`` keys, so that every sample's augmentation
is a pure function of ``(seed, epoch, position)`` as well: independent of the number of workers and exact on resume.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from lightning.pytorch import LightningDataModule
from monai.transforms import Compose
from torch.utils.data import DataLoader, DistributedSampler

from neurojepa_pl.data import (
    MODALITIES,
    SPLITS,
    LabelSpec,
    assign_patient_splits,
    is_blank,
    load_manifest,
    validate_manifest,
)
from neurojepa_pl.data.transforms import TransformSettings
from neurojepa_pl.data_modules.datasets import FailureLog, MRIScanDataset

log = logging.getLogger(__name__)

STAGE_SPLITS: dict[str | None, tuple[str, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("predict",),
    None: ("train", "val", "test"),
}
"""Which splits each Lightning stage needs (``predict`` is resolved through ``predict_split``)."""

METADATA_STRING_COLUMNS = ("subject_id", "session_id", "modality", "site", "sex")


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of one epoch's sample order: a pure function of ``(seed, epoch)``."""
    return int(np.random.SeedSequence([seed, epoch], spawn_key=(1,)).generate_state(1, dtype=np.uint64)[0] >> 1)


class EpochSampler(DistributedSampler):
    """Shuffled or class-weighted sampling whose order is a pure function of ``(seed, epoch)``, sharded by rank.

    Yields ``(epoch, position, index)`` keys (see :class:`neurojepa_pl.data_modules.datasets.MRIScanDataset`), where
    ``position`` is the place in the epoch's global stream, identical on every rank, so augmentation seeds never repeat
    within an epoch even when weighted sampling draws one scan twice.

    It subclasses ``DistributedSampler`` so that Lightning neither wraps nor replaces it under DDP and calls
    :meth:`set_epoch` at every epoch start (before the loader's workers are created).

    Args:
        num_items: dataset length.
        seed: base seed.
        shuffle: random order (a new permutation per epoch) instead of ``0..n-1``.
        weights: optional per-item sampling weights ``[num_items]``; draws with replacement (docs/method.md §8.3).
        num_draws: draws per epoch over all ranks with ``weights`` (``None`` = ``num_items``).
        num_replicas: world size.
        rank: this process's rank.
        drop_last: drop the tail that does not divide evenly across ranks (else pad by repeating).
        on_set_epoch: called with the epoch from :meth:`set_epoch` (in the main process, before workers start); used
            to keep the mask collator's step in line with the epoch.
        on_iter: called with the epoch when an iteration starts (in the main process; with workers this is after
            they were created, so it only reaches a ``num_workers=0`` collate function).
    """

    def __init__(
        self,
        num_items: int,
        seed: int = 0,
        shuffle: bool = True,
        weights: Sequence[float] | torch.Tensor | None = None,
        num_draws: int | None = None,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
        on_set_epoch: Callable[[int], None] | None = None,
        on_iter: Callable[[int], None] | None = None,
    ):
        if num_items <= 0:
            raise ValueError(f"EpochSampler needs a non-empty dataset; found {num_items} items.")
        self.num_items = int(num_items)
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=torch.float64)
            if weights.shape != (self.num_items,) or not bool(torch.isfinite(weights).all()) or weights.min() < 0:
                raise ValueError(
                    f"weights must be {self.num_items} finite non-negative numbers; found shape {tuple(weights.shape)}."
                )
            if float(weights.sum()) <= 0:
                raise ValueError("weights sum to 0: no item can be drawn.")
        elif num_draws is not None and num_draws != num_items:
            raise ValueError("num_draws other than num_items needs weights (draws with replacement).")
        self.weights = weights
        self.num_draws = int(num_draws) if num_draws is not None else self.num_items
        super().__init__(
            range(self.num_draws), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self.on_set_epoch = on_set_epoch
        self.on_iter = on_iter

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if self.on_set_epoch is not None:
            self.on_set_epoch(int(epoch))

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The global (all-rank) index stream of ``epoch``, ``[num_draws]`` int64."""
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        if self.weights is not None:
            return torch.multinomial(self.weights, self.num_draws, replacement=True, generator=generator)
        if self.shuffle:
            return torch.randperm(self.num_items, generator=generator)
        return torch.arange(self.num_items)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        epoch = self.epoch
        if self.on_iter is not None:
            self.on_iter(epoch)
        order = self.epoch_order(epoch).tolist()
        # total_size is the stream cut (drop_last) or padded (wrapping around the order) to a multiple of the world
        # size; padded positions keep their own number, so their augmentation differs from the original's.
        mine = range(self.rank, self.total_size, self.num_replicas)
        return iter([(epoch, pos, order[pos % len(order)]) for pos in mine])

    def __len__(self) -> int:
        return self.num_samples


def _metadata(row: Mapping[str, object], columns: Sequence[str]) -> dict[str, object]:
    """Per-sample metadata that collates cleanly: strings ('' for empty) and float32 ``age`` (NaN for empty)."""
    meta: dict[str, object] = {}
    for col in METADATA_STRING_COLUMNS:
        if col in columns:
            value = row[col]
            meta[col] = "" if is_blank(value) else str(value)
    if "age" in columns:
        value = pd.to_numeric(pd.Series([row["age"]]), errors="coerce").iloc[0]
        meta["age"] = np.float32(value)
    return meta


class MRIDataModule(LightningDataModule):
    """Manifest-driven 3D MRI data module (reference loading chain of docs/method.md §1.2 with MONAI, persistent cache).

    Args:
        manifest: per-scan manifest CSV (see :mod:`neurojepa_pl.data`).
        cache_dir: root of the persistent cache of the deterministic chain (``None``: no cache, the chain runs on
            every access). Entries live in ``cache_dir/<settings digest>/``.
        modalities: keep only these modalities (``None``: all).
        batch_size: per-process batch size.
        num_workers: DataLoader workers.
        pin_memory: pin host memory for faster H2D copies.
        spatial_size: model input size (centre crop of the cached volume).
        resize_to: size of the cached volume.
        pad_crop_size: pad/crop before resampling; ``None`` skips it.
        target_spacing: resampling voxel size in mm; ``None`` skips it.
        max_failed_fraction: fail the run if more than this fraction of scans cannot be loaded.
        nan_policy: ``"error"`` (skip and report scans with NaN/Inf) or ``"zero"`` (replace them with 0).
        seed: seed of splits, sampling order and augmentation.
        split_fractions: patient-level (train, val, test) fractions used when the manifest has no split.
        validate: validate the manifest in ``setup`` (errors raise with the full report).
        quarantine_path: where the list of skipped scans is written (default: ``<log dir>/quarantine.csv``, or
            ``<cache>/quarantine.csv`` without a trainer).
        preload_workers: workers for the one-time validation/caching pass in ``setup`` (default: ``num_workers``).
        predict_split: split served by ``predict_dataloader``: train, val, test or ``all``.
    """

    def __init__(
        self,
        manifest: str,
        cache_dir: str | None = None,
        modalities: list[str] | None = None,
        batch_size: int = 2,
        num_workers: int = 0,
        pin_memory: bool = False,
        spatial_size: tuple[int, int, int] = (96, 108, 96),
        resize_to: tuple[int, int, int] = (100, 120, 100),
        pad_crop_size: tuple[int, int, int] | None = (180, 216, 180),
        target_spacing: tuple[float, float, float] | None = (1.0, 1.0, 1.0),
        max_failed_fraction: float = 0.01,
        nan_policy: str = "error",
        seed: int = 0,
        split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
        validate: bool = True,
        quarantine_path: str | None = None,
        preload_workers: int | None = None,
        predict_split: str = "test",
    ):
        super().__init__()
        self.save_hyperparameters()
        if modalities is not None:
            unknown = [m for m in modalities if m not in MODALITIES]
            if unknown:
                raise ValueError(f"modalities {unknown} are not in {list(MODALITIES)}.")
        if not 0.0 <= max_failed_fraction <= 1.0:
            raise ValueError(f"max_failed_fraction must be in [0, 1]; found {max_failed_fraction}.")
        if predict_split not in (*SPLITS, "all"):
            raise ValueError(f"predict_split must be one of {[*SPLITS, 'all']}; found {predict_split!r}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; found {batch_size}.")
        self.settings = TransformSettings(
            pad_crop_size=pad_crop_size,
            target_spacing=target_spacing,
            resize_to=resize_to,
            spatial_size=spatial_size,
            nan_policy=nan_policy,
        )
        self.failure_log = FailureLog()
        self.datasets: dict[str, MRIScanDataset] = {}
        self.frame: pd.DataFrame | None = None
        self.quarantine_file: Path | None = None
        self._attempted = 0

    # ------------------------------------------------------------------ hooks for subclasses
    def label_specs(self) -> dict[str, LabelSpec | str] | None:
        """Label checks for validation (``None``: the default SynthBrain checks of the columns present)."""
        return None

    def stratify_column(self) -> str | None:
        """Label column to stratify the automatic patient split by."""
        return None

    def prepare_frame(self, df: pd.DataFrame) -> pd.DataFrame:
        """Row selection after validation and before splitting (default: the ``modalities`` filter)."""
        if self.hparams.modalities is not None:
            df = df[df["modality"].isin(self.hparams.modalities)]
            if df.empty:
                raise ValueError(
                    f"no row of {self.hparams.manifest} has a modality in {self.hparams.modalities}; check the "
                    "manifest's modality column or the modalities argument."
                )
        return df

    def split_frame(self, df: pd.DataFrame, split: str) -> pd.DataFrame:
        """Rows of one split (``predict`` follows ``predict_split``)."""
        if split == "predict":
            split = self.hparams.predict_split
        return df if split == "all" else df[df["split"] == split]

    def record(self, row: Mapping[str, object], split: str) -> dict[str, object]:
        """One dataset record: path + metadata (subclasses add labels)."""
        rec = {"path": str(row["path"])}
        rec.update(_metadata(row, self._columns))
        return rec

    def augmentation(self, split: str) -> Compose:
        """Transform applied after the cache for ``split``."""
        raise NotImplementedError("subclasses choose the augmentation of each split")

    # ------------------------------------------------------------------ manifest
    def load_frame(self) -> pd.DataFrame:
        """Load, validate, filter and split the manifest (once); returns the frame with a ``split`` column."""
        if self.frame is not None:
            return self.frame
        df = load_manifest(self.hparams.manifest)
        if self.hparams.validate:
            # Files are only checked for existence here: unreadable or non-finite scans are skipped (and counted)
            # by the loading pass instead of stopping the run.
            report = validate_manifest(df, label_specs=self.label_specs(), check_files=True, check_readable=False)
            for warning in report.warnings:
                log.warning("%s", warning.format())
            report.raise_if_errors()
        df = self.prepare_frame(df)
        if "split" not in df.columns or df["split"].map(is_blank).all():
            log.warning(
                "%s has no split column: assigning a patient-level split %s with seed %d%s",
                self.hparams.manifest,
                tuple(self.hparams.split_fractions),
                self.hparams.seed,
                f" stratified by {self.stratify_column()}" if self.stratify_column() else "",
            )
            try:
                df = assign_patient_splits(
                    df,
                    fractions=tuple(self.hparams.split_fractions),
                    seed=self.hparams.seed,
                    stratify=self.stratify_column(),
                    overwrite=True,
                )
            except ValueError as err:
                if self.stratify_column() is None:
                    raise
                raise ValueError(
                    f"{err} For this data module: set stratify_split=False, or give the manifest a split column."
                ) from err
        self._columns = list(df.columns)
        self.frame = df
        return df

    # ------------------------------------------------------------------ datasets
    def _default_quarantine(self) -> Path | None:
        if self.hparams.quarantine_path:
            return Path(self.hparams.quarantine_path)
        if self.trainer is not None:
            root = self.trainer.log_dir or self.trainer.default_root_dir
            return Path(root) / "quarantine.csv"
        if self.hparams.cache_dir:
            return Path(self.hparams.cache_dir) / "quarantine.csv"
        return None

    def _is_global_zero(self) -> bool:
        return self.trainer is None or self.trainer.is_global_zero

    def build_dataset(self, split: str) -> MRIScanDataset | None:
        """Build (not preload) the dataset of one split; ``None`` if the split has no rows."""
        df = self.load_frame()
        rows = self.split_frame(df, split)
        if rows.empty:
            return None
        records = [self.record(row, split) for row in rows.to_dict("records")]
        if not records:
            return None
        return MRIScanDataset(
            records,
            self.settings,
            cache_dir=self.hparams.cache_dir,
            augment=self.augmentation(split),
            failure_log=self.failure_log,
            seed=self.hparams.seed,
        )

    def setup(self, stage: str | None = None) -> None:
        """Validate the manifest, build the datasets of ``stage`` and run the loading pass once.

        Scans that fail are reported (path and reason), written to the quarantine CSV and skipped; more than
        ``max_failed_fraction`` of the scans attempted so far raises
        :class:`neurojepa_pl.data_modules.datasets.TooManyFailedScans`.
        """
        built = []
        for split in STAGE_SPLITS.get(stage, STAGE_SPLITS[None]):
            if split in self.datasets:
                continue
            dataset = self.build_dataset(split)
            if dataset is None:
                log.info("split %r of %s is empty", split, self.hparams.manifest)
                continue
            self._attempted += len(dataset)
            workers = self.hparams.preload_workers
            dataset.preload(num_workers=self.hparams.num_workers if workers is None else workers)
            if len(dataset) == 0:
                # Every scan of this split failed; the fraction check below names them.
                self.failure_log.raise_if_too_many(self._attempted, 0.0)
            self.datasets[split] = dataset
            built.append(split)
        if built and len(self.failure_log) and self._is_global_zero():
            self.quarantine_file = self._default_quarantine()
            if self.quarantine_file is not None:
                self.failure_log.write_csv(self.quarantine_file)
                log.warning("%d scan(s) skipped; list written to %s", len(self.failure_log), self.quarantine_file)
        self.failure_log.raise_if_too_many(self._attempted, self.hparams.max_failed_fraction, self.quarantine_file)
        for split in built:
            log.info("%s split: %d scans", split, len(self.datasets[split]))

    # ------------------------------------------------------------------ loaders
    def _world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return int(self.trainer.world_size), int(self.trainer.global_rank)
        return 1, 0

    def _require(self, split: str) -> MRIScanDataset:
        if split not in self.datasets:
            raise RuntimeError(
                f"no {split!r} dataset: either setup() was not called for this stage or the manifest "
                f"{self.hparams.manifest} has no usable {split!r} rows (check its split column)."
            )
        return self.datasets[split]

    def make_loader(
        self,
        dataset: MRIScanDataset,
        sampler: EpochSampler | None,
        collate_fn: Callable | None = None,
        drop_last: bool = False,
        shuffle: bool = False,
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            shuffle=shuffle if sampler is None else None,
            num_workers=self.hparams.num_workers,
            pin_memory=self.hparams.pin_memory,
            collate_fn=collate_fn,
            drop_last=drop_last,
        )

    def eval_sampler(self, dataset: MRIScanDataset) -> EpochSampler:
        world, rank = self._world()
        return EpochSampler(len(dataset), seed=self.hparams.seed, shuffle=False, num_replicas=world, rank=rank)

    def val_dataloader(self) -> DataLoader:
        dataset = self._require("val")
        return self.make_loader(dataset, self.eval_sampler(dataset))

    def test_dataloader(self) -> DataLoader:
        dataset = self._require("test")
        return self.make_loader(dataset, self.eval_sampler(dataset))

    def predict_dataloader(self) -> DataLoader:
        # Plain sequential order: Lightning injects its own index-tracking sampler for prediction.
        return self.make_loader(self._require("predict"), sampler=None)

    # ------------------------------------------------------------------ helpers
    def batches_per_epoch(self, num_samples_per_rank: int, drop_last: bool) -> int:
        size = self.hparams.batch_size
        return num_samples_per_rank // size if drop_last else math.ceil(num_samples_per_rank / size)
