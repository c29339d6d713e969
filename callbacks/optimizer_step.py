"""Detect, in a per-batch hook, whether the batch ended with an optimizer step."""

from __future__ import annotations

from lightning.pytorch import Trainer


class OptimizerStepDetector:
    """Tells whether ``trainer.global_step`` advanced since the last call.

    Lightning calls ``on_train_batch_end`` for every micro-batch but steps the optimizer only at the end of an
    accumulation window; ``global_step`` counts those steps, *including* ones whose update was dropped
    (:class:`~neurojepa_pl.callbacks.nonfinite.NonFiniteLossGuard`). Callbacks that must act once per optimizer-step
    call whether or not it updated the weights ask this object in ``on_train_batch_end``: ``MaskFigureLogger`` (the
    figure cadence follows the data, not the updates) and ``MoELoadBalance`` (to discard the routing counts of a
    dropped update). Callbacks that act once per *applied* update compare ``pl_module.update_step`` instead.
    """

    def __init__(self) -> None:
        self._last_global_step: int | None = None

    def reset(self, trainer: Trainer) -> None:
        """Start tracking from the trainer's current step (call in ``on_train_start``, which also covers resume)."""
        self._last_global_step = trainer.global_step

    def stepped(self, trainer: Trainer) -> bool:
        """True once per optimizer step, on the batch that ended it."""
        if self._last_global_step is None:
            raise RuntimeError("OptimizerStepDetector.stepped() called before reset(); call reset in on_train_start.")
        if trainer.global_step == self._last_global_step:
            return False
        self._last_global_step = trainer.global_step
        return True
