"""Sharded cache of the deterministic loading chain in LitData's streaming format, read by random access.

Why: MONAI's ``PersistentDataset`` keeps one pickled float32 tensor per scan (4.8 MB at 100x120x100: ~7 TB for the
paper's 1.55M scans, and millions of small files); here the chain's output (docs/method.md §1.2, everything before
the random augmentation) is written once by ``litdata.optimize`` into ~64 MB chunk files, in a compact dtype.

Layout of a shard folder ``<out_dir>/shards-<key>/``:

* ``chunk-<worker>-<n>.bin`` + ``index.json``: LitData's format; sample ``i`` is manifest row ``i`` (every row gives
  exactly one sample: a scan that fails is stored as an empty volume with its reason, so the sample index is the
  manifest row and an interrupted build can be resumed by LitData's checkpoints, which count samples). Each sample is
  ``{"row": int, "image": [D, H, W] array, "scale": float, "offset": float, "reason": str, "record": JSON str}``,
  ``record`` holding the scan's manifest columns as built;
* ``build.json`` (written first: what is being built, with the worker count a resume must reuse), ``samples.csv``
  (the manifest + ``shard_row``, ``status``, ``reason``), ``quarantine.csv`` and ``shards.json`` (written last: the
  folder is complete). :class:`ShardReader` refuses a folder without ``shards.json``.

Stored values (``dtype``), with the errors measured against the float32 chain on SynthBrain scans resampled 3.2 -> 2
mm, whose order-5 spline rings to [-0.29, 1.23] at the brain's edge (``range`` = the scan's max - min):

* ``uint16`` (default): ``rint((x - offset) / scale)`` with the scan's own ``offset = min``, ``scale = range /
  65535``; error <= ``scale / 2`` (measured 1.1e-5, RMS 6e-6), 2 bytes per voxel (2.40 MB at 100x120x100, read and
  decoded in 0.7 ms from the page cache);
* ``uint8``: the same with 255 levels; error <= ``range / 510`` (measured 2.9e-3), 1 byte per voxel (1.20 MB);
* ``float16``: ``x`` rounded to half precision; error <= 2^-11 relative (measured 4.9e-4), 2.40 MB, and 5 ms to
  decode (numpy's half-to-float conversion).

uint16 is the default: the size of float16 with 40x less error and 7x faster decoding, half the persistent cache's
float32 (4.8 MB per scan). uint8 halves the disk again (1.9 TB for the paper's 1.55M scans instead of 3.7 TB) for an
error of ~3e-3, 3% of the largest std of the pretraining noise augmentation (0.1, docs/method.md §1.4).

The chain produces no foreground mask (the token foreground map is computed from the augmented batch by the mask
collator, docs/method.md §6.1), so none is stored.

Key: ``shards-<key>`` is a hash of the format version, the chain settings' digest
(:meth:`~neurojepa_pl.data.transforms.TransformSettings.digest`), the dtype and the manifest's scans (paths, sizes,
modification times, in order). A different setting, dtype, scan list or a replaced file gives another folder: a
stale cache is never reused. Labels, splits and other columns are not part of the key (a label edit must not rebuild
terabytes): the data module takes them from the manifest it is given and finds each scan's sample by path.

Reading: :class:`ShardScanDataset` is an :class:`~neurojepa_pl.data_modules.datasets.MRIScanDataset` whose cached chain
output comes from ``litdata.StreamingDataset``'s random access (``dataset[i]``; with the decoding 0.7 ms per 2.4 MB
uint16 sample from the page cache), so the project's :class:`~neurojepa_pl.data_modules.base.EpochSampler` keeps the
order (shuffled per epoch, split across ranks, every scan once per epoch) and augmentation stays a function of the
sample key. LitData's own shuffling (chunk-wise, on its iterable loader) is not used: it would tie the order and resume
to LitData's loader state instead of the key. Random access reads one sample where it lies, which suits local and
network file systems; from an object store every read would fetch a chunk, so copy the folder to a local disk first.

Concurrency: a build holds ``.shards-<key>.lock`` beside the folder (``filelock``); another process building the same
key (a second rank) waits and reuses the result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from filelock import FileLock, Timeout
from monai.transforms import Compose

from neurojepa_pl.atomic_io import atomic_write
from neurojepa_pl.data.transforms import IMAGE_KEY, TransformSettings
from neurojepa_pl.data_modules.datasets import FailureLog, MRIScanDataset, ScanFailure, failure_reason
from neurojepa_pl.errors import UserFileNotFoundError, UserValueError

log = logging.getLogger(__name__)

SHARD_DTYPES = ("uint16", "uint8", "float16")
DEFAULT_SHARD_DTYPE = "uint16"
SHARDS_VERSION = 1
CHUNK_BYTES = "64MB"
BUILD_FILE, META_FILE, SAMPLES_FILE, QUARANTINE_FILE = "build.json", "shards.json", "samples.csv", "quarantine.csv"
FAILED_DIR = ".failed"
_LEVELS = {"uint16": 65535, "uint8": 255}


# ----------------------------------------------------------------------------------------------------------------------
# Stored values
# ----------------------------------------------------------------------------------------------------------------------


def _litdata():
    """The ``litdata`` module, or an error that says how to install it (imported lazily: only shards need it)."""
    try:
        import litdata
    except ImportError as err:
        from neurojepa_pl.errors import UserError

        raise UserError(
            "the shard cache needs LitData, which is not installed.",
            'run `make install`, or `pip install --no-deps "litdata==0.2.76"` (without --no-deps pip would also '
            "install torchvision, which replaces your torch build).",
        ) from err
    return litdata


def encode_volume(volume: np.ndarray, dtype: str) -> tuple[np.ndarray, float, float]:
    """Chain output -> stored array and the ``(scale, offset)`` that decode it.

    Args:
        volume: ``[D, H, W]`` float32 (any range: the spline's overshoot beyond [0, 1] is kept).
        dtype: one of :data:`SHARD_DTYPES`.

    Returns:
        ``(stored, scale, offset)``: ``stored * scale + offset`` is the volume within :func:`error_bound`.
    """
    if dtype not in SHARD_DTYPES:
        raise ValueError(f"shard dtype must be one of {SHARD_DTYPES}; found {dtype!r}.")
    if dtype == "float16":
        return volume.astype(np.float16), 1.0, 0.0
    levels = _LEVELS[dtype]
    low, high = float(volume.min()), float(volume.max())
    scale = (high - low) / levels if high > low else 1.0
    codes = np.rint((volume.astype(np.float64) - low) / scale)
    return np.clip(codes, 0, levels).astype(dtype), scale, low


def decode_volume(stored: np.ndarray, scale: float, offset: float) -> torch.Tensor:
    """Stored array -> float32 tensor ``[D, H, W]`` (one pass in numpy, single-threaded: see fast_cache.dequantize)."""
    out = np.empty(stored.shape, dtype=np.float32)
    if stored.dtype == np.float16:
        out[...] = stored
        return torch.from_numpy(out)
    np.multiply(stored, np.float32(scale), out=out)
    out += np.float32(offset)
    return torch.from_numpy(out)


def error_bound(dtype: str, scale: float, max_abs: float) -> float:
    """Largest ``|decoded - original|`` for a volume stored with ``scale`` whose largest magnitude is ``max_abs``."""
    rounding = 4 * float(np.finfo(np.float32).eps) * max(max_abs, 1.0)  # float32 multiply-add, conversions
    if dtype == "float16":
        return float(np.spacing(np.float16(max(max_abs, 2.0**-14)))) / 2 + rounding
    return scale / 2 + rounding


# ----------------------------------------------------------------------------------------------------------------------
# Key
# ----------------------------------------------------------------------------------------------------------------------
def scans_fingerprint(paths: Sequence[str]) -> str:
    """Hash of the scan list in order: each path with its size and modification time (a replaced file changes it)."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            stat = os.stat(path)
            size, mtime = int(stat.st_size), int(stat.st_mtime_ns)
        except OSError:
            size, mtime = -1, -1  # a missing file is quarantined by the build, with its reason
        digest.update(f"{path}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()[:16]


def shard_key(settings: TransformSettings, dtype: str, fingerprint: str) -> str:
    """The folder key: format version, chain-settings digest, dtype and scan fingerprint."""
    payload = {"version": SHARDS_VERSION, "settings": settings.digest(), "dtype": dtype, "scans": fingerprint}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def shard_folder(out_dir: str | Path, settings: TransformSettings, dtype: str, paths: Sequence[str]) -> Path:
    """``<out_dir>/shards-<key>``: where :func:`build_shards` puts these scans through these settings."""
    if dtype not in SHARD_DTYPES:
        raise UserValueError(f"shard dtype must be one of {SHARD_DTYPES}; found {dtype!r}.", "use uint16 (default).")
    return Path(out_dir) / f"shards-{shard_key(settings, dtype, scans_fingerprint(paths))}"


# ----------------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------------
class ChainWriter:
    """The function ``litdata.optimize`` calls in its workers: manifest row -> one shard sample.

    Picklable (module-level class holding plain data); the chain is built on the first call in each worker.

    Args:
        paths: scan path of every manifest row.
        records: the manifest row as a JSON string, per row.
        settings: chain settings.
        dtype: stored dtype.
        failed_dir: where a failing row leaves ``<row>.txt`` with its reason (read when the build finishes).
        device: where the chain's resampling runs (:func:`neurojepa_pl.data.resample.device_loading_transforms`).
        resampler: ``"separable"`` or ``"scipy"`` (MONAI's ``Spacingd`` on the CPU, the chain as written).
    """

    def __init__(
        self,
        paths: Sequence[str],
        records: Sequence[str],
        settings: TransformSettings,
        dtype: str,
        failed_dir: str,
        device: str = "cpu",
        resampler: str = "separable",
    ):
        self.paths, self.records = list(paths), list(records)
        self.settings, self.dtype, self.failed_dir = settings, dtype, failed_dir
        self.device, self.resampler = device, resampler
        self._chain: Compose | None = None

    def chain(self) -> Compose:
        if self._chain is None:
            from neurojepa_pl.data.resample import device_loading_transforms

            torch.set_num_threads(1)  # one worker process per core
            self._chain = device_loading_transforms(self.settings, self.device, self.resampler)
        return self._chain

    def __call__(self, row: int) -> dict[str, Any]:
        reason = ""
        try:
            volume = self.chain()({IMAGE_KEY: self.paths[row]})[IMAGE_KEY].numpy()[0]
            if volume.shape != tuple(self.settings.resize_to):
                reason = f"loading chain produced shape {volume.shape}, expected {self.settings.resize_to}"
        # Any reader error (EOFError, zlib.error, ImageFileError, OSError, ...) or ScanRejected quarantines the scan.
        except Exception as error:  # noqa: BLE001
            reason = failure_reason(error)
        if reason:
            with atomic_write(Path(self.failed_dir) / f"{row}.txt", fsync=False) as handle:
                handle.write(reason.encode())
            stored, scale, offset = np.zeros((0, 0, 0), dtype=self.dtype), 1.0, 0.0
        else:
            stored, scale, offset = encode_volume(volume, self.dtype)
        return {"row": int(row), "image": stored, "scale": scale, "offset": offset, "reason": reason,
                "record": self.records[row]}  # fmt: skip


@contextlib.contextmanager
def _litdata_scratch(folder: Path) -> Iterator[None]:
    """Point LitData's working folders at ``folder`` for one ``optimize`` call.

    ``optimize`` deletes its cache folders (default ``$TMPDIR/chunks`` and ``$TMPDIR/data``) when it starts, which
    would pull the files from under another build running on the same machine; each build gets its own.
    """
    names = ("DATA_OPTIMIZER_CACHE_FOLDER", "DATA_OPTIMIZER_DATA_CACHE_FOLDER")
    saved = {name: os.environ.get(name) for name in names}
    os.environ[names[0]], os.environ[names[1]] = str(folder / "chunks"), str(folder / "data")
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(folder, ignore_errors=True)


def _lock(folder: Path) -> FileLock:
    return FileLock(str(folder.parent / f".{folder.name}.lock"))


@contextlib.contextmanager
def _building(folder: Path) -> Iterator[None]:
    lock = _lock(folder)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("shard cache %s is being built by another process; waiting for it", folder)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    with atomic_write(path) as handle:
        handle.write((json.dumps(payload, indent=2, default=list) + "\n").encode())


def build_shards(
    manifest: pd.DataFrame,
    out_dir: str | Path,
    settings: TransformSettings,
    dtype: str = DEFAULT_SHARD_DTYPE,
    workers: int = 1,
    device: str = "cpu",
    resampler: str = "separable",
    rebuild: bool = False,
    chunk_bytes: str | int = CHUNK_BYTES,
) -> pd.DataFrame:
    """Run the deterministic chain once per scan and write the shards (or reuse / resume them).

    A complete folder for the same key is reused; an incomplete one (a killed build) is resumed from LitData's
    checkpoints with the worker count it was started with; ``rebuild`` deletes the folder first. Safe to call from
    several processes at once (they take turns on the lock; the later ones reuse the first one's shards).

    Args:
        manifest: per-scan manifest with resolved paths (``load_manifest``); its columns go to ``samples.csv``.
        out_dir: parent folder; the shards go to :func:`shard_folder`.
        settings: chain settings.
        dtype: one of :data:`SHARD_DTYPES`.
        workers: LitData worker processes running the chain (ignored when resuming: the build's own count).
        device: where the chain's resampling runs (``cpu``, ``cuda``, ``auto``).
        resampler: ``"separable"`` (default) or ``"scipy"``.
        rebuild: delete an existing folder of this key and build it again.
        chunk_bytes: LitData chunk size.

    Returns:
        ``samples.csv`` as a frame (one row per manifest row: manifest columns, ``shard_row``, ``status`` ok/failed,
        ``reason``); ``attrs``: ``cache_dir``, ``quarantine`` (the failed rows), ``built`` (False: reused).

    Raises:
        ValueError: no ``path`` column, or no scan could be loaded.
    """
    if "path" not in manifest.columns:
        raise UserValueError(
            f"the shard cache needs the per-scan manifest (a 'path' column); found {list(manifest.columns)}.",
            "pass the per-scan manifest (one row per scan).",
        )
    manifest = manifest.reset_index(drop=True)
    paths = [str(p) for p in manifest["path"]]
    folder = shard_folder(out_dir, settings, dtype, paths)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _building(folder):
        if rebuild and folder.exists():
            shutil.rmtree(folder)
        if _read_json(folder / META_FILE) is not None:
            log.info("shard cache %s is complete for this manifest; reusing it", folder)
            samples = read_samples(folder)
            samples.attrs["built"] = False
            return samples
        started = time.perf_counter()
        build = _read_json(folder / BUILD_FILE)
        if build is None or build.get("version") != SHARDS_VERSION:
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir()
            build = {
                "version": SHARDS_VERSION,
                "key": folder.name.removeprefix("shards-"),
                "settings": settings.to_dict(),
                "settings_digest": settings.digest(),
                "dtype": dtype,
                "scans": len(paths),
                "workers": max(1, min(int(workers), len(paths))),
                "chunk_bytes": chunk_bytes,
            }
            _write_json(folder / BUILD_FILE, build)
        else:
            log.warning(
                "shard cache %s: resuming an interrupted build with its %d workers", folder, int(build["workers"])
            )
        resuming = any(folder.glob("chunk-*.bin"))
        try:
            _optimize(folder, manifest, paths, settings, dtype, int(build["workers"]), device, resampler,
                      build["chunk_bytes"])  # fmt: skip
        except Exception as error:  # noqa: BLE001 - LitData's resume state can be damaged in many ways
            if not resuming:
                raise
            log.warning("shard cache %s: resuming failed (%s); building it from the start", folder, error)
            shutil.rmtree(folder)
            folder.mkdir()
            _write_json(folder / BUILD_FILE, build)
            _optimize(folder, manifest, paths, settings, dtype, int(build["workers"]), device, resampler,
                      build["chunk_bytes"])  # fmt: skip
        samples = _finish(folder, manifest, build, device, resampler, time.perf_counter() - started)
    samples.attrs["built"] = True
    return samples


def _optimize(
    folder: Path,
    manifest: pd.DataFrame,
    paths: list[str],
    settings: TransformSettings,
    dtype: str,
    workers: int,
    device: str,
    resampler: str,
    chunk_bytes: str | int,
) -> None:
    optimize = _litdata().optimize

    from neurojepa_pl.data.resample import resolve_device

    failed = folder / FAILED_DIR
    failed.mkdir(exist_ok=True)
    records = manifest.to_json(orient="records", lines=True, default_handler=str).splitlines()
    writer = ChainWriter(paths, records, settings, dtype, str(failed), str(resolve_device(device)), resampler)
    # fork is fast and shares the parent's imports; CUDA cannot be used in a forked child, so spawn for a GPU.
    start_method = "spawn" if resolve_device(device).type == "cuda" else "fork"
    with _litdata_scratch(folder.parent / f".{folder.name}.litdata-{os.getpid()}"):
        # Integer inputs: LitData scans string inputs for file paths to stage; the writer looks the paths up itself.
        # keep_data_ordered + reorder_files=False: worker w takes a contiguous slice in order, so sample i is row i.
        optimize(
            writer,
            list(range(len(paths))),
            output_dir=str(folder),
            chunk_bytes=chunk_bytes,
            num_workers=workers,
            keep_data_ordered=True,
            reorder_files=False,
            use_checkpoint=True,
            start_method=start_method,
            verbose=False,
        )


def _finish(
    folder: Path, manifest: pd.DataFrame, build: dict, device: str, resampler: str, seconds: float
) -> pd.DataFrame:
    """Check what LitData wrote, then write samples.csv, quarantine.csv and (last) shards.json."""
    StreamingDataset = _litdata().StreamingDataset  # noqa: N806 (the class, under its own name)

    n = len(manifest)
    streaming = StreamingDataset(str(folder))
    if len(streaming) != n or int(streaming[0]["row"]) != 0 or int(streaming[n - 1]["row"]) != n - 1:
        raise RuntimeError(
            f"the LitData build in {folder} holds {len(streaming)} samples for {n} manifest rows (or out of order); "
            "delete the folder and build again (neurojepa build-cache --rebuild)."
        )
    reasons = {int(p.stem): p.read_text() for p in (folder / FAILED_DIR).glob("*.txt")}
    samples = manifest.copy()
    samples.insert(0, "shard_row", np.arange(n))
    samples["status"] = ["failed" if i in reasons else "ok" for i in range(n)]
    samples["reason"] = [reasons.get(i, "") for i in range(n)]
    if not reasons.keys() < set(range(n)):
        first = samples[samples["status"] == "failed"].head(5)[["path", "reason"]].to_string(index=False)
        shutil.rmtree(folder, ignore_errors=True)
        raise UserValueError(
            f"no scan of the manifest could be loaded into the shard cache {folder}; failures:\n{first}",
            "check the paths and the loading settings (`neurojepa validate-manifest MANIFEST` reads every file).",
        )
    samples.to_csv(folder / SAMPLES_FILE, index=False)
    quarantine = samples[samples["status"] == "failed"][["shard_row", "path", "reason"]]
    quarantine.to_csv(folder / QUARANTINE_FILE, index=False)
    listed = {chunk["filename"] for chunk in json.loads((folder / "index.json").read_text())["chunks"]}
    for stray in folder.glob("chunk-*.bin"):  # chunk files a killed build started and its resume replaced
        if stray.name not in listed:
            stray.unlink()
    shutil.rmtree(folder / FAILED_DIR, ignore_errors=True)
    stored = sum((folder / name).stat().st_size for name in listed)
    _write_json(
        folder / META_FILE,
        {
            **build,
            "samples": n,
            "quarantined": len(quarantine),
            "bytes": stored,
            "bytes_per_scan": round(stored / max(1, n - len(quarantine))),
            "device": str(device),
            "resampler": resampler,
            "seconds": round(seconds, 3),
        },
    )
    log.info("shard cache %s: %d scans, %d quarantined, %.1f s", folder, n - len(quarantine), len(quarantine), seconds)
    return read_samples(folder)


_ID_COLUMNS = {"subject_id": str, "session_id": str, "modality": str, "path": str, "split": str, "site": str,
               "sex": str, "reason": str}  # fmt: skip


def read_samples(folder: str | Path) -> pd.DataFrame:
    """``samples.csv`` of a complete shard folder; ``attrs``: ``cache_dir``, ``quarantine``, ``meta``."""
    folder = Path(folder)
    meta = _read_json(folder / META_FILE)
    if meta is None:
        raise UserFileNotFoundError(
            f"{folder} is not a complete shard cache (no readable {META_FILE}: never built, or its build was "
            "interrupted).",
            f"run `neurojepa build-cache MANIFEST --out {folder.parent}` with the same settings: it resumes the build.",
        )
    if meta.get("version") != SHARDS_VERSION:
        raise UserValueError(
            f"the shard cache {folder} has format version {meta.get('version')}, this code reads {SHARDS_VERSION}.",
            f"build it again: `neurojepa build-cache MANIFEST --out {folder.parent} --rebuild`.",
        )
    header = pd.read_csv(folder / SAMPLES_FILE, nrows=0).columns
    samples = pd.read_csv(
        folder / SAMPLES_FILE, dtype={c: t for c, t in _ID_COLUMNS.items() if c in header}, keep_default_na=False,
        na_values={c: [""] for c in header if c not in _ID_COLUMNS},
    )  # fmt: skip
    samples.attrs.update(
        cache_dir=str(folder), quarantine=samples[samples["status"] == "failed"].reset_index(drop=True), meta=meta
    )
    return samples


# ----------------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------------
class ShardReader:
    """Random access to the volumes of a complete shard folder (``litdata.StreamingDataset``, opened per process).

    Args:
        folder: a folder written by :func:`build_shards`.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.meta = read_samples(self.folder).attrs["meta"]
        self._streaming = None
        self._pid = -1

    @property
    def streaming(self):
        # Opened lazily and again in each DataLoader worker process (file handles are not shared across a fork).
        if self._streaming is None or self._pid != os.getpid():
            self._streaming = _litdata().StreamingDataset(str(self.folder))
            self._pid = os.getpid()
        return self._streaming

    def volume(self, row: int) -> torch.Tensor:
        """The stored chain output of manifest row ``row``: float32 ``[1, D, H, W]``.

        Raises:
            RuntimeError: the row failed at build time (its reason), or the folder does not hold what its index says.
        """
        sample = self.streaming[int(row)]
        if int(sample["row"]) != int(row):
            raise RuntimeError(
                f"shard cache {self.folder}: sample {row} holds manifest row {sample['row']}; the folder is damaged. "
                f"Rebuild it: `neurojepa build-cache MANIFEST --out {self.folder.parent} --rebuild`."
            )
        if sample["reason"]:
            raise RuntimeError(f"scan of row {row} was quarantined when the shards were built: {sample['reason']}")
        return decode_volume(sample["image"], float(sample["scale"]), float(sample["offset"])).unsqueeze(0)

    def sample(self, row: int) -> dict[str, Any]:
        """The raw stored sample of ``row`` (``image`` as stored, ``scale``, ``offset``, ``reason``, ``record``)."""
        return self.streaming[int(row)]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_streaming"], state["_pid"] = None, -1
        return state


@dataclass
class ShardCache:
    """The shard folder of one manifest, built (or found) on first use and shared by the splits' datasets.

    Args:
        manifest: the per-scan manifest CSV (all rows are cached, whatever split or modality a run uses).
        out_dir: parent folder of the shards (the data module's ``cache_dir``).
        settings: chain settings.
        dtype: stored dtype.
        device: where a build resamples.
        resampler: ``"separable"`` or ``"scipy"``.
    """

    manifest: str
    out_dir: str
    settings: TransformSettings
    dtype: str = DEFAULT_SHARD_DTYPE
    device: str = "cpu"
    resampler: str = "separable"

    def __post_init__(self) -> None:
        self._samples: pd.DataFrame | None = None
        self._reader: ShardReader | None = None

    def ensure(self, workers: int = 1) -> pd.DataFrame:
        """Build or reuse the folder (once per object); returns its ``samples.csv`` frame."""
        if self._samples is None:
            from neurojepa_pl.data import load_manifest

            self._samples = build_shards(
                load_manifest(self.manifest), self.out_dir, self.settings, self.dtype, max(1, workers), self.device,
                self.resampler,
            )  # fmt: skip
            self._reader = ShardReader(self._samples.attrs["cache_dir"])
        return self._samples

    @property
    def reader(self) -> ShardReader:
        if self._reader is None:
            raise RuntimeError("the shard cache is not built yet: call ensure() (the dataset's preload()) first.")
        return self._reader

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers need only the reader; the samples frame can hold millions of rows.
        state = dict(self.__dict__)
        state["_samples"] = None
        return state


class _ShardView:
    """What :class:`MRIScanDataset` reads its cached chain output from: ``view[i] -> {"image": [1, D, H, W]}``."""

    def __init__(self, cache: ShardCache, rows: Sequence[int]):
        self.cache, self.rows = cache, list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not self.rows:
            raise RuntimeError("the shard cache has not been opened yet")
        return {IMAGE_KEY: self.cache.reader.volume(self.rows[index])}


class ShardScanDataset(MRIScanDataset):
    """:class:`MRIScanDataset` whose deterministic chain output is read from a shard cache.

    Sampling keys, augmentation seeding and sample layout are :class:`MRIScanDataset`'s; only the cached volume comes
    from the shards. :meth:`preload` builds (or finds) the shards, records the scans that failed in ``failure_log``
    and drops them, like the persistent path.

    Args:
        records: one dict per scan with at least ``"path"`` (matched to the shards' scans by path).
        settings: chain settings (those of ``shards``).
        shards: the shard cache of the manifest the records come from.
        augment: transform after the cache, seeded per sample key.
        failure_log: where failed scans are recorded.
        seed: base seed of the augmentation.

    Samples: ``{"image": Tensor[1, D, H, W] float32, **record}``.
    """

    def __init__(
        self,
        records: Sequence[Mapping[str, object]],
        settings: TransformSettings,
        shards: ShardCache,
        augment: Compose | None = None,
        failure_log: FailureLog | None = None,
        seed: int = 0,
    ):
        self.shards = shards
        self._shard_rows: list[int] = []
        super().__init__(records, settings, cache_dir=None, augment=augment, failure_log=failure_log, seed=seed)

    def _make_persistent(self) -> _ShardView:  # type: ignore[override]
        return _ShardView(self.shards, self._shard_rows)

    def preload(self, num_workers: int = 0) -> list[ScanFailure]:
        """Build or reuse the shards, then keep the records whose scan is stored; returns the failures."""
        samples = self.shards.ensure(workers=num_workers)
        by_path = {path: i for i, path in reversed(list(enumerate(samples["path"].astype(str))))}
        failures, kept, rows = [], [], []
        for record in self.records:
            row = by_path.get(str(record["path"]))
            if row is None:
                raise UserValueError(
                    f"scan {record['path']} is not in the shard cache {samples.attrs['cache_dir']}.",
                    "the cache was built from another manifest: build it from this one (neurojepa build-cache).",
                )
            if samples["status"].iat[row] == "ok":
                kept.append(record)
                rows.append(row)
                continue
            failure = ScanFailure(
                path=str(record["path"]),
                reason=str(samples["reason"].iat[row]),
                subject_id=str(record.get("subject_id", "")),
                session_id=str(record.get("session_id", "")),
                modality=str(record.get("modality", "")),
            )
            self.failure_log.add(failure)
            failures.append(failure)
        self.records, self._shard_rows = kept, rows
        self._persistent = self._make_persistent()
        self.preloaded = True
        return failures

    @property
    def shard_rows(self) -> list[int]:
        """Shard sample (= manifest row) of each record, after :meth:`preload`."""
        return list(self._shard_rows)


def shard_split_dataset(datamodule: Any, split: str) -> ShardScanDataset | None:
    """The dataset of one split of an :class:`~neurojepa_pl.data_modules.base.MRIDataModule` read from shards.

    Used by ``PretrainDataModule(cache="shards")``: the rows, records and augmentation are the data module's own;
    the shards live under its ``cache_dir`` (one folder for the whole manifest, shared by every split).
    """
    rows = datamodule.split_frame(datamodule.load_frame(), split)
    if rows.empty:
        return None
    records = [datamodule.record(row, split) for row in rows.to_dict("records")]
    cache = getattr(datamodule, "_shard_cache", None)
    if cache is None:
        if not datamodule.hparams.cache_dir:
            raise UserValueError(
                "cache: shards needs a folder for the shards; data.init_args.cache_dir is not set.",
                "set data.init_args.cache_dir (e.g. runs/cache), or build them with `neurojepa build-cache`.",
            )
        cache = ShardCache(
            manifest=str(datamodule.hparams.manifest),
            out_dir=str(datamodule.hparams.cache_dir),
            settings=datamodule.settings,
            dtype=datamodule.hparams.shard_dtype,
        )
        datamodule._shard_cache = cache
    return ShardScanDataset(
        records,
        datamodule.settings,
        cache,
        augment=datamodule.augmentation(split),
        failure_log=datamodule.failure_log,
        seed=datamodule.hparams.seed,
    )
