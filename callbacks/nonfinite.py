"""Skip optimizer updates whose loss is not finite; stop after too many in a row (docs/method.md §7)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim import Optimizer


class NonFiniteLossError(RuntimeError):
    """Raised when ``max_consecutive`` optimizer steps in a row had a non-finite loss."""


class NonFiniteLossGuard(Callback):
    """Skip the update of any optimizer step whose loss (on any rank, any micro-batch) is NaN or infinite.

    The reference checks the loss before its schedulers step and skips both on a non-finite bf16 loss
    (docs/method.md §7). Here:

    - ``on_before_backward`` checks each micro-batch loss; the decision is all-reduced, so every rank agrees (backward
      still runs on every rank, so DDP's gradient all-reduce never deadlocks);
    - ``on_before_optimizer_step`` (after the last micro-batch, before clipping and ``optimizer.step``) drops all
      gradients of a bad step (``zero_grad(set_to_none=True)``). That is the whole signal, and it is one the others
      observe for themselves: clipping finds no gradient, AdamW skips every parameter without one (weights *and*
      moments unchanged), ``JEPAPretrainModule.optimizer_step`` sees no gradient after the step and does not advance
      ``update_step`` (the schedules), and the MoE / EMA callbacks, which act when ``update_step`` advances, do
      nothing. The guard sets nothing on the module.
    - the skip is counted (``train/nonfinite_skipped``, total) and warned about; after ``max_consecutive`` skipped
      steps in a row training stops with :class:`NonFiniteLossError`.

    Lightning's ``global_step`` still counts a skipped step (it counts optimizer-step calls).

    Args:
        max_consecutive: number of consecutive skipped steps that stops training.
    """

    def __init__(self, max_consecutive: int = 10) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}.")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total = 0
        self._window_finite = True
        self._last_bad_loss = float("nan")

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        finite = bool(torch.isfinite(loss.detach()).all())
        if not finite:
            self._last_bad_loss = float(loss.detach().float().sum())
        # One small collective: all ranks must take the same decision.
        self._window_finite &= bool(trainer.strategy.reduce_boolean_decision(finite, all=True))

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        finite, self._window_finite = self._window_finite, True
        if finite:
            self.consecutive = 0
            return
        # set_to_none, not zeros: AdamW skips parameters whose grad is None, but would still decay its moments and
        # apply weight decay for a zero gradient.
        optimizer.zero_grad(set_to_none=True)
        self.consecutive += 1
        self.total += 1
        pl_module.log("train/nonfinite_skipped", float(self.total), on_step=True, on_epoch=False)
        rank_zero_warn(
            f"Non-finite loss ({self._last_bad_loss}) at global step {trainer.global_step}: update skipped "
            f"({self.consecutive} in a row, {self.total} in total; limit {self.max_consecutive} in a row)."
        )
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{self.consecutive} consecutive optimizer steps had a non-finite loss (last: {self._last_bad_loss} "
                f"at global step {trainer.global_step}); training stopped. Weights are those of the last finite "
                "update. Likely causes: a learning rate too high for this batch size (lower lr_peak or lengthen "
                "warmup_steps), bf16 overflow (try --trainer.precision 32 to confirm), or corrupt input scans "
                "(run `neurojepa validate-manifest`). Resume from the last checkpoint with --ckpt_path after fixing."
            )

    def state_dict(self) -> dict[str, Any]:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.consecutive = int(state_dict["consecutive"])
        self.total = int(state_dict["total"])
