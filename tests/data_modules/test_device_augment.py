"""PretrainDataModule(augment_on="device"): per-sample seeding, the MONAI chain's distributions, foreground and masks
after the augmentation, a real Trainer.fit (docs/method.md §1.4, 5.3, 6.1)."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from jepa_tiny import tiny_module
from jepa_tiny import tiny_trainer as jepa_trainer
from scipy.stats import ks_2samp
from volume_factory import TINY_CROP, TINY_PATCH, make_cohort, write_manifest, write_nifti

from neurojepa_pl.data.transforms import (
    TransformSettings,
    augmentation_seed,
    pretrain_augmentations,
    pretrain_crop,
    seed_augmentation,
)
from neurojepa_pl.data_modules.collate import MASKS_PENDING
from neurojepa_pl.data_modules.gpu_augment import AugmentParameters, BatchedAugment, augment_generator
from neurojepa_pl.data_modules.pretrain import PretrainDataModule
from neurojepa_pl.errors import UserValueError
from neurojepa_pl.masks import foreground_token_map
from neurojepa_pl.seeding import derive_seed

ALWAYS = dict(flip_prob=0.5, bias_field_prob=1.0, contrast_prob=1.0, noise_prob=1.0, shift_prob=1.0)
FLIPS_ONLY = dict(flip_prob=1.0, bias_field_prob=0.0, contrast_prob=0.0, noise_prob=0.0, shift_prob=0.0)
GRID = tuple(s // TINY_PATCH for s in TINY_CROP)  # (8, 9, 8)


def _images(n: int, shape=(12, 10, 8), seed: int = 0) -> torch.Tensor:
    return torch.rand((n, 1, *shape), generator=torch.Generator().manual_seed(seed))


def _masks(batch: dict) -> list[torch.Tensor]:
    return [*batch["context_idx"], *batch["target_idx"]]


def _wedge(shape=(48, 54, 48), seed: int = 0) -> np.ndarray:
    """A brain-like volume whose shape has no mirror symmetry: the corner x + 0.8 y + 0.6 z < 1.4 of the unit cube, so
    every flip changes the token foreground map."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(0.0, 1.0, s) for s in shape], indexing="ij")
    inside = x + 0.8 * y + 0.6 * z < 1.4
    tissue = 200.0 + 20.0 * rng.standard_normal(shape)
    return np.where(inside, np.clip(tissue, 1.0, None), 0.0).astype(np.float32)


@pytest.fixture(scope="module")
def wedge_cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("wedges")
    rows = []
    for s in range(6):
        rel = f"sub-{s:03d}_T1w.nii.gz"
        write_nifti(root / rel, _wedge(seed=s))
        split = "train" if s < 4 else ("val" if s == 4 else "test")
        rows.append({"subject_id": f"{s:03d}", "session_id": "ses-0", "modality": "T1w", "path": rel, "split": split})
    return write_manifest(root / "manifest.csv", rows)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("blobs"), n_subjects=10)  # 6 train scans, 2 val, 2 test


def _dm(manifest, kwargs, **extra) -> PretrainDataModule:
    dm = PretrainDataModule(str(manifest), patch_size=TINY_PATCH, **{**kwargs, **extra})
    dm.setup("fit")
    return dm


def _epoch(dm: PretrainDataModule) -> list[dict]:
    return [dm.on_after_batch_transfer(batch, 0) for batch in dm.train_dataloader()]


# ---------------------------------------------------------------------------------------------------- per-key seeding
def test_augment_on_is_validated(cohort, tiny_dm_kwargs):
    with pytest.raises(UserValueError, match="augment_on must be one of") as err:
        PretrainDataModule(str(cohort), patch_size=TINY_PATCH, augment_on="gpu", **tiny_dm_kwargs)
    assert "data.init_args.augment_on" in err.value.fix and "workers" in err.value.fix


def test_resuming_a_stream_augmented_elsewhere_warns(cohort, tiny_dm_kwargs, caplog):
    dm = PretrainDataModule(str(cohort), patch_size=TINY_PATCH, **tiny_dm_kwargs)
    assert dm.state_dict()["augment_on"] == "device"
    with caplog.at_level("WARNING", logger="neurojepa_pl.data_modules.pretrain"):
        dm.load_state_dict({"global_step": 4, "epoch": 1, "seed": 0, "augment_on": "device"})
        assert not caplog.records
        dm.load_state_dict({"global_step": 4, "epoch": 1, "seed": 0})  # a checkpoint from before augment_on
    assert "data.init_args.augment_on: workers to continue it exactly" in caplog.text


def test_per_key_draws_are_the_samples_own_whatever_the_batch():
    augment = BatchedAugment("pretrain", **ALWAYS)
    images = _images(4)
    keys = torch.tensor([[0, 10], [0, 11], [0, 12], [3, 10]])
    four = augment.augment_keys(images, keys, seed=5)
    assert torch.equal(four, augment.augment_keys(images, keys, seed=5))  # bit-reproducible
    # the same sample in a batch of 2, and in another order: the same bits
    torch.testing.assert_close(augment.augment_keys(images[1:3], keys[1:3], seed=5), four[1:3], rtol=0, atol=0)
    order = torch.tensor([3, 0, 2])
    torch.testing.assert_close(augment.augment_keys(images[order], keys[order], seed=5), four[order], rtol=0, atol=0)
    # another run seed, or the same position in another epoch, draws anew
    assert not torch.equal(augment.augment_keys(images, keys, seed=6)[0], four[0])
    same_image = images[0:1].expand(2, -1, -1, -1, -1)
    pair = augment.augment_keys(same_image, torch.tensor([[0, 10], [3, 10]]), seed=5)
    assert not torch.equal(pair[0], pair[1])


def test_sample_per_key_is_one_draw_per_key_on_its_own_stream():
    augment = BatchedAugment("pretrain")
    keys = torch.tensor([[2, 7], [2, 8]])
    params = augment.sample_per_key(keys, seed=11)
    for b, (epoch, position) in enumerate(keys.tolist()):
        alone = augment.sample(1, augment_generator(11, epoch, position))
        assert torch.equal(params.flip[b], alone.flip[0]) and torch.equal(params.bias_coeffs[b], alone.bias_coeffs[0])
        assert int(params.noise_seeds[b]) == alone.noise_seed and params.noise_seed is None
    # a stream apart from the mask streams (integers 0..M-1, collate.py) of any step
    augment_seed = derive_seed(11, step=7, stream="augment/2")
    assert augment_generator(11, 2, 7).initial_seed() == augment_seed
    assert augment_seed not in {derive_seed(11, rank=0, step=s, stream=m) for s in range(64) for m in range(3)}
    with pytest.raises(ValueError, match="exactly one of noise_seed"):
        AugmentParameters(*[params.flip, *([params.bias] * 8)])


# ---------------------------------------------------------------------------------------------------- distributions
N_DRAWS = 300


def _probe_volume() -> torch.Tensor:
    """``[1, 18, 18, 18]`` in [0, 1] like a cached scan: ramps of three strengths (so every flip shows in the sign of a
    half-difference), a smooth blob and no voxel-scale texture (so voxel-to-voxel roughness is the noise's)."""
    x, y, z = torch.meshgrid(*[torch.linspace(-1.0, 1.0, 18)] * 3, indexing="ij")
    blob = torch.exp(-((x - 0.2) ** 2 + (y - 0.3) ** 2 + z**2) / 0.3)  # off-centre towards +x, +y: no mirror image
    return (0.35 + 0.15 * x + 0.1 * y + 0.05 * z + 0.3 * blob).unsqueeze(0).float()


def _statistics(images: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-sample statistics of ``[N, 1, D, H, W]``."""
    flat = images.flatten(1).double()
    half = images.shape[2] // 2
    stats = {
        "mean": flat.mean(1),
        "std": flat.std(1),
        "q95": torch.quantile(flat, 0.95, dim=1),
        "roughness": (images[..., 1:] - images[..., :-1]).abs().flatten(1).double().mean(1),
    }
    for axis in range(3):
        low = images.narrow(axis + 2, 0, half).flatten(1).mean(1)
        high = images.narrow(axis + 2, half, half).flatten(1).mean(1)
        stats[f"flipped_{axis}"] = (low > high).double()  # the ramps rise along every axis: low > high = flipped
    return {name: value.numpy() for name, value in stats.items()}


def _monai_draws(settings: TransformSettings, seed: int = 0) -> dict[str, np.ndarray]:
    """The workers path: pretrain_augmentations reseeded per sample exactly as MRIScanDataset does."""
    chain, volume = pretrain_augmentations(settings), _probe_volume()
    out = []
    for position in range(N_DRAWS):
        seed_augmentation(chain, augmentation_seed(seed, 0, position))
        out.append(torch.as_tensor(chain({"image": volume.clone()})["image"]))
    return _statistics(torch.stack(out))


def _device_draws(settings: TransformSettings, seed: int = 0, **overrides) -> dict[str, np.ndarray]:
    """The device path: pretrain_crop in the worker, then BatchedAugment with per-key seeds, batches of 50."""
    cropped = torch.as_tensor(pretrain_crop(settings)({"image": _probe_volume()})["image"])
    augment, out = BatchedAugment("pretrain", **overrides), []
    for start in range(0, N_DRAWS, 50):
        keys = torch.tensor([[0, p] for p in range(start, start + 50)])
        out.append(augment.augment_keys(cropped.unsqueeze(0).expand(50, -1, -1, -1, -1), keys, seed))
    return _statistics(torch.cat(out))


@pytest.fixture(scope="module")
def probe_settings():
    return TransformSettings(pad_crop_size=None, target_spacing=None, resize_to=(18, 18, 18), spatial_size=(16, 16, 16))


@pytest.fixture(scope="module")
def monai_draws(probe_settings):
    return _monai_draws(probe_settings)


def test_device_path_draws_the_distributions_of_the_monai_chain(monai_draws, probe_settings):
    device = _device_draws(probe_settings)
    p_values = {name: ks_2samp(monai_draws[name], device[name]).pvalue for name in monai_draws}
    assert all(p > 0.01 for p in p_values.values()), p_values
    for axis in range(3):  # the flip indicator reads the flips: about half of the draws, p = 0.5 per axis
        assert 0.4 < device[f"flipped_{axis}"].mean() < 0.6


def test_the_comparison_detects_a_wrong_noise_std(monai_draws, probe_settings):
    wrong = _device_draws(probe_settings, noise_std=0.2)  # twice docs/method.md §1.4's U(0, 0.1)
    assert ks_2samp(monai_draws["roughness"], wrong["roughness"]).pvalue < 0.01


# ---------------------------------------------------------------------------------------------------- the data module
def test_device_batches_are_reproducible_and_independent_of_the_batch(cohort, tiny_dm_kwargs):
    dm = _dm(cohort, tiny_dm_kwargs)
    pending = next(iter(dm.train_dataloader()))
    assert pending[MASKS_PENDING] is True and "context_idx" not in pending and "foreground" not in pending
    dataset = dm.datasets["train"]  # the worker only crops: no random operation, whatever the key
    assert dataset[(0, 0, 0)]["image"].shape == (1, *TINY_CROP)
    assert torch.equal(dataset[(0, 5, 0)]["image"], dataset[(3, 1, 0)]["image"])
    first, again = _epoch(dm), _epoch(dm)
    assert [b["mask_step"] for b in first] == [0, 1, 2]
    for a, b in zip(first, again, strict=True):
        assert MASKS_PENDING not in a and torch.equal(a["image"], b["image"])
        assert all(torch.equal(x, y) for x, y in zip(_masks(a), _masks(b), strict=True))
        assert torch.equal(a["foreground"], foreground_token_map(a["image"], TINY_PATCH))  # of the augmented image
    # batches of 3: the same samples (same epoch order) get the same augmentation bit for bit
    by_key = {tuple(k.tolist()): img for b in first for k, img in zip(b["sample_key"], b["image"])}
    three = _epoch(_dm(cohort, tiny_dm_kwargs, batch_size=3))
    assert [b["image"].shape[0] for b in three] == [3, 3]
    for batch in three:
        for key, image in zip(batch["sample_key"], batch["image"]):
            assert torch.equal(by_key[tuple(key.tolist())], image)
    # the workers path draws other numbers from the same distributions; val batches are the same in both modes
    workers = _dm(cohort, tiny_dm_kwargs, augment_on="workers")
    assert not torch.equal(workers.datasets["train"][(0, 0, 0)]["image"], dataset[(0, 0, 0)]["image"])
    for a, b in zip(dm.val_dataloader(), workers.val_dataloader(), strict=True):
        assert dm.on_after_batch_transfer(a, 0) is a  # carries its fixed masks: untouched
        assert torch.equal(a["image"], b["image"]) and all(torch.equal(x, y) for x, y in zip(_masks(a), _masks(b)))


def test_workers_batches_pass_the_hook_untouched(cohort, tiny_dm_kwargs):
    dm = _dm(cohort, tiny_dm_kwargs, augment_on="workers")
    assert dm.device_augment is None and not dm.train_dataloader().collate_fn.defer_masks
    batch = next(iter(dm.train_dataloader()))
    assert MASKS_PENDING not in batch and len(batch["context_idx"]) == 3
    assert dm.on_after_batch_transfer(batch, 0) is batch


def test_foreground_and_masks_follow_the_augmentation(wedge_cohort, tiny_dm_kwargs):
    dm = _dm(wedge_cohort, tiny_dm_kwargs, batch_size=2)
    dm.device_augment = BatchedAugment("pretrain", **FLIPS_ONLY)  # every sample flipped on all three axes
    pending = next(iter(dm.train_dataloader()))
    original = pending["image"].clone()
    batch = dm.on_after_batch_transfer(pending, 0)
    assert torch.equal(batch["image"], original.flip(2, 3, 4))
    before = foreground_token_map(original, TINY_PATCH).view(2, *GRID)
    expected = before.flip(1, 2, 3).flatten(1)
    assert torch.equal(batch["foreground"], expected)
    assert not torch.equal(expected, before.flatten(1))  # the wedge has no mirror symmetry: the test can fail
    collator = dm.train_collator
    rank, step = collator.batch_coordinates(batch["sample_key"])
    contexts, targets = collator.draw_masks(2, expected, step=step, rank=rank)
    assert all(torch.equal(a, b) for a, b in zip(_masks(batch), [*contexts, *targets], strict=True))
    unflipped = collator.draw_masks(2, before.flatten(1), step=step, rank=rank)[0]
    assert not all(torch.equal(a, b) for a, b in zip(batch["context_idx"], unflipped))  # foreground-aware masks moved


class _DeviceProbe(pl.Callback):
    """What the training step receives: the devices of image, masks and foreground, and the mask steps."""

    def __init__(self) -> None:
        self.seen: list[tuple[set[torch.device], torch.device, int]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        devices = {t.device for t in [*batch["context_idx"], *batch["target_idx"], batch["foreground"]]}
        self.seen.append((devices, batch["image"].device, int(batch["mask_step"])))


def test_trainer_fit_with_device_augmentation(cohort, tiny_dm_kwargs, tmp_path):
    probe = _DeviceProbe()
    module = tiny_module()
    dm = PretrainDataModule(str(cohort), patch_size=TINY_PATCH, **tiny_dm_kwargs)
    trainer = jepa_trainer(tmp_path, max_steps=3, limit_val_batches=0, callbacks=[probe])
    trainer.fit(module, datamodule=dm)
    assert [step for _, _, step in probe.seen] == [0, 1, 2]
    assert all(devices == {image} for devices, image, _ in probe.seen)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


@pytest.mark.gpu
def test_cuda_batches_get_their_masks_on_the_gpu(cohort, tiny_dm_kwargs):
    dm = _dm(cohort, tiny_dm_kwargs)
    pending = next(iter(dm.train_dataloader()))
    cpu = dm.on_after_batch_transfer({k: (v.clone() if torch.is_tensor(v) else v) for k, v in pending.items()}, 0)
    cuda = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in pending.items()}
    cuda = dm.on_after_batch_transfer(cuda, 0)
    assert cuda["image"].is_cuda and cuda["foreground"].is_cuda and all(m.is_cuda for m in _masks(cuda))
    assert cuda["mask_step"] == cpu["mask_step"]
    # noise voxels come from the device's generator; everything else agrees with the CPU path
    dm.device_augment = BatchedAugment("pretrain", noise_prob=0.0)
    cpu = dm.on_after_batch_transfer({k: (v.clone() if torch.is_tensor(v) else v) for k, v in pending.items()}, 0)
    cuda = dm.on_after_batch_transfer({k: (v.cuda() if torch.is_tensor(v) else v) for k, v in pending.items()}, 0)
    torch.testing.assert_close(cuda["image"].cpu(), cpu["image"], rtol=1e-5, atol=1e-5)


def test_loaders_passed_without_the_data_module_get_a_plain_error(cohort, tiny_dm_kwargs, tmp_path):
    # trainer.fit(module, train_dataloaders=...) never calls the data module's hook: the step says what to do.
    dm = _dm(cohort, tiny_dm_kwargs)
    trainer = jepa_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    with pytest.raises(UserValueError, match="masks_pending") as error:
        trainer.fit(tiny_module(), train_dataloaders=dm.train_dataloader())
    assert "datamodule=dm" in error.value.fix
