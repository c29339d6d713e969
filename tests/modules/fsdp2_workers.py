"""Worker for the 2-process FSDP2-vs-DDP test: one process per rank, started by ``torch.multiprocessing.spawn``.

Each worker sets the torchrun-style environment (``LOCAL_RANK`` etc.), so Lightning treats the processes as launched
externally and starts none itself; then it trains the same tiny JEPA model under DDP and under FSDP2
(``ModelParallelStrategy``) and saves, per strategy and rank, the per-step losses and gradient norms and the full
(gathered) state dict.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from jepa_tiny import TinyJEPAData, tiny_module, tiny_trainer
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch.distributed.tensor import DTensor


class StepRecorder(pl.Callback):
    """Loss and pre-clip gradient norm of every step (logged by the module), as floats."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        metrics = trainer.callback_metrics
        self.steps.append({key: float(metrics[key]) for key in ("train/loss", "train/grad_norm")})


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state with every DTensor gathered (a collective: every rank calls it, in the same order)."""
    state = {}
    for key, value in module.state_dict().items():
        full = value.full_tensor() if isinstance(value, DTensor) else value
        state[key] = full.detach().clone()
    return state


def fit_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )
    torch.set_num_threads(1)
    strategies = {
        "ddp": lambda: DDPStrategy(find_unused_parameters=False),
        "fsdp2": lambda: ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1),
    }
    for name, make_strategy in strategies.items():
        torch.manual_seed(0)
        module = tiny_module(ema_momentum=0.9, moe_bias_rate=0.05)
        recorder = StepRecorder()
        trainer = tiny_trainer(
            Path(out_dir) / name, devices=world, strategy=make_strategy(), max_steps=2, callbacks=[recorder]
        )
        trainer.fit(module, datamodule=TinyJEPAData(n=8, batch_size=2, seed=1))
        params = dict(module.named_parameters())
        result = {
            "steps": recorder.steps,
            "state": full_state_dict(module),
            "update_step": module.update_step,
            "dtensor_params": sum(isinstance(p, DTensor) for p in params.values()),
            "num_params": len(params),
            "local_numel": {k: (p.to_local() if isinstance(p, DTensor) else p).numel() for k, p in params.items()},
        }
        torch.save(result, Path(out_dir) / f"{name}_rank{rank}.pt")
