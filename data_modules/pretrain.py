"""JEPA pretraining data module: T1w/T2w/FLAIR from one manifest, docs/method.md §1.4 augmentation, mask collation.

Data stream: sample order is a pure function of ``(seed, epoch)``, each sample's augmentation of ``(seed, epoch,
position)`` and each batch's masks of its samples' ``(epoch, position)`` keys (batch ``i`` of epoch ``e`` gets mask step
``e * batches_per_epoch + i``; :mod:`neurojepa_pl.data_modules.collate`). The training loader is a
``torchdata`` ``StatefulDataLoader``: Lightning saves its position in every checkpoint and a run resumed mid-epoch
(``--ckpt_path``) continues with the next batch, exactly (docs/method.md §5.3).

Where the docs/method.md §1.4 augmentation runs (``augment_on``):

* ``"device"`` (default): the loader workers only read and centre-crop (:func:`neurojepa_pl.data.transforms.
  pretrain_crop`) and the collator only stacks (``defer_masks``); after Lightning has moved a training batch to its
  device, :meth:`PretrainDataModule.on_after_batch_transfer` augments it there with
  :class:`neurojepa_pl.data_modules.gpu_augment.BatchedAugment` (each sample seeded from ``(seed, epoch, position)``
  on its own stream, :func:`neurojepa_pl.data_modules.gpu_augment.augment_generator`) and then adds the foreground
  map and masks with the collator's own :meth:`~neurojepa_pl.data_modules.collate.JEPAMaskCollator.add_masks`.
* ``"workers"``: MONAI's per-sample chain (:func:`neurojepa_pl.data.transforms.pretrain_augmentations`) in the loader
  workers, seeded by :func:`neurojepa_pl.data.transforms.augmentation_seed`; the collator adds foreground and masks.

Both draw the same distributions (``tests/data_modules/test_device_augment.py`` compares them), not the same numbers.
Validation and test batches are never augmented and keep the collator's fixed masks in both modes.
"""

from __future__ import annotations

import logging
from typing import Any

from monai.transforms import Compose
from torch.utils.data import DataLoader

from neurojepa_pl.config_specs import PAPER_MASKING, MaskingSpec
from neurojepa_pl.data.subsets import check_fraction, patient_subset
from neurojepa_pl.data.transforms import eval_transforms, pretrain_augmentations, pretrain_crop
from neurojepa_pl.data_modules.base import EpochSampler, MRIDataModule
from neurojepa_pl.data_modules.collate import MASKS_PENDING
from neurojepa_pl.data_modules.datasets import SAMPLE_KEY
from neurojepa_pl.errors import UserValueError

log = logging.getLogger(__name__)

MASKINGS = ("multiscale", "vjepa2")
"""The masking presets (neurojepa_pl/masks/presets.py); ``masking`` also takes a list of generators."""
PAPER_MASK_RATIO = 0.75
CACHES = ("persistent", "shards")
SHARD_DTYPES = ("uint16", "uint8", "float16")  # data_modules/shards.py (imported lazily: it is only for cache=shards)
AUGMENT_ON = ("device", "workers")
"""Where the training augmentation runs: batched on the batch's device, or per sample in the loader workers."""


class PretrainDataModule(MRIDataModule):
    """All modalities mixed (no modality input to the model, docs/method.md §1.6), batches collated with JEPA masks.

    Args (in addition to :class:`neurojepa_pl.data_modules.base.MRIDataModule`'s):
        masking: ``"multiscale"`` (the paper's three generators), ``"vjepa2"`` (ablation), or a list of generators
            (``kind`` plus settings); ``--print_config``, the saved ``config.yaml`` and ``hparams["masking"]`` hold
            every generator with its settings (:func:`neurojepa_pl.masks.presets.masking_spec`, docs/method.md §5.1).
        patch_size: patch edge; ``spatial_size`` must be a multiple of it.
        mask_ratio: target share of the multiscale generators (0.75 in the paper).
        foreground_aware: foreground-first erosion/dilation of the masks (docs/method.md §6.1).
        use_all_for_pretraining: train on every row regardless of ``split`` (then there is no val loader).
        cache: where the deterministic chain's output is kept: ``"persistent"`` (default; MONAI ``PersistentDataset``,
            one float32 file per scan under ``cache_dir``: simple, for up to ~10^4 scans) or ``"shards"`` (LitData
            chunk files under ``cache_dir``, built on first use or by ``neurojepa build-cache``; for archives, see
            :mod:`neurojepa_pl.data_modules.shards`).
        shard_dtype: stored dtype of ``cache="shards"``: ``uint16`` (default, error ~1e-5), ``uint8``, ``float16``.
        subset_fraction: pretrain on this share of the training patients (all their scans; the data-fraction
            ablation, experiments/ablations/data_fraction_*.yaml); the subsets of one ``subset_seed`` are nested
            (:func:`neurojepa_pl.data.subsets.patient_subset`). Validation rows are kept whole.
        subset_seed: seed of the patient ranking behind ``subset_fraction``.
        augment_on: ``"device"`` (default): the training augmentation runs batched on the batch's device after the
            transfer, then the foreground map and masks are drawn (:meth:`on_after_batch_transfer`; needs
            ``trainer.fit(..., datamodule=dm)``, which every ``neurojepa fit`` run does); ``"workers"``: MONAI's
            per-sample chain in the loader workers (the only behaviour before ``augment_on`` existed). On CPU the
            batched code is ~4x cheaper per scan than MONAI and fits are no slower (docs/data_notes.md §3 (f)).

    Batches: dicts with ``image`` ``[B, 1, D, H, W]``, metadata lists (``subject_id``, ``path``, ...) and the
    collator's ``context_idx`` / ``target_idx`` (lists of M ``[B, K]``), ``foreground`` ``[B, N]`` bool, ``mask_step``.
    With ``augment_on="device"`` the training loader's batches hold the cropped, unaugmented images and
    ``masks_pending=True`` instead; :meth:`on_after_batch_transfer` turns them into the above (call it yourself when
    iterating the loader outside a Trainer).
    """

    def __init__(
        self,
        manifest: str,
        masking: MaskingSpec = PAPER_MASKING,
        patch_size: int = 12,
        mask_ratio: float = 0.75,
        foreground_aware: bool = True,
        use_all_for_pretraining: bool = False,
        cache: str = "persistent",
        shard_dtype: str = "uint16",
        subset_fraction: float = 1.0,
        subset_seed: int = 0,
        augment_on: str = "device",
        **kwargs: Any,
    ):
        # The base class's save_hyperparameters() records this __init__'s arguments too (Lightning walks the
        # chain of __init__ frames), so it must not be called again here.
        super().__init__(manifest=manifest, **kwargs)
        if cache not in CACHES:  # shard cache selection (issue 14); the reader is data_modules/shards.py
            raise UserValueError(f"cache must be one of {CACHES}; found {cache!r}.", "use persistent or shards.")
        if shard_dtype not in SHARD_DTYPES:
            raise UserValueError(f"shard_dtype must be one of {SHARD_DTYPES}; found {shard_dtype!r}.", "use uint16.")
        if augment_on not in AUGMENT_ON:
            raise UserValueError(
                f"augment_on must be one of {AUGMENT_ON}; found {augment_on!r}.",
                "set data.init_args.augment_on to device (batched on the training device, the default) or workers "
                "(MONAI per sample in the loader workers).",
            )
        check_fraction(subset_fraction)
        try:
            masking = MaskingSpec(masking)
        except (ValueError, TypeError) as err:
            raise UserValueError(
                str(err), f"use one of {MASKINGS} or a list of generators (docs/method.md §5.1)."
            ) from err
        # The full spec, as a plain dict (checkpoints are read back with weights_only=True).
        self.hparams["masking"] = masking.to_dict()
        kinds = {generator["kind"] for generator in self.hparams["masking"]["generators"]}
        if "multiscale" not in kinds and mask_ratio != PAPER_MASK_RATIO:
            raise UserValueError(
                "mask_ratio only applies to the multiscale masks.", "leave it at 0.75 with masking='vjepa2'."
            )
        if any(s % patch_size for s in self.settings.spatial_size):
            raise UserValueError(
                f"spatial_size {self.settings.spatial_size} is not a multiple of patch_size {patch_size}; the token "
                "grid must tile the volume exactly.",
                "choose a spatial_size whose three sides divide by patch_size (the paper: 96x108x96 with patch 12).",
            )
        self.grid = tuple(s // patch_size for s in self.settings.spatial_size)
        self.train_collator = None
        self.train_sampler: EpochSampler | None = None
        self._resume_epoch = 0  # the sampler's epoch when the loader is (re)built: from the checkpoint on resume
        self.device_augment = None
        if augment_on == "device":
            from neurojepa_pl.data_modules.gpu_augment import BatchedAugment

            # No crop here: the workers' pretrain_crop already gives spatial_size (docs/method.md §1.4, step 2).
            self.device_augment = BatchedAugment("pretrain")

    # ------------------------------------------------------------------ choices of the base module
    def split_frame(self, df, split):
        if self.hparams.use_all_for_pretraining:
            rows = df if split == "train" else df.iloc[0:0]
        else:
            rows = super().split_frame(df, split)
        if split == "train" and self.hparams.subset_fraction < 1.0:
            rows = patient_subset(rows, self.hparams.subset_fraction, self.hparams.subset_seed)
        return rows

    def build_dataset(self, split: str):
        # ---- cache: shards (issue 14) reads the chain's output from LitData shards; the rest is the base's
        if self.hparams.cache == "shards":
            from neurojepa_pl.data_modules.shards import shard_split_dataset

            dataset = shard_split_dataset(self, split)
        else:
            dataset = super().build_dataset(split)
        if dataset is not None:
            dataset.emit_sample_key = True  # the collator seeds each batch's masks from its samples' keys
        return dataset

    def augmentation(self, split: str) -> Compose:
        if split != "train":
            return eval_transforms(self.settings)
        if self.hparams.augment_on == "device":
            return pretrain_crop(self.settings)  # the random part runs in on_after_batch_transfer
        return pretrain_augmentations(self.settings)

    # ------------------------------------------------------------------ masks
    def mask_generators(self) -> list:
        """The mask generators of ``masking`` on this grid, with the run's mask ratio and foreground flag."""
        from neurojepa_pl.masks.presets import build_mask_generators

        return build_mask_generators(
            self.hparams.masking, self.grid, self.hparams.mask_ratio, self.hparams.foreground_aware
        )

    def make_collator(
        self, seed: int, sampler: EpochSampler, drop_last: bool, fixed: bool = False, defer_masks: bool = False
    ):
        """The mask collator of a loader over ``sampler`` (``fixed``: the same masks at every pass; ``defer_masks``:
        stack only, :meth:`on_after_batch_transfer` adds foreground and masks after the device augmentation)."""
        from neurojepa_pl.data_modules.collate import JEPAMaskCollator

        return JEPAMaskCollator(
            self.mask_generators(),
            batch_size=self.hparams.batch_size,
            batches_per_epoch=max(1, self.batches_per_epoch(sampler.num_samples, drop_last=drop_last)),
            world_size=sampler.num_replicas,
            patch_size=self.hparams.patch_size,
            seed=seed,
            fixed=fixed,
            foreground_aware=self.hparams.foreground_aware,
            defer_masks=defer_masks,
        )

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        dataset = self._require("train")
        world, rank = self._world()
        self.train_sampler = EpochSampler(
            len(dataset), seed=self.hparams.seed, shuffle=True, num_replicas=world, rank=rank, drop_last=False
        )
        if self.train_sampler.num_samples < self.hparams.batch_size:
            raise UserValueError(
                f"the training split has {len(dataset)} scan(s), {self.train_sampler.num_samples} per rank, fewer than "
                f"batch_size={self.hparams.batch_size}; with drop_last=True there would be no batch.",
                "lower data.init_args.batch_size or add scans.",
            )
        # The checkpoint's epoch on resume (Lightning sets it again at every epoch start, before the first batch is
        # drawn; this covers loops that do not); a mid-epoch position is the loader's own state (fit loop's state).
        self.train_sampler.set_epoch(self._resume_epoch)
        self.train_collator = self.make_collator(
            self.hparams.seed, self.train_sampler, drop_last=True, defer_masks=self.device_augment is not None
        )
        return self.make_loader(
            dataset, self.train_sampler, collate_fn=self.train_collator, drop_last=True, stateful=True
        )

    @property
    def batches_per_train_epoch(self) -> int:
        if self.train_sampler is None:
            raise RuntimeError("train_dataloader() has not been built yet.")
        return self.batches_per_epoch(self.train_sampler.num_samples, drop_last=True)

    def val_dataloader(self) -> DataLoader | list:
        if "val" not in self.datasets:
            log.info("no validation split: pretraining without a val loader")
            return []
        dataset = self.datasets["val"]
        return self._fixed_mask_loader(dataset)

    def test_dataloader(self) -> DataLoader:
        return self._fixed_mask_loader(self._require("test"))

    def _fixed_mask_loader(self, dataset) -> DataLoader:
        # A fixed seed (not the training stream), an unshuffled sampler and the epoch ignored: the same masks at every
        # pass, so val/test losses are comparable across epochs.
        sampler = self.eval_sampler(dataset)
        collator = self.make_collator(self.hparams.seed + 1, sampler, drop_last=False, fixed=True)
        return self.make_loader(dataset, sampler, collate_fn=collator, drop_last=False)

    # ------------------------------------------------------------------ augmentation on the device
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Augment a pending training batch on its device, then add its foreground map and masks.

        Lightning (2.6, ``_DataHookSelector``) calls the data module's hook on every batch after
        ``transfer_batch_to_device``, when the Trainer was given ``datamodule=``; this override takes precedence over a
        LightningModule's own ``on_after_batch_transfer`` (Lightning warns then). Only batches of the
        ``augment_on="device"`` training collator (``masks_pending``) are changed: validation / test / predict batches
        and every ``augment_on="workers"`` batch pass through untouched.

        Args:
            batch: the collated batch, ``image`` ``[B, 1, D, H, W]`` on the training device.
            dataloader_idx: unused.

        Returns:
            The batch with the augmented ``image`` (sample ``b`` a pure function of ``(seed, sample_key[b])``,
            docs/method.md §1.4) and ``foreground`` / ``context_idx`` / ``target_idx`` (on the image's device) /
            ``mask_step`` computed from it, exactly as the collator computes them (docs/method.md §5.3, 6.1).
        """
        if not isinstance(batch, dict) or not batch.get(MASKS_PENDING, False):
            return batch
        if self.device_augment is None or self.train_collator is None:
            raise RuntimeError(
                "got a batch with masks_pending but this data module has no device augmentation or train collator; "
                "build the batch with this module's train_dataloader() (augment_on='device')."
            )
        batch["image"] = self.device_augment.augment_keys(batch["image"], batch[SAMPLE_KEY], int(self.hparams.seed))
        return self.train_collator.add_masks(batch)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Saved in Lightning checkpoints: the epoch the sampler resumes in, the seed of the stream and where it was
        augmented (``augment_on``: the two settings draw different numbers).

        The position within the epoch is the training loader's own state (``StatefulDataLoader.state_dict``, saved by
        Lightning's fit loop); ``global_step`` is informative.
        """
        if self.trainer is not None:
            step, epoch = int(self.trainer.global_step), int(self.trainer.current_epoch)
        else:
            step, epoch = 0, self._resume_epoch
        return {
            "global_step": step,
            "epoch": epoch,
            "seed": int(self.hparams.seed),
            "augment_on": self.hparams.augment_on,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if int(state_dict.get("seed", self.hparams.seed)) != int(self.hparams.seed):
            log.warning(
                "resuming with seed %s but the checkpoint's data stream used seed %s: samples and masks will differ",
                self.hparams.seed,
                state_dict["seed"],
            )
        # Checkpoints written before augment_on existed augmented in the workers.
        saved = state_dict.get("augment_on", "workers")
        if saved != self.hparams.augment_on:
            log.warning(
                "resuming with augment_on=%s but the checkpoint's data stream used augment_on=%s: the augmentations "
                "(and so the foreground-aware masks) will differ from the interrupted run's; set "
                "data.init_args.augment_on: %s to continue it exactly",
                self.hparams.augment_on,
                saved,
                saved,
            )
        self._resume_epoch = int(state_dict.get("epoch", 0))
        if self.train_sampler is not None:
            self.train_sampler.set_epoch(self._resume_epoch)
