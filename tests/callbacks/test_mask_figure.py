"""MaskFigureLogger: token ids painted at the right voxels; a figure reaches TensorBoard."""

import numpy as np
import torch
from jepa_tiny import TinyJEPAData, tiny_module, tiny_trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from neurojepa_pl.callbacks.mask_figure import mask_figure, token_label_volume


def test_token_label_volume_paints_patches():
    volume = token_label_volume([torch.tensor([0, 3]), torch.tensor([2])], grid=(2, 2, 1), patch=(1, 2, 3))
    assert volume.shape == (2, 4, 3)
    # token id = 2*i0 + i1 (g2 = 1): token 0 -> (0, 0), 2 -> (1, 0), 3 -> (1, 1); token 1 unlabelled
    np.testing.assert_array_equal(volume[0, :2], 1)
    np.testing.assert_array_equal(volume[0, 2:], 0)
    np.testing.assert_array_equal(volume[1, :2], 2)
    np.testing.assert_array_equal(volume[1, 2:], 1)


def test_mask_figure_has_one_panel_per_mask_and_view():
    data = TinyJEPAData(n=2, batch_size=2)
    batch = next(iter(data.train_dataloader()))
    fig = mask_figure(
        batch["image"][0],
        [c[0] for c in batch["context_idx"]],
        [t[0] for t in batch["target_idx"]],
        batch["foreground"][0],
        grid=(8, 9, 8),
    )
    assert len(fig.axes) == 2 * (3 + 1)
    assert fig.axes[0].get_title().startswith("mask 0: context / target (axial)")


def test_logger_writes_the_figure_to_tensorboard(tmp_path):
    module = tiny_module(mask_figure_every_n_steps=2)
    trainer = tiny_trainer(tmp_path, max_steps=3, logger=TensorBoardLogger(tmp_path, name="tb"))
    trainer.fit(module, datamodule=TinyJEPAData(n=6, batch_size=2))
    events = EventAccumulator(str(next((tmp_path / "tb").iterdir())))
    events.Reload()
    assert "train/masks" in events.Tags()["images"]
    assert [e.step for e in events.Images("train/masks")] == [1, 3]  # optimizer steps 1 and 3
