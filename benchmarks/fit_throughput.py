"""End-to-end throughput of `neurojepa fit` from the shard cache, against the bare step, in one process.

    python benchmarks/fit_throughput.py --preset tiny --device cpu        # CPU smoke run (tests/benchmarks)
    python benchmarks/fit_throughput.py --preset paper --device cuda      # the paper's step + loader on one GPU
    python benchmarks/fit_throughput.py --preset tiny --device cpu --augment-on workers   # MONAI in the workers

1. A SynthBrain cohort (``--unique`` scans, hard-linked under ``--scans`` names so that the timed steps stay inside
   one epoch, no loader restart) and its shard cache (``data_modules/shards.py``: ``litdata.optimize``, uint16),
   built once in ``--workdir`` and reused by later runs.
2. **fit**: the real ``neurojepa fit`` path. ``neurojepa_pl.cli.lightning_main`` builds the experiment YAML (trainer,
   callbacks, EMA, MoE balance, logger, data module with ``cache: shards``, ``--workers`` loader workers) as the CLI
   does; the benchmark adds Lightning's ``ThroughputMonitor``, a loop timer and Lightning's ``SimpleProfiler`` (which
   times every ``next()`` on the training loader), then runs ``trainer.fit`` for ``--warmup + --steps`` steps.
   ``--augment-on device|workers`` sets ``data.init_args.augment_on`` (default: the config's, i.e. the data module's
   ``device``): batched augmentation after the transfer (inside the step's time, not the loader wait) or MONAI in
   the loader workers.
3. **step**: the same model (a copy taken before the fit, compiled when the fit compiled) on in-memory batches of the
   same shape, outside Lightning (``benchmarks/pretrain_step.py``'s ``Stepper``: the same update as a training step).

Prints one JSON object: ``fit_scans_per_s`` (timed steps' scans / their wall time, data waits included),
``step_scans_per_s`` (the same over the bare steps), ``ratio`` (fit / step; the goal on an H200 is >= 0.9),
``data_wait_fraction`` (time in the training loader's ``next()`` / loop time, over the timed steps), the loader
workers, the ThroughputMonitor's own samples/s and MFU, the shard build and the per-step times.

The paper preset uses the model and batch of ``experiments/pretrain/neurojepa_base.yaml`` (ViT-B-MoE, batch 48,
bf16, compiled on CUDA) on SynthBrain volumes at the model grid (96x108x96, chain without pad/crop and resampling:
resampling is measured by ``benchmarks/resample.py``); the tiny preset shrinks the model to the test size on CPU.
The shards are read from the page cache after the build (a cold disk is slower on the first epoch).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # pretrain_step.py beside this file

from pretrain_step import Stepper, bf16_peak, flops_per_scan, make_batch, synchronize  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "encoder": "vit_tiny_moe", "predictor": "predictor_tiny", "grid": (48, 54, 48), "spatial_size": (32, 36, 32),
        "resize_to": (34, 40, 34), "patch_size": 4, "batch": 2, "workers": 1, "unique": 3, "warmup": 2, "steps": 6,
    },
    "paper": {
        "encoder": None, "predictor": None, "grid": "model", "spatial_size": (96, 108, 96),
        "resize_to": (100, 120, 100), "patch_size": 12, "batch": 48, "workers": 16, "unique": 16, "warmup": 5,
        "steps": 20,
    },
}  # fmt: skip
FETCH = "[_TrainingEpochLoop].train_dataloader_next"


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------
def make_cohort(workdir: Path, preset: dict[str, Any], n_scans: int, unique: int, source: Path | None = None) -> Path:
    """``n_scans`` names hard-linked to the scans of ``source`` (a per-scan manifest; default: ``unique`` SynthBrain
    T1w scans generated here); returns the manifest (reused if it is there)."""
    from neurojepa_pl.data import load_manifest
    from neurojepa_pl.synth import generate_cohort

    tag = "synth" if source is None else hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:8]
    manifest = workdir / f"manifest_{n_scans}_{tag}.csv"
    if manifest.is_file():
        return manifest
    links = workdir / f"scans_{tag}"
    if source is None:
        source = workdir / "synthbrain" / "manifest.csv"
        if not source.is_file():
            generate_cohort(source.parent, n_subjects=unique, seed=0, modalities=("T1w",), grid=preset["grid"],
                            sessions=(1, 1), workers=min(unique, os.cpu_count() or 1))  # fmt: skip
    scans = [str(p) for p in load_manifest(source)["path"]]
    rows = []
    links.mkdir(parents=True, exist_ok=True)
    for i in range(n_scans):
        target = links / f"scan{i:05d}_T1w.nii.gz"
        if not target.exists():
            try:
                os.link(scans[i % len(scans)], target)
            except OSError:  # no hard links on this file system (or across file systems)
                shutil.copy2(scans[i % len(scans)], target)
        rows.append({"subject_id": f"sub-{i:05d}", "session_id": "ses-01", "modality": "T1w",
                     "path": str(target.relative_to(workdir)), "split": "train"})  # fmt: skip
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def data_words(preset: dict[str, Any], manifest: Path, cache_dir: Path, workers: int, batch: int) -> list[str]:
    size = lambda values: "[" + ",".join(str(v) for v in values) + "]"  # noqa: E731
    return [
        "--data.init_args.manifest", str(manifest), "--data.init_args.cache", "shards",
        "--data.init_args.cache_dir", str(cache_dir), "--data.init_args.num_workers", str(workers),
        "--data.init_args.batch_size", str(batch), "--data.init_args.spatial_size", size(preset["spatial_size"]),
        "--data.init_args.resize_to", size(preset["resize_to"]), "--data.init_args.patch_size",
        str(preset["patch_size"]), "--data.init_args.pad_crop_size", "null", "--data.init_args.target_spacing",
        "null", "--data.init_args.use_all_for_pretraining", "true",
    ]  # fmt: skip


def build_cache(manifest: Path, cache_dir: Path, preset: dict[str, Any], workers: int) -> dict[str, Any]:
    from neurojepa_pl.data import load_manifest
    from neurojepa_pl.data.transforms import TransformSettings
    from neurojepa_pl.data_modules.shards import build_shards

    settings = TransformSettings(pad_crop_size=None, target_spacing=None, resize_to=preset["resize_to"],
                                 spatial_size=preset["spatial_size"])  # fmt: skip
    started = time.perf_counter()
    samples = build_shards(load_manifest(manifest), cache_dir, settings, workers=workers)
    meta = samples.attrs["meta"]
    return {
        "folder": samples.attrs["cache_dir"],
        "built_now": bool(samples.attrs["built"]),
        "seconds": time.perf_counter() - started,
        "scans": int(meta["samples"]) - int(meta["quarantined"]),
        "bytes_per_scan": int(meta["bytes_per_scan"]),
        "dtype": meta["dtype"],
        "build_workers": int(meta["workers"]),
    }


# ----------------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------------
class FitTimer(pl.Callback):
    """Per loop iteration (one batch start to the next, callbacks included): wall time and the time the loop spent in
    the training loader's ``next()`` (read from the ``SimpleProfiler``); the device is synchronised at each start."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.iterations: list[float] = []
        self.fetches: list[float] = []
        self._start: float | None = None
        self._fetched = 0

    def _tick(self, trainer: pl.Trainer) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        durations = trainer.profiler.recorded_durations.get(FETCH, [])
        if self._start is not None:
            self.iterations.append(now - self._start)
            self.fetches.append(sum(durations[self._fetched :]))
        self._start, self._fetched = now, len(durations)

    def on_train_batch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        self._tick(trainer)

    def on_train_end(self, trainer: pl.Trainer, *_: Any) -> None:
        self._tick(trainer)


def run_fit(args: argparse.Namespace, preset: dict[str, Any], words: list[str], device: torch.device) -> dict:
    from lightning.pytorch.callbacks import ThroughputMonitor
    from lightning.pytorch.profilers import SimpleProfiler
    from lightning.pytorch.trainer.states import RunningStage

    from neurojepa_pl.cli import lightning_main

    cli = lightning_main(words, run=False)
    trainer, module = cli.trainer, cli.model
    step_copy = copy.deepcopy(module)  # the step-only benchmark's model, taken before any update
    # FLOPs per scan from one scan through a throw-away copy on the device (the count does not depend on the batch)
    flops = flops_per_scan(Stepper(copy.deepcopy(step_copy), device), make_batch(step_copy, {}, 1, device))
    module.flops_per_batch = flops * args.batch  # read by ThroughputMonitor (FLOP/s and MFU)
    trainer.profiler = SimpleProfiler(dirpath=str(args.workdir), filename="fit_profile")
    timer = FitTimer(device)
    monitor = ThroughputMonitor(batch_size_fn=lambda batch: int(batch["image"].shape[0]), window_size=args.steps + 1)
    trainer.callbacks.extend([monitor, timer])
    started = time.perf_counter()
    trainer.fit(module, datamodule=cli.datamodule)
    fit_s = time.perf_counter() - started
    iterations, fetches = timer.iterations[args.warmup :], timer.fetches[args.warmup :]
    if len(iterations) < args.steps:
        raise RuntimeError(f"the fit ran {len(timer.iterations)} steps, expected {args.warmup + args.steps}")
    monitored = monitor._throughputs[RunningStage.TRAINING].compute()  # the window covers the timed steps
    compiled = [n for n in ("context_encoder", "target_encoder", "predictor")
                if getattr(getattr(module, n), "_compiled_call_impl", None) is not None]  # fmt: skip
    loader = trainer.train_dataloader
    result = {
        "fit_scans_per_s": args.batch * len(iterations) / sum(iterations),
        "fit_scans_per_s_median_step": args.batch / statistics.median(iterations),
        "data_wait_fraction": sum(fetches) / sum(iterations),
        "data_wait_s_per_step": sum(fetches) / len(fetches),
        "loader_workers": int(getattr(loader, "num_workers", args.workers)),
        "throughput_monitor": {k: float(v) for k, v in monitored.items()},
        "fit_step_s_all": timer.iterations,
        "fit_fetch_s_all": timer.fetches,
        "fit_total_s": fit_s,
        "compiled_networks": compiled,
        "precision": str(trainer.precision),
        "flops_per_scan": flops,
        "augment_on": str(cli.datamodule.hparams.augment_on),
    }
    module.cpu()
    del cli, trainer, module
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"result": result, "step_model": step_copy, "compiled": bool(compiled)}


def run_step(model: Any, args: argparse.Namespace, device: torch.device, compiled: bool) -> dict[str, Any]:
    """The bare update on one in-memory batch of the fit's shape (fresh masks are not needed: same shapes)."""
    if compiled:
        for name in ("context_encoder", "target_encoder", "predictor"):
            getattr(model, name).compile()
    stepper = Stepper(model, device)
    batch = make_batch(model, {}, args.batch, device)
    for _ in range(args.warmup):
        stepper.step(batch)
    times = []
    for _ in range(args.steps):
        synchronize(device)
        start = time.perf_counter()
        stepper.step(batch)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {
        "step_scans_per_s": args.batch * len(times) / sum(times),
        "step_scans_per_s_median_step": args.batch / statistics.median(times),
        "step_s_all": times,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/fit_throughput.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=tuple(PRESETS), default="tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", type=Path, default=REPO / "experiments/pretrain/neurojepa_base.yaml")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "fit_throughput", help="cohort, shards, logs")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: tiny 1, paper 16)")
    parser.add_argument("--batch", type=int, default=None, help="scans per step (default: tiny 2, paper 48)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: tiny 6, paper 20)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default: tiny 2, paper 5)")
    parser.add_argument(
        "--unique", type=int, default=None, help="distinct SynthBrain scans (default: tiny 3, paper 16)"
    )
    parser.add_argument("--manifest", type=Path, default=None,
                        help="use the scans of this per-scan manifest instead of generating SynthBrain ones (e.g. a "
                        "`neurojepa synth --grid model` cohort brought to a machine without nilearn)")  # fmt: skip
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="model compile setting (auto: the YAML's, i.e. compiled on CUDA)")  # fmt: skip
    parser.add_argument("--augment-on", choices=("device", "workers"), default=None,
                        help="where the training augmentation runs (data.init_args.augment_on; default: the "
                        "config's)")  # fmt: skip
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    for name in ("workers", "batch", "steps", "warmup", "unique"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    device = torch.device(args.device)
    args.workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    n_scans = args.batch * (args.warmup + args.steps + 1)  # one epoch covers the whole run: no loader restart
    manifest = make_cohort(args.workdir / args.preset, preset, n_scans, args.unique, args.manifest)
    cache_dir = args.workdir / args.preset / "cache"
    cache = build_cache(manifest, cache_dir, preset, workers=max(1, min(os.cpu_count() or 1, 16)))

    words = ["--config", str(args.config), *data_words(preset, manifest, cache_dir, args.workers, args.batch)]
    # lightning_main(run=False) has no subcommand, so the CLI's data->model geometry link is not made: state it.
    words += ["--model.init_args.img_size", "[" + ",".join(map(str, preset["spatial_size"])) + "]",
              "--model.init_args.patch_size", str(preset["patch_size"])]  # fmt: skip
    if preset["encoder"] is not None:
        words += ["--model.init_args.encoder", preset["encoder"], "--model.init_args.predictor", preset["predictor"]]
    if args.compile != "auto":
        words += ["--model.init_args.compile", "true" if args.compile == "on" else "false"]
    if args.augment_on is not None:
        words += ["--data.init_args.augment_on", args.augment_on]
    words += [
        "--model.init_args.mask_figure_every_n_steps", "0", "--model.init_args.collapse_every_n_steps", "0",
        "--data.init_args.pin_memory", str(device.type == "cuda").lower(),
        "--trainer.accelerator", "gpu" if device.type == "cuda" else "cpu", "--trainer.devices", "1",
        "--trainer.precision", "bf16-mixed" if device.type == "cuda" else "32-true",
        "--trainer.max_steps", str(args.warmup + args.steps), "--trainer.limit_train_batches", str(n_scans),
        "--trainer.log_every_n_steps", "1", "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.logger.init_args.save_dir", str(args.workdir / "logs"), "--trainer.default_root_dir",
        str(args.workdir),
    ]  # fmt: skip
    fit = run_fit(args, preset, words, device)
    step = run_step(fit["step_model"], args, device, fit["compiled"])
    result = fit["result"]
    peak = bf16_peak(device)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "preset": args.preset,
        "config": str(args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config),
        "batch": args.batch,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "fit_scans_per_s": result["fit_scans_per_s"],
        "step_scans_per_s": step["step_scans_per_s"],
        "ratio": result["fit_scans_per_s"] / step["step_scans_per_s"],
        "data_wait_fraction": result["data_wait_fraction"],
        "loader_workers": result["loader_workers"],
        "augment_on": result["augment_on"],
        "mfu_fit": None if peak is None else result["flops_per_scan"] * result["fit_scans_per_s"] / peak,
        "cache": cache,
        "fit": {
            k: v
            for k, v in result.items()
            if k not in ("fit_scans_per_s", "data_wait_fraction", "loader_workers", "augment_on")
        },  # fmt: skip
        "step": step,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
