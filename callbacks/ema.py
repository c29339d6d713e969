"""EMA target-encoder update (docs/method.md §7 per-step order, item 11)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torch.distributed.tensor import DTensor


@torch.no_grad()
def ema_update_(target: list[Tensor], online: list[Tensor], momentum: float) -> None:
    """In place ``target <- momentum * target + (1 - momentum) * online`` over two aligned tensor lists.

    Two fused ``torch._foreach_*`` kernels over the whole list instead of one small kernel pair per tensor (lightly's
    recipe); the lists are cached by the callback so no module traversal happens per step.

    Args:
        target: EMA tensors, updated in place.
        online: tensors of the same shapes, read only.
        momentum: in [0, 1]; 1 keeps the target unchanged, 0 copies the online tensors.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must lie in [0, 1], got {momentum}.")
    torch._foreach_mul_(target, momentum)
    torch._foreach_add_(target, online, alpha=1.0 - momentum)


def _is_moe_counts(name: str) -> bool:
    # The MoE `counts` buffers are per-rank routing statistics of the *context* encoder (the target never counts, and
    # MoELoadBalance resets them); they are deliberately not copied.
    return name == "counts" or name.endswith(".counts")


def _aligned_pairs(target: nn.Module, online: nn.Module, what: str) -> tuple[list[Tensor], list[Tensor]]:
    named = (
        (target.named_parameters, online.named_parameters)
        if what == "parameters"
        else (target.named_buffers, online.named_buffers)
    )
    t_items, o_items = list(named[0]()), list(named[1]())
    if what == "buffers":
        t_items = [(n, b) for n, b in t_items if not _is_moe_counts(n)]
        o_items = [(n, b) for n, b in o_items if not _is_moe_counts(n)]
    if len(t_items) != len(o_items):
        raise RuntimeError(
            f"EMATargetUpdate: target_encoder has {len(t_items)} {what} but context_encoder has {len(o_items)}. "
            "Both encoders must be built from the same registry name and overrides (and wrapped identically)."
        )
    for (tn, t), (on, o) in zip(t_items, o_items):
        if t.shape != o.shape or t.dtype != o.dtype:
            raise RuntimeError(
                f"EMATargetUpdate: {what} mismatch, target {tn} {tuple(t.shape)} {t.dtype} vs context {on} "
                f"{tuple(o.shape)} {o.dtype}. Both encoders must share one architecture and precision."
            )
        if _sharding(t) != _sharding(o):
            raise RuntimeError(
                f"EMATargetUpdate: target {tn} is sharded as {_sharding(t)} but context {on} as {_sharding(o)}. Both "
                "encoders must be sharded with the same plan (JEPAPretrainModule.configure_model), so that the EMA "
                "can run on the local shards without communication."
            )
    return [t for _, t in t_items], [o for _, o in o_items]


def _sharding(t: Tensor) -> tuple[Any, ...] | None:
    """Device mesh and placements of a DTensor (FSDP2), None for a plain tensor."""
    return (t.device_mesh, tuple(t.placements)) if isinstance(t, DTensor) else None


def local_shards(tensors: list[Tensor]) -> list[Tensor]:
    """The local shard of each DTensor (FSDP2 parameters), other tensors as they are.

    Under ``no_grad`` ``DTensor.to_local()`` is the shard itself, so in-place updates of the result update the
    parameter. Taken afresh at every update (a cheap attribute read), because FSDP2 may swap the local tensor at its
    lazy initialisation in the first forward.
    """
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


class EMATargetUpdate(Callback):
    """After every applied optimizer update: ``target <- m * target + (1 - m) * context``, then copy buffers.

    Runs once per *applied* optimizer update: it acts in ``on_train_batch_end`` only when ``pl_module.update_step``
    advanced since the last batch end (the value is re-read in ``on_train_start``, which also covers resume). The
    module advances it only for an update AdamW applied, so micro-batches of an accumulation window and updates
    dropped by :class:`~neurojepa_pl.callbacks.nonfinite.NonFiniteLossGuard` leave the target untouched.
    The momentum is a pure function of the update counter: ``pl_module.schedule.at(pl_module.update_step)``.
    Buffers (the MoE balance biases, after :class:`~neurojepa_pl.callbacks.moe_balance.MoELoadBalance` updated them)
    are copied, except the MoE ``counts``.

    Module surface used: ``context_encoder``, ``target_encoder``, ``schedule``, ``update_step``.
    Under FSDP both encoders are wrapped identically, so the cached parameter lists are the aligned local shards and the
    update needs no communication; under FSDP2 the parameters are DTensors with identical placements (checked), and
    the update runs on their local shards (:func:`local_shards`), again without communication.
    """

    def __init__(self) -> None:
        self._last_update_step: int | None = None
        self._target_params: list[Tensor] = []
        self._online_params: list[Tensor] = []
        self._target_buffers: list[Tensor] = []
        self._online_buffers: list[Tensor] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Cached after the strategy wrapped the model, so these are the tensors the optimizer actually updates.
        self._target_params, self._online_params = _aligned_pairs(
            pl_module.target_encoder, pl_module.context_encoder, "parameters"
        )
        self._target_buffers, self._online_buffers = _aligned_pairs(
            pl_module.target_encoder, pl_module.context_encoder, "buffers"
        )
        self._last_update_step = pl_module.update_step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if pl_module.update_step == self._last_update_step:
            return
        self._last_update_step = pl_module.update_step
        momentum = pl_module.schedule.at(pl_module.update_step).ema_momentum
        with torch.no_grad():
            ema_update_(local_shards(self._target_params), local_shards(self._online_params), momentum)
        with torch.no_grad():
            for target_buffer, online_buffer in zip(self._target_buffers, self._online_buffers):
                target_buffer.copy_(online_buffer)
        pl_module.log("train/ema_momentum", momentum, on_step=True, on_epoch=False)
