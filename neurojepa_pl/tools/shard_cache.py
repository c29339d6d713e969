"""`neurojepa build-cache --format shards` (the default): the LitData shard cache of data_modules/shards.py."""

from __future__ import annotations

import argparse
import time

FORMATS = ("shards", "memmap")
DEFAULT_DTYPES = {"shards": "uint16", "memmap": "uint8"}
DTYPES = {"shards": ("uint16", "uint8", "float16"), "memmap": ("uint8", "float16")}


def add_shard_arguments(parser: argparse.ArgumentParser) -> None:
    """``--format``, ``--dtype`` (per format), ``--device`` and ``--resampler``."""
    parser.add_argument("--format", choices=FORMATS, default="shards",
                        help="shards: LitData chunk files read by PretrainDataModule(cache=shards) (default); "
                        "memmap: one memory-mapped .npy (data_modules/fast_cache.py)")  # fmt: skip
    parser.add_argument("--dtype", choices=("uint16", "uint8", "float16"), default=None,
                        help="stored dtype (default: uint16 for shards, error <= (max-min)/131070, ~1e-5; "
                        "uint8 for memmap)")  # fmt: skip
    parser.add_argument("--device", default="auto",
                        help="shards: where the chain's resampling runs: auto (a GPU when present), cpu, cuda, "
                        "cuda:N (default auto)")  # fmt: skip
    parser.add_argument("--resampler", choices=("separable", "scipy"), default="separable",
                        help="shards: 'separable' = MONAI's order-5 spline as three matrix products (any device, "
                        "~1e-7 from 'scipy'); 'scipy' = MONAI Spacingd on the CPU (default separable)")  # fmt: skip


def dtype_for(args: argparse.Namespace) -> str:
    """The stored dtype of ``args`` (the format's default when ``--dtype`` is not given)."""
    dtype = args.dtype or DEFAULT_DTYPES[args.format]
    if dtype not in DTYPES[args.format]:
        raise SystemExit(f"neurojepa build-cache: --dtype {dtype} is not available for --format {args.format} "
                         f"(choose from {', '.join(DTYPES[args.format])}).")  # fmt: skip
    return dtype


def run_shards(args: argparse.Namespace, settings) -> int:
    """Build (or resume, or reuse) the shard cache of ``args.manifest``; print what happened."""
    from neurojepa_pl.data import load_manifest
    from neurojepa_pl.data.resample import resolve_device
    from neurojepa_pl.data_modules.shards import build_shards

    try:
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as error:
        raise SystemExit(f"neurojepa build-cache: {error}") from error
    started = time.perf_counter()
    samples = build_shards(
        load_manifest(args.manifest), args.out, settings, dtype_for(args), args.workers, str(device), args.resampler,
        rebuild=args.rebuild,
    )  # fmt: skip
    meta, quarantine = samples.attrs["meta"], samples.attrs["quarantine"]
    what = "built" if samples.attrs["built"] else "reused (complete for this manifest)"
    print(
        f"neurojepa build-cache: {len(samples) - len(quarantine)} scans in shards, {len(quarantine)} quarantined, "
        f"{meta['bytes_per_scan'] / 1e6:.2f} MB per scan ({meta['dtype']}), {what}, "
        f"{time.perf_counter() - started:.1f} s -> {samples.attrs['cache_dir']}\n"
        f"  train from it: neurojepa fit ... --data.init_args.cache shards --data.init_args.cache_dir {args.out}"
    )
    for row in quarantine.head(10).itertuples():
        print(f"  quarantined {row.path}: {row.reason}")
    return 0
