"""JEPA pretraining collation: stack the samples, build the token foreground map, draw masks (docs/method.md §5.3, 6.1).

Seeding and "step"
------------------
Every batch's masks come from ``derive_seed(seed, rank=rank, step=step, stream=m)`` for generator ``m``, where
``step`` is the **global batch index** of the batch (0, 1, 2, ... in the order the DataLoader yields batches):

* A DataLoader with ``W`` workers hands batches out round-robin, so worker ``w`` collates batches ``w, w + W,
  w + 2W, ...``. Worker ``w``'s ``c``-th call (``c = 0, 1, ...``) therefore gets
  ``step = base_step + c * W + w``; in the main process (``num_workers=0``) ``W = 1, w = 0``.
* ``base_step`` is 0 until `set_step` moves it. DataLoader workers are copies of the collator taken when the
  loader's iterator is created, so call ``set_step(global batch index of the next batch)`` in the main process
  *before* each iteration starts (e.g. in ``on_train_epoch_start``, with ``trainer.fit_loop.total_batch_idx``),
  and on resume. Without it, every new iterator starts again at ``base_step`` and repeats the first epoch's masks.
* With ``persistent_workers=True`` the worker copies live across epochs and keep counting; ``set_step`` after the
  first epoch cannot reach them. The steps stay unique (``(c, w)`` pairs never repeat), and they equal the global
  batch index when the number of batches per epoch is a multiple of ``W``.
* The worker id is deliberately *not* a seed key: the global batch index already tells the workers' batches
  apart, and leaving it out makes the mask sequence the same for any ``num_workers``, so a resumed run reproduces
  its masks even with a different worker count.
* ``rank`` is `set_rank`'s value if given, else ``torch.distributed.get_rank()`` when a process group is
  initialised, else 0. Different ranks draw different masks (the reference's masks were identical on all ranks,
  docs/method.md §12.9).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist
from monai.data import MetaTensor, list_data_collate
from torch import Tensor
from torch.utils.data import get_worker_info

from neurojepa_pl.masks.foreground import ForegroundMethod, foreground_token_map
from neurojepa_pl.seeding import make_generator

__all__ = ["JEPAMaskCollator", "MaskGenerator", "stack_masks"]

OUTPUT_KEYS = ("context_idx", "target_idx", "foreground", "mask_step")


class MaskGenerator(Protocol):
    """What the collator needs from a mask generator (e.g. `MultiscaleBlockMaskGenerator`)."""

    grid: tuple[int, int, int]

    def __call__(
        self, batch_size: int, generator: torch.Generator, foreground: Tensor | None = None
    ) -> tuple[Tensor, Tensor]: ...


def stack_masks(masks: Sequence[Tensor]) -> Tensor:
    """Stack M per-generator id tensors ``[B, K]`` into ``[M, B, K]``.

    Raises:
        ValueError: if the shapes differ (e.g. V-JEPA 2 masks, whose counts differ per generator).
    """
    shapes = {tuple(m.shape) for m in masks}
    if len(shapes) != 1:
        raise ValueError(
            f"Cannot stack masks of different shapes {sorted(shapes)}; keep them as a list (one forward per mask)."
        )
    return torch.stack(list(masks))


def _as_patch(patch_size: int | Sequence[int]) -> tuple[int, int, int]:
    patch = (patch_size,) * 3 if isinstance(patch_size, int) else tuple(patch_size)
    if len(patch) != 3 or not all(isinstance(p, int) and p > 0 for p in patch):
        raise ValueError(f"Expected patch_size as a positive int or three positive ints; found {patch_size!r}.")
    return patch  # type: ignore[return-value]


class JEPAMaskCollator:
    """DataLoader ``collate_fn`` for JEPA pretraining (picklable; see module docstring for the seeding).

    Args:
        generators: mask generators, each called once per batch (e.g. ``paper_mask_generators()``).
        patch_size: patch edge (int) or ``(pD, pH, pW)``; the volume's patch grid must equal every generator's grid.
        seed: base seed of the mask stream.
        foreground_aware: pass the foreground map to the generators (foreground-first erosion/dilation). The map
            itself is always computed and returned, for the loss and for monitoring.
        bg_method: foreground definition, ``"reference"`` or ``"percentile"`` (see `foreground_token_map`).
        min_foreground_fraction: voxel fraction that makes a token foreground (0.1).
        foreground_threshold: voxel threshold for volumes with degenerate percentiles (0.0).
        image_key: the sample key holding the ``[C, D, H, W]`` image.

    Call:
        ``collator(samples) -> dict`` with the collated sample fields plus

        * ``image``: float ``[B, C, D, H, W]`` (a plain tensor; MONAI metadata is dropped),
        * ``context_idx``: list of M int64 ``[B, K_ctx_m]``,
        * ``target_idx``: list of M int64 ``[B, K_tgt_m]``,
        * ``foreground``: bool ``[B, N]`` token foreground map of the (augmented) batch,
        * ``mask_step``: int, the step the masks were drawn for.
    """

    def __init__(
        self,
        generators: Sequence[MaskGenerator],
        patch_size: int | Sequence[int] = 12,
        seed: int = 0,
        foreground_aware: bool = True,
        bg_method: ForegroundMethod = "reference",
        min_foreground_fraction: float = 0.1,
        foreground_threshold: float = 0.0,
        image_key: str = "image",
    ) -> None:
        self.generators = list(generators)
        if not self.generators:
            raise ValueError("Expected at least one mask generator; found none (use paper_mask_generators()).")
        grids = {tuple(g.grid) for g in self.generators}
        if len(grids) != 1:
            raise ValueError(f"All mask generators must share one token grid; found {sorted(grids)}.")
        self.grid: tuple[int, int, int] = grids.pop()
        self.patch_size = _as_patch(patch_size)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"Expected an int seed; found {seed!r}.")
        self.seed = seed
        self.foreground_aware = bool(foreground_aware)
        if bg_method not in ("reference", "percentile"):
            raise ValueError(f"Expected bg_method 'reference' or 'percentile'; found {bg_method!r}.")
        self.bg_method = bg_method
        self.min_foreground_fraction = float(min_foreground_fraction)
        self.foreground_threshold = float(foreground_threshold)
        self.image_key = image_key
        self._rank: int | None = None
        self._base_step = 0
        self._calls = 0  # batches collated by this copy since the last set_step

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(generators={self.generators}, patch_size={self.patch_size}, seed={self.seed}, "
            f"foreground_aware={self.foreground_aware}, bg_method={self.bg_method!r})"
        )

    # ------------------------------------------------------------ seeding state
    def set_rank(self, rank: int) -> None:
        """Fix the rank used in the seed (overrides the torch.distributed lookup)."""
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"Expected a rank >= 0; found {rank!r}.")
        self._rank = rank

    def set_step(self, step: int) -> None:
        """Make the next batch this collator (or a worker copied from it afterwards) yields be global batch ``step``."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"Expected a global batch index >= 0; found {step!r}.")
        self._base_step = step
        self._calls = 0

    def set_epoch(self, epoch: int, batches_per_epoch: int) -> None:
        """``set_step(epoch * batches_per_epoch)``: for loops that restart the loader every epoch."""
        self.set_step(epoch * batches_per_epoch)

    @property
    def rank(self) -> int:
        """The rank keyed into the seed: explicit, else the initialised process group's, else 0."""
        if self._rank is not None:
            return self._rank
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
        return 0

    def __getstate__(self) -> dict[str, Any]:
        # Spawned workers do not inherit the process group: freeze the pickling process's rank into the copy.
        state = self.__dict__.copy()
        state["_rank"] = self.rank
        return state

    # ------------------------------------------------------------ drawing
    def draw_masks(
        self, batch_size: int, foreground: Tensor | None, *, step: int, rank: int
    ) -> tuple[list[Tensor], list[Tensor]]:
        """The masks of one batch, a pure function of ``(seed, rank, step)`` and the foreground map.

        Args:
            batch_size: B.
            foreground: bool ``[B, N]`` token map handed to the generators, or None.
            step: global batch index.
            rank: distributed rank.

        Returns:
            ``(context_idx, target_idx)``: lists of M int64 tensors ``[B, K]``.
        """
        contexts, targets = [], []
        for stream, mask_generator in enumerate(self.generators):
            generator = make_generator(self.seed, rank=rank, step=step, stream=stream)
            context, target = mask_generator(batch_size, generator, foreground)
            contexts.append(context)
            targets.append(target)
        return contexts, targets

    def _next_step(self) -> int:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self._base_step + self._calls * num_workers + worker
        self._calls += 1
        return step

    def _collate(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if len(samples) == 0:
            raise ValueError("JEPAMaskCollator got an empty batch; check the sampler / drop_last settings.")
        for i, sample in enumerate(samples):
            if not isinstance(sample, Mapping) or self.image_key not in sample:
                found = sorted(sample) if isinstance(sample, Mapping) else type(sample).__name__
                raise ValueError(
                    f"Sample {i} of the batch must be a dict with key {self.image_key!r}; found {found}. The dataset "
                    f"should return MONAI-style dicts such as {{'image': tensor [1, D, H, W], ...}}."
                )
            clash = [k for k in OUTPUT_KEYS if k in sample]
            if clash:
                raise ValueError(f"Sample {i} already has key(s) {clash}, which the collator writes; rename them.")
        batch = list_data_collate(list(samples))
        image = batch[self.image_key]
        image = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
        if image.ndim != 5:
            raise ValueError(f"Expected collated images [B, C, D, H, W]; found shape {list(image.shape)}.")
        spatial = tuple(image.shape[2:])
        grid = tuple(s // p for s, p in zip(spatial, self.patch_size))
        if any(s % p for s, p in zip(spatial, self.patch_size)) or grid != self.grid:
            raise ValueError(
                f"Images of spatial shape {list(spatial)} with patch size {list(self.patch_size)} do not tile the mask "
                f"generators' token grid {list(self.grid)}; crop/resize to "
                f"{[g * p for g, p in zip(self.grid, self.patch_size)]} or build the generators for this grid."
            )
        batch[self.image_key] = image
        return batch

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        batch = self._collate(samples)
        image = batch[self.image_key]
        foreground = foreground_token_map(
            image,
            patch_size=self.patch_size,
            min_fraction=self.min_foreground_fraction,
            method=self.bg_method,
            fallback_threshold=self.foreground_threshold,
        )
        step = self._next_step()
        contexts, targets = self.draw_masks(
            image.shape[0], foreground if self.foreground_aware else None, step=step, rank=self.rank
        )
        batch.update(context_idx=contexts, target_idx=targets, foreground=foreground, mask_step=step)
        return batch
