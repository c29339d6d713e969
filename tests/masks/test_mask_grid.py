"""6-neighbour fronts and index extraction on hand-made grids, including the edge semantics of docs/method.md §5.2."""

from __future__ import annotations

import pytest
import torch

from neurojepa_pl.masks.grid import as_foreground_grid, as_grid, inner_boundary, outer_boundary, shuffled_split


def _cells(mask: torch.Tensor) -> set[tuple[int, int, int]]:
    return {tuple(int(v) for v in idx) for idx in mask.nonzero()}


def test_fronts_around_a_single_masked_centre():
    kept = torch.ones(3, 3, 3, dtype=torch.bool)
    kept[1, 1, 1] = False
    assert _cells(outer_boundary(kept)) == {(0, 1, 1), (2, 1, 1), (1, 0, 1), (1, 2, 1), (1, 1, 0), (1, 1, 2)}
    assert _cells(inner_boundary(kept)) == {(1, 1, 1)}


def test_fronts_around_a_single_kept_corner():
    kept = torch.zeros(3, 4, 2, dtype=torch.bool)
    kept[0, 0, 0] = True
    assert _cells(outer_boundary(kept)) == {(0, 0, 0)}
    assert _cells(inner_boundary(kept)) == {(1, 0, 0), (0, 1, 0), (0, 0, 1)}


def test_volume_edge_never_creates_a_front():
    # All kept: the edge counts as kept, so no erosion front. All masked: the edge counts as masked, no dilation front.
    assert not outer_boundary(torch.ones(2, 3, 4, dtype=torch.bool)).any()
    assert not inner_boundary(torch.zeros(2, 3, 4, dtype=torch.bool)).any()


def test_fronts_do_not_wrap_around():
    kept = torch.ones(1, 1, 5, dtype=torch.bool)
    kept[0, 0, 0] = False
    # Only index 1 touches the masked index 0; index 4 would touch it only with wrap-around.
    assert _cells(outer_boundary(kept)) == {(0, 0, 1)}


def test_fronts_are_batched():
    kept = torch.ones(2, 3, 3, 3, dtype=torch.bool)
    kept[0, 1, 1, 1] = False
    out = outer_boundary(kept)
    assert out[0].sum() == 6 and out[1].sum() == 0


def test_shuffled_split_partitions_and_permutes():
    kept = torch.zeros(40, dtype=torch.bool)
    kept[::3] = True
    context, target = shuffled_split(kept, torch.Generator().manual_seed(0))
    assert torch.equal(context.sort().values, kept.nonzero().squeeze(1))
    assert torch.equal(target.sort().values, (~kept).nonzero().squeeze(1))
    assert context.dtype == target.dtype == torch.int64
    assert not torch.equal(target, target.sort().values)


def test_grid_and_foreground_validation():
    assert as_grid([8, 9, 8]) == (8, 9, 8)
    with pytest.raises(ValueError, match="three positive ints"):
        as_grid((8, 9))
    flat = torch.tensor([[1.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0]])
    grid = as_foreground_grid(flat, 1, (2, 2, 2))
    assert grid.dtype == torch.bool and grid.shape == (1, 2, 2, 2)
    assert _cells(grid[0]) == {(0, 0, 0), (0, 1, 1)}
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        as_foreground_grid(flat, 2, (2, 2, 2))
