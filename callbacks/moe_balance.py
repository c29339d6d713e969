"""Aux-loss-free MoE load balancing of the context encoder (docs/method.md §3.3-3.4)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from neurojepa_pl.callbacks.optimizer_step import OptimizerStepDetector
from neurojepa_pl.models.moe import rebalance_moe_layers_


class MoELoadBalance(Callback):
    """After every applied optimizer update and before the EMA: update each MoE layer's balance bias.

    Per applied update (docs/method.md §3.3): :func:`neurojepa_pl.models.moe.rebalance_moe_layers_` on the MoE layers
    of ``pl_module.context_encoder`` (counts summed over ranks in one collective, proportional rule in pretraining,
    clip 0.3, re-centring; counts reset) at the rate ``pl_module.schedule.at(update_step).moe_rate``, then the mean
    MinVio / MaxVio are logged. Every rank computes the same biases from the same summed counts, so no broadcast is
    needed. A dense encoder (no MoE layers) makes this a no-op.

    "Applied" is read from the module, never told: ``pl_module.update_step`` advanced since the last batch end (the
    module advances it only when AdamW received gradients). Acting in ``on_train_batch_end`` on that change runs once
    per update, not per micro-batch, under ``accumulate_grad_batches``. When instead only ``trainer.global_step``
    advanced, the update was dropped (non-finite loss, see
    :class:`~neurojepa_pl.callbacks.nonfinite.NonFiniteLossGuard`): its routing counts are discarded and the biases
    are left alone. Both last-seen values are re-read in ``on_train_start``, which also covers resume.

    Module surface used: ``context_encoder.moe_layers()``, ``schedule``, ``update_step``.

    Args:
        proportional: token-averaged error correction (docs/method.md §3.3 Mod 1; pretraining) instead of the sign rule.
        clip: bias clip (docs/method.md §3.3 Mod 3).
    """

    def __init__(self, proportional: bool = True, clip: float = 0.3) -> None:
        self.proportional = proportional
        self.clip = clip
        self._optimizer_step = OptimizerStepDetector()
        self._last_update_step: int | None = None
        self._layers: list[nn.Module] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._layers = list(pl_module.context_encoder.moe_layers())
        self._optimizer_step.reset(trainer)
        self._last_update_step = pl_module.update_step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stepped = self._optimizer_step.stepped(trainer)  # called every batch: it tracks global_step
        applied = pl_module.update_step != self._last_update_step
        self._last_update_step = pl_module.update_step
        if not self._layers:
            return
        if not applied:
            if stepped:  # a dropped update: its counts belong to a step that never happened
                for layer in self._layers:
                    layer.counts.zero_()
            return
        rate = pl_module.schedule.at(pl_module.update_step).moe_rate
        min_vio, max_vio = rebalance_moe_layers_(self._layers, rate, proportional=self.proportional, clip=self.clip)
        log = dict(on_step=True, on_epoch=False)
        pl_module.log("train/moe_min_vio", min_vio, **log)
        pl_module.log("train/moe_max_vio", max_vio, **log)
        pl_module.log("train/moe_rate", rate, **log)
