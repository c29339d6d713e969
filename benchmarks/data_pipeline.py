"""Data-pipeline throughput in one run: NIfTI + MONAI chain vs fast cache vs fast cache + batched augmentation.

Writes SynthBrain T1w scans (``--grid mni``: 182x218x182 1 mm ``.nii.gz``, the paper's input; ``--grid model`` for a
quick run), then times, with the same DataLoader settings (``--workers``, ``--batch-size``), ``--epochs`` passes of

(a) ``nifti_monai``: NIfTI -> docs/method.md §1.2 loading chain -> docs/method.md §1.4 MONAI augmentations, all in the
    workers;
(b) ``cache_monai``: fast memmap cache (built once, time reported apart) -> MONAI augmentations in the workers;
(c) ``cache_batched``: fast cache in the workers -> :class:`neurojepa_pl.data_modules.gpu_augment.BatchedAugment` on
    whole batches in the main process (on ``--device``: ``cpu``, or ``cuda`` when available).

Prints JSON: scans/s overall and per worker for each, and the ratios to (a). Worker start-up is included in every
pass, as in an epoch. Usage::

    python benchmarks/data_pipeline.py                          # 8 scans at 1 mm, 2 workers
    python benchmarks/data_pipeline.py --grid model --scans 16 --workers 0 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from neurojepa_pl.data import load_manifest
from neurojepa_pl.data.transforms import TransformSettings, pretrain_augmentations
from neurojepa_pl.data_modules.datasets import MRIScanDataset
from neurojepa_pl.data_modules.fast_cache import FastCacheDataset, build_fast_cache
from neurojepa_pl.data_modules.gpu_augment import BatchedAugment


def _time_loader(dataset, workers: int, batch_size: int, epochs: int, on_batch=None) -> tuple[float, int]:
    """Seconds and scans for ``epochs`` passes; each pass starts its workers like an epoch does."""
    scans, started = 0, time.perf_counter()
    for epoch in range(epochs):
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=workers,
            shuffle=False,
            persistent_workers=False,
            # Keys (epoch, position, index) reseed the MONAI augmentations per sample, as the data modules do.
            sampler=[(epoch, i, i) for i in range(len(dataset))],
        )
        for batch in loader:
            images = batch["image"]
            if on_batch is not None:
                images = on_batch(images)
            scans += images.shape[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started, scans


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", type=int, default=8)
    parser.add_argument("--grid", default="mni", help="SynthBrain grid: mni (1 mm, default), model, or DxHxW")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the scans and cache here")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads of the main process")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from neurojepa_pl.synth import generate_cohort

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="neurojepa_bench_"))
    started = time.perf_counter()
    generate_cohort(workdir / "synth", n_subjects=args.scans, seed=0, modalities=("T1w",), grid=args.grid,
                    sessions=(1, 1), workers=max(1, min(args.workers, os.cpu_count() or 1)))  # fmt: skip
    synth_seconds = time.perf_counter() - started
    manifest = load_manifest(workdir / "synth" / "manifest.csv")
    paper_grid = args.grid == "mni"
    settings = TransformSettings(
        pad_crop_size=(180, 216, 180) if paper_grid else None,
        target_spacing=(1.0, 1.0, 1.0) if paper_grid else None,
        resize_to=(100, 120, 100) if paper_grid else (100, 116, 100),
        spatial_size=(96, 108, 96),
    )
    records = [{"path": p, "subject_id": s} for p, s in zip(manifest["path"], manifest["subject_id"])]

    nifti = MRIScanDataset(records, settings, cache_dir=None, augment=pretrain_augmentations(settings))
    nifti_s, nifti_n = _time_loader(nifti, args.workers, args.batch_size, args.epochs)

    started = time.perf_counter()
    index = build_fast_cache(manifest, workdir / "cache", settings, dtype="uint8", workers=max(1, args.workers))
    cache_build_seconds = time.perf_counter() - started
    cached = FastCacheDataset(index.attrs["cache_dir"], augment=pretrain_augmentations(settings))
    cache_s, cache_n = _time_loader(cached, args.workers, args.batch_size, args.epochs)

    device = torch.device(args.device)
    augment = BatchedAugment("pretrain", spatial_size=settings.spatial_size)
    generator = torch.Generator().manual_seed(0)
    plain = FastCacheDataset(index.attrs["cache_dir"])
    batched_s, batched_n = _time_loader(
        plain, args.workers, args.batch_size, args.epochs,
        on_batch=lambda images: augment(images.to(device, non_blocking=True), generator),
    )  # fmt: skip

    per_worker = max(args.workers, 1)
    rates = {
        "nifti_monai": nifti_n / nifti_s,
        "cache_monai": cache_n / cache_s,
        "cache_batched": batched_n / batched_s,
    }
    result = {
        "benchmark": "data_pipeline",
        "grid": args.grid,
        "scans": args.scans,
        "epochs": args.epochs,
        "workers": args.workers,
        "batch_size": args.batch_size,
        "augment_device": str(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "synth_seconds": round(synth_seconds, 2),
        "cache_build_seconds": round(cache_build_seconds, 2),
        **{f"{name}_scans_per_s": round(rate, 2) for name, rate in rates.items()},
        **{f"{name}_scans_per_s_per_worker": round(rate / per_worker, 2) for name, rate in rates.items()},
        "ratio_cache_monai_vs_nifti": round(rates["cache_monai"] / rates["nifti_monai"], 2),
        "ratio_cache_batched_vs_nifti": round(rates["cache_batched"] / rates["nifti_monai"], 2),
        "ratio_cache_batched_vs_cache_monai": round(rates["cache_batched"] / rates["cache_monai"], 2),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
