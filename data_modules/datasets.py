"""Scan dataset: MONAI ``PersistentDataset`` for the deterministic chain, then seeded augmentation.

Failure handling: :meth:`MRIScanDataset.preload` runs the deterministic chain over every record once (which also fills
the persistent cache), records each scan that fails (unreadable/truncated file, NaN/Inf voxels, non-3D shape, blank
volume) with its path and reason in a :class:`FailureLog`, and drops it. The dataset never returns a zero image: a
failure after preloading raises with the path and reason.

Cache entries (:class:`CheckedPersistentDataset`): each ``.pt`` file is written whole or not at all (write-then-rename
in the cache folder), so a kill during a write or two processes filling one cache folder never leave a partial entry;
an entry that does not load (truncated, emptied, overwritten: torch's zip format keeps its directory at the end of the
file) is reported with a warning naming it and its scan, deleted and rebuilt from the scan. A bit flip inside the
stored voxels is not detected (no per-entry hash: hashing every read would cost more than the read).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.data import PersistentDataset
from monai.data.utils import SUPPORTED_PICKLE_MOD
from monai.transforms import Compose
from monai.utils import convert_to_tensor, look_up_option
from torch.utils.data import DataLoader, Dataset

from neurojepa_pl.atomic_io import atomic_write, remove_stale_partials
from neurojepa_pl.data.transforms import (
    IMAGE_KEY,
    ScanRejected,
    TransformSettings,
    augmentation_seed,
    loading_transforms,
    seed_augmentation,
)

log = logging.getLogger(__name__)

SAMPLE_KEY = "sample_key"
"""Sample field holding ``(epoch, position)`` (see :attr:`MRIScanDataset.emit_sample_key`)."""

SampleKey = int | tuple[int, int, int]
"""A dataset key: a plain index, or ``(epoch, position, index)`` from
:class:`neurojepa_pl.data_modules.base.EpochSampler`."""


# ----------------------------------------------------------------------------------------------------------------------
# Failure bookkeeping
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScanFailure:
    """One scan that could not be loaded."""

    path: str
    reason: str
    subject_id: str = ""
    session_id: str = ""
    modality: str = ""


class TooManyFailedScans(RuntimeError):
    """More scans failed to load than ``max_failed_fraction`` allows."""


@dataclass
class FailureLog:
    """Collects :class:`ScanFailure` records across datasets (one per unique path)."""

    failures: list[ScanFailure] = field(default_factory=list)

    def add(self, failure: ScanFailure) -> None:
        if all(f.path != failure.path for f in self.failures):
            self.failures.append(failure)
            log.warning("skipping scan %s: %s", failure.path, failure.reason)

    def __len__(self) -> int:
        return len(self.failures)

    def __iter__(self) -> Iterator[ScanFailure]:
        return iter(self.failures)

    def write_csv(self, path: str | Path) -> Path:
        """Write ``path, reason, subject_id, session_id, modality`` rows (the quarantine list); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "reason", "subject_id", "session_id", "modality"])
            for f in self.failures:
                writer.writerow([f.path, f.reason, f.subject_id, f.session_id, f.modality])
        return path

    def raise_if_too_many(self, total: int, max_failed_fraction: float, quarantine: str | Path | None = None) -> None:
        """Raise :class:`TooManyFailedScans` if ``len(self) / total > max_failed_fraction``.

        Args:
            total: number of scans attempted.
            max_failed_fraction: the tolerated fraction (e.g. 0.01).
            quarantine: where the full list was written, for the message.
        """
        if total <= 0 or len(self) / total <= max_failed_fraction:
            return
        first = "\n".join(f"  {f.path}: {f.reason}" for f in self.failures[:10])
        more = f"\n  ... and {len(self) - 10} more" if len(self) > 10 else ""
        where = f" The full list is in {quarantine}." if quarantine else ""
        raise TooManyFailedScans(
            f"{len(self)} of {total} scans failed to load ({len(self) / total:.1%}), more than max_failed_fraction="
            f"{max_failed_fraction:g}.{where} First failures:\n{first}{more}\n"
            "Fix or remove these scans in the manifest (`neurojepa validate-manifest FILE` reads every file), or raise "
            "max_failed_fraction if skipping them is acceptable."
        )


def failure_reason(exc: BaseException) -> str:
    """The innermost cause of an exception raised inside a MONAI ``Compose``, as ``"Type: message"``.

    MONAI wraps every transform error in ``RuntimeError("applying transform ...")``; the useful part is the cause.
    """
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    if isinstance(root, ScanRejected):
        return root.reason
    return f"{type(root).__name__}: {root}"


# ----------------------------------------------------------------------------------------------------------------------
# Persistent cache entries that are written whole and checked on read
# ----------------------------------------------------------------------------------------------------------------------
class CheckedPersistentDataset(PersistentDataset):
    """MONAI's ``PersistentDataset`` whose entries are written atomically and rebuilt when they do not load.

    What MONAI 1.6's ``PersistentDataset._cachecheck`` leaves open, and this override closes (same file names, same
    ``torch.save`` arguments, so existing caches stay valid):

    * on read it recomputes only ``UnpicklingError`` and "Invalid magic number" failures; a truncated entry
      (``RuntimeError: PytorchStreamReader failed reading zip archive``) or an empty one (``EOFError``) is re-raised,
      so the scan behind it would be quarantined as if the scan were broken. Here every load failure of an entry is
      reported (a warning with the entry and the scan), the entry deleted and rebuilt from the scan;
    * on write it saves into a ``tempfile.TemporaryDirectory()`` (``$TMPDIR``) and ``shutil.move``-s the file, which
      is a copy into the final path when ``$TMPDIR`` is another filesystem than the cache, so a kill mid-copy leaves a
      partial entry. Here the temporary file is in the cache folder itself and renamed (:func:`atomic_write`); two
      processes writing one entry each rename a complete file.

    No fsync: an entry lost or cut short by a node crash is detected and rebuilt on the next read.
    """

    def entry_path(self, item: Any) -> Path | None:
        """The cache file of a data item (MONAI's naming: hash of the item + hash of the transforms)."""
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"{self.hash_func(item).decode('utf-8')}{self.transform_hash}.pt"

    def _cachecheck(self, item_transformed: Any) -> Any:
        hashfile = self.entry_path(item_transformed)
        if hashfile is not None and hashfile.is_file():
            try:
                return torch.load(hashfile, weights_only=self.weights_only)
            except PermissionError:
                raise  # an unreadable cache folder is the user's to fix, not a corrupt entry
            # A damaged entry fails in the zip reader (RuntimeError), the unpickler (UnpicklingError, EOFError,
            # ValueError, ...) or torch's weights-only checks; all of them mean "rebuild it".
            except Exception as exc:  # noqa: BLE001
                scan = item_transformed.get(IMAGE_KEY) if isinstance(item_transformed, Mapping) else None
                reason = failure_reason(exc).splitlines()[0][:200].rstrip(": ") or type(exc).__name__
                log.warning("corrupt cache entry %s (scan %s): %s; deleting and rebuilding it", hashfile, scan, reason)
                hashfile.unlink(missing_ok=True)
        transformed = self._pre_transform(deepcopy(item_transformed))  # keep the original item: it is the hash key
        if hashfile is None:
            return transformed
        try:
            with atomic_write(hashfile, fsync=False, clean=False) as handle:
                torch.save(
                    obj=convert_to_tensor(transformed, convert_numeric=False, track_meta=self.track_meta),
                    f=handle,
                    pickle_module=look_up_option(self.pickle_module, SUPPORTED_PICKLE_MOD),
                    pickle_protocol=self.pickle_protocol,
                )
        except PermissionError:  # a read-only cache folder: serve the computed item uncached, as MONAI does
            pass
        return transformed


# ----------------------------------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------------------------------
class _PreloadProbe(Dataset):
    """Runs the cached chain on one item; returns only ``(index, reason or None)`` (cheap to send between workers)."""

    def __init__(self, persistent: CheckedPersistentDataset, expected_shape: tuple[int, ...]):
        self.persistent = persistent
        self.expected_shape = expected_shape

    def __len__(self) -> int:
        return len(self.persistent)

    def __getitem__(self, index: int) -> tuple[int, str | None]:
        try:
            image = self.persistent[index][IMAGE_KEY]
        # A corrupt file can surface as almost any exception type from the readers (EOFError, zlib.error,
        # ImageFileError, OSError, ValueError, ...); every one of them is recorded with its path and reason and
        # counted against max_failed_fraction, never swallowed.
        except Exception as exc:  # noqa: BLE001
            return index, failure_reason(exc)
        if tuple(image.shape) != self.expected_shape:
            return index, f"loading chain produced shape {tuple(image.shape)}, expected {self.expected_shape}"
        return index, None


def _identity_collate(batch):
    return batch


def _stat_key(path: str) -> tuple[int, int]:
    # Size and mtime are part of the cache key so that a replaced file is never served from a stale cache entry.
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1  # the load itself will fail and be reported with the real reason
    return int(st.st_size), int(st.st_mtime_ns)


class MRIScanDataset(Dataset):
    """Scans through the cached deterministic chain (docs/method.md §1.2) and an optional seeded augmentation.

    Args:
        records: one dict per scan with at least ``"path"``; every other key (subject_id, session_id, modality,
            labels, ...) is passed through to the sample. Must not contain ``"image"``.
        settings: loading-chain settings; the cache lives in ``cache_dir / settings.digest()``.
        cache_dir: root of the persistent cache; ``None`` runs the chain on every access.
        augment: transform applied after the cache (e.g. :func:`neurojepa_pl.data.transforms.pretrain_augmentations`).
            Random transforms are reseeded per sample from ``(seed, epoch, position)`` when the key is a tuple from
            :class:`neurojepa_pl.data_modules.base.EpochSampler`, and from ``(seed, 0, index)`` for a plain integer key.
        failure_log: where failed scans are recorded by :meth:`preload` (a new one if ``None``).
        seed: base seed of the augmentation.

    Samples are dicts ``{"image": Tensor[1, D, H, W] float32, **record}``, plus ``"sample_key"`` (int64 ``[2]``:
    ``(epoch, position)``) when :attr:`emit_sample_key` is set: the JEPA mask collator seeds each batch's masks from
    its samples' keys (:mod:`neurojepa_pl.data_modules.collate`).
    """

    emit_sample_key = False
    """Add ``"sample_key"`` to every sample (set by :class:`neurojepa_pl.data_modules.pretrain.PretrainDataModule`)."""

    def __init__(
        self,
        records: Sequence[Mapping[str, object]],
        settings: TransformSettings,
        cache_dir: str | Path | None = None,
        augment: Compose | None = None,
        failure_log: FailureLog | None = None,
        seed: int = 0,
    ):
        for i, rec in enumerate(records):
            if "path" not in rec or not isinstance(rec["path"], str) or not rec["path"]:
                raise ValueError(f"record {i} has no 'path' string: {dict(rec)!r}.")
            if IMAGE_KEY in rec:
                raise ValueError(f"record {i} must not contain the key {IMAGE_KEY!r} (it is the loaded volume).")
        self.records = [dict(r) for r in records]
        self.settings = settings
        self.augment = augment
        self.failure_log = failure_log if failure_log is not None else FailureLog()
        self.seed = int(seed)
        self.cache_path = Path(cache_dir) / settings.digest() if cache_dir is not None else None
        if self.cache_path is not None:
            self._write_cache_settings()
        self.preloaded = False
        self._persistent = self._make_persistent()

    def _write_cache_settings(self) -> None:
        self.cache_path.mkdir(parents=True, exist_ok=True)
        info = self.cache_path / "settings.json"
        if not info.exists():  # several processes may get here at once: each renames a complete file
            with atomic_write(info, fsync=False, clean=False) as handle:
                handle.write((json.dumps(self.settings.cache_fields(), indent=2, default=list) + "\n").encode())

    def _make_persistent(self) -> CheckedPersistentDataset:
        items = []
        for rec in self.records:
            size, mtime = _stat_key(str(rec["path"]))
            # Only the file identity goes into the hashed item: labels or metadata changing must not evict the cache.
            items.append({IMAGE_KEY: str(rec["path"]), "file_size": size, "file_mtime_ns": mtime})
        return CheckedPersistentDataset(items, transform=loading_transforms(self.settings), cache_dir=self.cache_path)

    def __len__(self) -> int:
        return len(self.records)

    def preload(self, num_workers: int = 0) -> list[ScanFailure]:
        """Run the deterministic chain over every scan once: fills the cache, records and drops failures.

        Args:
            num_workers: DataLoader workers for the pass (each writes its own cache files).

        Returns:
            The failures of this dataset (also added to ``failure_log``).
        """
        if self.cache_path is not None:
            remove_stale_partials(self.cache_path)  # writes of an earlier run that was killed (never read as entries)
        expected = (1, *self.settings.resize_to)
        probe = _PreloadProbe(self._persistent, expected)
        loader = DataLoader(probe, batch_size=None, num_workers=num_workers, collate_fn=_identity_collate)
        failed: dict[int, str] = {}
        for index, reason in loader:
            if reason is not None:
                failed[index] = reason
        failures = []
        for index in sorted(failed):
            rec = self.records[index]
            failure = ScanFailure(
                path=str(rec["path"]),
                reason=failed[index],
                subject_id=str(rec.get("subject_id", "")),
                session_id=str(rec.get("session_id", "")),
                modality=str(rec.get("modality", "")),
            )
            self.failure_log.add(failure)
            failures.append(failure)
        if failed:
            self.records = [r for i, r in enumerate(self.records) if i not in failed]
            self._persistent = self._make_persistent()
        self.preloaded = True
        return failures

    def _split_key(self, key: SampleKey) -> tuple[int, int, int]:
        if isinstance(key, tuple):
            epoch, position, index = (int(k) for k in key)
            return epoch, position, index
        index = int(key)
        return 0, index, index

    def __getitem__(self, key: SampleKey) -> dict[str, object]:
        epoch, position, index = self._split_key(key)
        rec = self.records[index]
        try:
            image = self._persistent[index][IMAGE_KEY]
        except Exception as exc:  # noqa: BLE001 - re-raised with the path; see _PreloadProbe for why it is broad
            hint = "" if self.preloaded else " Call preload() first to skip failing scans within max_failed_fraction."
            raise RuntimeError(f"cannot load scan {rec['path']}: {failure_reason(exc)}.{hint}") from exc
        if self.augment is not None:
            seed_augmentation(self.augment, augmentation_seed(self.seed, epoch, position))
            image = self.augment({IMAGE_KEY: image})[IMAGE_KEY]
        sample = dict(rec)
        sample[IMAGE_KEY] = torch.as_tensor(image)
        if self.emit_sample_key:
            sample[SAMPLE_KEY] = torch.tensor([epoch, position], dtype=torch.int64)
        return sample
