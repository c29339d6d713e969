"""A fast cache: the deterministic chain run once per scan, all volumes in one memory-mapped ``.npy`` file.

Reading a MONAI ``PersistentDataset`` ``.pt`` file costs about 0.7 ms per scan; one ``np.lib.format`` memmap of shape
``[N, D, H, W]`` in uint8 or float16 costs 0.3-0.5 ms (docs/data_notes.md §3, row d), and the OS page cache shares it
between DataLoader workers. Layout of a cache folder ``<out_dir>/<settings digest>-<dtype>/``:

* ``volumes.npy``: ``[K, *resize_to]`` (uint8: ``round(clip(x, 0, 1) * 255)``, the clip only trims the order-5 spline's
  overshoot; float16: ``x`` as is), one row per scan that loaded;
* ``index.csv``: the manifest columns of those K scans + ``cache_row`` + ``manifest_row`` + ``file_size`` /
  ``file_mtime_ns``;
* ``quarantine.csv``: the scans that failed, with the reason (never zero-filled, never in the index);
* ``meta.json``: settings, digest, dtype, shape, manifest fingerprint; written last (its presence marks completion).

The settings digest (:meth:`TransformSettings.digest`) names the folder, so a changed setting never reuses a cache. A
changed manifest (rows, files replaced: size/mtime) makes :func:`build_fast_cache` rebuild the folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.transforms import Compose
from torch.utils.data import Dataset

from neurojepa_pl.data.transforms import (
    IMAGE_KEY,
    TransformSettings,
    augmentation_seed,
    loading_transforms,
    seed_augmentation,
)

log = logging.getLogger(__name__)

CACHE_DTYPES = ("uint8", "float16")
FAST_CACHE_VERSION = 1
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


def build_fast_cache(
    manifest_df: pd.DataFrame,
    out_dir: str | Path,
    settings: TransformSettings,
    dtype: str = "uint8",
    workers: int = 1,
    rebuild: bool = False,
) -> pd.DataFrame:
    """Run the deterministic loading chain once per scan and store the volumes in one memmap.

    Args:
        manifest_df: per-scan manifest (``path`` resolved, e.g. from ``load_manifest``); all columns go to the index.
        out_dir: parent folder; the cache goes to :func:`cache_folder`.
        settings: loading-chain settings (their digest names the folder).
        dtype: ``"uint8"`` (1 MB per 100x120x100 scan) or ``"float16"`` (2 MB).
        workers: processes running the chain.
        rebuild: rebuild even if a complete cache for the same manifest exists.

    Returns:
        The index (one row per cached scan); ``attrs["cache_dir"]`` is the folder, ``attrs["quarantine"]`` the
        failures (DataFrame ``manifest_row, path, reason``).

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
    meta_path = folder / META_FILE
    if meta_path.is_file() and not rebuild:
        meta = json.loads(meta_path.read_text())
        if meta.get("manifest_fingerprint") == fingerprint and meta.get("version") == FAST_CACHE_VERSION:
            log.info("fast cache %s is complete for this manifest; reusing it", folder)
            return _read_index(folder)
        log.info("fast cache %s was built from another manifest or older files; rebuilding", folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)

    started = time.perf_counter()
    shape, n = tuple(settings.resize_to), len(manifest)
    header_length = len(_npy_header(np.dtype(dtype), (n, *shape)))
    tasks = [(i, p, settings, dtype) for i, p in enumerate(paths)]
    kept: list[int] = []
    quarantine: list[dict] = []
    with open(folder / VOLUMES_FILE, "wb") as handle:
        handle.seek(header_length)
        for index, volume, reason in _results(tasks, workers):
            if volume is None:
                quarantine.append({"manifest_row": index, "path": paths[index], "reason": reason})
                log.warning("fast cache: quarantined %s: %s", paths[index], reason)
                continue
            handle.write(volume.tobytes(order="C"))
            kept.append(index)
        handle.seek(0)
        handle.write(_npy_header(np.dtype(dtype), (len(kept), *shape), header_length))
    quarantine_frame = pd.DataFrame(quarantine, columns=["manifest_row", "path", "reason"])
    quarantine_frame.to_csv(folder / QUARANTINE_FILE, index=False)
    if not kept:
        first = quarantine_frame.head(5).to_string(index=False)
        raise ValueError(f"no scan of the manifest could be loaded into the fast cache {folder}; failures:\n{first}")
    index = manifest.iloc[kept].copy()
    index.insert(0, "cache_row", np.arange(len(kept)))
    index.insert(1, "manifest_row", kept)
    index["file_size"] = [identities[i][0] for i in kept]
    index["file_mtime_ns"] = [identities[i][1] for i in kept]
    index.to_csv(folder / INDEX_FILE, index=False)
    meta = {
        "version": FAST_CACHE_VERSION,
        "digest": settings.digest(),
        "settings": settings.to_dict(),
        "dtype": dtype,
        "shape": [len(kept), *shape],
        "scans": n,
        "quarantined": len(quarantine),
        "manifest_fingerprint": fingerprint,
        "seconds": round(time.perf_counter() - started, 3),
    }
    meta_path.write_text(json.dumps(meta, indent=2, default=list) + "\n")
    log.info("fast cache %s: %d scans cached, %d quarantined", folder, len(kept), len(quarantine))
    return _read_index(folder)


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
        self.index = _read_index(self.cache_dir)
        selected = self.index if rows is None else self.index.iloc[list(rows)]
        self.records = [
            {k: v for k, v in record.items() if k not in ("file_size", "file_mtime_ns")}
            for record in selected.to_dict(orient="records")
        ]
        self.augment = augment
        self.seed = int(seed)
        self._volumes: np.ndarray | None = None  # opened lazily: each DataLoader worker maps the file itself

    @property
    def volumes(self) -> np.ndarray:
        if self._volumes is None:
            self._volumes = np.load(self.cache_dir / VOLUMES_FILE, mmap_mode="r")
            if list(self._volumes.shape) != self.meta["shape"]:
                raise RuntimeError(
                    f"{self.cache_dir / VOLUMES_FILE} has shape {self._volumes.shape}, meta.json says "
                    f"{self.meta['shape']}; the cache is damaged: rebuild it (build_fast_cache(..., rebuild=True))."
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
