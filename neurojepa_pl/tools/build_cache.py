"""`neurojepa build-cache MANIFEST --out DIR [--dtype uint8] [...settings]`: build the fast memory-mapped cache."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


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
            "Run the deterministic loading chain once per scan of a per-scan manifest and store every volume in one "
            "memory-mapped .npy (OUT/<settings digest>-<dtype>/volumes.npy + index.csv + quarantine.csv + meta.json). "
            "Scans that fail are quarantined with their reason, never zero-filled. A changed setting gets a new folder."
        ),
    )
    parser.add_argument("manifest", type=Path, help="per-scan manifest CSV")
    parser.add_argument("--out", type=Path, required=True, help="parent folder of the cache")
    parser.add_argument("--dtype", choices=("uint8", "float16"), default="uint8", help="stored dtype (default uint8)")
    parser.add_argument("--workers", type=int, default=1, help="processes running the chain (default 1)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild even if a complete cache exists")
    add_transform_arguments(parser)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from neurojepa_pl.data import load_manifest
    from neurojepa_pl.data_modules.fast_cache import build_fast_cache

    settings = settings_from_args(args)
    started = time.perf_counter()
    index = build_fast_cache(load_manifest(args.manifest), args.out, settings, args.dtype, args.workers, args.rebuild)
    quarantine = index.attrs["quarantine"]
    print(
        f"neurojepa build-cache: {len(index)} scans cached, {len(quarantine)} quarantined, "
        f"{time.perf_counter() - started:.1f} s -> {index.attrs['cache_dir']}"
    )
    for row in quarantine.head(10).itertuples():
        print(f"  quarantined {row.path}: {row.reason}")
    return 0
