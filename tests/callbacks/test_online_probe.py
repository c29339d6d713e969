"""Online attentive probe on a frozen target encoder: learns a visible label, leaves training state untouched."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from nifti_factory import TINY_SETTINGS, write_blob_cohort  # noqa: E402

from neurojepa_pl.callbacks.online_probe import OnlineProbeMonitor  # noqa: E402
from neurojepa_pl.models import build_encoder  # noqa: E402


class TinyPretrain(L.LightningModule):
    """Stands in for the JEPA module: only ``target_encoder`` is used by the callback."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.target_encoder = build_encoder("vit_tiny", img_size=(16, 16, 16), patch_size=8).requires_grad_(False)
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.layer.parameters(), lr=0.1)


def _monitor(manifest, **kwargs):
    return OnlineProbeMonitor(
        str(manifest),
        ["blob", "noise_label"],
        every_n_epochs=2,
        probe_epochs=10,
        probe_lr=1e-2,
        probe_weight_decay=0.0,
        probe_depth=1,
        probe_heads=4,
        batch_size=8,
        **TINY_SETTINGS,
        **kwargs,
    )


def test_probe_learns_visible_label_and_leaves_state_untouched(tmp_path):
    manifest = write_blob_cohort(tmp_path)
    monitor = _monitor(manifest)
    module = TinyPretrain()
    encoder_state = {k: v.clone() for k, v in module.target_encoder.state_dict().items()}
    module.target_encoder.train()
    rng_before = torch.random.get_rng_state()
    results = monitor.run_probe(None, module.target_encoder, torch.device("cpu"), epoch=1)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert module.target_encoder.training  # mode restored
    for k, v in module.target_encoder.state_dict().items():
        torch.testing.assert_close(v, encoder_state[k])
    assert results["probe/val_auroc/blob"] > 0.9
    assert results["probe/test_auroc/blob"] > 0.9
    assert set(results) == {
        "probe/val_auroc/blob",
        "probe/val_auroc/noise_label",
        "probe/val_auroc_macro",
        "probe/test_auroc/blob",
        "probe/test_auroc/noise_label",
        "probe/test_auroc_macro",
    }
    # Same seed and epoch -> same probe.
    assert monitor.run_probe(None, module.target_encoder, torch.device("cpu"), epoch=1) == results


def test_linear_probe_mode_learns_visible_label_cheaply(tmp_path):
    manifest = write_blob_cohort(tmp_path)
    monitor = OnlineProbeMonitor(str(manifest), ["blob", "noise_label"], probe="linear", batch_size=8, **TINY_SETTINGS)
    module = TinyPretrain()
    module.target_encoder.train()
    rng_before = torch.random.get_rng_state()
    results = monitor.run_probe(None, module.target_encoder, torch.device("cpu"), epoch=1)
    assert torch.equal(torch.random.get_rng_state(), rng_before) and module.target_encoder.training
    assert results["probe/val_auroc/blob"] > 0.9 and results["probe/test_auroc/blob"] > 0.9
    assert 0.0 <= results["probe/val_auroc/noise_label"] <= 1.0
    assert set(results) == {
        "probe/val_auroc/blob",
        "probe/val_auroc/noise_label",
        "probe/val_auroc_macro",
        "probe/test_auroc/blob",
        "probe/test_auroc/noise_label",
        "probe/test_auroc_macro",
    }
    assert results["probe/val_auroc_macro"] == pytest.approx(
        (results["probe/val_auroc/blob"] + results["probe/val_auroc/noise_label"]) / 2
    )
    assert monitor.run_probe(None, module.target_encoder, torch.device("cpu"), epoch=1) == results
    with pytest.raises(ValueError, match="probe must be"):
        OnlineProbeMonitor(str(manifest), ["blob"], probe="knn")


def test_probe_runs_every_n_epochs_inside_fit(tmp_path):
    manifest = write_blob_cohort(tmp_path, {"train": 8, "val": 4})
    monitor = _monitor(manifest)
    monitor.probe_epochs = 2
    calls = []
    original = monitor.run_probe
    monitor.run_probe = lambda *a, **k: calls.append(a[-1]) or original(*a, **k)
    loader = DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4)
    trainer = L.Trainer(
        max_epochs=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
    )
    trainer.fit(TinyPretrain(), loader)
    assert calls == [1, 3]  # after epochs 2 and 4
    assert "probe/val_auroc/blob" in trainer.callback_metrics
    assert "probe/test_auroc_macro" not in monitor.last_results  # no test split in this manifest


def test_probe_configuration_errors(tmp_path):
    manifest = write_blob_cohort(tmp_path, {"train": 2, "val": 2})
    with pytest.raises(ValueError, match="at least one label"):
        OnlineProbeMonitor(str(manifest), [])
    with pytest.raises(ValueError, match="together"):
        OnlineProbeMonitor(str(manifest), ["blob"], resize_to=[18, 18, 18])
    monitor = OnlineProbeMonitor(str(manifest), ["missing_column"], **TINY_SETTINGS)
    with pytest.raises(ValueError, match="missing_column"):
        monitor.run_probe(None, TinyPretrain().target_encoder, torch.device("cpu"), epoch=0)
