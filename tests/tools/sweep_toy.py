"""A toy LightningCLI experiment for the sweep tests: linear regression whose validation score depends on lr/wd.

Imported by class path (``sweep_toy.ToyRegression``) from a YAML written by the tests; the folder of this file must be
on ``sys.path`` (pytest puts it there; the tests add it to ``PYTHONPATH`` for worker processes).
"""

from __future__ import annotations

import time

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


class ToyRegression(pl.LightningModule):
    """``y = w x`` fitted by SGD; logs ``val/score`` = -MSE (higher is better) and ``test/score``.

    Args:
        lr: SGD learning rate.
        weight_decay: SGD weight decay (pulls ``w`` towards 0, away from the true slope 3).
        sleep_s: seconds to sleep per training step (to kill a trial mid-way in a test).
    """

    def __init__(self, lr: float = 0.01, weight_decay: float = 0.0, sleep_s: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def _mse(self, batch):
        x, y = batch
        return torch.mean((self.w * x - y) ** 2)

    def training_step(self, batch, batch_idx):
        if self.hparams.sleep_s:
            time.sleep(self.hparams.sleep_s)
        loss = self._mse(batch)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/score", -self._mse(batch))

    def test_step(self, batch, batch_idx):
        self.log("test/score", -self._mse(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


class ToyData(pl.LightningDataModule):
    """64 points of ``y = 3 x + noise``; the same points serve train, val and test."""

    def __init__(self, batch_size: int = 16):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(64, 1, generator=generator)
        self.data = TensorDataset(x, 3 * x + 0.1 * torch.randn(64, 1, generator=generator))
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=64)

    def test_dataloader(self):
        return DataLoader(self.data, batch_size=64)
