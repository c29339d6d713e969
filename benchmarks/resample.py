"""Resampling to 1 mm, the loading chain's costliest step: MONAI's Spacingd (SciPy) vs separable products, CPU vs GPU.

    python benchmarks/resample.py                     # 3 SynthBrain scans at the model grid (~1.9 mm) -> 1 mm
    python benchmarks/resample.py --scans 8 --device cuda

SynthBrain T1w scans are written at ``--grid`` (default ``model``: 96x108x96 voxels of ~1.9 mm, a non-1 mm cohort)
and go through the docs/method.md §1.2 chain with ``target_spacing`` 1 mm (no pad/crop: the grid is not MNI's
182x218x182), i.e. an order-5 spline resampling to about 182x218x182. Timed per scan, in one process, on one CPU
thread (so the CPU figures are per core) and, when present, one GPU:

* ``spacing``: the resampling step alone, from the CPU tensor before it to the CPU tensor after it: ``scipy`` (MONAI
  ``Spacingd``, what the chain runs), ``separable_cpu`` and ``separable_cuda``
  (:class:`neurojepa_pl.data.resample.SeparableSpacingd`, transfers included);
* ``chain``: the whole deterministic chain from the ``.nii.gz`` file: ``loading_transforms`` (SciPy) against
  ``device_loading_transforms`` on the CPU and on the GPU (reading and decoding stay on the CPU).

Prints JSON: seconds per scan (mean over ``--scans``, after an untimed run of the first), scans/s per core or per
GPU, the speed-ups over SciPy and the largest difference to SciPy's output.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, inputs, device: str = "cpu") -> tuple[list[float], list[torch.Tensor]]:
    fn(inputs[0])  # untimed: operator tables, CUDA context, kernels
    times, outputs = [], []
    for item in inputs:
        _sync(device)
        start = time.perf_counter()
        out = fn(item)
        _sync(device)
        times.append(time.perf_counter() - start)
        outputs.append(out)
    return times, outputs


def _summary(times: list[float], reference: list[float] | None = None) -> dict[str, float]:
    mean = statistics.fmean(times)
    out = {"s_per_scan": mean, "scans_per_s": 1.0 / mean, "s_all": times}
    if reference is not None:
        out["speedup_over_scipy"] = statistics.fmean(reference) / mean
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/resample.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scans", type=int, default=3, help="timed scans (default 3)")
    parser.add_argument("--grid", default="model", help="SynthBrain grid: model (96x108x96), mni, or DxHxW")
    parser.add_argument("--spacing", type=float, default=1.0, help="target voxel size in mm (default 1)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="GPU figures too when CUDA is available (auto) or required (cuda)")  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=None, help="where the scans are written (default: a temp dir)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # per-core figures; SciPy's map_coordinates is single-threaded anyway

    from monai.transforms import Compose, Spacingd

    from neurojepa_pl.data import load_manifest
    from neurojepa_pl.data.resample import SeparableSpacingd, device_loading_transforms
    from neurojepa_pl.data.transforms import IMAGE_KEY, TransformSettings, loading_transforms
    from neurojepa_pl.synth import generate_cohort

    cuda = torch.cuda.is_available() and args.device != "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/resample.py: --device cuda but no CUDA device is available")
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        grid = args.grid if args.grid in ("model", "mni") else tuple(int(v) for v in args.grid.split("x"))
        generate_cohort(workdir / "synth", n_subjects=args.scans, seed=0, modalities=("T1w",), grid=grid,
                        sessions=(1, 1), workers=min(args.scans, os.cpu_count() or 1))  # fmt: skip
        paths = list(load_manifest(workdir / "synth" / "manifest.csv")["path"])
        settings = TransformSettings(pad_crop_size=None, target_spacing=(args.spacing,) * 3)
        chain = loading_transforms(settings)
        spacing_index = next(i for i, t in enumerate(chain.transforms) if isinstance(t, Spacingd))
        before = Compose(chain.transforms[:spacing_index])
        spacing: Spacingd = chain.transforms[spacing_index]
        inputs = [before({IMAGE_KEY: p}) for p in paths]
        in_shape = tuple(inputs[0][IMAGE_KEY].shape[1:])
        zooms = [round(float(z), 3) for z in inputs[0][IMAGE_KEY].pixdim]

        scipy_t, scipy_out = _time(lambda d: spacing(dict(d))[IMAGE_KEY], inputs)
        sep_cpu = SeparableSpacingd(spacing, device="cpu")
        cpu_t, cpu_out = _time(lambda d: sep_cpu(dict(d))[IMAGE_KEY], inputs)
        report: dict = {
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "cpu_threads": 1,
            "torch": torch.__version__,
            "grid": args.grid,
            "input_shape": in_shape,
            "input_voxel_mm": zooms,
            "output_shape": tuple(scipy_out[0].shape[1:]),
            "scans": args.scans,
            "spacing": {
                "scipy": _summary(scipy_t),
                "separable_cpu": {**_summary(cpu_t, scipy_t),
                                  "max_abs_diff_to_scipy": max(float((a - b).abs().max())
                                                               for a, b in zip(cpu_out, scipy_out))},
            },
        }  # fmt: skip
        if cuda:
            sep_gpu = SeparableSpacingd(spacing, device="cuda")
            gpu_t, gpu_out = _time(lambda d: sep_gpu(dict(d))[IMAGE_KEY].cpu(), inputs, "cuda")
            report["spacing"]["separable_cuda"] = {
                **_summary(gpu_t, scipy_t),
                "max_abs_diff_to_scipy": max(float((a - b).abs().max()) for a, b in zip(gpu_out, scipy_out)),
            }
        items = [{IMAGE_KEY: p} for p in paths]
        chain_t, chain_out = _time(lambda d: chain(dict(d))[IMAGE_KEY], items)
        dev_cpu = device_loading_transforms(settings, "cpu")
        dcpu_t, dcpu_out = _time(lambda d: dev_cpu(dict(d))[IMAGE_KEY], items)
        report["chain"] = {
            "scipy": _summary(chain_t),
            "separable_cpu": {**_summary(dcpu_t, chain_t),
                              "max_abs_diff_to_scipy": max(float((a - b).abs().max())
                                                           for a, b in zip(dcpu_out, chain_out))},
        }  # fmt: skip
        if cuda:
            dev_gpu = device_loading_transforms(settings, "cuda")
            dgpu_t, dgpu_out = _time(lambda d: dev_gpu(dict(d))[IMAGE_KEY], items, "cuda")
            report["chain"]["separable_cuda"] = {
                **_summary(dgpu_t, chain_t),
                "max_abs_diff_to_scipy": max(float((a - b).abs().max()) for a, b in zip(dgpu_out, chain_out)),
            }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
