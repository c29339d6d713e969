"""Raw-intensity baselines: foreground histogram and average pool of loaded volumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neurojepa_pl.raw_features import average_pool, intensity_histogram, raw_features


def _volumes() -> torch.Tensor:
    v = torch.zeros(2, 1, 8, 9, 8)
    v[0, 0, 2:6, 2:6, 2:6] = 0.25  # 64 voxels in bin 8 of 32
    v[1, 0, :4] = 0.9  # 288 voxels in bin 28
    v[1, 0, 4:6] = 0.1  # 144 voxels in bin 3
    return v


def test_histogram_counts_foreground_fractions():
    hist = intensity_histogram(_volumes(), bins=32)
    assert hist.shape == (2, 32) and hist.dtype == np.float32
    np.testing.assert_allclose(hist.sum(axis=1), 1.0)
    assert hist[0, 8] == 1.0  # 0.25 falls in [0.25, 0.28125)
    assert hist[1, 28] == pytest.approx(288 / 432) and hist[1, 3] == pytest.approx(144 / 432)
    with pytest.raises(ValueError, match="volume 0 has no voxel above 0"):
        intensity_histogram(torch.zeros(1, 1, 4, 4, 4))


def test_average_pool_to_the_token_grid():
    volumes = _volumes()
    pooled = average_pool(volumes, (2, 3, 2))
    assert pooled.shape == (2, 12)
    # Cell (0, 0, 0) of volume 1 covers depth 0-3 (all 0.9) for every height/width: mean 0.9.
    assert pooled[1, 0] == pytest.approx(0.9)
    assert pooled[0].mean() == pytest.approx(volumes[0].mean().item())  # equal-size cells: the grand mean
    assert average_pool(volumes).shape == (2, 8 * 9 * 8)  # default 8x9x8: one cell per voxel here
    np.testing.assert_allclose(average_pool(volumes)[1], volumes[1].flatten().numpy())
    with pytest.raises(ValueError, match=r"\[n, 1, D, H, W\]"):
        average_pool(volumes[:, 0])


def test_raw_features_by_name():
    out = raw_features(_volumes(), ("avgpool",), grid=(1, 1, 1))
    assert list(out) == ["avgpool"] and out["avgpool"].shape == (2, 1)
    with pytest.raises(ValueError, match="raw baselines"):
        raw_features(_volumes(), ("fourier",))
