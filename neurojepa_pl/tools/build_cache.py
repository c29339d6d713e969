"""`neurojepa build-cache MANIFEST --out DIR [--dtype uint8] [...settings]`: build the fast memory-mapped cache."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from neurojepa_pl.tools.shard_cache import add_shard_arguments, dtype_for, run_shards


def _triple_or_none(kind):
    def parse(values: list[str]):
        if len(values) == 1 and values[0].lower() == "none":
            return None
        if len(values) != 3:
            raise argparse.ArgumentTypeError(f"expected three numbers or 'none', got {values}")
        return tuple(kind(v) for v in values)

    return parse


def add_transform_arguments(parser: argparse.ArgumentParser) -> None:
    """Loading-chain settings (``TransformSettings``) as options; defaults are the paper's (docs/method.md §1.2)."""
    group = parser.add_argument_group("loading chain (docs/method.md §1.2; defaults are the paper's)")
    group.add_argument("--pad-crop-size", nargs="+", default=["180", "216", "180"], metavar="N",
                       help="edge pad/crop before resampling, or 'none' (default 180 216 180)")  # fmt: skip
    group.add_argument("--target-spacing", nargs="+", default=["1", "1", "1"], metavar="MM",
                       help="resample to this voxel size (mm), or 'none' (default 1 1 1)")  # fmt: skip
    group.add_argument("--resize-to", nargs=3, type=int, default=[100, 120, 100], metavar="N",
                       help="size after the foreground crop (default 100 120 100)")  # fmt: skip
    group.add_argument("--spatial-size", nargs=3, type=int, default=[96, 108, 96], metavar="N",
                       help="model input (centre crop; not part of the cache) (default 96 108 96)")  # fmt: skip
    group.add_argument("--percentiles", nargs=2, type=float, default=[0.5, 99.5], metavar="P")
    group.add_argument("--fg-margin", type=int, default=4, help="foreground crop margin in voxels (default 4)")
    group.add_argument("--nan-policy", choices=("error", "zero"), default="error",
                       help="'error' quarantines scans with NaN/Inf voxels; 'zero' replaces them")  # fmt: skip


def settings_from_args(args: argparse.Namespace):
    """``TransformSettings`` from the options of :func:`add_transform_arguments`."""
    from neurojepa_pl.data.transforms import TransformSettings

    try:
        pad = _triple_or_none(int)(args.pad_crop_size)
        spacing = _triple_or_none(float)(args.target_spacing)
    except argparse.ArgumentTypeError as error:
        raise SystemExit(f"neurojepa: --pad-crop-size / --target-spacing: {error}") from error
    return TransformSettings(
        pad_crop_size=pad,
        target_spacing=spacing,
        resize_to=tuple(args.resize_to),
        spatial_size=tuple(args.spatial_size),
        percentiles=tuple(args.percentiles),
        fg_margin=args.fg_margin,
        nan_policy=args.nan_policy,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neurojepa build-cache",
        description=(
            "Run the deterministic loading chain once per scan of a per-scan manifest and store the volumes: by default"
            " as LitData shards (OUT/shards-<key>/: chunk files, samples.csv, quarantine.csv, shards.json; the key "
            "hashes the settings, dtype and scans; a killed build resumes; read with `--data.init_args.cache shards`), "
            "or with --format memmap in one memory-mapped .npy (OUT/<settings digest>-<dtype>/volumes.npy + index.csv +"
            " quarantine.csv + meta.json). Scans that fail are quarantined with their reason, never zero-filled. A "
            "changed setting gets a new folder. Run again on a finished cache, it checks it (file size and header; "
            "every row's CRC-32 with --verify) and rebuilds damaged rows. Concurrent runs on one folder take turns (a "
            "lock file beside it); a killed run leaves no folder that looks finished."
        ),
    )
    parser.add_argument("manifest", type=Path, help="per-scan manifest CSV")
    parser.add_argument("--out", type=Path, required=True, help="parent folder of the cache")
    add_shard_arguments(parser)  # --format shards|memmap, --dtype, --device, --resampler (tools/shard_cache.py)
    parser.add_argument("--workers", type=int, default=1, help="processes running the chain (default 1)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild even if a complete cache exists")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="on an existing cache, also read every row and check its CRC-32 (reads the whole cache); damaged rows "
        "are rebuilt from their scans either way",
    )
    add_transform_arguments(parser)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from neurojepa_pl.data import load_manifest
    from neurojepa_pl.data_modules.fast_cache import build_fast_cache

    settings = settings_from_args(args)
    if args.format == "shards":
        return run_shards(args, settings)
    started = time.perf_counter()
    index = build_fast_cache(
        load_manifest(args.manifest),
        args.out,
        settings,
        dtype_for(args),
        args.workers,
        args.rebuild,
        verify=args.verify,
    )
    quarantine, repaired = index.attrs["quarantine"], index.attrs["repaired"]
    if index.attrs["built"]:
        what = "built"
    else:
        checked = "every row's CRC-32 checked" if args.verify else "size and header checked"
        what = f"reused ({checked}; {len(repaired)} damaged rows rebuilt)" if repaired else f"reused ({checked})"
    print(
        f"neurojepa build-cache: {len(index)} scans cached, {len(quarantine)} quarantined, {what}, "
        f"{time.perf_counter() - started:.1f} s -> {index.attrs['cache_dir']}"
    )
    for row in quarantine.head(10).itertuples():
        print(f"  quarantined {row.path}: {row.reason}")
    return 0
