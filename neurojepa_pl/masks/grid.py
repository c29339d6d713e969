"""Token-grid helpers shared by the mask generators: shape checks, 6-neighbour fronts, index extraction.

Token layout (docs/method.md §0): a grid ``(g0, g1, g2)`` = (height, width, depth) = ``(8, 9, 8)`` for the paper,
flattened in C order, so token id = ``g1*g2*i0 + g2*i1 + i2`` (= ``72*i0 + 8*i1 + i2``). "Kept" (True) means context,
masked (False) means target.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "GridShape",
    "as_grid",
    "as_foreground_grid",
    "outer_boundary",
    "inner_boundary",
    "shuffled_split",
]

GridShape = tuple[int, int, int]


def as_grid(grid: Sequence[int]) -> GridShape:
    """Validate a token grid ``(g0, g1, g2)`` and return it as a tuple of ints.

    Raises:
        ValueError: if it is not three positive ints.
    """
    values = tuple(grid)
    if len(values) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ValueError(f"Expected a token grid of three positive ints (g0, g1, g2), e.g. (8, 9, 8); found {grid!r}.")
    return values


def as_foreground_grid(foreground: Tensor, batch_size: int, grid: GridShape) -> Tensor:
    """Bring a token foreground map to a bool ``[B, g0, g1, g2]`` grid.

    Args:
        foreground: ``[B, N]`` or ``[B, g0, g1, g2]``; bool, or numeric where non-zero means foreground (the
            reference passes 0/1 floats).
        batch_size: expected B.
        grid: expected token grid.

    Returns:
        Bool tensor ``[B, g0, g1, g2]`` on the CPU.

    Raises:
        ValueError: on a shape that matches neither layout.
    """
    num_tokens = grid[0] * grid[1] * grid[2]
    shape = tuple(foreground.shape)
    if shape not in ((batch_size, num_tokens), (batch_size, *grid)):
        raise ValueError(
            f"Expected a foreground map of shape [B, N] = {[batch_size, num_tokens]} or [B, g0, g1, g2] = "
            f"{[batch_size, *grid]}; found {list(shape)}. Compute it with foreground_token_map(...) on volumes "
            f"whose patch grid is {grid}."
        )
    fg = foreground.detach().to("cpu")
    fg = fg if fg.dtype == torch.bool else fg != 0
    return fg.reshape(batch_size, *grid)


def _any_neighbour(indicator: Tensor) -> Tensor:
    """True where at least one 6-neighbour (no wrap) of a ``[..., g0, g1, g2]`` bool grid is True.

    Cells outside the grid count as False, i.e. the volume edge never makes a cell a boundary cell.
    """
    padded = torch.zeros(
        (*indicator.shape[:-3], *(s + 2 for s in indicator.shape[-3:])), dtype=torch.bool, device=indicator.device
    )
    padded[..., 1:-1, 1:-1, 1:-1] = indicator
    out = torch.zeros_like(indicator)
    for axis in range(3):
        for lo, hi in ((0, -2), (2, None)):
            # The interior on two axes, shifted by one cell (down, then up) on `axis`.
            window = [slice(1, -1)] * 3
            window[axis] = slice(lo, hi)
            out |= padded[..., window[0], window[1], window[2]]
    return out


def outer_boundary(kept: Tensor) -> Tensor:
    """Erosion front: kept cells with at least one masked 6-neighbour (docs/method.md §5.2, phase 2).

    The volume edge counts as kept, so it never creates a front.

    Args:
        kept: bool ``[..., g0, g1, g2]``, True = context.

    Returns:
        bool ``[..., g0, g1, g2]``.
    """
    return kept & _any_neighbour(~kept)


def inner_boundary(kept: Tensor) -> Tensor:
    """Dilation front: masked cells with at least one kept 6-neighbour (docs/method.md §5.2, phase 2).

    The volume edge counts as masked, so it never creates a front.

    Args:
        kept: bool ``[..., g0, g1, g2]``, True = context.

    Returns:
        bool ``[..., g0, g1, g2]``.
    """
    return ~kept & _any_neighbour(kept)


def shuffled_split(kept_flat: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Ids of kept and of masked tokens, each in random order (docs/method.md §5.2, phase 3).

    The order is random so that the sequence position carries no spatial information. The kept permutation is
    drawn before the masked one.

    Args:
        kept_flat: bool ``[N]``, True = context.
        generator: the random stream.

    Returns:
        ``(context_ids [K_ctx], target_ids [N - K_ctx])``, int64.
    """
    context = kept_flat.nonzero().squeeze(1)
    target = (~kept_flat).nonzero().squeeze(1)
    context = context[torch.randperm(context.numel(), generator=generator)]
    target = target[torch.randperm(target.numel(), generator=generator)]
    return context, target
