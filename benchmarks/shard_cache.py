"""The shard cache's stored dtypes against the float32 chain: size per scan, error, build and read time.

    python benchmarks/shard_cache.py                        # 4 SynthBrain subjects (3 contrasts), 3.2 -> 2 mm
    python benchmarks/shard_cache.py --subjects 8 --workers 4

SynthBrain scans on the 48x54x48 grid (~3.2 mm voxels) go through the docs/method.md §1.2 chain resampled to 2 mm
and resized to 100x120x100 (the paper's cached size): once as float32 with MONAI's own chain (the reference), then
into the shard cache of ``data_modules/shards.py`` once per dtype. Prints JSON per dtype: bytes per scan, the size of
the paper's 1.55M scans, the largest and RMS error against float32 (over all scans), the build time and the time to
read and decode one random sample (``ShardReader.volume``, page cache warm, one thread).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PAPER_SCANS = 1_550_000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/shard_cache.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=4, help="SynthBrain subjects, 3 contrasts each (default 4)")
    parser.add_argument("--workers", type=int, default=2, help="LitData writer processes (default 2)")
    parser.add_argument("--reads", type=int, default=100, help="random reads timed per dtype (default 100)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from neurojepa_pl.data import load_manifest
    from neurojepa_pl.data.transforms import TransformSettings, loading_transforms
    from neurojepa_pl.data_modules.shards import SHARD_DTYPES, ShardReader, build_shards
    from neurojepa_pl.synth import generate_cohort

    settings = TransformSettings(pad_crop_size=None, target_spacing=(2.0, 2.0, 2.0), resize_to=(100, 120, 100))
    with tempfile.TemporaryDirectory() as scratch:
        generate_cohort(Path(scratch) / "synth", n_subjects=args.subjects, seed=0, grid=(48, 54, 48), sessions=(1, 1))
        manifest = load_manifest(Path(scratch) / "synth" / "manifest.csv")
        chain = loading_transforms(settings)
        started = time.perf_counter()
        reference = [chain({"image": path})["image"][0] for path in manifest["path"]]
        report: dict = {
            "scans": len(reference),
            "shape": list(settings.resize_to),
            "chain_s_per_scan": (time.perf_counter() - started) / len(reference),
            "value_range": [min(float(x.min()) for x in reference), max(float(x.max()) for x in reference)],
            "float32_bytes_per_scan": int(np.prod(settings.resize_to)) * 4,
            "dtypes": {},
        }
        order = np.random.default_rng(0).integers(0, len(reference), size=args.reads).tolist()
        for dtype in SHARD_DTYPES:
            started = time.perf_counter()
            samples = build_shards(manifest, Path(scratch) / "shards", settings, dtype=dtype, workers=args.workers)
            build_s = time.perf_counter() - started
            reader = ShardReader(samples.attrs["cache_dir"])
            errors = [reader.volume(i)[0] - x for i, x in enumerate(reference)]
            started = time.perf_counter()
            for row in order:
                reader.volume(row)
            read_s = (time.perf_counter() - started) / len(order)
            per_scan = int(samples.attrs["meta"]["bytes_per_scan"])
            report["dtypes"][dtype] = {
                "bytes_per_scan": per_scan,
                "paper_scans_tb": per_scan * PAPER_SCANS / 1e12,
                "max_abs_error": max(float(e.abs().max()) for e in errors),
                "rms_error": float(torch.sqrt(torch.stack([(e**2).mean() for e in errors]).mean())),
                "build_s": build_s,
                "read_decode_ms": read_s * 1e3,
            }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
