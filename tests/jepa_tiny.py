"""Tiny JEPA pretraining fixtures shared by tests/modules and tests/callbacks (no files on disk).

Volumes are 32x36x32 with patch 4, i.e. the paper's 8x9x8 = 576-token grid, so the paper's mask generators apply.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from trainers import tiny_trainer as shared_tiny_trainer

from neurojepa_pl.data_modules.collate import JEPAMaskCollator
from neurojepa_pl.masks import paper_mask_generators
from neurojepa_pl.modules.pretrain import JEPAPretrainModule

IMG = (32, 36, 32)
PATCH = 4
TINY_OVERRIDES = {"img_size": list(IMG), "patch_size": PATCH}
TINY_CLI_GEOMETRY = [
    "--data.init_args.spatial_size",
    "[32,36,32]",
    "--data.init_args.resize_to",
    "[34,40,34]",
    "--data.init_args.patch_size",
    str(PATCH),
]
"""``neurojepa fit`` words for the tiny grid: the data geometry only, the CLI gives it to the pretraining model."""


def tiny_module(**kwargs: Any) -> JEPAPretrainModule:
    """The MoE tiny model with short schedules; kwargs override any init arg."""
    args: dict[str, Any] = dict(
        encoder="vit_tiny_moe",
        encoder_overrides=TINY_OVERRIDES,
        predictor="predictor_tiny",
        predictor_overrides={**TINY_OVERRIDES, "encoder_embed_dim": 64},
        warmup_steps=4,
        total_steps=50,
        lr_start=1e-4,
        lr_peak=1e-3,
        mask_figure_every_n_steps=0,
    )
    args.update(kwargs)
    return JEPAPretrainModule(**args)


def blob_volumes(n: int, seed: int) -> list[torch.Tensor]:
    """``n`` brain-like volumes ``[1, 32, 36, 32]``: a bright ellipsoid with random texture on a dark background."""
    g = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in IMG], indexing="ij")
    volumes = []
    for _ in range(n):
        radii = 0.6 + 0.3 * torch.rand(3, generator=g)
        inside = sum((a / r) ** 2 for a, r in zip(axes, radii)) < 1
        texture = torch.rand(IMG, generator=g)
        volumes.append((inside * (0.5 + 0.5 * texture)).float().unsqueeze(0))
    return volumes


class _Volumes(Dataset):
    def __init__(self, volumes: list[torch.Tensor]) -> None:
        self.volumes = volumes

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, Any]:
        epoch, position, i = key
        return {"image": self.volumes[i], "index": i, "sample_key": torch.tensor([epoch, position])}


class EpochPermutation(Sampler[tuple[int, int, int]]):
    """Shuffled order that is a pure function of (seed, epoch), as ``(epoch, position, index)`` keys (the mask
    collator seeds from them); Lightning calls ``set_epoch``."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
        return iter([(self.epoch, position, index) for position, index in enumerate(order.tolist())])

    def __len__(self) -> int:
        return self.n


class TinyJEPAData(pl.LightningDataModule):
    """Random blob volumes + the real mask collator (masks keyed by the batches' sample keys), num_workers=0."""

    def __init__(self, n: int = 8, batch_size: int = 2, seed: int = 0) -> None:
        super().__init__()
        self.volumes = blob_volumes(n, seed)
        self.batch_size = batch_size
        self.seed = seed
        self.collator = JEPAMaskCollator(
            paper_mask_generators((8, 9, 8)),
            batch_size=batch_size,
            batches_per_epoch=n // batch_size,
            patch_size=PATCH,
            seed=seed,
        )

    def train_dataloader(self) -> DataLoader:
        sampler = EpochPermutation(len(self.volumes), self.seed)
        return DataLoader(
            _Volumes(self.volumes),
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self.collator,
            drop_last=True,
            num_workers=0,
        )


def tiny_trainer(tmp_path, **kwargs: Any) -> pl.Trainer:
    """The shared tiny Trainer (tests/trainers.py) with the pretraining tests' fp32, clipping and determinism."""
    args: dict[str, Any] = dict(precision="32", gradient_clip_val=1.0, default_root_dir=tmp_path, deterministic=True)
    args.update(kwargs)
    return shared_tiny_trainer(**args)


def write_tiny_cohort(directory, n_scans: int = 8, seed: int = 0) -> str:
    """``n_scans`` 48x54x48 blob NIfTIs (one T1w scan per subject, all in the train split) and their manifest.

    Returns:
        The manifest path, for ``PretrainDataModule(manifest=...)`` with :data:`TINY_DATA_ARGS`.
    """
    import csv
    from pathlib import Path

    import nibabel as nib
    import numpy as np

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.linspace(-1, 1, s) for s in (48, 54, 48)], indexing="ij")
    rows = []
    for i in range(n_scans):
        radii = rng.uniform(0.6, 0.9, size=3)
        r = np.sqrt(sum((a / rr) ** 2 for a, rr in zip(axes, radii)))
        volume = np.where(r < 1, np.where(r < 0.5, 300.0, 180.0) + 20 * rng.standard_normal(r.shape), 0.0)
        path = directory / f"sub-{i:02d}_T1w.nii.gz"
        nib.save(nib.Nifti1Image(volume.astype(np.float32), np.eye(4)), str(path))
        rows.append(
            {
                "subject_id": f"sub-{i:02d}",
                "session_id": "ses-1",
                "modality": "T1w",
                "path": path.name,
                "split": "train",
            }
        )
    manifest = directory / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(manifest)


TINY_DATA_ARGS = dict(
    spatial_size=list(IMG),
    resize_to=[34, 40, 34],
    pad_crop_size=None,
    target_spacing=None,
    patch_size=PATCH,
    batch_size=2,
    num_workers=0,
)
