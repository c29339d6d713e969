"""3D rotary position embedding (docs/method.md §2.2) with the reference's position layouts.

Tokens are numbered in C order on the patch grid ``(g0, g1, g2)``: ``id = g1*g2*i0 + g2*i1 + i2``. RoPE needs one
position per axis. Three layouts map an id to ``(d, h, w)``:

* ``"grid"``: the true grid coordinates ``(i0, i1, i2)``.
* ``"reference_encoder"``: what the released encoder weights were trained with. The reference passes
  ``(g0, g1)`` as the "(height, width)" of a frame, so ``d = id // (g0*g1)``, ``h = (id % (g0*g1)) // g1``,
  ``w = (id % (g0*g1)) % g1``. At the paper grid 8x9x8 the inner 72 tokens are read as 8 rows x 9 columns.
* ``"reference_predictor"``: the reference predictor falls back to a cubic grid of side ``g0``, so
  ``d = id // g0**2``, ``h = (id % g0**2) // g0``, ``w = id % g0``.

All three are injective on ``0..N-1`` (mixed-radix decompositions), so no two tokens share a position.

Frequencies keep V-JEPA 2's tiling quirk: each axis slice of width ``D`` uses ``w_j = 10000**(-j/(D/2))``,
``j < D/2``, and sin/cos are *tiled* ``[f0..f(D/2-1), f0..f(D/2-1)]`` while the rotation pairs *adjacent* elements
``(x_2i, x_2i+1) -> (-x_2i+1, x_2i)``. Element ``i`` of a slice therefore uses angle ``f_(i mod D/2)``.
Each axis gets ``2*((head_dim//3)//2)`` dims, in the order ``[d | h | w | unrotated rest]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "PositionLayout",
    "RopeDtype",
    "rope_axis_dim",
    "token_positions",
    "rope_tables",
    "apply_rope",
]

PositionLayout = Literal["grid", "reference_encoder", "reference_predictor"]
RopeDtype = Literal["float32", "activation"]
_LAYOUTS = ("grid", "reference_encoder", "reference_predictor")


def rope_axis_dim(head_dim: int) -> int:
    """Rotated width per axis: ``2*((head_dim//3)//2)`` (20 for head dim 64, 10 for 32)."""
    return 2 * ((head_dim // 3) // 2)


def token_positions(token_ids: Tensor, grid_size: Sequence[int], layout: PositionLayout) -> Tensor:
    """Map token ids to per-axis RoPE positions.

    Args:
        token_ids: integer ids ``[...]`` (any shape) on the grid ``grid_size``.
        grid_size: patch grid ``(g0, g1, g2)``.
        layout: ``"grid"``, ``"reference_encoder"`` or ``"reference_predictor"`` (see module docstring).

    Returns:
        Long tensor ``[..., 3]`` of ``(d, h, w)`` positions.
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"Expected a RoPE position layout in {_LAYOUTS}; found {layout!r}.")
    g0, g1, g2 = (int(g) for g in grid_size)
    ids = token_ids.long()
    if layout == "grid":
        frame, row = g1 * g2, g2
    elif layout == "reference_encoder":
        frame, row = g0 * g1, g1
    else:
        frame, row = g0 * g0, g0
    d = ids // frame
    rem = ids - d * frame
    h = rem // row
    w = rem - h * row
    return torch.stack((d, h, w), dim=-1)


def _inverse_frequencies(axis_dim: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    # Same op sequence as the reference so that float32 angles are bit-identical to it.
    omega = torch.arange(axis_dim // 2, dtype=dtype, device=device)
    omega = omega / (axis_dim / 2.0)
    return 1.0 / 10000**omega


def rope_tables(positions: Tensor, axis_dim: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Cosine and sine tables for the rotated part of a head.

    Computed once per forward pass and shared by all blocks. ``dtype=float32`` is the default and our
    recommendation; the reference computes the angles in the activation dtype (bf16 under autocast), which is what
    passing that dtype here reproduces.

    Args:
        positions: ``[B, N, 3]`` (or ``[N, 3]``) per-axis positions from :func:`token_positions`.
        axis_dim: rotated width per axis (:func:`rope_axis_dim`), even.
        dtype: dtype in which angles, sin and cos are computed.

    Returns:
        ``(cos, sin)``, each ``[B, N, 3*axis_dim]`` (or ``[N, 3*axis_dim]``), in ``dtype``.
    """
    if axis_dim <= 0 or axis_dim % 2:
        raise ValueError(f"Expected a positive even RoPE axis width; found {axis_dim}. Use a head dim of at least 6.")
    omega = _inverse_frequencies(axis_dim, dtype, positions.device)
    angles = positions.to(dtype).unsqueeze(-1) * omega  # [..., 3, axis_dim/2]
    angles = torch.cat((angles, angles), dim=-1)  # tiled, not interleaved: the V-JEPA 2 quirk
    angles = angles.flatten(-2)  # [..., 3*axis_dim], axis slices in order d|h|w
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of each head; the rest pass through.

    Args:
        x: ``[B, N, H, head_dim]`` queries or keys.
        cos: ``[B or 1, N, rot]`` from :func:`rope_tables`.
        sin: same shape as ``cos``.

    Returns:
        ``[B, N, H, head_dim]`` in ``x.dtype``.
    """
    rot = cos.shape[-1]
    cos = cos.to(x.dtype).unsqueeze(-2)  # broadcast over heads
    sin = sin.to(x.dtype).unsqueeze(-2)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    pairs = x_rot.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    out = x_rot * cos + rotated * sin
    if x_pass.shape[-1] == 0:
        return out
    return torch.cat((out, x_pass), dim=-1)
