"""MONAI transform chains: the cached deterministic loading chain and the augmentations (docs/method.md §1.2, 1.4, 1.5).

All chains are MONAI dictionary transforms on the key ``"image"``. The loading chain ends at the resized volume
``[1, *resize_to]`` (100x120x100 in the paper) which is what the persistent cache stores; the augmentation chains start
with the centre crop to ``spatial_size`` (96x108x96).

Differences from the reference, on purpose:

* The reference silently replaces NaN with 0. Here a volume with NaN/Inf voxels raises :class:`ScanRejected` (the
  dataset reports and skips it) unless ``nan_policy="zero"`` is set explicitly.
* A volume that is not one 3D image (4D series, 2D slice) or that has no foreground after scaling is rejected with a
  reason, instead of producing a zero or garbage tensor.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import monai
import numpy as np
import torch
from monai.transforms import (
    CastToTyped,
    CenterSpatialCropd,
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandAdjustContrastd,
    RandBiasFieldd,
    RandFlipd,
    RandGaussianNoised,
    RandShiftIntensityd,
    Resized,
    ResizeWithPadOrCropd,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)

TRANSFORMS_VERSION = 1
"""Bump whenever the loading chain's output changes for the same settings: it is part of the cache digest."""

IMAGE_KEY = "image"
NAN_POLICIES = ("error", "zero")

# docs/method.md §1.4 (pretraining) and 1.5 (fine-tuning) augmentation parameters.
PRETRAIN_FLIP_PROB = 0.5
FINETUNE_FLIP_PROB = 0.1
AUGMENT_PROB = 0.5
BIAS_FIELD_COEFF_RANGE = (0.0, 0.1)
BIAS_FIELD_DEGREE = 3
CONTRAST_GAMMA = (0.6, 1.5)
NOISE_STD = 0.1
SHIFT_OFFSETS = (-0.1, 0.1)


class ScanRejected(ValueError):
    """A scan that cannot enter training: wrong dimensionality, NaN/Inf voxels, or no foreground.

    Attributes:
        reason: short human-readable statement of what was found.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _triple(value: Sequence[float] | None, name: str, cast=int) -> tuple | None:
    if value is None:
        return None
    out = tuple(cast(v) for v in value)
    if len(out) != 3 or any(v <= 0 for v in out):
        raise ValueError(f"TransformSettings.{name} must be three positive numbers or None; found {value!r}.")
    return out


@dataclass(frozen=True)
class TransformSettings:
    """Settings of the loading chain and crop size.

    Attributes:
        pad_crop_size: symmetric edge-pad/crop before resampling (docs/method.md §1.2: 180x216x180 trims the MNI
            182x218x182 grid by one voxel per side); ``None`` skips the step.
        target_spacing: resampling to this voxel size in mm with an order-5 spline; ``None`` skips the step.
        resize_to: size of the cached volume after the foreground crop ("area" resize, aspect not preserved).
        spatial_size: model input size (centre crop of the cached volume); not part of the cache digest.
        percentiles: lower/upper percentiles mapped to 0 and 1 (over the whole volume, background included).
        fg_margin: margin in voxels around the foreground (> 0) bounding box.
        orientation: axis codes the volume is reoriented to.
        spacing_interp: interpolation of the spacing step (int = spline order, or a MONAI mode name).
        resize_mode: interpolation of the resize step.
        pad_mode: padding mode of the pad/crop step.
        nan_policy: ``"error"`` rejects volumes with NaN/Inf voxels (reported and skipped); ``"zero"`` replaces them
            with 0 like the reference does.
    """

    pad_crop_size: tuple[int, int, int] | None = (180, 216, 180)
    target_spacing: tuple[float, float, float] | None = (1.0, 1.0, 1.0)
    resize_to: tuple[int, int, int] = (100, 120, 100)
    spatial_size: tuple[int, int, int] = (96, 108, 96)
    percentiles: tuple[float, float] = (0.5, 99.5)
    fg_margin: int = 4
    orientation: str = "RAS"
    spacing_interp: int | str = 5
    resize_mode: str = "area"
    pad_mode: str = "edge"
    nan_policy: str = "error"

    def __post_init__(self) -> None:
        # YAML hands over lists; normalise to tuples so the settings are hashable and the digest is stable.
        object.__setattr__(self, "pad_crop_size", _triple(self.pad_crop_size, "pad_crop_size"))
        object.__setattr__(self, "target_spacing", _triple(self.target_spacing, "target_spacing", float))
        object.__setattr__(self, "resize_to", _triple(self.resize_to, "resize_to"))
        object.__setattr__(self, "spatial_size", _triple(self.spatial_size, "spatial_size"))
        lo, hi = (float(p) for p in self.percentiles)
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(
                f"TransformSettings.percentiles must satisfy 0 <= lower < upper <= 100; found {self.percentiles}."
            )
        object.__setattr__(self, "percentiles", (lo, hi))
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(f"TransformSettings.nan_policy must be one of {NAN_POLICIES}; found {self.nan_policy!r}.")
        if self.fg_margin < 0:
            raise ValueError(f"TransformSettings.fg_margin must be >= 0; found {self.fg_margin}.")
        if any(s < c for s, c in zip(self.resize_to, self.spatial_size, strict=True)):
            raise ValueError(
                f"spatial_size {self.spatial_size} must fit inside resize_to {self.resize_to} (it is a centre crop)."
            )

    def cache_fields(self) -> dict[str, object]:
        """The settings that determine the cached volume (everything but ``spatial_size``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "spatial_size"}

    def digest(self) -> str:
        """Stable 16-hex-digit hash: cache-relevant settings, :data:`TRANSFORMS_VERSION` and MONAI's minor version.

        Used as the cache sub-directory name, so changing any setting (or the chain's version) never reuses a stale
        cache. ``spatial_size`` is excluded: the crop runs after the cache.
        """
        monai_minor = ".".join(monai.__version__.split(".")[:2])
        payload = {"version": TRANSFORMS_VERSION, "monai": monai_minor, **self.cache_fields()}
        text = json.dumps(payload, sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class RequireSingleVolumed(MapTransform):
    """Reject anything that is not one 3D volume ``[1, X, Y, Z]`` after ``EnsureChannelFirstd``."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            shape = tuple(d[key].shape)
            if len(shape) != 4 or shape[0] != 1:
                raise ScanRejected(
                    f"expected one 3D volume (channel-first shape [1, X, Y, Z]), found {shape}; 4D series and 2D "
                    "images cannot be used (split the series or select one volume)"
                )
        return d


class HandleNonFinited(MapTransform):
    """Reject (``policy="error"``) or zero-fill (``policy="zero"``) NaN/Inf voxels.

    Why not ``nan_to_num`` always: the reference silently turns NaN into 0, which hides broken exports.
    """

    def __init__(self, keys, policy: str = "error"):
        super().__init__(keys)
        if policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}; found {policy!r}.")
        self.policy = policy

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            finite = torch.isfinite(torch.as_tensor(img))
            n_bad = int(finite.numel() - finite.sum())
            if n_bad == 0:
                continue
            if self.policy == "error":
                n_nan = int(torch.isnan(torch.as_tensor(img)).sum())
                raise ScanRejected(
                    f"{n_bad} of {finite.numel()} voxels are non-finite (NaN: {n_nan}, Inf: {n_bad - n_nan}); "
                    "fix the export or set nan_policy='zero' to replace them with 0"
                )
            d[key] = torch.where(finite, img, torch.zeros((), dtype=img.dtype))
        return d


class RequireForegroundd(MapTransform):
    """Reject volumes without any voxel > 0 (blank or constant scans), which the foreground crop cannot handle."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if not bool((torch.as_tensor(d[key]) > 0).any()):
                raise ScanRejected(
                    "no voxel is > 0 after percentile scaling (blank or constant volume); check the file"
                )
        return d


def loading_transforms(
    settings: TransformSettings, companion_keys: Sequence[str] = (), after_orientation: Sequence = ()
) -> Compose:
    """The deterministic loading chain of docs/method.md §1.2, in that exact order.

    Load -> channel first -> (check 3D) -> NaN/Inf policy -> RAS -> percentile scaling 0.5/99.5 to [0, 1] (whole
    volume, clipped) -> pad/crop 180x216x180 (edge) -> 1 mm spacing (order-5 spline, border) -> foreground crop (> 0,
    margin 4) -> resize to 100x120x100 ("area") -> plain float32 tensor.

    Args:
        settings: the chain's settings; ``pad_crop_size``/``target_spacing`` = ``None`` skip those steps.
        companion_keys: extra keys that go through every geometric/intensity step after the reorientation together
            with ``image`` (QC carries the MNI template this way); the foreground crop box is always the scan's.
        after_orientation: transforms inserted right after the RAS reorientation (e.g. one that adds a companion).

    Returns:
        A MONAI ``Compose`` mapping ``{"image": path}`` to ``{"image": Tensor[1, *resize_to] float32}`` (plus the
        companion keys, same shape).
    """
    k = IMAGE_KEY
    keys = [k, *companion_keys]
    lo, hi = settings.percentiles
    steps: list = [
        LoadImaged(keys=k, image_only=True, dtype=np.float32),
        EnsureChannelFirstd(keys=k),
        RequireSingleVolumed(keys=k),
        HandleNonFinited(keys=k, policy=settings.nan_policy),
        Orientationd(keys=k, axcodes=settings.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        *after_orientation,
        ScaleIntensityRangePercentilesd(
            keys=keys, lower=lo, upper=hi, b_min=0.0, b_max=1.0, clip=True, channel_wise=False
        ),
    ]
    if settings.pad_crop_size is not None:
        steps.append(ResizeWithPadOrCropd(keys=keys, spatial_size=settings.pad_crop_size, mode=settings.pad_mode))
    if settings.target_spacing is not None:
        steps.append(
            Spacingd(keys=keys, pixdim=settings.target_spacing, mode=settings.spacing_interp, padding_mode="border")
        )
    steps += [
        RequireForegroundd(keys=k),
        CropForegroundd(keys=keys, source_key=k, margin=settings.fg_margin, allow_smaller=True),
        Resized(keys=keys, spatial_size=settings.resize_to, mode=settings.resize_mode),
        # The cache stores plain tensors: MetaTensor metadata is not needed after RAS/spacing and would bloat it.
        EnsureTyped(keys=keys, data_type="tensor", dtype=torch.float32, track_meta=False),
    ]
    return Compose(steps)


def eval_transforms(settings: TransformSettings) -> Compose:
    """Evaluation transform: float32, pad-or-crop, centre crop to ``spatial_size``.

    The test mode of docs/method.md §1.4 and the validation / test transform of §1.5.
    """
    k = IMAGE_KEY
    return Compose(
        [
            CastToTyped(keys=k, dtype=torch.float32),
            ResizeWithPadOrCropd(keys=k, spatial_size=settings.spatial_size, mode="constant"),
            CenterSpatialCropd(keys=k, roi_size=settings.spatial_size),
            EnsureTyped(keys=k, data_type="tensor", dtype=torch.float32, track_meta=False),
        ]
    )


def pretrain_augmentations(settings: TransformSettings) -> Compose:
    """Pretraining augmentation of docs/method.md §1.4.

    Centre crop, then flips (p=0.5 per axis), bias field, contrast, noise, shift.

    Args:
        settings: only ``spatial_size`` is used.

    Returns:
        A randomizable MONAI ``Compose`` mapping ``{"image": [1, *resize_to]}`` to ``{"image": [1, *spatial_size]}``.
        Seed it per sample with :func:`seed_augmentation`.
    """
    k = IMAGE_KEY
    return _cropped_chain(
        settings,
        [
            *(RandFlipd(keys=k, prob=PRETRAIN_FLIP_PROB, spatial_axis=axis) for axis in range(3)),
            RandBiasFieldd(keys=k, prob=AUGMENT_PROB, coeff_range=BIAS_FIELD_COEFF_RANGE, degree=BIAS_FIELD_DEGREE),
            RandAdjustContrastd(keys=k, prob=AUGMENT_PROB, gamma=CONTRAST_GAMMA),
            RandGaussianNoised(keys=k, prob=AUGMENT_PROB, mean=0.0, std=NOISE_STD, sample_std=True),
            RandShiftIntensityd(keys=k, prob=AUGMENT_PROB, offsets=SHIFT_OFFSETS),
        ],
    )


def pretrain_crop(settings: TransformSettings) -> Compose:
    """The deterministic part of :func:`pretrain_augmentations` (float32, centre crop), without any random operation.

    The per-sample transform of ``PretrainDataModule(augment_on="device")``: the random operations of docs/method.md
    §1.4 then run batched on the device (:class:`neurojepa_pl.data_modules.gpu_augment.BatchedAugment`).

    Returns:
        A MONAI ``Compose`` mapping ``{"image": [1, *resize_to]}`` to ``{"image": [1, *spatial_size]}`` float32.
    """
    return _cropped_chain(settings, [])


def _cropped_chain(settings: TransformSettings, random_ops: list) -> Compose:
    """float32, centre crop to ``spatial_size``, ``random_ops``, tensor: the pretraining chain with or without its
    random part (one definition, so the ``workers`` and ``device`` paths crop alike)."""
    k = IMAGE_KEY
    return Compose(
        [
            CastToTyped(keys=k, dtype=torch.float32),
            CenterSpatialCropd(keys=k, roi_size=settings.spatial_size),
            *random_ops,
            EnsureTyped(keys=k, data_type="tensor", dtype=torch.float32, track_meta=False),
        ]
    )


def finetune_augmentations(settings: TransformSettings, train: bool) -> Compose:
    """docs/method.md §1.5 fine-tuning transform.

    Train: float32, pad-or-crop + centre crop to ``spatial_size``, flips (p=0.1 per axis), contrast, noise, shift
    (no bias field). Eval (``train=False``): :func:`eval_transforms`.
    """
    if not train:
        return eval_transforms(settings)
    k = IMAGE_KEY
    return Compose(
        [
            CastToTyped(keys=k, dtype=torch.float32),
            ResizeWithPadOrCropd(keys=k, spatial_size=settings.spatial_size, mode="constant"),
            CenterSpatialCropd(keys=k, roi_size=settings.spatial_size),
            *(RandFlipd(keys=k, prob=FINETUNE_FLIP_PROB, spatial_axis=axis) for axis in range(3)),
            RandAdjustContrastd(keys=k, prob=AUGMENT_PROB, gamma=CONTRAST_GAMMA),
            RandGaussianNoised(keys=k, prob=AUGMENT_PROB, mean=0.0, std=NOISE_STD, sample_std=True),
            RandShiftIntensityd(keys=k, prob=AUGMENT_PROB, offsets=SHIFT_OFFSETS),
            EnsureTyped(keys=k, data_type="tensor", dtype=torch.float32, track_meta=False),
        ]
    )


def augmentation_seed(seed: int, epoch: int, position: int) -> int:
    """Seed of one sample's augmentation: a pure function of (run seed, epoch, position in the epoch's stream).

    Deriving it from the sample's place in the stream (not from a worker-local RNG) makes augmentations identical for
    any number of workers and exactly reproducible on resume.

    Returns:
        An integer in [0, 2**32).
    """
    if min(seed, epoch, position) < 0:
        raise ValueError(f"seed, epoch and position must be >= 0; got {(seed, epoch, position)}.")
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1, dtype=np.uint32)[0])


def seed_augmentation(transform: Compose, seed: int) -> Compose:
    """Reset every random transform in ``transform`` from ``seed`` (MONAI ``set_random_state``); returns it."""
    transform.set_random_state(seed=seed)
    return transform
