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
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from lightning.pytorch import LightningDataModule
from monai.transforms import Compose
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from neurojepa_pl.data import (
    MODALITIES,
    SPLITS,
    LabelSpec,
    ManifestError,
    Problem,
    ValidationReport,
    assign_patient_splits,
    is_blank,
    load_manifest,
    validate_manifest,
)
from neurojepa_pl.data.problems import problem_table
from neurojepa_pl.data.transforms import TransformSettings
from neurojepa_pl.data.validation import diagnose_scan
from neurojepa_pl.data_modules.datasets import FailureLog, MRIScanDataset, ScanFailure, TooManyFailedScans
from neurojepa_pl.errors import UserError, UserValueError

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

MAX_LISTED_SCANS = 50
"""Rows of the bad-scan table in messages; every failed scan is in the quarantine CSV."""

DEFERRED_KINDS = ("missing_file",)
"""Manifest problems that concern one scan only: counted with the loading pass's failures (quarantined within
``max_failed_fraction``) instead of stopping the run before the other scans were looked at."""


class TooManyBadScans(UserError, TooManyFailedScans):
    """More scans cannot be used than ``max_failed_fraction`` allows; the message is the table of all of them.

    Attributes:
        problems: one :class:`neurojepa_pl.data.Problem` per listed scan (path, kind, reason, fix).
    """

    def __init__(self, message: str, fix: str, problems: Sequence[Problem] = ()):
        super().__init__(message, fix)
        self.problems = list(problems)

    def __reduce__(self):
        return (type(self), (self.message, self.fix, self.problems))


def _num_listed_files(df: pd.DataFrame) -> int:
    """Distinct non-empty paths of a manifest (either form)."""
    columns = [c for c in df.columns if c == "path" or c.endswith("_path")]
    values = pd.unique(df[columns].to_numpy().ravel()) if columns else []
    return sum(not is_blank(v) for v in values)


def _num_scans(dataset: Dataset) -> int:
    """Scans a dataset will load: one per record, or one per modality of each paired session."""
    scans = getattr(dataset, "scans", None)  # PairedScanDataset: one MRIScanDataset per modality
    if isinstance(scans, Mapping):
        return sum(len(d) for d in scans.values())
    return len(dataset)


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

    Mid-epoch resume needs no sampler state: ``torchdata``'s ``StatefulDataLoader`` skips the batches already
    yielded by slicing this sampler's key list (no data is read), and :meth:`set_epoch` restores the epoch.
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
        order = self.epoch_order(epoch).tolist()
        # total_size is the stream cut (drop_last) or padded (wrapping around the order) to a multiple of the world
        # size; padded positions keep their own number, so their augmentation differs from the original's.
        mine = range(self.rank, self.total_size, self.num_replicas)
        return iter([(epoch, pos, order[pos % len(order)]) for pos in mine])

    def __len__(self) -> int:
        return self.num_samples


def _loader_state_position(state: Mapping[str, object]) -> tuple[int, int] | None:
    """``(num_workers, batches yielded)`` of a ``StatefulDataLoader`` state (``None``: not a layout torchdata 0.11
    writes)."""
    if isinstance(state.get("_num_yielded"), int):
        return 0, int(state["_num_yielded"])
    snapshot = state.get("_snapshot")
    if isinstance(snapshot, Mapping) and isinstance(snapshot.get("_main_snapshot"), Mapping):
        workers, step = snapshot["_main_snapshot"].get("_num_workers"), snapshot.get("_snapshot_step")
        since = state.get("_steps_since_snapshot", 0)
        if isinstance(workers, int) and isinstance(step, int) and isinstance(since, int):
            return workers, step + since
    return None


class ResumableLoader(StatefulDataLoader):
    """``torchdata``'s ``StatefulDataLoader`` (Lightning saves its ``state_dict`` in checkpoints), plus:

    * a state saved after the epoch's last batch (a checkpoint at an epoch boundary) is not restored: Lightning counts
      that epoch as done and goes on to the next one with this loader, whose iterator (created before Lightning's
      ``set_epoch``) must start the next epoch from its first batch; restoring it would skip the whole next epoch.
      If the epoch's iterator had not reached its end yet, the checkpoint's epoch is the finished one, so the
      sampler moves on by one;
    * a clear error when the state was written with another ``num_workers`` (torchdata only asserts).
    """

    def load_state_dict(self, state_dict: dict[str, object]) -> None:
        position = _loader_state_position(state_dict)
        if position is not None and position[1] >= len(self):
            if not state_dict.get("_iterator_finished", False) and isinstance(self.sampler, EpochSampler):
                self.sampler.set_epoch(self.sampler.epoch + 1)
            return
        saved = None if position is None else position[0]
        if saved is not None and saved != self.num_workers:
            raise UserValueError(
                f"the checkpoint's training-loader position was saved with num_workers={saved}, this run has "
                f"num_workers={self.num_workers}; torchdata cannot restore it across worker counts.",
                f"resume with --data.init_args.num_workers {saved} (the batches and masks do not depend on it).",
            )
        super().load_state_dict(state_dict)


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
                raise UserValueError(
                    f"modalities {unknown} are not in {list(MODALITIES)}.",
                    "use the exact BIDS suffixes (case matters).",
                )
        if not 0.0 <= max_failed_fraction <= 1.0:
            raise UserValueError(
                f"max_failed_fraction must be in [0, 1]; found {max_failed_fraction}.",
                "give the tolerated share of unusable scans, e.g. 0.01.",
            )
        if predict_split not in (*SPLITS, "all"):
            raise UserValueError(
                f"predict_split must be one of {[*SPLITS, 'all']}; found {predict_split!r}.", "use one of those."
            )
        if batch_size < 1:
            raise UserValueError(f"batch_size must be >= 1; found {batch_size}.", "set data.init_args.batch_size >= 1.")
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
        self._deferred: dict[str, Problem] = {}  # path -> manifest problem counted with the loading failures

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
                raise UserValueError(
                    f"no row of {self.hparams.manifest} has a modality in {self.hparams.modalities}.",
                    "check the manifest's modality column or the modalities argument.",
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
    def check_manifest(self, df: pd.DataFrame | None = None) -> ValidationReport:
        """Validate the manifest without opening any image; raise on problems that stop a run.

        ``neurojepa`` calls this before any model is built, so that a wrong column, label or split fails in seconds;
        :meth:`load_frame` calls it again (the same checks) in ``setup``. Files are only checked for existence: a
        missing file, like an unreadable or non-finite one, concerns one scan, so it is counted with the loading
        pass's failures and the run stops (or goes on, within ``max_failed_fraction``) with one table of every bad
        scan (:meth:`setup`). Only when *no* listed file exists (a wrong root folder, typically) does it stop here.

        Args:
            df: the loaded manifest (default: read ``manifest``).

        Returns:
            The report (warnings included; the deferred missing files are kept for :meth:`setup`).

        Raises:
            ManifestError: any error other than missing files, or every file missing (the full report).
        """
        df = load_manifest(self.hparams.manifest) if df is None else df
        report = validate_manifest(df, label_specs=self.label_specs(), check_files=True, check_readable=False)
        deferred = {p.path: p for p in report.errors if p.kind in DEFERRED_KINDS and p.path}
        blocking = [p for p in report.errors if p.kind not in DEFERRED_KINDS]
        if blocking or (deferred and len(deferred) >= _num_listed_files(df)):
            raise ManifestError(report)
        self._deferred = deferred
        return report

    def load_frame(self) -> pd.DataFrame:
        """Load, validate, filter and split the manifest (once); returns the frame with a ``split`` column."""
        if self.frame is not None:
            return self.frame
        df = load_manifest(self.hparams.manifest)
        if self.hparams.validate:
            report = self.check_manifest(df)
            for warning in report.warnings:
                log.warning("%s", warning.format())
            if self._deferred:
                log.warning(
                    "%d file(s) listed in %s do not exist; they are counted with the scans the loading pass rejects",
                    len(self._deferred),
                    self.hparams.manifest,
                )
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
                reason = err.message if isinstance(err, UserError) else str(err)
                raise UserValueError(
                    reason, "set data.init_args.stratify_split: false, or give the manifest a split column."
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

        Every scan that cannot be used (missing, unreadable, truncated, non-finite, not one 3D volume, no brain) is
        collected first; then, all together: written to the quarantine CSV, and either skipped with one warning
        table (within ``max_failed_fraction`` of the scans attempted so far) or reported in one table of path, reason
        and fix by :class:`TooManyBadScans`.
        """
        built = []
        known_failures = len(self.failure_log)  # from an earlier stage's setup: reported then
        for split in STAGE_SPLITS.get(stage, STAGE_SPLITS[None]):
            if split in self.datasets:
                continue
            dataset = self.build_dataset(split)
            if dataset is None:
                log.info("split %r of %s is empty", split, self.hparams.manifest)
                continue
            self._attempted += _num_scans(dataset)
            workers = self.hparams.preload_workers
            dataset.preload(num_workers=self.hparams.num_workers if workers is None else workers)
            self.datasets[split] = dataset
            built.append(split)
        if built and len(self.failure_log) and self._is_global_zero():
            self.quarantine_file = self._default_quarantine()
            if self.quarantine_file is not None:
                self.failure_log.write_csv(self.quarantine_file)
        empty = [split for split in built if len(self.datasets[split]) == 0]
        limit = 0.0 if empty else self.hparams.max_failed_fraction
        self._raise_if_too_many_bad_scans(limit, empty)
        if len(self.failure_log) > known_failures:
            log.warning(
                "%d of %d scan(s) cannot be used and are skipped (max_failed_fraction=%g)%s:\n%s",
                len(self.failure_log),
                self._attempted,
                self.hparams.max_failed_fraction,
                f"; list written to {self.quarantine_file}" if self.quarantine_file else "",
                problem_table(self.scan_problems()),
            )
        for split in built:
            log.info("%s split: %d scans", split, len(self.datasets[split]))

    def scan_problems(self, limit: int | None = MAX_LISTED_SCANS) -> list[Problem]:
        """The scans skipped so far, one :class:`Problem` each (kind, reason and fix), in loading order.

        The kind and fix come from :func:`neurojepa_pl.data.validation.diagnose_scan` (the checks of ``neurojepa
        validate-manifest``), run again on the failed files only; a failure it cannot explain keeps the loading
        chain's own reason.

        Args:
            limit: at most this many (the first ones); ``None`` for all.
        """
        failures = list(self.failure_log)[:limit] if limit is not None else list(self.failure_log)
        return [self._diagnose(failure) for failure in failures]

    def _diagnose(self, failure: ScanFailure) -> Problem:
        found = self._deferred.get(failure.path) or diagnose_scan(failure.path)
        if found is not None:
            return found
        return Problem(
            "load_failed",
            None,
            failure.path,
            failure.reason,
            "check the file in a viewer and the loading settings (spatial_size, resize_to, target_spacing); remove "
            "the row if the scan is unusable.",
        )

    def _raise_if_too_many_bad_scans(self, limit: float, empty_splits: Sequence[str] = ()) -> None:
        failed, total = len(self.failure_log), self._attempted
        if total <= 0 or failed / total <= limit:
            return
        problems = self.scan_problems()
        more = failed - len(problems)
        where = f" (all listed in {self.quarantine_file})" if self.quarantine_file else ""
        listed = f"\n... and {more} more{where}" if more > 0 else ""
        why = (
            f"no scan of the {', '.join(map(repr, empty_splits))} split(s) can be used"
            if empty_splits
            else f"more than max_failed_fraction={self.hparams.max_failed_fraction:g}"
        )
        share = failed / total
        enough = math.ceil(share * 1000) / 1000  # rounded up, so that the value suggested really lets them through
        raise TooManyBadScans(
            f"{failed} of {total} scans cannot be used ({share:.1%}), {why}:\n{problem_table(problems)}{listed}",
            f"fix or remove these scans in {self.hparams.manifest} (`neurojepa validate-manifest "
            f"{self.hparams.manifest}` reads every file)"
            + ("." if empty_splits else f", or set data.init_args.max_failed_fraction: {enough:g} to skip them."),
            problems,
        )

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
        stateful: bool = False,
    ) -> DataLoader:
        """A loader of this module's batch size and workers.

        Args:
            stateful: a :class:`ResumableLoader` (a ``torchdata`` ``StatefulDataLoader``, a ``DataLoader`` subclass
                with ``state_dict`` / ``load_state_dict``), whose position Lightning keeps in checkpoints for exact
                mid-epoch resume.
        """
        if not stateful:
            return DataLoader(dataset, **self._loader_args(sampler, collate_fn, drop_last, shuffle))
        with warnings.catch_warnings():
            # torchdata 0.11 calls the deprecated torch.set_vital in its constructor; nothing for us to act on.
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
            return ResumableLoader(dataset, **self._loader_args(sampler, collate_fn, drop_last, shuffle))

    def _loader_args(
        self, sampler: EpochSampler | None, collate_fn: Callable | None, drop_last: bool, shuffle: bool
    ) -> dict[str, object]:
        return dict(
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
