"""JEPA pretraining data module: T1w/T2w/FLAIR from one manifest, docs/method.md §1.4 augmentation, mask collation.

Mask stream: batch ``i`` of epoch ``e`` gets mask step ``e * batches_per_epoch + i``. The sampler's ``set_epoch`` (which
Lightning calls at every epoch start, before the loader's workers are created) moves the collator there, so masks,
like sample order and augmentation, are a pure function of ``(seed, rank, epoch, batch)`` and a resumed run redraws
them exactly.
"""

from __future__ import annotations

import logging
from typing import Any

from monai.transforms import Compose
from torch.utils.data import DataLoader

from neurojepa_pl.data.transforms import eval_transforms, pretrain_augmentations
from neurojepa_pl.data_modules.base import EpochSampler, MRIDataModule

log = logging.getLogger(__name__)

MASKINGS = ("multiscale", "vjepa2")
PAPER_MASK_RATIO = 0.75


class PretrainDataModule(MRIDataModule):
    """All modalities mixed (no modality input to the model, docs/method.md §1.6), batches collated with JEPA masks.

    Args (in addition to :class:`neurojepa_pl.data_modules.base.MRIDataModule`'s):
        masking: ``"multiscale"`` (the paper's three generators) or ``"vjepa2"`` (ablation).
        patch_size: patch edge; ``spatial_size`` must be a multiple of it.
        mask_ratio: target share of the multiscale generators (0.75 in the paper).
        foreground_aware: foreground-first erosion/dilation of the masks (docs/method.md §6.1).
        use_all_for_pretraining: train on every row regardless of ``split`` (then there is no val loader).

    Batches: dicts with ``image`` ``[B, 1, D, H, W]``, metadata lists (``subject_id``, ``path``, ...) and the
    collator's ``context_idx`` / ``target_idx`` (lists of M ``[B, K]``), ``foreground`` ``[B, N]`` bool, ``mask_step``.
    """

    def __init__(
        self,
        manifest: str,
        masking: str = "multiscale",
        patch_size: int = 12,
        mask_ratio: float = 0.75,
        foreground_aware: bool = True,
        use_all_for_pretraining: bool = False,
        **kwargs: Any,
    ):
        # The base class's save_hyperparameters() records this __init__'s arguments too (Lightning walks the
        # chain of __init__ frames), so it must not be called again here.
        super().__init__(manifest=manifest, **kwargs)
        if masking not in MASKINGS:
            raise ValueError(f"masking must be one of {MASKINGS}; found {masking!r}.")
        if masking == "vjepa2" and mask_ratio != PAPER_MASK_RATIO:
            raise ValueError("mask_ratio only applies to the multiscale masks; leave it at 0.75 with masking='vjepa2'.")
        if any(s % patch_size for s in self.settings.spatial_size):
            raise ValueError(
                f"spatial_size {self.settings.spatial_size} is not a multiple of patch_size {patch_size}; the token "
                "grid must tile the volume exactly."
            )
        self.grid = tuple(s // patch_size for s in self.settings.spatial_size)
        self.train_collator = None
        self.train_sampler: EpochSampler | None = None
        self._resume_step = 0
        self._resume_epoch = 0

    # ------------------------------------------------------------------ choices of the base module
    def split_frame(self, df, split):
        if self.hparams.use_all_for_pretraining:
            return df if split == "train" else df.iloc[0:0]
        return super().split_frame(df, split)

    def augmentation(self, split: str) -> Compose:
        return pretrain_augmentations(self.settings) if split == "train" else eval_transforms(self.settings)

    # ------------------------------------------------------------------ masks
    def mask_generators(self) -> list:
        """The mask generators for this grid (imported lazily: the masks package is only needed for pretraining)."""
        from neurojepa_pl.masks import MultiscaleBlockMaskGenerator, paper_mask_generators, vjepa2_mask_generators

        if self.hparams.masking == "vjepa2":
            return vjepa2_mask_generators(self.grid)
        generators = paper_mask_generators(self.grid, foreground_aware=self.hparams.foreground_aware)
        if self.hparams.mask_ratio == PAPER_MASK_RATIO:
            return generators
        return [
            MultiscaleBlockMaskGenerator(
                g.grid,
                num_blocks=g.num_blocks,
                spatial_scale=g.spatial_scale,
                depth_scale=g.depth_scale,
                aspect_ratio=g.aspect_ratio,
                mask_ratio=self.hparams.mask_ratio,
                foreground_aware=g.foreground_aware,
            )
            for g in generators
        ]

    def make_collator(self, seed: int):
        from neurojepa_pl.data_modules.collate import JEPAMaskCollator

        return JEPAMaskCollator(
            self.mask_generators(),
            patch_size=self.hparams.patch_size,
            seed=seed,
            foreground_aware=self.hparams.foreground_aware,
        )

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        dataset = self._require("train")
        world, rank = self._world()
        self.train_collator = self.make_collator(self.hparams.seed)
        self.train_sampler = EpochSampler(
            len(dataset), seed=self.hparams.seed, shuffle=True, num_replicas=world, rank=rank, drop_last=False
        )
        if self.train_sampler.num_samples < self.hparams.batch_size:
            raise ValueError(
                f"the training split has {len(dataset)} scan(s), {self.train_sampler.num_samples} per rank, fewer than "
                f"batch_size={self.hparams.batch_size}; with drop_last=True there would be no batch. Lower the batch "
                "size or add scans."
            )
        self.train_sampler.on_set_epoch = self._on_train_epoch
        self.train_sampler.set_epoch(self._resume_epoch)
        return self.make_loader(dataset, self.train_sampler, collate_fn=self.train_collator, drop_last=True)

    @property
    def batches_per_train_epoch(self) -> int:
        if self.train_sampler is None:
            raise RuntimeError("train_dataloader() has not been built yet.")
        return self.batches_per_epoch(self.train_sampler.num_samples, drop_last=True)

    def _on_train_epoch(self, epoch: int) -> None:
        self._resume_epoch = epoch
        if self.train_collator is not None:
            self.train_collator.set_step(epoch * self.batches_per_train_epoch)

    def val_dataloader(self) -> DataLoader | list:
        if "val" not in self.datasets:
            log.info("no validation split: pretraining without a val loader")
            return []
        dataset = self.datasets["val"]
        return self._fixed_mask_loader(dataset)

    def test_dataloader(self) -> DataLoader:
        return self._fixed_mask_loader(self._require("test"))

    def _fixed_mask_loader(self, dataset) -> DataLoader:
        # A fixed seed (not the training stream) and step 0 at every pass: the same masks every time, so val/test
        # losses are comparable across epochs. Worker copies of the collator start from the main-process copy,
        # whose step stays 0; with num_workers=0 the reset at each iteration does the same.
        collator = self.make_collator(self.hparams.seed + 1)
        sampler = self.eval_sampler(dataset)
        sampler.on_set_epoch = sampler.on_iter = lambda _epoch: collator.set_step(0)
        return self.make_loader(dataset, sampler, collate_fn=collator, drop_last=False)

    # ------------------------------------------------------------------ resume
    def set_resume_step(self, global_step: int) -> None:
        """Continue the mask stream at ``global_step`` (called by the training module on resume).

        Sets the collator's next step now (for loops that do not call ``set_epoch``); with Lightning, the next
        ``set_epoch`` puts it at ``epoch * batches_per_epoch``, which is the same batch when resuming at an epoch
        boundary with one batch per optimizer step.
        """
        if global_step < 0:
            raise ValueError(f"global_step must be >= 0; found {global_step}.")
        self._resume_step = int(global_step)
        if self.train_collator is not None:
            self.train_collator.set_step(self._resume_step)

    def state_dict(self) -> dict[str, Any]:
        """Saved in Lightning checkpoints: the sampling/mask position and the seed it belongs to."""
        if self.trainer is not None:
            step, epoch = int(self.trainer.global_step), int(self.trainer.current_epoch)
        else:
            step, epoch = self._resume_step, self._resume_epoch
        return {"global_step": step, "epoch": epoch, "seed": int(self.hparams.seed)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if int(state_dict.get("seed", self.hparams.seed)) != int(self.hparams.seed):
            log.warning(
                "resuming with seed %s but the checkpoint's data stream used seed %s: samples and masks will differ",
                self.hparams.seed,
                state_dict["seed"],
            )
        self._resume_epoch = int(state_dict.get("epoch", 0))
        self.set_resume_step(int(state_dict.get("global_step", 0)))
        if self.train_sampler is not None:
            self.train_sampler.set_epoch(self._resume_epoch)
