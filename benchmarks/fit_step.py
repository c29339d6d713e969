"""Steps of a real Lightning training run, per strategy, on one device: scans/s, MFU, memory, compile time, recompiles.

    python benchmarks/fit_step.py --preset paper --strategy single            # the YAML's compile setting (auto)
    python benchmarks/fit_step.py --preset paper --strategy fsdp2 --compile off
    python benchmarks/fit_step.py --device cpu --preset tiny --steps 3        # CPU smoke run (eager)

``Trainer.fit`` of the experiment's ``JEPAPretrainModule`` with its own callbacks (non-finite guard, MoE balance, EMA),
gradient clipping and logging as the YAML sets them, bf16-mixed on CUDA, on a pool of collated batches that already
sit on the device: the same volumes, fresh masks from the real collator for every batch (global batch index = step).
So it times the training loop without the data pipeline (``benchmarks/fit_throughput.py`` times all of
``neurojepa fit``). Strategies: ``single`` (one device), ``ddp`` (``DDPStrategy``, one process), ``fsdp2``
(``ModelParallelStrategy``: ``fully_shard`` of every block and network, JEPAPretrainModule.configure_model).

Prints one JSON object: per-step wall times (one loop iteration, callbacks included), the median scans/s and MFU over
the steps after ``--warmup``, peak memory, the first step's time and the warm-up's excess over the median (the
compilation), Dynamo frames traced in the first step and after it (a recompile is a frame traced after it), and the
per-step losses, which two runs with different strategies can be compared on (same seed, weights and batches).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from pretrain_step import REPO, Stepper, bf16_peak, flops_per_scan, load_module_args, make_batch, synchronize
from torch.utils.data import DataLoader, Dataset

from neurojepa_pl.modules.pretrain import JEPAPretrainModule

COMPILE = {"auto": None, "on": True, "off": False}


class BatchPool(Dataset):
    """``length`` items cycling through pre-collated batches (use with ``DataLoader(batch_size=None)``)."""

    def __init__(self, batches: list[dict[str, Any]], length: int) -> None:
        self.batches, self.length = batches, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.batches[index % len(self.batches)]


class LoopTimer(pl.Callback):
    """Wall time of every loop iteration (batch start to next batch start, so every callback is inside), the loss of
    every step and Dynamo's traced-frame count after it. As a trainer callback it runs before the module's own."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self.losses: list[float] = []
        self.frames: list[int] = []
        self._start: float | None = None

    def _tick(self) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        if self._start is not None:
            self.times.append(now - self._start)
            self.frames.append(int(torch._dynamo.utils.counters["frames"]["total"]))
        self._start = now

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._tick()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._tick()


def make_strategy(name: str) -> Any:
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    if name == "ddp":
        return DDPStrategy(find_unused_parameters=False, gradient_as_bucket_view=True)
    if name == "fsdp2":
        return ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1, save_distributed_checkpoint=False)
    return "auto"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/fit_step.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "experiments/pretrain/neurojepa_base.yaml")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=("tiny", "paper"), default="tiny")
    parser.add_argument("--strategy", choices=("single", "ddp", "fsdp2"), default="single")
    parser.add_argument(
        "--compile", choices=tuple(COMPILE), default=None, help="default: the YAML's (auto = compiled on CUDA)"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 4 cpu / 12 cuda)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 1 cpu / 3 cuda)")
    parser.add_argument("--batch", type=int, default=None, help="scans per step (default: tiny 2, paper the YAML's)")
    parser.add_argument("--pool", type=int, default=4, help="distinct mask sets cycled through")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    steps = args.steps or (12 if cuda else 4)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    model_args, data_args = load_module_args(args.config, args.preset)
    yaml_compile = (yaml.safe_load(args.config.read_text())["model"]["init_args"]).get("compile")
    model_args["compile"] = yaml_compile if args.compile is None else COMPILE[args.compile]
    trainer_cfg = yaml.safe_load(args.config.read_text()).get("trainer", {})
    batch_size = args.batch or (2 if args.preset == "tiny" else int(data_args.get("batch_size", 48)))

    torch.manual_seed(0)
    module = JEPAPretrainModule(**model_args)
    pool = [make_batch(module, data_args, batch_size, device, step=i) for i in range(args.pool)]
    image = pool[0]["image"]
    for batch in pool[1:]:
        batch["image"] = image  # one copy of the volumes on the device; the masks differ
    probe = Stepper(copy.deepcopy(module), device)
    flops = flops_per_scan(probe, pool[0])
    del probe
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    timer = LoopTimer(device)
    trainer = pl.Trainer(
        accelerator=device.type,
        devices=1,
        strategy=make_strategy(args.strategy),
        precision="bf16-mixed" if cuda else "32-true",
        max_steps=warmup + steps,
        limit_val_batches=0,
        gradient_clip_val=trainer_cfg.get("gradient_clip_val", 1.0),
        log_every_n_steps=trainer_cfg.get("log_every_n_steps", 10),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        use_distributed_sampler=False,  # the pool in order under every strategy, so their losses can be compared
        default_root_dir=REPO / "runs" / "fit_step",
    )
    loader = DataLoader(BatchPool(pool, warmup + steps), batch_size=None, shuffle=False, num_workers=0)
    torch._dynamo.utils.counters.clear()
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    fit_s = time.perf_counter() - start

    timed = timer.times[warmup:]
    median = statistics.median(timed)
    peak = bf16_peak(device)
    scans_per_s = batch_size / median
    compiled = [n for n in ("context_encoder", "target_encoder", "predictor") if getattr(module, n)._compiled_call_impl]
    report = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "lightning": pl.__version__,
        "config": str(args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config),
        "preset": args.preset,
        "encoder": model_args["encoder"],
        "strategy": args.strategy,
        "precision": trainer.precision,
        "compile_setting": model_args["compile"],
        "compiled_networks": compiled,
        "batch": batch_size,
        "warmup_steps": warmup,
        "timed_steps": len(timed),
        "step_s": median,
        "step_s_all": timer.times,
        "scans_per_s": scans_per_s,
        "flops_per_scan": flops,
        "bf16_peak_flops": peak,
        "mfu": None if peak is None else flops * scans_per_s / peak,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
        "first_step_s": timer.times[0],
        "warmup_excess_s": sum(timer.times[:warmup]) - warmup * median,
        "fit_s": fit_s,
        "dynamo_frames_first_step": timer.frames[0],
        "dynamo_frames_after_first_step": timer.frames[-1] - timer.frames[0],
        "dynamo_frames_per_step": timer.frames,
        "losses": timer.losses,
        "update_step": module.update_step,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
