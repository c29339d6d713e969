"""JEPA pretraining collation: stack the samples, build the token foreground map, draw masks (docs/method.md §5.3, 6.1).

Seeding: masks are a pure function of the batch's sample keys
------------------------------------------------------------
Every sample carries its ``sample_key`` ``(epoch, position)`` from
:class:`neurojepa_pl.data_modules.base.EpochSampler` (``position``: the place in the epoch's global stream, the same
on every rank; rank ``r`` of ``W`` gets positions ``r, r + W, r + 2W, ...``). A batch of ``B`` consecutive samples of
rank ``r`` therefore starts at position ``r + W * B * b`` for its batch index ``b`` within the epoch, and the collator
reads off

* ``rank = min(position) % W`` and ``batch_in_epoch = min(position) // (W * B)``,
* ``mask_step = epoch * batches_per_epoch + batch_in_epoch``: the global batch index, kept in the batch for logging,

and draws generator ``m``'s masks from ``derive_seed(seed, rank=rank, step=mask_step, stream=m)``. Nothing is counted
or pushed in from outside: the masks are the same for any ``num_workers`` (each worker collates whole batches from
their keys), with ``persistent_workers``, and for a loader that resumes mid-epoch (docs/method.md §5.3). Different
ranks draw different masks (the reference's masks were identical on all ranks, docs/method.md §12.9).

With ``fixed=True`` (validation / test) the epoch is ignored, so every pass over the same (unshuffled) loader draws the
same masks and losses are comparable across epochs.

With ``defer_masks=True`` (``PretrainDataModule(augment_on="device")``) the collator only stacks and validates the
samples and marks the batch with ``masks_pending``; the data module augments the batch on its device and then calls
:meth:`JEPAMaskCollator.add_masks`, the same code that a plain collator runs on CPU, so the foreground map and the
foreground-aware masks are always those of the augmented volumes (docs/method.md §1.4, 6.1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from monai.data import MetaTensor, list_data_collate
from torch import Tensor

from neurojepa_pl.data_modules.datasets import SAMPLE_KEY
from neurojepa_pl.masks.foreground import ForegroundMethod, foreground_token_map
from neurojepa_pl.seeding import make_generator

__all__ = ["MASKS_PENDING", "JEPAMaskCollator", "MaskGenerator", "stack_masks"]

MASKS_PENDING = "masks_pending"
"""Batch field (``True``) of a ``defer_masks`` collator: foreground and masks are still to be added (``add_masks``)."""
OUTPUT_KEYS = ("context_idx", "target_idx", "foreground", "mask_step", MASKS_PENDING)


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
        batch_size: the loader's batch size B (a short last batch keeps the index of its first sample's batch).
        batches_per_epoch: batches per epoch and rank; ``mask_step = epoch * batches_per_epoch + batch_in_epoch``.
        world_size: number of ranks W sharing the epoch's stream (positions ``r, r + W, ...`` on rank ``r``).
        patch_size: patch edge (int) or ``(pD, pH, pW)``; the volume's patch grid must equal every generator's grid.
        seed: base seed of the mask stream.
        fixed: ignore the epoch (validation / test: the same masks at every pass).
        foreground_aware: pass the foreground map to the generators (foreground-first erosion/dilation). The map
            itself is always computed and returned, for the loss and for monitoring.
        bg_method: foreground definition, ``"reference"`` or ``"percentile"`` (see `foreground_token_map`).
        min_foreground_fraction: voxel fraction that makes a token foreground (0.1).
        foreground_threshold: voxel threshold for volumes with degenerate percentiles (0.0).
        image_key: the sample key holding the ``[C, D, H, W]`` image.
        defer_masks: only stack and validate; the batch gets ``masks_pending=True`` instead of the foreground and the
            masks, which :meth:`add_masks` adds later (after augmentation on the device).

    Call:
        ``collator(samples) -> dict``; every sample needs ``image`` and ``sample_key`` (int ``[2]``: epoch,
        position). Returns the collated sample fields (``sample_key`` as int64 ``[B, 2]``) plus

        * ``image``: float ``[B, C, D, H, W]`` (a plain tensor; MONAI metadata is dropped),
        * ``context_idx``: list of M int64 ``[B, K_ctx_m]``,
        * ``target_idx``: list of M int64 ``[B, K_tgt_m]``,
        * ``foreground``: bool ``[B, N]`` token foreground map of the (augmented) batch,
        * ``mask_step``: int, the global batch index the masks were drawn for

        (with ``defer_masks``: the collated fields and ``masks_pending`` only).
    """

    def __init__(
        self,
        generators: Sequence[MaskGenerator],
        *,
        batch_size: int,
        batches_per_epoch: int,
        world_size: int = 1,
        patch_size: int | Sequence[int] = 12,
        seed: int = 0,
        fixed: bool = False,
        foreground_aware: bool = True,
        bg_method: ForegroundMethod = "reference",
        min_foreground_fraction: float = 0.1,
        foreground_threshold: float = 0.0,
        image_key: str = "image",
        defer_masks: bool = False,
    ) -> None:
        self.generators = list(generators)
        if not self.generators:
            raise ValueError("Expected at least one mask generator; found none (use paper_mask_generators()).")
        grids = {tuple(g.grid) for g in self.generators}
        if len(grids) != 1:
            raise ValueError(f"All mask generators must share one token grid; found {sorted(grids)}.")
        self.grid: tuple[int, int, int] = grids.pop()
        self.patch_size = _as_patch(patch_size)
        for name, value in (("seed", seed), ("batch_size", batch_size), ("batches_per_epoch", batches_per_epoch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "seed" else 1):
                raise TypeError(f"Expected an int {name} (>= {0 if name == 'seed' else 1}); found {value!r}.")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"Expected world_size >= 1; found {world_size!r}.")
        self.seed = seed
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.world_size = world_size
        self.fixed = bool(fixed)
        self.foreground_aware = bool(foreground_aware)
        if bg_method not in ("reference", "percentile"):
            raise ValueError(f"Expected bg_method 'reference' or 'percentile'; found {bg_method!r}.")
        self.bg_method = bg_method
        self.min_foreground_fraction = float(min_foreground_fraction)
        self.foreground_threshold = float(foreground_threshold)
        self.image_key = image_key
        self.defer_masks = bool(defer_masks)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(generators={self.generators}, patch_size={self.patch_size}, seed={self.seed}, "
            f"batch_size={self.batch_size}, world_size={self.world_size}, fixed={self.fixed}, "
            f"foreground_aware={self.foreground_aware}, bg_method={self.bg_method!r}, defer_masks={self.defer_masks})"
        )

    # ------------------------------------------------------------ seeding
    def batch_coordinates(self, keys: Tensor) -> tuple[int, int]:
        """``(rank, mask_step)`` of a batch from its samples' ``(epoch, position)`` keys ``[B, 2]``.

        Raises:
            ValueError: if the keys do not come from one epoch and one rank's stream.
        """
        keys = torch.as_tensor(keys, dtype=torch.int64).reshape(-1, 2)
        epochs, positions = keys[:, 0], keys[:, 1]
        ranks = positions % self.world_size
        if bool((epochs != epochs[0]).any()) or bool((ranks != ranks[0]).any()):
            raise ValueError(
                f"A batch must hold samples of one epoch and one rank's stream; found keys {keys.tolist()} with "
                f"world_size={self.world_size}. Use EpochSampler (not a custom sampler) for the pretraining loader."
            )
        first = int(positions.min())
        epoch = 0 if self.fixed else int(epochs[0])
        batch_in_epoch = first // (self.world_size * self.batch_size)
        return int(ranks[0]), epoch * self.batches_per_epoch + batch_in_epoch

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

    def _collate(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if len(samples) == 0:
            raise ValueError("JEPAMaskCollator got an empty batch; check the sampler / drop_last settings.")
        for i, sample in enumerate(samples):
            if not isinstance(sample, Mapping) or self.image_key not in sample or SAMPLE_KEY not in sample:
                found = sorted(sample) if isinstance(sample, Mapping) else type(sample).__name__
                raise ValueError(
                    f"Sample {i} of the batch must be a dict with keys {self.image_key!r} and {SAMPLE_KEY!r}; found "
                    f"{found}. The dataset should return MONAI-style dicts such as {{'image': tensor [1, D, H, W], "
                    f"'sample_key': tensor([epoch, position])}} (MRIScanDataset with emit_sample_key=True)."
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
        key = batch[SAMPLE_KEY]
        batch[SAMPLE_KEY] = (key.as_tensor() if isinstance(key, MetaTensor) else torch.as_tensor(key)).long()
        return batch

    def add_masks(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Add the foreground map and the masks of a collated batch, on the device of its image.

        Args:
            batch: a collated batch with ``image`` ``[B, C, D, H, W]`` (any device) and ``sample_key`` ``[B, 2]``;
                ``masks_pending`` is removed.

        Returns:
            ``batch`` (updated in place) with ``foreground`` bool ``[B, N]``, ``context_idx`` / ``target_idx`` (M x
            int64 ``[B, K]``), all on the image's device, and ``mask_step``. The masks are drawn on CPU, so they are
            the same whatever the device.
        """
        batch.pop(MASKS_PENDING, None)
        image = batch[self.image_key]
        foreground = foreground_token_map(
            image,
            patch_size=self.patch_size,
            min_fraction=self.min_foreground_fraction,
            method=self.bg_method,
            fallback_threshold=self.foreground_threshold,
        )
        rank, step = self.batch_coordinates(batch[SAMPLE_KEY])
        contexts, targets = self.draw_masks(
            image.shape[0], foreground.cpu() if self.foreground_aware else None, step=step, rank=rank
        )
        device = image.device
        if device.type != "cpu":  # the generators draw on CPU; the training step wants the masks beside the image
            contexts = [c.to(device, non_blocking=True) for c in contexts]
            targets = [t.to(device, non_blocking=True) for t in targets]
        batch.update(context_idx=contexts, target_idx=targets, foreground=foreground, mask_step=step)
        return batch

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        batch = self._collate(samples)
        if self.defer_masks:
            batch[MASKS_PENDING] = True
            return batch
        return self.add_masks(batch)
