"""Data-loader throughput: the full NIfTI chain vs the persistent cache, each then augmented as in docs/method.md §1.4.

Writes a few synthetic skull-stripped-looking volumes (182x218x182 float32 .nii.gz with the FSL LAS affine, or a small
grid with ``--small``), then, with identical DataLoader settings, times one pass over them

(a) from NIfTI: load -> docs/method.md §1.2 chain -> augmentation (no cache), and
(b) from the persistent cache (built first, its build time reported separately) -> augmentation,

and prints JSON with scans/s per worker for both and their ratio (wall clock), plus the CPU time per scan of the main
process and its workers, which a busy shared machine distorts much less. Worker start-up is included in each pass, as
it is in an epoch. Usage::

    python benchmarks/data_loader.py                 # paper grid, 16 scans, 2 workers
    python benchmarks/data_loader.py --small --scans 16 --workers 0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import DataLoader

from neurojepa_pl.data.transforms import TransformSettings, pretrain_augmentations
from neurojepa_pl.data_modules.datasets import MRIScanDataset

MNI_SHAPE = (182, 218, 182)
SMALL_SHAPE = (91, 109, 91)


def synthetic_volume(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """An ellipsoidal 'brain' with a brighter core, smooth bias and noise; exact zeros outside (skull-stripped)."""
    axes = [np.linspace(-1.0, 1.0, s, dtype=np.float32) for s in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    r = np.sqrt((x / 0.78) ** 2 + (y / 0.85) ** 2 + (z / 0.75) ** 2)
    bias = 1.0 + 0.1 * x + 0.05 * y
    tissue = np.where(r < 0.55, 300.0, 200.0) * bias + rng.normal(0.0, 12.0, size=shape).astype(np.float32)
    return np.where(r < 1.0, np.clip(tissue, 1.0, None), 0.0).astype(np.float32)


def write_scans(root: Path, n: int, shape: tuple[int, int, int], seed: int) -> list[dict[str, object]]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [90.0, -126.0, -72.0]  # FSL MNI152 1 mm, stored LAS
    records = []
    for i in range(n):
        path = root / f"sub-{i:03d}_T1w.nii.gz"
        nib.save(nib.Nifti1Image(synthetic_volume(shape, rng), affine), str(path))
        records.append({"path": str(path), "subject_id": f"{i:03d}", "modality": "T1w"})
    return records


def _cpu_seconds() -> float:
    # This process plus every reaped child (DataLoader workers are joined when their iterator is deleted).
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_pass(dataset: MRIScanDataset, workers: int, batch_size: int) -> tuple[float, float]:
    """One pass over ``dataset``; returns (wall seconds, CPU seconds of this process and its workers).

    CPU time is reported next to wall time because on a shared machine the wall time mostly measures the neighbours.
    """
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
    wall0, cpu0 = time.perf_counter(), _cpu_seconds()
    iterator = iter(loader)
    n = 0
    for batch in iterator:
        n += batch["image"].shape[0]
    del iterator  # joins the workers, so that their CPU time is accounted
    wall, cpu = time.perf_counter() - wall0, _cpu_seconds() - cpu0
    if n != len(dataset):
        raise RuntimeError(f"loaded {n} scans, expected {len(dataset)}")
    return wall, cpu


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(prog="benchmarks/data_loader.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scans", type=int, default=16, help="number of synthetic scans (default 16)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2; 0 = main process)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--small", action="store_true", help=f"{SMALL_SHAPE} volumes and a half-size chain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="keep files here (default: a temporary folder)")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # per-worker numbers: one thread per process, as in DataLoader workers
    if args.small:
        shape = SMALL_SHAPE
        settings = TransformSettings(
            pad_crop_size=(90, 108, 90), target_spacing=None, resize_to=(50, 60, 50), spatial_size=(48, 54, 48)
        )
    else:
        shape, settings = MNI_SHAPE, TransformSettings()
    root = Path(tempfile.mkdtemp(prefix="nj_loader_bench_")) if args.workdir is None else args.workdir
    root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        records = write_scans(root / "scans", args.scans, shape, args.seed)
        write_s = time.perf_counter() - t0

        nifti = MRIScanDataset(records, settings, cache_dir=None, augment=pretrain_augmentations(settings))
        nifti[0]  # warm-up outside the timing: first-call initialisation of the readers and transforms
        nifti_s, nifti_cpu = time_pass(nifti, args.workers, args.batch_size)

        cached = MRIScanDataset(records, settings, cache_dir=root / "cache", augment=pretrain_augmentations(settings))
        t0 = time.perf_counter()
        failures = cached.preload(num_workers=args.workers)
        build_s = time.perf_counter() - t0
        if failures:
            raise RuntimeError(f"cache build failed for {failures}")
        cache_s, cache_cpu = time_pass(cached, args.workers, args.batch_size)

        per_worker = max(1, args.workers)
        nifti_rate = args.scans / nifti_s / per_worker
        cache_rate = args.scans / cache_s / per_worker
        result = {
            "volume_shape": "x".join(map(str, shape)),
            "cached_shape": "x".join(map(str, settings.resize_to)),
            "model_input": "x".join(map(str, settings.spatial_size)),
            "scans": args.scans,
            "workers": args.workers,
            "batch_size": args.batch_size,
            "nifti_scans_per_s_per_worker": round(nifti_rate, 3),
            "cache_scans_per_s_per_worker": round(cache_rate, 3),
            "ratio": round(cache_rate / nifti_rate, 2),
            "nifti_ms_per_scan_per_worker": round(1000.0 / nifti_rate, 1),
            "cache_ms_per_scan_per_worker": round(1000.0 / cache_rate, 1),
            "nifti_cpu_ms_per_scan": round(1000.0 * nifti_cpu / args.scans, 1),
            "cache_cpu_ms_per_scan": round(1000.0 * cache_cpu / args.scans, 1),
            "cpu_ratio": round(nifti_cpu / cache_cpu, 2),
            "load_average_1min": round(os.getloadavg()[0], 2),
            "cache_build_s": round(build_s, 2),
            "cache_mb_per_scan": round(
                sum(p.stat().st_size for p in cached.cache_path.glob("*.pt")) / args.scans / 2**20, 2
            ),
            "write_s": round(write_s, 2),
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
        }
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
