"""Token foreground map (docs/method.md §6.1) against hand computations: both definitions, fallback, subsampling."""

from __future__ import annotations

import pytest
import torch

from neurojepa_pl.masks import foreground_token_map, foreground_voxel_mask
from neurojepa_pl.masks.foreground import quantile_stride


def _ramp() -> torch.Tensor:
    """[1, 1, 4, 4, 4] with voxel (d, h, w) = 16 d + 4 h + w, i.e. the values 0..63."""
    return torch.arange(64, dtype=torch.float32).reshape(1, 1, 4, 4, 4)


def test_reference_method_by_hand():
    # 64 voxels -> stride 1. q02 = 0.02 * 63 = 1.26, q98 = 61.74, threshold = 1.26 + 0.1 * 60.48 = 7.308:
    # foreground voxels are the values 8..63. Patch (0,0,0) holds 0,1,4,5,16,17,20,21 -> 4/8 foreground, patch
    # (0,0,1) holds 2,3,6,7,18,19,22,23 -> 4/8; every other patch is all foreground.
    voxels = foreground_voxel_mask(_ramp())
    assert torch.equal(voxels.flatten(), torch.arange(64) >= 8)
    expected = torch.tensor([[False, False, True, True, True, True, True, True]])
    assert torch.equal(foreground_token_map(_ramp(), patch_size=2, min_fraction=0.6), expected)
    assert foreground_token_map(_ramp(), patch_size=2, min_fraction=0.5).all()  # 0.5 >= 0.5 counts
    assert foreground_token_map(_ramp(), patch_size=2).all()  # default 0.1


def test_percentile_method_by_hand():
    # Non-zero voxels 1..63: q02 = 1 + 0.02 * 62 = 2.24, q98 = 1 + 0.98 * 62 = 61.76 -> foreground values 3..61.
    # Patch (0,0,0): 4,5,16,17,20,21 of its 8 -> 0.75; patch (1,1,1) holds 42,43,46,47,58,59,62,63 -> 0.75;
    # patch (0,0,1): all but 2 -> 0.875.
    voxels = foreground_voxel_mask(_ramp(), method="percentile")
    values = torch.arange(64)
    assert torch.equal(voxels.flatten(), (values >= 3) & (values <= 61))
    expected = torch.tensor([[False, True, True, True, True, True, True, False]])
    assert torch.equal(foreground_token_map(_ramp(), patch_size=2, min_fraction=0.8, method="percentile"), expected)


def test_fallback_when_percentiles_are_degenerate():
    flat = torch.full((1, 1, 4, 4, 4), 0.3)
    # p98 == p2: the threshold is fallback_threshold.
    assert foreground_token_map(flat, 2, fallback_threshold=0.0).all()
    assert not foreground_token_map(flat, 2, fallback_threshold=0.5).any()
    assert foreground_token_map(flat, 2, method="percentile", fallback_threshold=0.0).all()
    # No non-zero voxel at all: the percentile method falls back as well.
    assert not foreground_token_map(torch.zeros(1, 1, 4, 4, 4), 2, method="percentile").any()


def test_quantiles_use_every_kth_voxel():
    assert quantile_stride(96 * 108 * 96) == 9
    assert quantile_stride(64) == 1
    # 200,000 voxels -> stride 2. Even flat positions are 0, odd ones 1: the subsample sees only zeros, so the
    # percentiles are degenerate and the fallback threshold (2.0) applies -> nothing is foreground. Without the
    # subsampling the threshold would be 0.1 and half the voxels would be foreground.
    volume = torch.zeros(200_000)
    volume[1::2] = 1.0
    volume = volume.reshape(1, 1, 40, 50, 100)
    assert quantile_stride(volume.numel()) == 2
    assert not foreground_voxel_mask(volume, fallback_threshold=2.0).any()


def test_channels_use_the_absolute_maximum():
    # Channel 0 holds the ramp negated, channel 1 zeros: |x| max over channels gives back the ramp.
    two_channels = torch.cat([-_ramp(), torch.zeros_like(_ramp())], dim=1)
    expected = foreground_token_map(_ramp(), 2, min_fraction=0.6)
    assert torch.equal(foreground_token_map(two_channels, 2, min_fraction=0.6), expected)


def test_batched_thresholds_are_per_sample():
    a, b = _ramp(), 100.0 * _ramp().flip(-3)
    batched = foreground_token_map(torch.cat([a, b]), 2, min_fraction=0.6)
    assert torch.equal(batched[0], foreground_token_map(a, 2, min_fraction=0.6)[0])
    assert torch.equal(batched[1], foreground_token_map(b, 2, min_fraction=0.6)[0])
    assert not torch.equal(batched[0], batched[1])


def test_token_order_matches_the_grid():
    # One bright 2x2x2 patch at grid cell (1, 0, 1) of a 2x2x2 token grid -> token 4 * 1 + 2 * 0 + 1 = 5.
    volume = torch.zeros(1, 1, 4, 4, 4)
    volume[..., 2:4, 0:2, 2:4] = 1.0
    assert foreground_token_map(volume, 2).nonzero()[:, 1].tolist() == [5]
    # Anisotropic patches: (2, 4, 1) on 4x4x4 -> grid 2x1x4.
    assert foreground_token_map(volume, (2, 4, 1), min_fraction=0.25).flatten().nonzero().flatten().tolist() == [6, 7]


def test_shape_errors_are_explained():
    with pytest.raises(ValueError, match="not divisible"):
        foreground_token_map(torch.rand(1, 1, 10, 12, 12), 12)
    with pytest.raises(ValueError, match=r"\[B, C, D, H, W\]"):
        foreground_token_map(torch.rand(10, 12, 12), 12)
    with pytest.raises(ValueError, match="method"):
        foreground_token_map(_ramp(), 2, method="otsu")
