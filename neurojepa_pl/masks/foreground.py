"""Token foreground map of a batch of volumes (docs/method.md §6.1).

Two definitions of a foreground voxel, both on ``v = max over channels of |x|`` per sample:

* ``"reference"`` (the reference implementation, docs/method.md §6.1): ``v > p2 + 0.1 * (p98 - p2)``, with the 2nd and
  98th percentiles computed on every k-th voxel, ``k = max(1, numel // 100000)``; when ``p98 <= p2`` (a flat volume)
  the threshold is ``fallback_threshold``.
* ``"percentile"`` (the paper's wording, "background = intensities outside the 2nd-98th percentile range"): the
  percentiles are taken over the non-zero voxels of the same k-th-voxel subsample (skull-stripped background is
  exactly zero and would otherwise fill the low percentiles), and a voxel is foreground when it is non-zero and
  ``p2 <= v <= p98``. When the subsample has no non-zero voxel or ``p98 <= p2``, foreground is
  ``v > fallback_threshold``.

A token (patch) is foreground when its fraction of foreground voxels is ``>= min_fraction``; the fraction is the
``avg_pool3d`` of the voxel mask over the patch. Quantiles use linear interpolation (``torch.quantile``'s and
numpy's default).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["foreground_token_map", "foreground_voxel_mask", "quantile_stride"]

ForegroundMethod = Literal["reference", "percentile"]
_SUBSAMPLE_TARGET = 100_000  # the reference's quantile budget: about 1e5 voxels per sample


def quantile_stride(num_voxels: int) -> int:
    """Subsampling stride for the percentile estimate: ``max(1, num_voxels // 100000)`` (9 for 96x108x96)."""
    return max(1, num_voxels // _SUBSAMPLE_TARGET)


def _as_patch(patch_size: int | Sequence[int]) -> tuple[int, int, int]:
    patch = (patch_size,) * 3 if isinstance(patch_size, int) else tuple(patch_size)
    if len(patch) != 3 or not all(isinstance(p, int) and p > 0 for p in patch):
        raise ValueError(f"Expected patch_size as a positive int or three positive ints; found {patch_size!r}.")
    return patch


def foreground_voxel_mask(
    volumes: Tensor,
    method: ForegroundMethod = "reference",
    fallback_threshold: float = 0.0,
) -> Tensor:
    """Voxel-level foreground of a batch.

    Args:
        volumes: ``[B, C, D, H, W]`` intensities (any float dtype; computed in float32).
        method: ``"reference"`` or ``"percentile"`` (see module docstring).
        fallback_threshold: threshold on ``v`` used for samples whose percentiles are degenerate.

    Returns:
        bool ``[B, D, H, W]``.
    """
    if volumes.ndim != 5:
        raise ValueError(f"Expected volumes [B, C, D, H, W]; found shape {list(volumes.shape)}.")
    volumes = volumes.detach()
    # One channel (the usual case): skip the max-over-channels copy of a large volume.
    v = volumes[:, 0].abs() if volumes.shape[1] == 1 else volumes.abs().amax(dim=1)
    v = v.float()  # [B, D, H, W]
    batch = v.shape[0]
    flat = v.reshape(batch, -1)
    sub = flat[:, :: quantile_stride(flat.shape[1])]
    q = torch.tensor([0.02, 0.98], dtype=sub.dtype, device=sub.device)
    fallback = torch.full((batch,), float(fallback_threshold), dtype=v.dtype, device=v.device)
    view = (batch, 1, 1, 1)

    if method == "reference":
        p2, p98 = torch.quantile(sub, q, dim=1)  # each [B]
        threshold = torch.where(p98 > p2, p2 + 0.1 * (p98 - p2), fallback)
        return v > threshold.view(view)
    if method == "percentile":
        nonzero = torch.where(sub != 0, sub, torch.full_like(sub, float("nan")))
        p2, p98 = torch.nanquantile(nonzero, q, dim=1)  # NaN for rows without non-zero voxels
        usable = (p98 > p2).view(view)  # False for NaN rows too
        in_band = (v != 0) & (v >= p2.view(view)) & (v <= p98.view(view))
        return torch.where(usable, in_band, v > fallback.view(view))
    raise ValueError(f"Expected method 'reference' or 'percentile'; found {method!r}.")


def foreground_token_map(
    volumes: Tensor,
    patch_size: int | Sequence[int] = 12,
    min_fraction: float = 0.1,
    method: ForegroundMethod = "reference",
    fallback_threshold: float = 0.0,
) -> Tensor:
    """Token foreground map of a batch (docs/method.md §6.1); computed on the augmented batch in the collator.

    Args:
        volumes: ``[B, C, D, H, W]``; D, H, W divisible by the patch size.
        patch_size: patch edge (int) or ``(pD, pH, pW)``.
        min_fraction: a token is foreground when at least this fraction of its voxels are.
        method: ``"reference"`` (default, as trained) or ``"percentile"`` (the paper's wording).
        fallback_threshold: voxel threshold for samples with degenerate percentiles.

    Returns:
        bool ``[B, N]`` with ``N = (D/pD)(H/pH)(W/pW)`` in token order (C order over the patch grid).
    """
    patch = _as_patch(patch_size)
    if volumes.ndim != 5:
        raise ValueError(f"Expected volumes [B, C, D, H, W]; found shape {list(volumes.shape)}.")
    spatial = tuple(volumes.shape[2:])
    if any(s % p for s, p in zip(spatial, patch)):
        raise ValueError(
            f"Volume spatial shape {list(spatial)} is not divisible by patch size {list(patch)}; resize or crop the "
            f"volumes to a multiple of the patch size (e.g. 96x108x96 for 12^3 patches)."
        )
    voxel_fg = foreground_voxel_mask(volumes, method=method, fallback_threshold=fallback_threshold)
    fraction = F.avg_pool3d(voxel_fg.unsqueeze(1).float(), kernel_size=patch, stride=patch)  # [B, 1, g0, g1, g2]
    return (fraction >= min_fraction).flatten(1)
