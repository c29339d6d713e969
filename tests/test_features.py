"""Frozen-feature extraction: token poolings from one forward per batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neurojepa_pl.features import extract_pooled_features, extract_tokens, pool_tokens
from neurojepa_pl.models import build_encoder


def _encoder():
    torch.manual_seed(0)
    return build_encoder("vit_tiny", img_size=(16, 16, 16), patch_size=8)


def _volumes() -> torch.Tensor:
    v = torch.zeros(3, 1, 16, 16, 16)
    v[:, :, :8] = torch.rand(3, 1, 8, 16, 16) + 0.5  # brain in the first half: tokens 0-3 of 8 are foreground
    return v


def test_pool_tokens_mean_and_foreground_mean():
    tokens = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(2, 8, 3)
    volumes = _volumes()[:2]
    torch.testing.assert_close(pool_tokens(tokens, volumes, "mean", 8), tokens.mean(dim=1))
    torch.testing.assert_close(pool_tokens(tokens, volumes, "fg_mean", 8), tokens[:, :4].mean(dim=1))
    with pytest.raises(ValueError, match="no foreground token"):
        pool_tokens(tokens, torch.zeros_like(volumes), "fg_mean", 8)
    with pytest.raises(ValueError, match="pooling must be one of"):
        pool_tokens(tokens, volumes, "max", 8)


def test_extract_pooled_features_matches_the_tokens_and_batching():
    encoder, volumes = _encoder(), _volumes()
    encoder.train()
    pooled = extract_pooled_features(encoder, volumes, ["mean", "fg_mean"], batch_size=2)
    assert encoder.training  # mode restored
    tokens = extract_tokens(encoder, volumes, batch_size=3)
    np.testing.assert_allclose(pooled["mean"], tokens.mean(dim=1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pooled["fg_mean"], tokens[:, :4].mean(dim=1).numpy(), rtol=1e-5, atol=1e-6)
    assert pooled["mean"].dtype == np.float32 and pooled["mean"].shape == (3, encoder.embed_dim)
    with pytest.raises(ValueError, match="non-empty subset"):
        extract_pooled_features(encoder, volumes, [])
