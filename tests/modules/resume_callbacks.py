"""Callbacks that the CLI resume test (tests/modules/test_resume.py) loads by class path in a ``neurojepa fit``."""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl


class KillAt(pl.Callback):
    """SIGKILL this process when optimizer step ``step`` is about to start (its checkpoint of ``step`` is written).

    ``ModelCheckpoint`` runs last in ``on_train_batch_end``, so the kill comes at the start of the next batch: the
    checkpoint of step ``step`` is complete on disk, and nothing after it is (no shutdown, no ``on_train_end``).

    Args:
        step: global step at which to die.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
