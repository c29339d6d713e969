"""Pretraining schedules as pure functions of the optimizer-update counter.

Every value here depends only on the number of the optimizer update it is used for, so a run resumed from a checkpoint
(which stores that counter) continues its schedules exactly, with no scheduler objects to fast-forward.

Step convention (docs/method.md §7). The reference steps its lr / weight-decay / MoE-rate schedulers *before*
``optimizer.step()``, so the first update uses the value at step 1, the k-th update the value at step k. We replicate
that: :meth:`PretrainSchedule.at` takes the 1-based number ``k`` of the update about to be applied. The reference's EMA
momentum generator, in contrast, is consumed *after* the update starting at index 0, so the k-th EMA update uses the
momentum at step ``k - 1``; :meth:`PretrainSchedule.at` applies that offset for you.

A step that is skipped because its loss was not finite does not count as an update (docs/method.md §7: "non-finite
losses skip the step and the schedules"), so the counter is the number of *applied* updates, which can be smaller than
Lightning's ``global_step``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

CooldownShape = Literal["linear", "cosine"]


def _check_step(step: int) -> None:
    if step < 0:
        raise ValueError(f"schedule step must be >= 0, got {step}.")


def _cosine_interpolation(start: float, end: float, progress: float) -> float:
    """``start`` at progress 0, ``end`` at progress 1, half a cosine period in between."""
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(
    step: int,
    *,
    lr_start: float,
    lr_peak: float,
    lr_final: float,
    warmup_steps: int,
    total_steps: int,
    cooldown_steps: int = 0,
    cooldown_shape: CooldownShape = "linear",
) -> float:
    """Learning rate at ``step``: linear warm-up, constant plateau, cool-down ("warmup-stable-decay").

    - ``0 <= step < warmup_steps``: ``lr_start + step / warmup_steps * (lr_peak - lr_start)`` (the reference's
      ``WarmupCosineSchedule``; its post-warm-up "cosine" runs from ``lr_peak`` to ``lr_peak``, i.e. it is constant).
    - ``warmup_steps <= step < total_steps - cooldown_steps``: ``lr_peak``.
    - the last ``cooldown_steps`` steps: ``lr_peak`` to ``lr_final``; ``"linear"`` as the reference's
      ``LinearDecaySchedule`` (``lr_peak + step / T * (lr_final - lr_peak)`` when the whole run is cool-down),
      ``"cosine"`` as the paper's text. Reaches ``lr_final`` exactly at ``total_steps`` and stays there.

    Args:
        step: 1-based number of the optimizer update (0 gives the value before any update).
        lr_start: learning rate at step 0.
        lr_peak: learning rate at the end of warm-up and on the plateau.
        lr_final: learning rate at ``total_steps``.
        warmup_steps: length of the linear warm-up (0 for none).
        total_steps: length of the schedule.
        cooldown_steps: length of the decay at the end of the schedule (0 for none; ``total_steps`` for a run that
            is all cool-down, like the reference's phase 2).
        cooldown_shape: ``"linear"`` (reference code) or ``"cosine"`` (paper).

    Returns:
        The learning rate.
    """
    _check_step(step)
    if warmup_steps < 0 or cooldown_steps < 0 or warmup_steps + cooldown_steps > total_steps:
        raise ValueError(
            f"lr schedule needs 0 <= warmup_steps + cooldown_steps <= total_steps; got warmup_steps={warmup_steps}, "
            f"cooldown_steps={cooldown_steps}, total_steps={total_steps}. Fix the model's init_args."
        )
    if cooldown_shape not in ("linear", "cosine"):
        raise ValueError(f"cooldown_shape must be 'linear' or 'cosine', got {cooldown_shape!r}.")
    if step < warmup_steps:
        return lr_start + step / warmup_steps * (lr_peak - lr_start)
    cooldown_start = total_steps - cooldown_steps
    if step < cooldown_start or cooldown_steps == 0:
        return lr_peak
    progress = min(1.0, (step - cooldown_start) / cooldown_steps)
    if cooldown_shape == "linear":
        return lr_peak + progress * (lr_final - lr_peak)
    return _cosine_interpolation(lr_peak, lr_final, progress)


def weight_decay_at(step: int, *, start: float, end: float, total_steps: int) -> float:
    """Weight decay at ``step``: cosine from ``start`` (step 0) to ``end`` (``total_steps``), as the reference's
    ``CosineWDSchedule``; constant 0.04 in the paper. Clamped at ``end`` after ``total_steps``."""
    _check_step(step)
    return _cosine_interpolation(start, end, min(1.0, step / max(1, total_steps)))


def ema_momentum_at(step: int, *, start: float, end: float, total_steps: int) -> float:
    """EMA momentum at ``step``: linear from ``start`` (step 0) to ``end`` (``total_steps``), clamped; constant
    0.99925 in the paper."""
    _check_step(step)
    return start + (end - start) * min(1.0, step / max(1, total_steps))


def moe_rate_at(step: int, *, start: float, end: float, total_steps: int) -> float:
    """MoE balance-bias update rate at ``step``: cosine from ``start`` to ``end`` (the reference's
    ``InverseCosineScheduler`` with ``u_min = u_max = 1e-4``, i.e. constant 1e-4 in the paper)."""
    _check_step(step)
    return _cosine_interpolation(start, end, min(1.0, step / max(1, total_steps)))


@dataclass(frozen=True)
class ScheduleValues:
    """The hyper-parameters that drive one optimizer update."""

    lr: float
    weight_decay: float
    ema_momentum: float
    moe_rate: float


@dataclass(frozen=True)
class PretrainSchedule:
    """All pretraining schedules of docs/method.md §7 in one pure object.

    Attributes mirror the ``JEPAPretrainModule`` init args. ``cooldown_steps`` is the length of the final decay
    (``total_steps`` for a cool-down phase, 0 for the paper's phase 1).
    """

    lr_start: float
    lr_peak: float
    lr_final: float
    warmup_steps: int
    total_steps: int
    cooldown_steps: int = 0
    cooldown_shape: CooldownShape = "linear"
    weight_decay: tuple[float, float] = (0.04, 0.04)
    ema_momentum: tuple[float, float] = (0.99925, 0.99925)
    moe_rate: tuple[float, float] = (1e-4, 1e-4)

    def __post_init__(self) -> None:
        lr_at(0, **self._lr_kwargs())  # validates the lr arguments once, at construction

    def _lr_kwargs(self) -> dict:
        return dict(
            lr_start=self.lr_start,
            lr_peak=self.lr_peak,
            lr_final=self.lr_final,
            warmup_steps=self.warmup_steps,
            total_steps=self.total_steps,
            cooldown_steps=self.cooldown_steps,
            cooldown_shape=self.cooldown_shape,
        )

    def at(self, update: int) -> ScheduleValues:
        """Values for the ``update``-th optimizer update (1-based; see the module docstring for the convention)."""
        if update < 1:
            raise ValueError(f"optimizer updates are numbered from 1, got {update}.")
        total = self.total_steps
        return ScheduleValues(
            lr=lr_at(update, **self._lr_kwargs()),
            weight_decay=weight_decay_at(
                update, start=self.weight_decay[0], end=self.weight_decay[1], total_steps=total
            ),
            ema_momentum=ema_momentum_at(
                update - 1, start=self.ema_momentum[0], end=self.ema_momentum[1], total_steps=total
            ),
            moe_rate=moe_rate_at(update, start=self.moe_rate[0], end=self.moe_rate[1], total_steps=total),
        )
