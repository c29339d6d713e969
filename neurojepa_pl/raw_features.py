"""Raw-intensity features of loaded volumes: the no-network baselines a pretrained encoder has to beat.

* :func:`intensity_histogram`: the distribution of foreground intensities (``bins`` equal bins over (0, 1], as
  fractions of the scan's foreground voxels). It sees lesion load and tissue contrast but nothing of where.
* :func:`average_pool`: the volume average-pooled to a coarse grid (default 8x9x8, the encoder's token grid at the
  paper's 96x108x96 input), i.e. a blurred thumbnail that keeps where, at token resolution.

Both read volumes after the evaluation loading chain (:func:`neurojepa_pl.features.load_eval_volumes`), whose
percentile scaling maps intensities into [0, 1] with skull-stripped background at exactly 0, so "foreground" here is
every voxel above 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["RAW_BASELINES", "intensity_histogram", "average_pool", "raw_features"]

RAW_BASELINES: tuple[str, ...] = ("histogram", "avgpool")
"""Names of the raw baselines of :func:`raw_features`."""


def _check_volumes(volumes: torch.Tensor) -> None:
    if volumes.ndim != 5 or volumes.shape[1] != 1:
        raise ValueError(f"expected volumes [n, 1, D, H, W]; got shape {tuple(volumes.shape)}.")


def intensity_histogram(volumes: torch.Tensor, bins: int = 32) -> np.ndarray:
    """Foreground intensity histogram of each volume.

    Args:
        volumes: ``[n, 1, D, H, W]`` intensities in [0, 1].
        bins: equal-width bins over (0, 1].

    Returns:
        float32 ``[n, bins]``; each row sums to 1 (fractions of the volume's voxels > 0).

    Raises:
        ValueError: if a volume has no voxel above 0.
    """
    _check_volumes(volumes)
    if bins < 1:
        raise ValueError(f"bins must be >= 1; got {bins}.")
    rows = []
    for i, volume in enumerate(volumes.detach().cpu().float().numpy()):
        foreground = volume[volume > 0]
        if foreground.size == 0:
            raise ValueError(f"volume {i} has no voxel above 0; its foreground histogram is undefined.")
        counts, _ = np.histogram(foreground, bins=bins, range=(0.0, 1.0))
        rows.append(counts / foreground.size)
    return np.asarray(rows, dtype=np.float32)


def average_pool(volumes: torch.Tensor, grid: Sequence[int] = (8, 9, 8)) -> np.ndarray:
    """Each volume average-pooled to ``grid`` (``adaptive_avg_pool3d``), flattened in C order.

    Args:
        volumes: ``[n, 1, D, H, W]``.
        grid: output cells per axis.

    Returns:
        float32 ``[n, prod(grid)]``.
    """
    _check_volumes(volumes)
    grid = tuple(int(g) for g in grid)
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"grid must be three positive ints; got {grid}.")
    pooled = F.adaptive_avg_pool3d(volumes.detach().float(), grid)  # [n, 1, g0, g1, g2]
    return pooled.flatten(1).cpu().numpy().astype(np.float32)


def raw_features(
    volumes: torch.Tensor, names: Sequence[str] = RAW_BASELINES, bins: int = 32, grid: Sequence[int] = (8, 9, 8)
) -> dict[str, np.ndarray]:
    """``{name: features [n, F]}`` for the requested :data:`RAW_BASELINES`."""
    unknown = [n for n in names if n not in RAW_BASELINES]
    if unknown:
        raise ValueError(f"raw baselines must be among {RAW_BASELINES}; got {unknown}.")
    makers = {"histogram": lambda: intensity_histogram(volumes, bins), "avgpool": lambda: average_pool(volumes, grid)}
    return {name: makers[name]() for name in names}
