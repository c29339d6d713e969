"""Lightning callbacks.

Pretraining callbacks, in the order ``JEPAPretrainModule.configure_callbacks`` returns them (Lightning calls hooks of
callbacks in list order, and moves ``ModelCheckpoint`` to the end, so a checkpoint always sees the state after all of
them):

1. :class:`NonFiniteLossGuard` drops the update of a step with a non-finite loss (``on_before_optimizer_step``).
2. :class:`MoELoadBalance` updates the context encoder's MoE balance biases after the optimizer step
   (``on_train_batch_end``) ...
3. :class:`EMATargetUpdate` ... and only then updates the EMA target encoder, copying the new biases (docs/method.md §7 order).
4. :class:`MaskFigureLogger` logs a figure of one volume's masks every N steps.

They talk to the module through a small surface: ``context_encoder``, ``target_encoder`` (with ``moe_layers()`` and
``grid_size``), ``schedule`` (a :class:`neurojepa_pl.schedules.PretrainSchedule`), ``update_step`` (number of applied
optimizer updates) and ``update_skipped`` (whether the current step's update was dropped).
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
