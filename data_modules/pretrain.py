"""JEPA pretraining data module: T1w/T2w/FLAIR from one manifest, docs/method.md §1.4 augmentation, mask collation.

Data stream: sample order is a pure function of ``(seed, epoch)``, each sample's augmentation of ``(seed, epoch,
position)`` and each batch's masks of its samples' ``(epoch, position)`` keys (batch ``i`` of epoch ``e`` gets mask step
``e * batches_per_epoch + i``; :mod:`neurojepa_pl.data_modules.collate`). The training loader is a
``torchdata`` ``StatefulDataLoader``: Lightning saves its position in every checkpoint and a run resumed mid-epoch
(``--ckpt_path``) continues with the next batch, exactly (docs/method.md §5.3).
"""

from __future__ import annotations

import logging
from typing import Any

from monai.transforms import Compose
from torch.utils.data import DataLoader

from neurojepa_pl.config_specs import PAPER_MASKING, MaskingSpec
from neurojepa_pl.data.subsets import check_fraction, patient_subset
from neurojepa_pl.data.transforms import eval_transforms, pretrain_augmentations
from neurojepa_pl.data_modules.base import EpochSampler, MRIDataModule
from neurojepa_pl.errors import UserValueError

log = logging.getLogger(__name__)

MASKINGS = ("multiscale", "vjepa2")
"""The masking presets (neurojepa_pl/masks/presets.py); ``masking`` also takes a list of generators."""
PAPER_MASK_RATIO = 0.75
CACHES = ("persistent", "shards")
SHARD_DTYPES = ("uint16", "uint8", "float16")  # data_modules/shards.py (imported lazily: it is only for cache=shards)


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

    Batches: dicts with ``image`` ``[B, 1, D, H, W]``, metadata lists (``subject_id``, ``path``, ...) and the
    collator's ``context_idx`` / ``target_idx`` (lists of M ``[B, K]``), ``foreground`` ``[B, N]`` bool, ``mask_step``.
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
        **kwargs: Any,
    ):
        # The base class's save_hyperparameters() records this __init__'s arguments too (Lightning walks the
        # chain of __init__ frames), so it must not be called again here.
        super().__init__(manifest=manifest, **kwargs)
        if cache not in CACHES:  # shard cache selection (issue 14); the reader is data_modules/shards.py
            raise UserValueError(f"cache must be one of {CACHES}; found {cache!r}.", "use persistent or shards.")
        if shard_dtype not in SHARD_DTYPES:
            raise UserValueError(f"shard_dtype must be one of {SHARD_DTYPES}; found {shard_dtype!r}.", "use uint16.")
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
        return pretrain_augmentations(self.settings) if split == "train" else eval_transforms(self.settings)

    # ------------------------------------------------------------------ masks
    def mask_generators(self) -> list:
        """The mask generators of ``masking`` on this grid, with the run's mask ratio and foreground flag."""
        from neurojepa_pl.masks.presets import build_mask_generators

        return build_mask_generators(
            self.hparams.masking, self.grid, self.hparams.mask_ratio, self.hparams.foreground_aware
        )

    def make_collator(self, seed: int, sampler: EpochSampler, drop_last: bool, fixed: bool = False):
        """The mask collator of a loader over ``sampler`` (``fixed``: the same masks at every pass)."""
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
        self.train_collator = self.make_collator(self.hparams.seed, self.train_sampler, drop_last=True)
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

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Saved in Lightning checkpoints: the epoch the sampler resumes in and the seed of the stream.

        The position within the epoch is the training loader's own state (``StatefulDataLoader.state_dict``, saved by
        Lightning's fit loop); ``global_step`` is informative.
        """
        if self.trainer is not None:
            step, epoch = int(self.trainer.global_step), int(self.trainer.current_epoch)
        else:
            step, epoch = 0, self._resume_epoch
        return {"global_step": step, "epoch": epoch, "seed": int(self.hparams.seed)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if int(state_dict.get("seed", self.hparams.seed)) != int(self.hparams.seed):
            log.warning(
                "resuming with seed %s but the checkpoint's data stream used seed %s: samples and masks will differ",
                self.hparams.seed,
                state_dict["seed"],
            )
        self._resume_epoch = int(state_dict.get("epoch", 0))
        if self.train_sampler is not None:
            self.train_sampler.set_epoch(self._resume_epoch)
