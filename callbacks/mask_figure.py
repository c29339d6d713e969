"""TensorBoard figure of one volume's context / target / foreground tokens."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from neurojepa_pl.callbacks.optimizer_step import OptimizerStepDetector

# label 0 = neither (transparent), 1 = context, 2 = target
_TOKEN_COLOURS = ListedColormap([(0, 0, 0, 0), (0.1, 0.8, 0.2, 0.45), (0.9, 0.1, 0.1, 0.45)])
_FOREGROUND_COLOURS = ListedColormap([(0, 0, 0, 0), (0.2, 0.4, 1.0, 0.45)])


def token_label_volume(ids_by_label: Sequence[torch.Tensor], grid: Sequence[int], patch: Sequence[int]) -> np.ndarray:
    """Paint token ids into a voxel volume.

    Args:
        ids_by_label: label ``l + 1`` is written at the tokens of ``ids_by_label[l]`` (1-D LongTensors, flat C-order
            ids over ``grid``).
        grid: token grid ``(g0, g1, g2)``.
        patch: voxels per token along each axis.

    Returns:
        uint8 ``[g0*p0, g1*p1, g2*p2]`` with 0 where no label was given.
    """
    labels = np.zeros(int(np.prod(grid)), dtype=np.uint8)
    for label, ids in enumerate(ids_by_label, start=1):
        labels[ids.detach().cpu().numpy()] = label
    labels = labels.reshape(tuple(grid))
    for axis, size in enumerate(patch):
        labels = np.repeat(labels, size, axis=axis)
    return labels


def mask_figure(
    image: torch.Tensor,
    context_idx: Sequence[torch.Tensor],
    target_idx: Sequence[torch.Tensor],
    foreground: torch.Tensor | None,
    grid: Sequence[int],
) -> Figure:
    """Mid-axial and mid-coronal slices of one volume with each mask's context (green) and target (red) tokens, and
    the token foreground map (blue).

    Args:
        image: ``[1, D, H, W]`` or ``[D, H, W]``, with ``D, H, W`` multiples of ``grid``.
        context_idx: per mask, ``[Kc]`` token ids of this volume.
        target_idx: per mask, ``[Kt]`` token ids.
        foreground: ``[N]`` bool token map, or None.
        grid: token grid ``(g0, g1, g2)``.

    Returns:
        A matplotlib Figure (not attached to pyplot, so no global state is touched).
    """
    volume = image.detach().float().cpu().reshape(image.shape[-3:]).numpy()
    patch = [s // g for s, g in zip(volume.shape, grid)]
    overlays = [token_label_volume([c, t], grid, patch) for c, t in zip(context_idx, target_idx)]
    titles = [f"mask {m}: context / target" for m in range(len(overlays))]
    colours = [_TOKEN_COLOURS] * len(overlays)
    if foreground is not None:
        fg_ids = torch.nonzero(foreground.detach().reshape(-1)).reshape(-1)
        overlays.append(token_label_volume([fg_ids], grid, patch))
        titles.append("foreground tokens")
        colours.append(_FOREGROUND_COLOURS)
    # Axis 2 is inferior->superior (RAS), so a slice at fixed axis-2 index is axial; fixed axis 1 is coronal.
    views = [("axial", lambda v: v[:, :, v.shape[2] // 2]), ("coronal", lambda v: v[:, v.shape[1] // 2, :])]
    fig = Figure(figsize=(3 * len(overlays), 6))
    axes = fig.subplots(len(views), len(overlays), squeeze=False)
    for row, (view_name, take) in enumerate(views):
        for col, (overlay, title, cmap) in enumerate(zip(overlays, titles, colours)):
            ax = axes[row, col]
            ax.imshow(take(volume).T, cmap="gray", origin="lower")
            ax.imshow(
                take(overlay[: volume.shape[0], : volume.shape[1], : volume.shape[2]]).T,
                cmap=cmap,
                vmin=0,
                vmax=cmap.N - 1,
                origin="lower",
                interpolation="nearest",
            )
            ax.set_title(f"{title} ({view_name})", fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    return fig


class MaskFigureLogger(Callback):
    """Every ``every_n_steps`` optimizer steps, log :func:`mask_figure` of the first volume of the batch to
    TensorBoard (``train/masks``) on global rank 0. A no-op without a TensorBoard logger or with ``every_n_steps=0``.

    Module surface used: ``context_encoder.grid_size``. Batch keys: ``image``, ``context_idx``, ``target_idx``,
    ``foreground`` (optional).
    """

    def __init__(self, every_n_steps: int = 500) -> None:
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}.")
        self.every_n_steps = every_n_steps
        self._step = OptimizerStepDetector()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._step.reset(trainer)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._step.stepped(trainer) or self.every_n_steps == 0:
            return
        if (trainer.global_step - 1) % self.every_n_steps != 0 or not trainer.is_global_zero:
            return
        tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if tensorboard is None:
            return
        foreground = batch.get("foreground")
        fig = mask_figure(
            batch["image"][0],
            [ids[0] for ids in batch["context_idx"]],
            [ids[0] for ids in batch["target_idx"]],
            None if foreground is None else foreground[0],
            pl_module.context_encoder.grid_size,
        )
        tensorboard.experiment.add_figure("train/masks", fig, global_step=trainer.global_step)
