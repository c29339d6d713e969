"""BatchedAugment: each operation against MONAI's transform with the same parameters, selection, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import AdjustContrast, CenterSpatialCrop, Flip, RandBiasField, RandGaussianNoise, ShiftIntensity

from neurojepa_pl.data_modules.gpu_augment import (
    AugmentParameters,
    BatchedAugment,
    bias_field_exponents,
    center_crop,
    legendre_bias_field,
)

SHAPE = (10, 12, 9)


def _batch(batch_size: int = 4, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((batch_size, 1, *SHAPE), generator=generator)


def _params(batch_size: int, **active) -> AugmentParameters:
    """Parameters with every operation off except those given (tensors for the active ones)."""
    off = torch.zeros(batch_size, dtype=torch.bool)
    base = dict(
        flip=torch.zeros(batch_size, 3, dtype=torch.bool),
        bias=off,
        bias_coeffs=torch.zeros(batch_size, 20, dtype=torch.float64),
        contrast=off,
        gamma=torch.ones(batch_size, dtype=torch.float64),
        noise=off,
        noise_std=torch.zeros(batch_size, dtype=torch.float64),
        shift=off,
        offset=torch.zeros(batch_size, dtype=torch.float64),
        noise_seed=7,
    )
    base.update(active)
    return AugmentParameters(**base)


def test_flips_match_monai_per_sample_and_axis():
    images = _batch(3)
    flip = torch.tensor([[True, False, True], [False, True, False], [False, False, False]])
    out = BatchedAugment("pretrain").apply(images, _params(3, flip=flip))
    for b in range(3):
        expected = images[b]
        for axis in range(3):
            if flip[b, axis]:
                expected = Flip(spatial_axis=axis)(expected)
        torch.testing.assert_close(out[b], torch.as_tensor(expected), rtol=0, atol=0)


def test_bias_field_matches_monai_generate_random_field():
    assert len(bias_field_exponents(3)) == 20  # MONAI: prod((3 + k) / k, k=1..3)
    coeffs = torch.from_numpy(np.random.default_rng(0).uniform(0.0, 0.1, size=(2, 20)))
    field = legendre_bias_field(SHAPE, coeffs.float())
    monai = RandBiasField(degree=3, coeff_range=(0.0, 0.1), prob=1.0)
    for b in range(2):
        expected = monai._generate_random_field(SHAPE, 3, coeffs[b].tolist())
        np.testing.assert_allclose(field[b].numpy(), expected, rtol=1e-5, atol=1e-6)
    images = _batch(2)
    out = BatchedAugment("pretrain").apply(images, _params(2, bias=torch.tensor([False, True]), bias_coeffs=coeffs))
    expected = images[1].numpy() * np.exp(monai._generate_random_field(SHAPE, 3, coeffs[1].tolist()))
    np.testing.assert_allclose(out[1].numpy(), expected, rtol=1e-5)
    torch.testing.assert_close(out[0], images[0], rtol=0, atol=0)  # not selected: untouched


def test_contrast_matches_monai_adjust_contrast():
    images = _batch(3) * 2.0 - 0.3  # a range that is not [0, 1], negative values included
    gamma = torch.tensor([0.6, 1.0, 1.5], dtype=torch.float64)
    out = BatchedAugment("pretrain").apply(images, _params(3, contrast=torch.ones(3, dtype=torch.bool), gamma=gamma))
    for b in range(3):
        expected = AdjustContrast(gamma=float(gamma[b]))(images[b])
        torch.testing.assert_close(out[b], torch.as_tensor(expected), rtol=1e-5, atol=1e-6)


def test_shift_matches_monai_shift_intensity():
    images = _batch(2)
    offset = torch.tensor([0.07, -0.04], dtype=torch.float64)
    out = BatchedAugment("pretrain").apply(images, _params(2, shift=torch.ones(2, dtype=torch.bool), offset=offset))
    for b in range(2):
        expected = ShiftIntensity(offset=float(offset[b]))(images[b])
        torch.testing.assert_close(out[b], torch.as_tensor(expected), rtol=1e-6, atol=1e-6)


def test_noise_is_std_times_standard_normal_like_monai():
    images = torch.zeros((2, 1, 40, 40, 40))
    std = torch.tensor([0.0, 0.08], dtype=torch.float64)
    params = _params(2, noise=torch.tensor([False, True]), noise_std=std, noise_seed=123)
    out = BatchedAugment("pretrain").apply(images, params)
    expected = torch.randn((1, 1, 40, 40, 40), generator=torch.Generator().manual_seed(123)) * 0.08
    torch.testing.assert_close(out[1:], expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out[0], images[0], rtol=0, atol=0)
    monai = RandGaussianNoise(prob=1.0, mean=0.0, std=0.08, sample_std=False)
    monai.set_random_state(seed=0)
    monai_noise = torch.as_tensor(monai(images[1]))
    # Same distribution (MONAI draws from numpy): mean 0 and std 0.08 within sampling error of 64,000 voxels.
    for noise in (out[1], monai_noise):
        assert abs(float(noise.mean())) < 3 * 0.08 / 64000**0.5
        assert abs(float(noise.std()) - 0.08) < 0.002


def test_centre_crop_matches_monai():
    images = torch.rand((1, 1, 100, 120, 101))
    expected = CenterSpatialCrop((95, 108, 96))(images[0])
    torch.testing.assert_close(center_crop(images, (95, 108, 96))[0], torch.as_tensor(expected), rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot centre-crop"):
        center_crop(images, (96, 130, 96))


def test_sampled_probabilities_and_ranges_follow_the_spec():
    generator = torch.Generator().manual_seed(0)
    n = 20000
    pretrain = BatchedAugment("pretrain").sample(n, generator)
    finetune = BatchedAugment("finetune").sample(n, generator)
    tolerance = 4 * (0.25 / n) ** 0.5  # 4 sigma of a Bernoulli(0.5) mean
    for mask in (pretrain.flip[:, 0], pretrain.flip[:, 2], pretrain.bias, pretrain.contrast, pretrain.noise):
        assert abs(float(mask.double().mean()) - 0.5) < tolerance
    assert abs(float(finetune.flip.double().mean()) - 0.1) < 4 * (0.09 / (3 * n)) ** 0.5
    assert not finetune.bias.any()
    assert 0.6 <= float(pretrain.gamma.min()) and float(pretrain.gamma.max()) <= 1.5
    assert 0.0 <= float(pretrain.noise_std.min()) and float(pretrain.noise_std.max()) <= 0.1
    assert -0.1 <= float(pretrain.offset.min()) and float(pretrain.offset.max()) <= 0.1
    assert 0.0 <= float(pretrain.bias_coeffs.min()) and float(pretrain.bias_coeffs.max()) <= 0.1
    # Independent draws: the flip of axis 0 says nothing about the noise decision.
    both = (pretrain.flip[:, 0] & pretrain.noise).double().mean()
    assert abs(float(both) - 0.25) < 4 * (0.1875 / n) ** 0.5


def test_forward_is_deterministic_touches_only_selected_samples_and_crops():
    images = _batch(16)
    rare = dict(flip_prob=0.2, bias_field_prob=0.2, contrast_prob=0.2, noise_prob=0.2, shift_prob=0.2)
    augment = BatchedAugment("pretrain", spatial_size=(8, 10, 8), **rare)
    first = augment(images, torch.Generator().manual_seed(3))
    again = augment(images, torch.Generator().manual_seed(3))
    other = augment(images, torch.Generator().manual_seed(4))
    assert first.shape == (16, 1, 8, 10, 8)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)
    params = augment.sample(16, torch.Generator().manual_seed(3))
    untouched = ~(params.flip.any(1) | params.bias | params.contrast | params.noise | params.shift)
    cropped = center_crop(images, (8, 10, 8))
    assert untouched.any()  # 0.8^7 = 21% of samples draw nothing
    torch.testing.assert_close(first[untouched], cropped[untouched], rtol=0, atol=0)
    assert not torch.equal(first[~untouched], cropped[~untouched])
    torch.testing.assert_close(images, _batch(16), rtol=0, atol=0)  # input not modified


def test_rejects_wrong_inputs():
    with pytest.raises(ValueError, match="mode must be"):
        BatchedAugment("train")
    with pytest.raises(ValueError, match=r"\[B, C, D, H, W\]"):
        BatchedAugment().apply(torch.zeros(1, 4, 4, 4), _params(1))


@pytest.mark.gpu
def test_cuda_matches_cpu_for_the_deterministic_parameters():
    images = _batch(8)
    augment = BatchedAugment("pretrain", noise_prob=0.0)
    params = augment.sample(8, torch.Generator().manual_seed(1))
    cpu = augment.apply(images, params)
    gpu = augment.apply(images.cuda(), params).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-5)
