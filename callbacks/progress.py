"""Plain-line progress for runs whose output goes to a file (batch jobs, ``nohup``, ``| tee``, CI).

Lightning's rich / tqdm bars redraw one terminal line; written to a file they show nothing useful until the run ends
(rich prints only the final state when stdout is not a terminal). :class:`LineProgress` prints one ordinary line every
``every_n_steps`` optimizer steps or ``every_seconds`` seconds, whichever comes first, e.g.::

    [progress] step 120/200 (60%) | epoch 14 | loss 0.2931 | 1.52 steps/s | elapsed 0:01:19 | ETA 0:00:53

plus one line per validation (its ``val/*`` metrics) and per test / predict loop. It is a Lightning
:class:`~lightning.pytorch.callbacks.ProgressBar`, so it replaces the default bar. ``neurojepa`` adds it by itself
when stdout is not a terminal (:func:`wants_line_progress`), and keeps Lightning's bar on a terminal.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar

__all__ = ["LineProgress", "format_duration", "stdout_is_terminal", "wants_line_progress"]


def stdout_is_terminal() -> bool:
    """Whether ``sys.stdout`` is an interactive terminal (``False`` for files, pipes and captured output)."""
    isatty = getattr(sys.stdout, "isatty", None)
    return bool(isatty and isatty())


def wants_line_progress(enable_progress_bar: bool | None, callbacks: list[Any]) -> bool:
    """Whether the CLI should add a :class:`LineProgress`: stdout is not a terminal, the progress bar is not switched
    off (``enable_progress_bar: false``) and no progress bar callback is configured already."""
    if enable_progress_bar is False or any(isinstance(cb, ProgressBar) for cb in callbacks):
        return False
    return not stdout_is_terminal()


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (``"?"`` when unknown or infinite)."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    total = int(round(seconds))
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


def _scalar(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        return None


def _count(batches: Any, dataloader_idx: int) -> Any:
    # Lightning gives one batch count per dataloader (a list) for test / predict.
    return batches[dataloader_idx] if isinstance(batches, list) else batches


def _step_loss(outputs: Any) -> float | None:
    # `training_step` returns the loss tensor or a dict holding it (Lightning's two conventions).
    if isinstance(outputs, Mapping):
        outputs = outputs.get("loss")
    return _scalar(outputs) if outputs is not None else None


class LineProgress(ProgressBar):
    """Print a plain progress line every ``every_n_steps`` optimizer steps or ``every_seconds`` seconds.

    Args:
        every_n_steps: print after every N-th optimizer step (0 = by time only).
        every_seconds: also print when this many seconds passed since the last line (0 = by steps only).
        stream: where to print (default ``sys.stdout`` at print time, so captured output works).
    """

    def __init__(self, every_n_steps: int = 50, every_seconds: float = 30.0, stream: Any = None) -> None:
        super().__init__()
        if every_n_steps < 0 or every_seconds < 0:
            raise ValueError(f"every_n_steps and every_seconds must be >= 0; got {every_n_steps}, {every_seconds}.")
        if every_n_steps == 0 and every_seconds == 0:
            raise ValueError("set every_n_steps or every_seconds (both are 0: nothing would ever be printed).")
        self.every_n_steps = int(every_n_steps)
        self.every_seconds = float(every_seconds)
        self.stream = stream
        self._enabled = True
        self._fit_start = 0.0
        self._last_time = 0.0
        self._last_step = 0
        self._first_step = 0
        self._eval_start = 0.0
        self._eval_last = 0.0

    # ------------------------------------------------------------------ ProgressBar interface
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._enabled:
            kwargs.setdefault("file", self.stream or sys.stdout)
            kwargs.setdefault("flush", True)
            print(*args, **kwargs)

    # ------------------------------------------------------------------ training
    def total_steps(self, trainer: Trainer) -> float:
        """Optimizer steps of the whole fit: ``max_steps``, else the estimate from epochs x batches (may be inf)."""
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return float(trainer.max_steps)
        try:
            return float(trainer.estimated_stepping_batches)
        except Exception:  # no train dataloader length (iterable datasets): unknown
            return math.inf

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_start = self._last_time = time.monotonic()
        self._first_step = self._last_step = trainer.global_step
        total = self.total_steps(trainer)
        epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else "?"
        steps = int(total) if math.isfinite(total) else "?"
        when = [f"every {self.every_n_steps} steps"] if self.every_n_steps else []
        when += [f"every {self.every_seconds:g} s"] if self.every_seconds else []
        self.print(
            f"[progress] training: {steps} optimizer steps, {epochs} epochs, {trainer.num_training_batches} batches "
            f"per epoch; a line {' or '.join(when)}"
        )

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:  # gradient accumulation: no optimizer step yet
            return
        now = time.monotonic()
        due_steps = self.every_n_steps > 0 and step % self.every_n_steps == 0
        due_time = self.every_seconds > 0 and now - self._last_time >= self.every_seconds
        first = self._last_step == self._first_step
        if due_steps or due_time or first:
            self.print(self.train_line(trainer, outputs, now))
            self._last_time = now
        self._last_step = step

    def train_line(self, trainer: Trainer, outputs: Any, now: float | None = None) -> str:
        """The training progress line at the current step."""
        now = time.monotonic() if now is None else now
        step = trainer.global_step
        total = self.total_steps(trainer)
        elapsed = now - self._fit_start
        done = step - self._first_step
        rate = done / elapsed if elapsed > 0 else math.nan
        parts = [f"step {step}/{int(total)} ({100.0 * step / total:.0f}%)" if math.isfinite(total) else f"step {step}"]
        parts.append(f"epoch {trainer.current_epoch}")
        loss = _step_loss(outputs)
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        parts.append(f"{rate:.2f} steps/s" if math.isfinite(rate) else "? steps/s")
        eta = (total - step) / rate if math.isfinite(total) and rate > 0 else math.inf
        parts += [f"elapsed {format_duration(elapsed)}", f"ETA {format_duration(eta)}"]
        return "[progress] " + " | ".join(parts)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        elapsed = time.monotonic() - self._fit_start
        self.print(f"[progress] training ended at step {trainer.global_step} after {format_duration(elapsed)}")

    # ------------------------------------------------------------------ evaluation loops
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: _scalar(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if v is not None)
        self.print(f"[progress] validation at step {trainer.global_step}: {shown or 'no val/* metrics logged'}")

    def _eval_start_line(self, what: str, batches: Any) -> None:
        self._eval_start = self._eval_last = time.monotonic()
        total = sum(batches) if isinstance(batches, list) else batches
        self.print(f"[progress] {what}: {total} batches")

    def _eval_batch(self, what: str, batch_idx: int, total: Any) -> None:
        now = time.monotonic()
        if self.every_seconds > 0 and now - self._eval_last >= self.every_seconds:
            self._eval_last = now
            elapsed = format_duration(now - self._eval_start)
            self.print(f"[progress] {what}: batch {batch_idx + 1}/{total} | elapsed {elapsed}")

    def _eval_end_line(self, what: str) -> None:
        self.print(f"[progress] {what} done in {format_duration(time.monotonic() - self._eval_start)}")

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_start_line("test", trainer.num_test_batches)

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx=0
    ) -> None:
        self._eval_batch("test", batch_idx, _count(trainer.num_test_batches, dataloader_idx))

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_end_line("test")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_start_line("predict", trainer.num_predict_batches)

    def on_predict_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx=0
    ) -> None:
        self._eval_batch("predict", batch_idx, _count(trainer.num_predict_batches, dataloader_idx))

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_end_line("predict")
