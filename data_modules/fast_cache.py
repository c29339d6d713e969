"""A fast cache: the deterministic chain run once per scan, all volumes in one memory-mapped ``.npy`` file.

Reading a MONAI ``PersistentDataset`` ``.pt`` file costs about 0.7 ms per scan; one ``np.lib.format`` memmap of shape
``[N, D, H, W]`` in uint8 or float16 costs 0.3-0.5 ms (docs/data_notes.md §3, row d), and the OS page cache shares it
between DataLoader workers. Layout of a cache folder ``<out_dir>/<settings digest>-<dtype>/``:

* ``volumes.npy``: ``[K, *resize_to]`` (uint8: ``round(clip(x, 0, 1) * 255)``, the clip only trims the order-5 spline's
  overshoot; float16: ``x`` as is), one row per scan that loaded;
* ``index.csv``: the manifest columns of those K scans + ``cache_row`` + ``manifest_row`` + ``file_size`` /
  ``file_mtime_ns`` + ``row_crc32`` (CRC-32 of the row's stored bytes);
* ``quarantine.csv``: the scans that failed, with the reason (never zero-filled, never in the index);
* ``meta.json``: settings, digest, dtype, shape, byte layout, manifest fingerprint; written last.

The settings digest (:meth:`TransformSettings.digest`) names the folder, so a changed setting never reuses a cache. A
changed manifest (rows, files replaced: size/mtime) makes :func:`build_fast_cache` rebuild the folder.

Interrupted and concurrent writes. A build runs under a file lock ``.<folder name>.lock`` beside the folder
(``filelock``; a second process building the same folder waits, then reuses the finished cache) and writes into a
hidden sibling folder that is renamed into place when complete, so a killed build never leaves a folder that looks
finished. A finished cache is checked
whenever :func:`build_fast_cache` meets it again: the size of ``volumes.npy`` and its header always (a truncated or
grown file), every row's CRC-32 with ``verify=True`` (``neurojepa build-cache --verify``: overwritten bytes; it reads
the whole file). Damaged rows are reported (a warning naming each row and its scan) and rebuilt in place from their
scans; ``meta.json`` carries ``"repairing": true`` while that runs, so an interrupted repair is resumed, with a full
check, and :class:`FastCacheDataset` refuses the folder meanwhile. :class:`FastCacheDataset` itself checks the file size
when it opens the memmap (reading every row's CRC on each access would cost more than the read: ~0.8 ms per MB).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from filelock import FileLock, Timeout
from monai.transforms import Compose
from torch.utils.data import Dataset

from neurojepa_pl.atomic_io import atomic_write
from neurojepa_pl.data.transforms import (
    IMAGE_KEY,
    TransformSettings,
    augmentation_seed,
    loading_transforms,
    seed_augmentation,
)

log = logging.getLogger(__name__)

CACHE_DTYPES = ("uint8", "float16")
FAST_CACHE_VERSION = 2  # 2: row CRC-32s in the index, byte layout in meta.json, built under a lock
VOLUMES_FILE, INDEX_FILE, QUARANTINE_FILE, META_FILE = "volumes.npy", "index.csv", "quarantine.csv", "meta.json"


def cache_folder(out_dir: str | Path, settings: TransformSettings, dtype: str) -> Path:
    """``<out_dir>/<settings digest>-<dtype>``: where :func:`build_fast_cache` puts this configuration's cache."""
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"fast-cache dtype must be one of {CACHE_DTYPES}, found {dtype!r}.")
    return Path(out_dir) / f"{settings.digest()}-{dtype}"


def quantize(volume: np.ndarray, dtype: str) -> np.ndarray:
    """Chain output (float, ~[0, 1]) -> stored dtype. uint8 keeps 1/255 steps: half a step is the largest error."""
    if dtype == "uint8":
        return np.rint(np.clip(volume, 0.0, 1.0) * 255.0).astype(np.uint8)
    return volume.astype(np.float16)


def dequantize(stored: np.ndarray) -> torch.Tensor:
    """Stored volume -> float32 tensor in [0, 1] (uint8 / 255).

    One single-threaded numpy pass straight from the memmap into a new float32 buffer: torch's multi-threaded
    ``.float()`` spent ~30 ms on a 1.2 M-voxel volume on a busy 2-core machine (0.5 ms this way).
    """
    out = np.empty(stored.shape, dtype=np.float32)
    if stored.dtype == np.uint8:
        np.true_divide(stored, np.float32(255.0), out=out)
    else:
        out[...] = stored
    return torch.from_numpy(out)


def _file_identity(path: str) -> tuple[int, int]:
    try:
        stat = os.stat(path)
    except OSError:
        return -1, -1
    return int(stat.st_size), int(stat.st_mtime_ns)


def manifest_fingerprint(paths: Sequence[str], identities: Sequence[tuple[int, int]]) -> str:
    """Hash of the scans (paths, sizes, mtimes) in order: a different manifest or a replaced file changes it."""
    digest = hashlib.sha256()
    for path, (size, mtime) in zip(paths, identities):
        digest.update(f"{path}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()[:16]


def _npy_header(dtype: np.dtype, shape: tuple[int, ...], total_length: int | None = None) -> bytes:
    """A version-1.0 ``.npy`` header, padded with spaces to ``total_length`` bytes when given (a multiple of 64)."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape})
    header = buffer.getvalue()
    if total_length is None or len(header) == total_length:
        return header
    if len(header) > total_length or total_length % 64:
        raise ValueError(f"cannot pad a {len(header)}-byte .npy header to {total_length} bytes.")
    # Spaces before the final newline are valid header padding (the reader parses the dict and ignores them).
    body = header[10:-1] + b" " * (total_length - len(header))
    return header[:8] + (total_length - 10).to_bytes(2, "little") + body + b"\n"


def row_crc32(row: np.ndarray) -> int:
    """CRC-32 of a stored row's bytes (C order): what ``index.csv``'s ``row_crc32`` holds."""
    return zlib.crc32(memoryview(np.ascontiguousarray(row)).cast("B"))


def _load_one(task: tuple[int, str, TransformSettings, str]) -> tuple[int, np.ndarray | None, str]:
    index, path, settings, dtype = task
    from neurojepa_pl.data_modules.datasets import failure_reason  # the same reason text as the NIfTI path's quarantine

    try:
        image = loading_transforms(settings)({IMAGE_KEY: path})[IMAGE_KEY]
    # Any reader error (EOFError, zlib.error, ImageFileError, OSError, ...) or ScanRejected quarantines the scan.
    except Exception as error:  # noqa: BLE001
        return index, None, failure_reason(error)
    volume = image.numpy()[0]
    if volume.shape != tuple(settings.resize_to):
        return index, None, f"loading chain produced shape {volume.shape}, expected {settings.resize_to}"
    return index, quantize(volume, dtype), ""


def _init_worker() -> None:
    torch.set_num_threads(1)  # one process per core: intra-op threads would oversubscribe


def _results(tasks: list, workers: int) -> Iterable[tuple[int, np.ndarray | None, str]]:
    if workers <= 1:
        yield from map(_load_one, tasks)
        return
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) as pool:
        yield from pool.map(_load_one, tasks, chunksize=4)


@contextmanager
def _building(folder: Path) -> Iterator[None]:
    """Hold ``.<folder name>.lock`` beside the folder (one builder per cache folder; the OS releases it when its
    holder dies, so a killed build never blocks the next one)."""
    lock = FileLock(str(folder.parent / f".{folder.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("fast cache %s is being built or repaired by another process; waiting for it", folder)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _read_meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError):
        return None


def _write_meta(folder: Path, meta: dict) -> None:
    with atomic_write(folder / META_FILE) as handle:
        handle.write((json.dumps(meta, indent=2, default=list) + "\n").encode())


@dataclass
class CacheDamage:
    """What :func:`find_damage` found wrong with a finished cache folder.

    Attributes:
        rows: damaged cache row -> why (beyond the end of a truncated file, CRC mismatch).
        header: the ``.npy`` header is not the one meta.json describes.
        size: ``volumes.npy``'s size in bytes (-1: missing).
        expected_size: the size meta.json describes.
    """

    rows: dict[int, str] = field(default_factory=dict)
    header: bool = False
    size: int = 0
    expected_size: int = 0

    def __bool__(self) -> bool:
        return bool(self.rows) or self.header or self.size != self.expected_size


def find_damage(folder: str | Path, verify: bool = False) -> CacheDamage:
    """Check a finished cache: ``volumes.npy``'s size and header always, every row's CRC-32 with ``verify``.

    Args:
        folder: a cache folder written by :func:`build_fast_cache`.
        verify: also read every row and compare its CRC-32 with ``index.csv`` (reads the whole file).

    Returns:
        The damage found (falsy when none).
    """
    folder = Path(folder)
    meta = _read_meta(folder)
    if meta is None:
        raise FileNotFoundError(f"{folder} is not a finished fast cache (no readable {META_FILE}).")
    header_bytes, row_bytes, rows = int(meta["header_bytes"]), int(meta["row_bytes"]), int(meta["shape"][0])
    path = folder / VOLUMES_FILE
    size = path.stat().st_size if path.is_file() else -1
    damage = CacheDamage(size=size, expected_size=header_bytes + rows * row_bytes)
    expected_header = _npy_header(np.dtype(meta["dtype"]), tuple(meta["shape"]), header_bytes)
    complete_rows = min(rows, (size - header_bytes) // row_bytes) if size >= header_bytes else 0
    for row in range(complete_rows, rows):
        damage.rows[row] = f"beyond the end of {VOLUMES_FILE} ({max(size, 0)} of {damage.expected_size} bytes)"
    if size < 0:
        damage.header = True
        return damage
    with open(path, "rb") as handle:
        damage.header = handle.read(header_bytes) != expected_header
        if verify and complete_rows:
            crcs = _read_index(folder)["row_crc32"].to_numpy()
            handle.seek(header_bytes)
            for row in range(complete_rows):
                if zlib.crc32(handle.read(row_bytes)) != int(crcs[row]):
                    damage.rows[row] = "CRC-32 mismatch (overwritten or corrupted bytes)"
    return damage


def _report_damage(folder: Path, damage: CacheDamage, index: pd.DataFrame) -> None:
    problems = []
    if damage.size != damage.expected_size:
        problems.append(f"{VOLUMES_FILE} has {max(damage.size, 0)} bytes, expected {damage.expected_size}")
    if damage.header:
        problems.append(f"the header of {VOLUMES_FILE} is damaged")
    shown = [f"row {row} ({index['path'].iloc[row]}): {why}" for row, why in sorted(damage.rows.items())[:10]]
    more = f"; ... and {len(damage.rows) - 10} more rows" if len(damage.rows) > 10 else ""
    log.warning(
        "fast cache %s is damaged (%s): %d damaged rows%s%s; rebuilding them from their scans",
        folder,
        "; ".join(problems) or "bytes overwritten",
        len(damage.rows),
        (": " + "; ".join(shown)) if shown else "",
        more,
    )


class _RepairFailed(RuntimeError):
    """A damaged row could not be rebuilt identically: the whole cache is rebuilt instead."""


def _repair(folder: Path, meta: dict, damage: CacheDamage, settings: TransformSettings, workers: int) -> list[int]:
    """Rebuild the damaged rows in place (their scans through the chain again) and fix the file's size and header."""
    index = _read_index(folder)
    _report_damage(folder, damage, index)
    _write_meta(folder, {**meta, "repairing": True})  # an interrupted repair is resumed with a full check
    header_bytes, row_bytes = int(meta["header_bytes"]), int(meta["row_bytes"])
    rows = sorted(damage.rows)
    tasks = [(row, str(index["path"].iloc[row]), settings, meta["dtype"]) for row in rows]
    path = folder / VOLUMES_FILE
    with open(path, "r+b" if path.is_file() else "w+b") as handle:
        handle.seek(0)
        handle.write(_npy_header(np.dtype(meta["dtype"]), tuple(meta["shape"]), header_bytes))
        handle.truncate(damage.expected_size)  # a truncated file grows (zeros, rewritten below), a longer one is cut
        for row, volume, reason in _results(tasks, workers):
            if volume is None:
                raise _RepairFailed(f"row {row} ({index['path'].iloc[row]}) no longer loads: {reason}")
            if row_crc32(volume) != int(index["row_crc32"].iloc[row]):
                raise _RepairFailed(f"row {row} ({index['path'].iloc[row]}) rebuilt to different values")
            handle.seek(header_bytes + row * row_bytes)
            handle.write(volume.tobytes(order="C"))
        handle.flush()
        os.fsync(handle.fileno())
    _write_meta(folder, {k: v for k, v in meta.items() if k != "repairing"})
    log.info("fast cache %s: %d rows rebuilt", folder, len(rows))
    return rows


def _replace_folder(built: Path, folder: Path) -> None:
    """Put a finished build in place: two renames (a kill in between leaves no ``folder``: the next call rebuilds)."""
    if folder.exists():
        old = folder.parent / f".{folder.name}.old-{os.getpid()}"
        os.rename(folder, old)
        os.rename(built, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(built, folder)


def build_fast_cache(
    manifest_df: pd.DataFrame,
    out_dir: str | Path,
    settings: TransformSettings,
    dtype: str = "uint8",
    workers: int = 1,
    rebuild: bool = False,
    verify: bool = False,
) -> pd.DataFrame:
    """Run the deterministic loading chain once per scan and store the volumes in one memmap.

    A finished cache for the same settings and manifest is reused after a check (see the module docstring): damaged
    rows are reported and rebuilt; ``verify`` extends the check to every row's CRC-32. Safe to call from several
    processes at once (they take turns on the folder's lock; the later ones reuse the first one's cache).

    Args:
        manifest_df: per-scan manifest (``path`` resolved, e.g. from ``load_manifest``); all columns go to the index.
        out_dir: parent folder; the cache goes to :func:`cache_folder`.
        settings: loading-chain settings (their digest names the folder).
        dtype: ``"uint8"`` (1 MB per 100x120x100 scan) or ``"float16"`` (2 MB).
        workers: processes running the chain.
        rebuild: rebuild even if a complete cache for the same manifest exists.
        verify: on reuse, read every row and compare its CRC-32 (reads the whole cache).

    Returns:
        The index (one row per cached scan); ``attrs["cache_dir"]`` is the folder, ``attrs["quarantine"]`` the
        failures (DataFrame ``manifest_row, path, reason``), ``attrs["built"]`` whether this call built the folder
        (False: reused), ``attrs["repaired"]`` the cache rows it rebuilt.

    Raises:
        ValueError: paired manifest, bad dtype, or no scan could be loaded.
    """
    if "path" not in manifest_df.columns:
        raise ValueError(
            f"build_fast_cache needs the per-scan manifest (a 'path' column); found {list(manifest_df.columns)}."
        )
    folder = cache_folder(out_dir, settings, dtype)
    manifest = manifest_df.reset_index(drop=True)
    paths = [str(p) for p in manifest["path"]]
    identities = [_file_identity(p) for p in paths]
    fingerprint = manifest_fingerprint(paths, identities)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _building(folder):
        meta = _read_meta(folder)
        if meta is not None and not rebuild:
            if meta.get("manifest_fingerprint") == fingerprint and meta.get("version") == FAST_CACHE_VERSION:
                repaired: list[int] = []
                damage = find_damage(folder, verify=verify or bool(meta.get("repairing")))
                if damage:
                    try:
                        repaired = _repair(folder, meta, damage, settings, workers)
                    except _RepairFailed as error:
                        log.warning("fast cache %s: %s; rebuilding the whole cache", folder, error)
                        return _build(folder, manifest, paths, identities, fingerprint, settings, dtype, workers)
                else:
                    log.info("fast cache %s is complete for this manifest; reusing it", folder)
                index = _read_index(folder)
                index.attrs.update(built=False, repaired=repaired)
                return index
            log.info("fast cache %s was built from another manifest or older files; rebuilding", folder)
        return _build(folder, manifest, paths, identities, fingerprint, settings, dtype, workers)


def _build(
    folder: Path,
    manifest: pd.DataFrame,
    paths: list[str],
    identities: list[tuple[int, int]],
    fingerprint: str,
    settings: TransformSettings,
    dtype: str,
    workers: int,
) -> pd.DataFrame:
    # Under the lock: leftovers of killed builds of this folder are nobody's work in progress.
    for stale in [*folder.parent.glob(f".{folder.name}.build-*"), *folder.parent.glob(f".{folder.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    work = folder.parent / f".{folder.name}.build-{os.getpid()}"
    work.mkdir()
    try:
        index = _write_cache(work, folder, manifest, paths, identities, fingerprint, settings, dtype, workers)
        _replace_folder(work, folder)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("fast cache %s: %d scans cached, %d quarantined", folder, len(index), len(index.attrs["quarantine"]))
    index = _read_index(folder)
    index.attrs.update(built=True, repaired=[])
    return index


def _write_cache(
    work: Path,
    folder: Path,
    manifest: pd.DataFrame,
    paths: list[str],
    identities: list[tuple[int, int]],
    fingerprint: str,
    settings: TransformSettings,
    dtype: str,
    workers: int,
) -> pd.DataFrame:
    """Write volumes, index, quarantine and meta (last) into ``work``; returns the index."""
    started = time.perf_counter()
    shape, n = tuple(settings.resize_to), len(manifest)
    header_length = len(_npy_header(np.dtype(dtype), (n, *shape)))
    tasks = [(i, p, settings, dtype) for i, p in enumerate(paths)]
    kept: list[int] = []
    crcs: list[int] = []
    quarantine: list[dict] = []
    with open(work / VOLUMES_FILE, "wb") as handle:
        handle.seek(header_length)
        for index, volume, reason in _results(tasks, workers):
            if volume is None:
                quarantine.append({"manifest_row": index, "path": paths[index], "reason": reason})
                log.warning("fast cache: quarantined %s: %s", paths[index], reason)
                continue
            handle.write(volume.tobytes(order="C"))
            kept.append(index)
            crcs.append(row_crc32(volume))
        handle.seek(0)
        handle.write(_npy_header(np.dtype(dtype), (len(kept), *shape), header_length))
        handle.flush()
        os.fsync(handle.fileno())
    quarantine_frame = pd.DataFrame(quarantine, columns=["manifest_row", "path", "reason"])
    quarantine_frame.to_csv(work / QUARANTINE_FILE, index=False)
    if not kept:
        first = quarantine_frame.head(5).to_string(index=False)
        raise ValueError(f"no scan of the manifest could be loaded into the fast cache {folder}; failures:\n{first}")
    index = manifest.iloc[kept].copy()
    index.insert(0, "cache_row", np.arange(len(kept)))
    index.insert(1, "manifest_row", kept)
    index["file_size"] = [identities[i][0] for i in kept]
    index["file_mtime_ns"] = [identities[i][1] for i in kept]
    index["row_crc32"] = crcs
    index.to_csv(work / INDEX_FILE, index=False)
    index.attrs["quarantine"] = quarantine_frame
    row_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    _write_meta(
        work,
        {
            "version": FAST_CACHE_VERSION,
            "digest": settings.digest(),
            "settings": settings.to_dict(),
            "dtype": dtype,
            "shape": [len(kept), *shape],
            "header_bytes": header_length,
            "row_bytes": row_bytes,
            "scans": n,
            "quarantined": len(quarantine),
            "manifest_fingerprint": fingerprint,
            "seconds": round(time.perf_counter() - started, 3),
        },
    )
    return index


_ID_COLUMNS = {"subject_id": str, "session_id": str, "modality": str, "path": str, "split": str, "site": str}


def _read_index(folder: Path) -> pd.DataFrame:
    header = pd.read_csv(folder / INDEX_FILE, nrows=0).columns
    index = pd.read_csv(folder / INDEX_FILE, dtype={c: t for c, t in _ID_COLUMNS.items() if c in header})
    index.attrs["cache_dir"] = str(folder)
    index.attrs["quarantine"] = pd.read_csv(folder / QUARANTINE_FILE)
    return index


class FastCacheDataset(Dataset):
    """Samples from a fast cache, shaped like :class:`neurojepa_pl.data_modules.datasets.MRIScanDataset`'s.

    Args:
        cache_dir: a folder written by :func:`build_fast_cache` (its ``meta.json`` must exist).
        rows: cache rows to expose (e.g. ``index.index[index["split"] == "train"]``); ``None`` = all.
        augment: transform on ``{"image": Tensor}`` after loading (e.g. MONAI augmentations), reseeded per sample
            from ``(seed, epoch, position)`` like ``MRIScanDataset``; ``None`` returns the cached volume.
        seed: base seed of ``augment``.

    Samples: ``{"image": Tensor[1, D, H, W] float32 in [0, 1], **index row}`` (manifest columns, ``cache_row``...).
    Keys may be an int or ``(epoch, position, index)`` like ``MRIScanDataset``.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        rows: Sequence[int] | None = None,
        augment: Compose | None = None,
        seed: int = 0,
    ):
        self.cache_dir = Path(cache_dir)
        meta_path = self.cache_dir / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{self.cache_dir} is not a complete fast cache (no {META_FILE}); build it with "
                "`neurojepa build-cache`."
            )
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("version") != FAST_CACHE_VERSION or self.meta.get("repairing"):
            state = (
                "is being repaired (or a repair was interrupted)"
                if self.meta.get("repairing")
                else (f"has format version {self.meta.get('version')}, this code reads {FAST_CACHE_VERSION}")
            )
            raise RuntimeError(f"the fast cache {self.cache_dir} {state}; {self._fix()}")
        self.index = _read_index(self.cache_dir)
        selected = self.index if rows is None else self.index.iloc[list(rows)]
        self.records = [
            {k: v for k, v in record.items() if k not in ("file_size", "file_mtime_ns", "row_crc32")}
            for record in selected.to_dict(orient="records")
        ]
        self.augment = augment
        self.seed = int(seed)
        self._volumes: np.ndarray | None = None  # opened lazily: each DataLoader worker maps the file itself

    def _fix(self) -> str:
        return (
            f"run `neurojepa build-cache MANIFEST --out {self.cache_dir.parent}` with the settings of meta.json "
            "again (or build_fast_cache): it checks the cache and rebuilds what is damaged"
        )

    @property
    def volumes(self) -> np.ndarray:
        if self._volumes is None:
            path = self.cache_dir / VOLUMES_FILE
            expected = int(self.meta["header_bytes"]) + int(self.meta["shape"][0]) * int(self.meta["row_bytes"])
            size = path.stat().st_size if path.is_file() else -1
            if size != expected:  # a truncated file would fail np.load; a grown one would load shifted rows
                raise RuntimeError(
                    f"the fast cache file {path} has {max(size, 0)} bytes, meta.json describes {expected}: it is "
                    f"damaged (cut short or overwritten); {self._fix()}."
                )
            self._volumes = np.load(path, mmap_mode="r")
            if list(self._volumes.shape) != self.meta["shape"]:
                raise RuntimeError(
                    f"{path} has shape {self._volumes.shape}, meta.json says {self.meta['shape']}: its header is "
                    f"damaged; {self._fix()}."
                )
        return self._volumes

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int, int]) -> dict[str, object]:
        if isinstance(key, tuple):
            epoch, position, index = (int(k) for k in key)
        else:
            epoch, position, index = 0, int(key), int(key)
        record = self.records[index]
        image = dequantize(self.volumes[int(record["cache_row"])]).unsqueeze(0)
        if self.augment is not None:
            seed_augmentation(self.augment, augmentation_seed(self.seed, epoch, position))
            image = torch.as_tensor(self.augment({IMAGE_KEY: image})[IMAGE_KEY])
        return {**record, IMAGE_KEY: image}

    def __getstate__(self) -> Mapping[str, object]:
        # Workers re-open the memmap instead of pickling a mapped array.
        state = dict(self.__dict__)
        state["_volumes"] = None
        return state
