"""Frozen-backbone feature extraction from scan paths, through the evaluation loading chain.

Each path goes through the deterministic loading chain (:func:`neurojepa_pl.data.transforms.loading_transforms`: RAS,
percentile scaling, optional pad/crop and resampling, foreground crop, resize) and the evaluation transform
(:func:`neurojepa_pl.data.transforms.eval_transforms`: centre crop to ``spatial_size``), exactly as evaluation batches
are built, then through the backbone without gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from neurojepa_pl.data.transforms import IMAGE_KEY, TransformSettings, eval_transforms, loading_transforms

__all__ = ["load_eval_volumes", "extract_tokens", "extract_features"]


def load_eval_volumes(paths: Sequence[str | Path], settings: TransformSettings | None = None) -> torch.Tensor:
    """Load scans as model inputs ``[n, 1, *spatial_size]`` float32 (CPU).

    Args:
        paths: NIfTI files.
        settings: loading-chain settings (default: the paper's, 96x108x96 inputs).
    """
    settings = settings or TransformSettings()
    load, crop = loading_transforms(settings), eval_transforms(settings)
    volumes = []
    for path in paths:
        path = str(path)
        if not Path(path).is_file():
            raise FileNotFoundError(f"scan {path} does not exist.")
        volumes.append(crop(load({IMAGE_KEY: path}))[IMAGE_KEY])
    if not volumes:
        raise ValueError("no scan paths given.")
    return torch.stack(volumes).float()


@torch.no_grad()
def _run_backbone(
    backbone: nn.Module, volumes: torch.Tensor, batch_size: int, device: torch.device | str | None, pool: bool
) -> torch.Tensor:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    try:
        outputs = []
        for start in range(0, volumes.shape[0], batch_size):
            tokens = backbone(volumes[start : start + batch_size].to(device))
            outputs.append((tokens.mean(dim=1) if pool else tokens).float().cpu())
    finally:
        backbone.train(was_training)
    return torch.cat(outputs, dim=0)


def extract_tokens(
    backbone: nn.Module, volumes: torch.Tensor, batch_size: int = 4, device: torch.device | str | None = None
) -> torch.Tensor:
    """Backbone tokens ``[n, N, C]`` (CPU float32) of already-loaded volumes ``[n, 1, D, H, W]``.

    The backbone runs in eval mode without gradients and is returned to its previous mode.
    """
    return _run_backbone(backbone, volumes, batch_size, device, pool=False)


def extract_features(
    backbone: nn.Module,
    paths: Sequence[str | Path],
    settings: TransformSettings | None = None,
    batch_size: int = 4,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Mean-pooled backbone features of scans.

    Args:
        backbone: an encoder mapping ``[B, 1, D, H, W]`` to tokens ``[B, N, C]`` (e.g. from ``load_backbone``).
        paths: NIfTI files.
        settings: loading-chain settings; ``spatial_size`` must match the backbone's ``img_size``.
        batch_size: scans per forward.
        device: where to run (default: the backbone's device).

    Returns:
        float32 array ``[n, C]`` in the order of ``paths``.
    """
    volumes = load_eval_volumes(paths, settings)
    return _run_backbone(backbone, volumes, batch_size, device, pool=True).numpy()
