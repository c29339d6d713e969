"""Loading chain and augmentations (docs/method.md §1.2, 1.4, 1.5): order, shapes, ranges, oracles, seeding, digest."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from monai.transforms import (
    CenterSpatialCropd,
    CropForegroundd,
    LoadImaged,
    Orientationd,
    RandBiasFieldd,
    RandFlipd,
    Resized,
    ResizeWithPadOrCropd,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)
from volume_factory import TINY_CROP, TINY_RESIZE, blob_volume, write_nifti

from neurojepa_pl.data.transforms import (
    ScanRejected,
    TransformSettings,
    augmentation_seed,
    eval_transforms,
    finetune_augmentations,
    loading_transforms,
    pretrain_augmentations,
    seed_augmentation,
)


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


# ---------------------------------------------------------------------------------------------------- settings
def test_defaults_are_the_paper_chain():
    s = TransformSettings()
    assert s.pad_crop_size == (180, 216, 180) and s.target_spacing == (1.0, 1.0, 1.0)
    assert s.resize_to == (100, 120, 100) and s.spatial_size == (96, 108, 96)
    assert s.percentiles == (0.5, 99.5) and s.fg_margin == 4 and s.nan_policy == "error"
    chain = loading_transforms(s).transforms
    order = [type(t) for t in chain]
    expected = [
        LoadImaged,
        Orientationd,
        ScaleIntensityRangePercentilesd,
        ResizeWithPadOrCropd,
        Spacingd,
        CropForegroundd,
        Resized,
    ]
    positions = [order.index(t) for t in expected]
    assert positions == sorted(positions), f"docs/method.md §1.2 order violated: {order}"


def test_digest_stable_and_sensitive_to_every_cache_field():
    base = TransformSettings()
    assert base.digest() == TransformSettings().digest()
    assert TransformSettings(resize_to=[100, 120, 100]).digest() == base.digest()  # YAML lists normalised
    assert replace(base, spatial_size=(48, 60, 48)).digest() == base.digest()  # crop runs after the cache
    changes = {
        "pad_crop_size": None,
        "target_spacing": (1.5, 1.5, 1.5),
        "resize_to": (102, 120, 100),
        "percentiles": (1.0, 99.0),
        "fg_margin": 2,
        "orientation": "LPS",
        "spacing_interp": 3,
        "resize_mode": "trilinear",
        "pad_mode": "constant",
        "nan_policy": "zero",
    }
    digests = {base.digest()}
    for name, value in changes.items():
        digests.add(replace(base, **{name: value}).digest())
    assert len(digests) == len(changes) + 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"nan_policy": "ignore"},
        {"percentiles": (99.5, 0.5)},
        {"resize_to": (90, 120, 100)},  # crop larger than the cached volume
        {"spatial_size": (96, 108)},
        {"fg_margin": -1},
    ],
)
def test_invalid_settings_raise(kwargs):
    with pytest.raises(ValueError, match="TransformSettings|spatial_size|nan_policy"):
        TransformSettings(**kwargs)


# ---------------------------------------------------------------------------------------------------- loading chain
def test_loading_chain_shape_dtype_range(tmp_path, tiny_settings):
    path = write_nifti(tmp_path / "a.nii.gz", blob_volume())
    out = loading_transforms(tiny_settings)({"image": str(path)})["image"]
    assert type(out) is torch.Tensor  # plain tensor, no MetaTensor in the cache
    assert out.shape == (1, *TINY_RESIZE) and out.dtype == torch.float32
    # "area" resizing averages neighbours, so the clipped maximum 1.0 is approached but rarely kept
    assert float(out.min()) == 0.0 and 0.9 < float(out.max()) <= 1.0


@pytest.mark.slow
def test_full_paper_chain_on_mni_sized_grid(tmp_path):
    """The default settings (pad/crop 180x216x180, 1 mm spacing) on a 182x218x182 LAS volume."""
    path = write_nifti(tmp_path / "mni.nii.gz", blob_volume((182, 218, 182)))
    out = loading_transforms(TransformSettings())({"image": str(path)})["image"]
    assert out.shape == (1, 100, 120, 100)
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


def test_reorientation_to_ras(tmp_path, tiny_settings):
    """The same anatomy stored RAS or LAS (x flipped on disk) gives the same output."""
    ras = blob_volume(seed=3)
    ras[30:34, 20:24, 20:24] = 1000.0  # an asymmetric bright marker on the right
    ras_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    ras_affine[:3, 3] = [-24.0, -27.0, -24.0]
    las_affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    las_affine[:3, 3] = [23.0, -27.0, -24.0]
    a = write_nifti(tmp_path / "ras.nii.gz", ras, ras_affine)
    b = write_nifti(tmp_path / "las.nii.gz", ras[::-1].copy(), las_affine)
    chain = loading_transforms(tiny_settings)
    out_a, out_b = chain({"image": str(a)})["image"], chain({"image": str(b)})["image"]
    torch.testing.assert_close(out_a, out_b)
    # the marker ends on the high-x (right) side in RAS
    hot = torch.nonzero(out_a[0] == out_a[0].max())[:, 0].float().mean()
    assert hot > TINY_RESIZE[0] / 2


def test_percentile_scaling_oracle(tmp_path):
    """Percentiles over the whole volume (background included), clipped to [0, 1]; crop and resize are identities."""
    rng = np.random.default_rng(0)
    vol = np.zeros((20, 22, 20), dtype=np.float32)
    vol[4:16, 5:17, 4:16] = rng.uniform(1.0, 100.0, size=(12, 12, 12))
    path = write_nifti(tmp_path / "box.nii.gz", vol, np.eye(4))  # RAS already: no flip
    settings = TransformSettings(
        pad_crop_size=None, target_spacing=None, resize_to=(12, 12, 12), spatial_size=(12, 12, 12), fg_margin=0
    )
    out = loading_transforms(settings)({"image": str(path)})["image"][0].numpy()
    lo, hi = np.percentile(vol, [0.5, 99.5])
    assert lo == 0.0  # 0.5th percentile of a mostly-background volume is background
    expected = np.clip((vol[4:16, 5:17, 4:16] - lo) / (hi - lo), 0.0, 1.0)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert (out == 1.0).sum() == int((vol > hi).sum())


def test_foreground_crop_margin(tmp_path):
    vol = np.zeros((30, 30, 30), dtype=np.float32)
    vol[10:20, 12:18, 5:25] = 50.0
    path = write_nifti(tmp_path / "fg.nii.gz", vol, np.eye(4))
    settings = TransformSettings(
        pad_crop_size=None, target_spacing=None, resize_to=(18, 14, 28), spatial_size=(18, 14, 28), fg_margin=4
    )
    out = loading_transforms(settings)({"image": str(path)})["image"][0]
    # box 10x6x20 + 2*4 margin = 18x14x28: the resize is an identity and the margin ring is background
    assert out.shape == (18, 14, 28)
    assert float(out[4:14, 4:10, 4:24].min()) == 1.0
    assert float(out.sum()) == 10 * 6 * 20


def test_nan_volume_rejected_with_counts(tmp_path, tiny_settings):
    vol = blob_volume()
    vol[20, 20, 20] = np.nan
    vol[21, 20, 20] = np.nan
    vol[22, 20, 20] = -np.inf
    path = write_nifti(tmp_path / "nan.nii.gz", vol)
    with pytest.raises(RuntimeError) as info:
        loading_transforms(tiny_settings)({"image": str(path)})
    cause = _root_cause(info.value)
    assert isinstance(cause, ScanRejected)
    assert cause.reason.startswith("3 of 124416 voxels are non-finite (NaN: 2, Inf: 1)")


def test_nan_policy_zero_replaces_only_when_asked(tmp_path, tiny_settings):
    vol = blob_volume()
    clean = vol.copy()
    clean[24, 27, 24] = 0.0
    vol[24, 27, 24] = np.nan
    a = write_nifti(tmp_path / "nan.nii.gz", vol)
    b = write_nifti(tmp_path / "zero.nii.gz", clean)
    chain = loading_transforms(replace(tiny_settings, nan_policy="zero"))
    torch.testing.assert_close(chain({"image": str(a)})["image"], chain({"image": str(b)})["image"])


def test_4d_rejected_and_trailing_singleton_accepted(tmp_path, tiny_settings):
    chain = loading_transforms(tiny_settings)
    four_d = write_nifti(tmp_path / "4d.nii.gz", np.stack([blob_volume()] * 3, axis=-1))
    with pytest.raises(RuntimeError) as info:
        chain({"image": str(four_d)})
    assert "found (3, 48, 54, 48)" in _root_cause(info.value).reason
    singleton = write_nifti(tmp_path / "4d1.nii.gz", blob_volume()[..., None])
    assert chain({"image": str(singleton)})["image"].shape == (1, *TINY_RESIZE)


def test_blank_volume_rejected(tmp_path, tiny_settings):
    path = write_nifti(tmp_path / "blank.nii.gz", np.zeros((20, 20, 20), np.float32))
    with pytest.warns(Warning, match="Divide by zero"), pytest.raises(RuntimeError) as info:
        loading_transforms(tiny_settings)({"image": str(path)})
    assert "no voxel is > 0" in _root_cause(info.value).reason


# ---------------------------------------------------------------------------------------------------- augmentation
def _cached_like(seed=0, size=TINY_RESIZE):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((1, *size), generator=g)


@pytest.fixture
def small_settings(tiny_settings):
    """An even smaller cached/crop size where only the augmentation's behaviour matters (keeps the tests fast)."""
    return replace(tiny_settings, resize_to=(10, 12, 10), spatial_size=(8, 9, 8))


def test_eval_is_exact_centre_crop(tiny_settings):
    x = _cached_like()
    out = eval_transforms(tiny_settings)({"image": x})["image"]
    assert type(out) is torch.Tensor
    torch.testing.assert_close(out, x[:, 1:33, 2:38, 1:33])
    torch.testing.assert_close(finetune_augmentations(tiny_settings, train=False)({"image": x})["image"], out)


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_augmentation_seeded_shape_and_reproducible(tiny_settings, small_settings, kind):
    make = pretrain_augmentations if kind == "pretrain" else (lambda s: finetune_augmentations(s, True))
    out = make(tiny_settings)({"image": _cached_like()})["image"]
    assert type(out) is torch.Tensor and out.shape == (1, *TINY_CROP) and out.dtype == torch.float32
    aug = make(small_settings)
    x = _cached_like(size=small_settings.resize_to)
    a = seed_augmentation(aug, 11)({"image": x.clone()})["image"]
    b = seed_augmentation(aug, 11)({"image": x.clone()})["image"]
    assert a.shape == (1, 8, 9, 8)
    torch.testing.assert_close(a, b)
    differing = sum(not torch.equal(a, seed_augmentation(aug, s)({"image": x.clone()})["image"]) for s in range(12, 20))
    assert differing >= 7  # with 7 coin flips at p >= 0.1, nearly every seed changes something


def test_augmentation_parameters_follow_spec(tiny_settings):
    pre = pretrain_augmentations(tiny_settings).transforms
    fine = finetune_augmentations(tiny_settings, True).transforms
    assert [t.prob for t in pre if isinstance(t, RandFlipd)] == [0.5, 0.5, 0.5]
    assert [t.prob for t in fine if isinstance(t, RandFlipd)] == [0.1, 0.1, 0.1]
    assert [t.flipper.spatial_axis for t in pre if isinstance(t, RandFlipd)] == [0, 1, 2]
    assert any(isinstance(t, RandBiasFieldd) for t in pre) and not any(isinstance(t, RandBiasFieldd) for t in fine)
    assert isinstance(pre[1], CenterSpatialCropd)  # central, not random, crop (docs/method.md §1.4)


def test_pretrain_flip_statistics(small_settings):
    """Over many seeds each axis flips about half the time (p = 0.5)."""
    x = torch.zeros((1, *small_settings.resize_to))
    x[0, 1, 2, 1] = 1.0  # the corner of the crop window (MONAI centres 12 -> 9 at offset 2)
    aug = pretrain_augmentations(small_settings)
    flips = np.zeros(3)
    n = 200
    for seed in range(n):
        out = seed_augmentation(aug, seed)({"image": x.clone()})["image"][0]
        pos = torch.nonzero(out == out.max())[0]
        flips += (pos != 0).numpy()
    assert np.all(np.abs(flips / n - 0.5) < 0.12), flips / n


def test_augmentation_seed_pure_and_distinct():
    assert augmentation_seed(0, 1, 2) == augmentation_seed(0, 1, 2)
    seeds = {augmentation_seed(s, e, p) for s in range(3) for e in range(3) for p in range(50)}
    assert len(seeds) == 450
    assert all(0 <= s < 2**32 for s in seeds)
    with pytest.raises(ValueError):
        augmentation_seed(0, -1, 0)
