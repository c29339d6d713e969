"""V-JEPA 2 multiblock masks on the 3D token grid: the ablation baseline of the paper (Fig. 3, "V-JEPA 2").

V-JEPA 2 masks video tubes: every block spans the whole temporal axis. On our grid the "temporal" axis is the depth
axis, axis2 (``g2``), and the spatial plane is ``g0 x g1``. As in V-JEPA 2:

* one block size ``(d, h, w)`` is drawn per call and shared by the whole batch (three ``torch.rand(1)``: depth
  scale, spatial scale, aspect ratio; the aspect ratio is uniform, not log-uniform);
* every sample masks ``num_blocks`` boxes of that size at uniform valid origins (boxes may overlap);
  context = the tokens no box covers, target = the covered ones;
* a sample whose context came out empty is redrawn.

Fixed lengths. V-JEPA 2 does not force the counts, so kept/masked counts vary per sample. To stack a batch, both
lists are cut to the batch minimum (as I-JEPA's and V-JEPA 2's collators do). Upstream keeps the *lowest* ids of each
sorted list, which always drops the highest-axis0 tokens; our default ``truncation="random"`` instead permutes each
sample's ids and keeps the first ``K`` (a uniformly random subset, in random order, like the multiscale masks).
``truncation="lowest"`` reproduces upstream (sorted ids, lowest kept). Dropped tokens are neither context nor target.

Unlike upstream, the box origins are drawn from the given generator (upstream uses the global torch RNG), so the
masks are reproducible; block sizes are clamped to at least one cell so tiny test grids work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from neurojepa_pl.masks.grid import as_grid

__all__ = ["VJEPA2BlockMaskGenerator", "vjepa2_mask_generators"]

Truncation = Literal["random", "lowest"]
_MAX_REDRAWS = 1000


class VJEPA2BlockMaskGenerator:
    """V-JEPA 2 multiblock ("tube") mask generator on a ``(g0, g1, g2)`` token grid.

    Args:
        grid: token grid; axis2 plays V-JEPA 2's temporal axis.
        num_blocks: boxes per sample.
        spatial_scale: range of a box's share of the ``g0 * g1`` plane.
        depth_scale: range of a box's share of axis2; ``(1.0, 1.0)`` (the default, V-JEPA 2's setting) makes every
            box span the full depth.
        aspect_ratio: ``h / w`` range, sampled uniformly.
        truncation: ``"random"`` (default) or ``"lowest"``; how per-sample id lists are cut to the batch minimum
            (see module docstring).

    Call:
        ``generator(batch_size, torch_generator, foreground=None) -> (context_idx [B, K_ctx], target_idx [B, K_tgt])``.
        ``foreground`` is accepted for interface compatibility and ignored (V-JEPA 2 masks are not
        foreground-aware). ``K_ctx`` and ``K_tgt`` vary from call to call.
    """

    def __init__(
        self,
        grid: Sequence[int] = (8, 9, 8),
        *,
        num_blocks: int,
        spatial_scale: Sequence[float],
        depth_scale: Sequence[float] = (1.0, 1.0),
        aspect_ratio: Sequence[float] = (0.75, 1.5),
        truncation: Truncation = "random",
    ) -> None:
        self.grid = as_grid(grid)
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"Expected `num_blocks` to be an int >= 1; found {num_blocks!r}.")
        self.num_blocks = num_blocks
        self.spatial_scale = self._range("spatial_scale", spatial_scale, upper=1.0)
        self.depth_scale = self._range("depth_scale", depth_scale, upper=1.0)
        self.aspect_ratio = self._range("aspect_ratio", aspect_ratio, upper=None)
        if self.aspect_ratio[0] <= 0.0:
            raise ValueError(f"Expected `aspect_ratio` bounds > 0; found {aspect_ratio!r}.")
        if truncation not in ("random", "lowest"):
            raise ValueError(f"Expected truncation 'random' or 'lowest'; found {truncation!r}.")
        self.truncation = truncation
        self.num_tokens = self.grid[0] * self.grid[1] * self.grid[2]
        self.foreground_aware = False

    @staticmethod
    def _range(name: str, value: Sequence[float], upper: float | None) -> tuple[float, float]:
        pair = tuple(float(v) for v in value)
        if len(pair) != 2 or not (0.0 <= pair[0] <= pair[1]) or (upper is not None and pair[1] > upper):
            raise ValueError(f"Expected `{name}` = (lo, hi) with 0 <= lo <= hi <= {upper}; found {value!r}.")
        return pair

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(grid={self.grid}, num_blocks={self.num_blocks}, "
            f"spatial_scale={self.spatial_scale}, depth_scale={self.depth_scale}, aspect_ratio={self.aspect_ratio}, "
            f"truncation={self.truncation!r})"
        )

    def sample_block_size(self, generator: torch.Generator) -> tuple[int, int, int]:
        """Draw the batch's block size ``(d, h, w)``: ``d`` along axis2, ``h`` along axis0, ``w`` along axis1."""
        g0, g1, g2 = self.grid
        u = torch.rand(1, generator=generator).item()
        d = max(1, min(int(g2 * (self.depth_scale[0] + u * (self.depth_scale[1] - self.depth_scale[0]))), g2))
        u = torch.rand(1, generator=generator).item()
        area = int(g0 * g1 * (self.spatial_scale[0] + u * (self.spatial_scale[1] - self.spatial_scale[0])))
        u = torch.rand(1, generator=generator).item()
        aspect = self.aspect_ratio[0] + u * (self.aspect_ratio[1] - self.aspect_ratio[0])
        h = max(1, min(int(round(math.sqrt(area * aspect))), g0))
        w = max(1, min(int(round(math.sqrt(area / aspect))), g1))
        return d, h, w

    def sample_kept_mask(self, block: tuple[int, int, int], generator: torch.Generator) -> Tensor:
        """Mask ``num_blocks`` boxes of size ``block`` at uniform origins; redraw while nothing stays kept.

        Returns:
            bool ``[g0, g1, g2]``, True = context, with at least one True cell.
        """
        g0, g1, g2 = self.grid
        d, h, w = block
        for _ in range(_MAX_REDRAWS):
            kept = torch.ones(self.grid, dtype=torch.bool)
            for _ in range(self.num_blocks):
                top = int(torch.randint(0, g0 - h + 1, (1,), generator=generator))
                left = int(torch.randint(0, g1 - w + 1, (1,), generator=generator))
                start = int(torch.randint(0, g2 - d + 1, (1,), generator=generator))
                kept[top : top + h, left : left + w, start : start + d] = False
            if kept.any():
                return kept
        raise RuntimeError(
            f"{self!r}: every one of {_MAX_REDRAWS} draws with block (d, h, w) = {block} masked the whole grid; "
            f"lower num_blocks or spatial_scale so that some context survives."
        )

    def _cut(self, ids: Tensor, keep: int, generator: torch.Generator) -> Tensor:
        if self.truncation == "lowest":
            return ids[:keep]  # `ids` come sorted from nonzero()
        return ids[torch.randperm(ids.numel(), generator=generator)[:keep]]

    def __call__(
        self, batch_size: int, generator: torch.Generator, foreground: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draw one (context, target) split per sample, cut to the batch minimum counts.

        Args:
            batch_size: B.
            generator: CPU ``torch.Generator``.
            foreground: ignored (see class docstring).

        Returns:
            ``context_idx`` int64 ``[B, K_ctx]`` and ``target_idx`` int64 ``[B, K_tgt]`` with ``K_ctx`` / ``K_tgt``
            the smallest kept / masked counts in the batch.
        """
        del foreground  # V-JEPA 2 masks do not look at the anatomy.
        if batch_size < 1:
            raise ValueError(f"Expected batch_size >= 1; found {batch_size}.")
        block = self.sample_block_size(generator)
        kept_masks = [self.sample_kept_mask(block, generator).view(-1) for _ in range(batch_size)]
        contexts = [k.nonzero().squeeze(1) for k in kept_masks]
        targets = [(~k).nonzero().squeeze(1) for k in kept_masks]
        keep_context = min(c.numel() for c in contexts)
        keep_target = min(t.numel() for t in targets)
        context = torch.stack([self._cut(c, keep_context, generator) for c in contexts])
        target = torch.stack([self._cut(t, keep_target, generator) for t in targets])
        return context, target


def vjepa2_mask_generators(
    grid: Sequence[int] = (8, 9, 8), truncation: Truncation = "random"
) -> list[VJEPA2BlockMaskGenerator]:
    """V-JEPA 2's two mask settings, with full-depth blocks and aspect ratio 0.75-1.5.

    Short range: 8 blocks at spatial scale 0.15; long range: 2 blocks at spatial scale 0.7.

    Args:
        grid: token grid ``(g0, g1, g2)``.
        truncation: see `VJEPA2BlockMaskGenerator`.

    Returns:
        ``[short_range, long_range]``.
    """
    return [
        VJEPA2BlockMaskGenerator(
            grid,
            num_blocks=n,
            spatial_scale=(s, s),
            depth_scale=(1.0, 1.0),
            aspect_ratio=(0.75, 1.5),
            truncation=truncation,
        )
        for n, s in ((8, 0.15), (2, 0.7))
    ]
