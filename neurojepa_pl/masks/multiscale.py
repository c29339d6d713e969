"""Neuro-JEPA multiscale 3D block masks with exact context/target counts (docs/method.md §5.1, 5.2).

One generator draws, for every sample of a batch, a context set of exactly ``N - int(N * mask_ratio)`` tokens and a
target set of the remaining ``int(N * mask_ratio)`` tokens (144 / 432 on the paper's 8x9x8 grid):

1. Phase 1, block placement: ``num_blocks`` boxes of random size and position are masked (boxes may overlap).
2. Phase 2, boundary-coherent count adjustment: the masked region grows along its 6-connected front (erosion of
   the context) or shrinks along it (dilation) until the exact count is reached; with a foreground map,
   background is masked first and foreground restored first.
3. Phase 2b, random fallback: only when phase 2 had no front to work on (e.g. the blocks masked everything).
4. Phase 3: kept and masked ids, each randomly permuted.

Per sample, the random draws follow the reference's order (per block: depth, spatial scale, aspect ratio as one
``torch.rand(1)`` each, then top, left, start as ``torch.randint``; then the phase-2 permutations, background/
foreground part first as preferred, then the phase-3 permutations of kept and masked ids), so `sample_kept_mask`
with a generator seeded like the reference's per-sample generator is meant to give the reference's mask (not checked
against the reference code here). A batch draws its samples one after another from the single generator it is given;
seeds come from `neurojepa_pl.seeding.derive_seed`, not from the reference's counter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from neurojepa_pl.masks.grid import (
    as_foreground_grid,
    as_grid,
    inner_boundary,
    outer_boundary,
    shuffled_split,
)

__all__ = ["MultiscaleBlockMaskGenerator", "paper_mask_generators"]


def _as_range(name: str, value: Sequence[float], *, low: float, high: float | None) -> tuple[float, float]:
    pair = tuple(float(v) for v in value)
    valid = len(pair) == 2 and low <= pair[0] <= pair[1] and (high is None or pair[1] <= high)
    if not valid:
        bound = f"[{low}, {high}]" if high is not None else f"[{low}, inf)"
        raise ValueError(f"Expected `{name}` = (lo, hi) with lo <= hi inside {bound}; found {value!r}.")
    return pair  # type: ignore[return-value]


class MultiscaleBlockMaskGenerator:
    """Multiscale 3D block mask generator with exact token counts (docs/method.md §5.2).

    Grid naming follows the reference: height = axis0 (``g0``), width = axis1 (``g1``), depth = axis2 (``g2``).
    A block spans ``h`` rows on axis0, ``w`` columns on axis1 and ``d`` slices on axis2, where ``d`` comes from
    ``depth_scale`` (full or partial depth) and ``h * w`` from ``spatial_scale`` of the ``g0 * g1`` plane.

    Args:
        grid: token grid ``(g0, g1, g2)``; ``(8, 9, 8)`` for 96x108x96 volumes with 12^3 patches.
        num_blocks: blocks placed in phase 1.
        spatial_scale: range of the block's share of the ``g0 * g1`` plane; the lower end is raised to
            ``1 / (g0 * g1)`` so every block has at least one cell.
        depth_scale: range of the block's share of the ``g2`` axis; the lower end is raised to ``1 / g2``.
        aspect_ratio: ``h / w`` range, sampled log-uniformly.
        mask_ratio: share of target tokens; the target count is ``int(N * mask_ratio)``.
        foreground_aware: when True and a foreground map is passed, erosion masks background first and dilation
            restores foreground first; when False the map is ignored.

    Call:
        ``generator(batch_size, torch_generator, foreground=None) -> (context_idx [B, K_ctx], target_idx [B, K_tgt])``
        with int64 ids in ``[0, N)``, disjoint and together covering all N tokens, each row randomly permuted.
    """

    def __init__(
        self,
        grid: Sequence[int] = (8, 9, 8),
        *,
        num_blocks: int,
        spatial_scale: Sequence[float],
        depth_scale: Sequence[float] = (0.0, 1.0),
        aspect_ratio: Sequence[float] = (0.75, 1.5),
        mask_ratio: float = 0.75,
        foreground_aware: bool = True,
    ) -> None:
        self.grid = as_grid(grid)
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"Expected `num_blocks` to be an int >= 1; found {num_blocks!r}.")
        self.num_blocks = num_blocks
        self.spatial_scale = _as_range("spatial_scale", spatial_scale, low=0.0, high=1.0)
        self.depth_scale = _as_range("depth_scale", depth_scale, low=0.0, high=1.0)
        self.aspect_ratio = _as_range("aspect_ratio", aspect_ratio, low=0.0, high=None)
        if self.aspect_ratio[0] <= 0.0:
            raise ValueError(
                f"Expected `aspect_ratio` bounds > 0 (it is sampled log-uniformly); found {aspect_ratio!r}."
            )
        self.mask_ratio = float(mask_ratio)
        self.foreground_aware = bool(foreground_aware)

        g0, g1, g2 = self.grid
        self.num_tokens = g0 * g1 * g2
        self.num_target = int(self.num_tokens * self.mask_ratio)
        self.num_context = self.num_tokens - self.num_target
        if self.num_target < 1 or self.num_context < 1:
            raise ValueError(
                f"mask_ratio={mask_ratio} on grid {self.grid} (N={self.num_tokens}) gives {self.num_context} context "
                f"and {self.num_target} target tokens; both must be >= 1. Choose a ratio in "
                f"[{1 / self.num_tokens:.4f}, {1 - 1 / self.num_tokens:.4f}) or a larger grid."
            )
        # Raised lower bounds guarantee at least one cell per block (docs/method.md §5.2 phase 1, steps 1-2).
        self._depth_low = max(self.depth_scale[0], 1.0 / g2)
        self._spatial_low = max(self.spatial_scale[0], 1.0 / (g0 * g1))
        if self._depth_low > self.depth_scale[1] or self._spatial_low > self.spatial_scale[1]:
            raise ValueError(
                f"depth_scale {self.depth_scale} / spatial_scale {self.spatial_scale} must reach at least one cell "
                f"(1/{g2} of depth, 1/{g0 * g1} of the plane) on grid {self.grid}; raise the upper bound."
            )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(grid={self.grid}, num_blocks={self.num_blocks}, "
            f"spatial_scale={self.spatial_scale}, depth_scale={self.depth_scale}, aspect_ratio={self.aspect_ratio}, "
            f"mask_ratio={self.mask_ratio}, foreground_aware={self.foreground_aware})"
        )

    # ---------------------------------------------------------------- phase 1
    def sample_block_size(self, generator: torch.Generator) -> tuple[int, int, int]:
        """Draw one block size ``(d, h, w)``: ``d`` along axis2, ``h`` along axis0, ``w`` along axis1.

        Three ``torch.rand(1)`` draws, in the order depth scale, spatial scale, aspect ratio.
        """
        g0, g1, g2 = self.grid
        u_depth = torch.rand(1, generator=generator).item()
        depth_scale = self._depth_low + u_depth * (self.depth_scale[1] - self._depth_low)
        d = max(1, min(int(g2 * depth_scale), g2))

        u_spatial = torch.rand(1, generator=generator).item()
        spatial_scale = self._spatial_low + u_spatial * (self.spatial_scale[1] - self._spatial_low)
        area = max(1, int(g0 * g1 * spatial_scale))

        u_aspect = torch.rand(1, generator=generator).item()
        log_lo, log_hi = math.log(self.aspect_ratio[0]), math.log(self.aspect_ratio[1])
        aspect = math.exp(log_lo + u_aspect * (log_hi - log_lo))

        h = max(1, min(int(round(math.sqrt(area * aspect))), g0))
        w = max(1, min(int(round(math.sqrt(area / aspect))), g1))
        return d, h, w

    def place_blocks(self, generator: torch.Generator) -> Tensor:
        """Phase 1: start from all-kept and mask ``num_blocks`` boxes at uniform valid origins.

        Returns:
            bool ``[g0, g1, g2]``, True = kept (context).
        """
        g0, g1, g2 = self.grid
        kept = torch.ones(self.grid, dtype=torch.bool)
        for _ in range(self.num_blocks):
            d, h, w = self.sample_block_size(generator)
            top = int(torch.randint(0, g0 - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, g1 - w + 1, (1,), generator=generator))
            start = int(torch.randint(0, g2 - d + 1, (1,), generator=generator))
            kept[top : top + h, left : left + w, start : start + d] = False
        return kept

    # ---------------------------------------------------------------- phase 2 / 2b
    @staticmethod
    def _preferred_first(
        ids: Tensor, foreground_flat: Tensor | None, prefer_foreground: bool, generator: torch.Generator
    ) -> Tensor:
        """Random order of ``ids``; with a foreground map, the preferred class (each part shuffled) comes first."""
        if foreground_flat is None:
            return ids[torch.randperm(ids.numel(), generator=generator)]
        is_fg = foreground_flat[ids]
        first = ids[is_fg] if prefer_foreground else ids[~is_fg]
        second = ids[~is_fg] if prefer_foreground else ids[is_fg]
        first = first[torch.randperm(first.numel(), generator=generator)]
        second = second[torch.randperm(second.numel(), generator=generator)]
        return torch.cat([first, second])

    def adjust_count(self, kept: Tensor, generator: torch.Generator, foreground: Tensor | None = None) -> Tensor:
        """Phases 2 and 2b: reach exactly ``num_context`` kept tokens.

        Erosion (too many kept) masks cells of the outer front, background first when foreground-aware; dilation
        (too few kept) restores cells of the inner front, foreground first. Each round takes
        ``min(needed, |front|)`` cells, then recomputes the front; a round with an empty front ends phase 2, and
        phase 2b masks / restores random cells to finish.

        Args:
            kept: bool ``[g0, g1, g2]`` after phase 1 (not modified).
            generator: the random stream.
            foreground: bool ``[g0, g1, g2]`` or ``[N]`` token foreground map, or None.

        Returns:
            bool ``[g0, g1, g2]`` with exactly ``num_context`` True cells.
        """
        kept = kept.clone()
        flat = kept.view(-1)
        fg_flat = None
        if foreground is not None and self.foreground_aware:
            fg_flat = foreground.reshape(-1)
            fg_flat = fg_flat if fg_flat.dtype == torch.bool else fg_flat != 0
        n_keep = int(flat.sum())

        # Erosion stops at the exact count or with an empty front, so at most one of these loops runs.
        while n_keep > self.num_context:
            front = outer_boundary(kept).view(-1).nonzero().squeeze(1)
            if front.numel() == 0:
                break
            order = self._preferred_first(front, fg_flat, prefer_foreground=False, generator=generator)
            take = order[: n_keep - self.num_context]
            flat[take] = False
            n_keep -= take.numel()
        while n_keep < self.num_context:
            front = inner_boundary(kept).view(-1).nonzero().squeeze(1)
            if front.numel() == 0:
                break
            order = self._preferred_first(front, fg_flat, prefer_foreground=True, generator=generator)
            take = order[: self.num_context - n_keep]
            flat[take] = True
            n_keep += take.numel()

        # Phase 2b: reached only when phase 2 ran out of front (e.g. every token was masked in phase 1).
        if n_keep > self.num_context:
            ids = flat.nonzero().squeeze(1)
            ids = ids[torch.randperm(ids.numel(), generator=generator)]
            flat[ids[: n_keep - self.num_context]] = False
        elif n_keep < self.num_context:
            ids = (~flat).nonzero().squeeze(1)
            ids = ids[torch.randperm(ids.numel(), generator=generator)]
            flat[ids[: self.num_context - n_keep]] = True
        return kept

    # ---------------------------------------------------------------- per sample / batch
    def sample_kept_mask(self, generator: torch.Generator, foreground: Tensor | None = None) -> Tensor:
        """Phases 1, 2 and 2b for one sample.

        Args:
            generator: the random stream.
            foreground: bool ``[g0, g1, g2]`` (or ``[N]``) for this sample, or None.

        Returns:
            bool ``[g0, g1, g2]`` with exactly ``num_context`` True (context) cells.
        """
        return self.adjust_count(self.place_blocks(generator), generator, foreground)

    def __call__(
        self, batch_size: int, generator: torch.Generator, foreground: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draw one (context, target) split per sample.

        Args:
            batch_size: B.
            generator: CPU ``torch.Generator``; samples draw from it one after another.
            foreground: token foreground map ``[B, N]`` or ``[B, g0, g1, g2]`` (bool, or 0/1 numbers), or None.

        Returns:
            ``context_idx`` int64 ``[B, num_context]`` and ``target_idx`` int64 ``[B, num_target]``, each row
            randomly permuted.
        """
        if batch_size < 1:
            raise ValueError(f"Expected batch_size >= 1; found {batch_size}.")
        fg_grid = as_foreground_grid(foreground, batch_size, self.grid) if foreground is not None else None
        contexts, targets = [], []
        for b in range(batch_size):
            kept = self.sample_kept_mask(generator, None if fg_grid is None else fg_grid[b])
            context, target = shuffled_split(kept.view(-1), generator)
            contexts.append(context)
            targets.append(target)
        return torch.stack(contexts), torch.stack(targets)


def paper_mask_generators(
    grid: Sequence[int] = (8, 9, 8), foreground_aware: bool = True
) -> list[MultiscaleBlockMaskGenerator]:
    """The paper's 3 generators (docs/method.md §5.1): 32 blocks at spatial scale 0-0.2, 16 at 0.2-0.5, 4 at 0.5-0.7.

    All use depth scale 0-1, aspect ratio 0.75-1.5 and mask ratio 0.75 (144 context / 432 target tokens on 8x9x8).

    Args:
        grid: token grid ``(g0, g1, g2)``.
        foreground_aware: see `MultiscaleBlockMaskGenerator`.

    Returns:
        ``[small, medium, large]`` generators.
    """
    settings = ((32, (0.0, 0.2)), (16, (0.2, 0.5)), (4, (0.5, 0.7)))
    return [
        MultiscaleBlockMaskGenerator(
            grid,
            num_blocks=num_blocks,
            spatial_scale=spatial,
            depth_scale=(0.0, 1.0),
            aspect_ratio=(0.75, 1.5),
            mask_ratio=0.75,
            foreground_aware=foreground_aware,
        )
        for num_blocks, spatial in settings
    ]
