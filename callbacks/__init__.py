"""Lightning callbacks.

Pretraining callbacks, in the order ``JEPAPretrainModule.configure_callbacks`` returns them. Lightning calls the hooks
of callbacks in list order, appends the module's callbacks after the trainer's, and moves ``ModelCheckpoint`` to the
end, so a checkpoint always sees the state after all of them.

1. :class:`NonFiniteLossGuard` checks every micro-batch loss (``on_before_backward``) and drops the update of a step
   with a non-finite loss by deleting its gradients (``on_before_optimizer_step``).
2. :class:`MoELoadBalance` updates the context encoder's MoE balance biases (``on_train_batch_end``) ...
3. :class:`EMATargetUpdate` ... and only then updates the EMA target encoder, copying the new biases.
4. :class:`MaskFigureLogger` logs a figure of one volume's masks every N optimizer steps.

One optimizer update then runs in the docs/method.md §7 order: schedules set for update ``update_step + 1``
(``JEPAPretrainModule.optimizer_step``) -> last forward / backward -> non-finite check (1) -> gradient clipping
(``configure_gradient_clipping``) -> AdamW -> ``update_step += 1`` if the update was applied -> MoE bias update (2)
-> EMA (3). ``tests/callbacks/test_update_order.py`` checks this sequence on a real step.

No callback sets anything on the module, and none tells another anything: a dropped update is visible to everyone
downstream of the guard as "no gradients" (clipping and AdamW skip them; the module then does not advance
``update_step``), and the per-update callbacks act when ``update_step`` advanced since their last batch end.

They use this module surface: ``context_encoder`` (its parameters and buffers, ``moe_layers()`` and ``grid_size``),
``target_encoder`` (its parameters and buffers), ``schedule`` (a :class:`neurojepa_pl.schedules.PretrainSchedule`)
and ``update_step`` (the number of applied optimizer updates). They write only into tensors of the encoders (MoE
biases and counts, EMA target weights), never an attribute of the module.
"""

from neurojepa_pl.callbacks.ema import EMATargetUpdate, ema_update_
from neurojepa_pl.callbacks.mask_figure import MaskFigureLogger, mask_figure
from neurojepa_pl.callbacks.moe_balance import MoELoadBalance
from neurojepa_pl.callbacks.nonfinite import NonFiniteLossError, NonFiniteLossGuard
from neurojepa_pl.callbacks.optimizer_step import OptimizerStepDetector

__all__ = [
    "EMATargetUpdate",
    "MaskFigureLogger",
    "MoELoadBalance",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "OptimizerStepDetector",
    "ema_update_",
    "mask_figure",
]
