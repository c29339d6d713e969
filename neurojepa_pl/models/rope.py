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

The tables depend only on the geometry (grid, layout, axis width), so :class:`RopeTable` computes the cos/sin of every
token of its grid once and a forward gathers the rows of its token ids; recomputing them in every call cost ~9% of the
compiled H200 step (benchmarks/README.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = [
    "PositionLayout",
    "RopeDtype",
    "RopeTable",
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

    The networks take float32 tables from :class:`RopeTable` (computed once per geometry) and call this per forward
    only for other dtypes, shared by all blocks. ``dtype=float32`` is the default and our
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


class RopeTable(nn.Module):
    """float32 RoPE tables of every token of one grid, computed once and gathered by token id.

    ``cos`` / ``sin`` ``[N, 3*axis_dim]`` are non-persistent buffers (a pure function of the geometry, so never in a
    checkpoint): they follow the module to its device, and as graph inputs under ``torch.compile`` they cost neither a
    recompile nor a graph break. Row ``n`` is :func:`rope_tables` of :func:`token_positions` of id ``n``. Any
    ``_apply`` (``.to(device)``, ``.to(bfloat16)``, ``to_empty`` after a meta-device init) recomputes them in float32
    on the module's new device, so they are never stale, never rounded and never uninitialised.

    Other dtypes (``rope_dtype="activation"``, the reference's bf16 angles) are computed per call by
    :func:`rope_tables`, as before, because their values depend on the autocast state of the call.

    Args:
        grid_size: patch grid ``(g0, g1, g2)``.
        layout: position layout of :func:`token_positions`.
        axis_dim: rotated width per axis (:func:`rope_axis_dim`), even.
    """

    cos: Tensor
    sin: Tensor

    def __init__(self, grid_size: Sequence[int], layout: PositionLayout, axis_dim: int) -> None:
        super().__init__()
        self.grid_size = tuple(int(g) for g in grid_size)
        self.layout: PositionLayout = layout
        self.axis_dim = int(axis_dim)
        self.num_tokens = self.grid_size[0] * self.grid_size[1] * self.grid_size[2]
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset_parameters()

    def extra_repr(self) -> str:
        return f"grid_size={self.grid_size}, layout={self.layout!r}, axis_dim={self.axis_dim}"

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)compute the float32 tables on the buffers' device (what meta-device materialisation calls)."""
        device = self.cos.device
        positions = token_positions(torch.arange(self.num_tokens, device=device), self.grid_size, self.layout)
        # float32 elementwise ops only, which autocast leaves alone: the values do not depend on the caller's context.
        self.cos, self.sin = rope_tables(positions, self.axis_dim, torch.float32)

    def _apply(self, fn: Any, recurse: bool = True) -> RopeTable:
        super()._apply(fn, recurse)
        if self.cos.device.type != "meta":
            self.reset_parameters()
        return self

    def forward(self, token_ids: Tensor | None, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """``(cos, sin)`` of the given tokens.

        Args:
            token_ids: integer ids ``[B, K]`` in ``[0, N)``, or None for all ``N`` tokens in id order.
            dtype: dtype of the angles; float32 gathers from the tables, any other is computed now.

        Returns:
            ``(cos, sin)``, each ``[B, K, 3*axis_dim]`` (``[1, N, 3*axis_dim]`` for None), in ``dtype``.
        """
        if dtype != torch.float32:
            ids = torch.arange(self.num_tokens, device=self.cos.device)[None] if token_ids is None else token_ids
            return rope_tables(token_positions(ids, self.grid_size, self.layout), self.axis_dim, dtype)
        if token_ids is None:
            return self.cos.unsqueeze(0), self.sin.unsqueeze(0)
        ids = token_ids.long()
        return self.cos[ids], self.sin[ids]


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
