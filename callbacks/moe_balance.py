"""Aux-loss-free MoE load balancing of the context encoder (docs/method.md §3.3-3.4)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from neurojepa_pl.callbacks.optimizer_step import OptimizerStepDetector
from neurojepa_pl.models.moe import balance_bias_update


def all_reduce_counts(counts: torch.Tensor) -> torch.Tensor:
    """Sum routing counts over all ranks (in place; a no-op without an initialised process group).

    Args:
        counts: int64 ``[L, E]``, one row per MoE layer.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return counts


class MoELoadBalance(Callback):
    """After every applied optimizer update and before the EMA: update each MoE layer's balance bias.

    Per step (docs/method.md §3.3): stack the ``counts`` of every MoE layer of ``pl_module.context_encoder`` and all-reduce them
    (SUM) across ranks in one collective, call :func:`neurojepa_pl.models.moe.balance_bias_update` per layer with the
    rate ``pl_module.schedule.at(update_step).moe_rate`` (proportional rule in pretraining, clip 0.3, re-centring),
    write the new bias, reset the counts, and log the mean MinVio / MaxVio. Every rank computes the same biases from
    the same summed counts, so no broadcast is needed. A skipped update (non-finite loss) only discards the counts.
    A dense encoder (no MoE layers) makes this a no-op.

    Module surface used: ``context_encoder.moe_layers()``, ``schedule``, ``update_step``, ``update_skipped``.

    Args:
        proportional: token-averaged error correction (docs/method.md §3.3 Mod 1; pretraining) instead of the sign rule.
        clip: bias clip (docs/method.md §3.3 Mod 3).
    """

    def __init__(self, proportional: bool = True, clip: float = 0.3) -> None:
        self.proportional = proportional
        self.clip = clip
        self._step = OptimizerStepDetector()
        self._layers: list[nn.Module] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._layers = list(pl_module.context_encoder.moe_layers())
        self._step.reset(trainer)

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._layers or not self._step.stepped(trainer):
            return
        if pl_module.update_skipped:
            for layer in self._layers:
                layer.counts.zero_()
            return
        counts = all_reduce_counts(torch.stack([layer.counts for layer in self._layers]))  # [L, E]
        rate = pl_module.schedule.at(pl_module.update_step).moe_rate
        min_vio, max_vio = [], []
        for layer, layer_counts in zip(self._layers, counts):
            new_bias, lo, hi = balance_bias_update(
                layer.gate.bias, layer_counts, rate, self.proportional, clip=self.clip
            )
            layer.gate.bias.copy_(new_bias)
            layer.counts.zero_()
            min_vio.append(torch.as_tensor(lo, dtype=torch.float32, device=counts.device))
            max_vio.append(torch.as_tensor(hi, dtype=torch.float32, device=counts.device))
        log = dict(on_step=True, on_epoch=False)
        pl_module.log("train/moe_min_vio", torch.stack(min_vio).mean(), **log)
        pl_module.log("train/moe_max_vio", torch.stack(max_vio).mean(), **log)
        pl_module.log("train/moe_rate", rate, **log)
