"""Registry names and measured parameter counts of docs/method.md §2.6 (built on the meta device: no memory, fast)."""

from __future__ import annotations

import pytest
import torch

from neurojepa_pl.models import build_encoder, build_predictor, encoder_config, list_encoders, list_predictors


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name, overrides, expected",
    [
        ("vit_base_moe", {}, 122_054_544),
        ("vit_base", {}, 86_494_608),
        ("vit_base", {"attn_gate": False}, 86_383_872),
    ],
)
def test_encoder_parameter_counts(name, overrides, expected):
    with torch.device("meta"):
        encoder = build_encoder(name, **overrides)
    assert _count(encoder) == expected


def test_paper_encoder_activated_params_and_buffers():
    with torch.device("meta"):
        encoder = build_encoder("vit_base_moe")
    layers = encoder.moe_layers()
    assert len(layers) == 6
    inactive_experts_per_layer = (16 - 6) * 590_976  # 10 unselected experts of 768->384->768
    assert _count(encoder) - 6 * inactive_experts_per_layer == 86_595_984
    assert sum(b.numel() for n, b in encoder.named_buffers() if "mlp" in n) == 192
    assert {n for n, _ in encoder.named_buffers()} == {
        f"blocks.{i}.mlp.{b}" for i in (1, 3, 5, 7, 9, 11) for b in ("gate.bias", "counts")
    } | {"rope.cos", "rope.sin"}  # the RoPE tables: non-persistent, so in no checkpoint


def test_predictor_parameter_count():
    with torch.device("meta"):
        predictor = build_predictor("predictor_base")
    assert _count(predictor) == 21_941_904
    assert _count(predictor) - 2 * 384 == 21_941_136  # without the two never-used mask tokens


def test_names_and_configs():
    assert {"vit_tiny", "vit_tiny_moe", "vit_small", "vit_base", "vit_base_moe"} <= set(list_encoders())
    assert {"predictor_tiny", "predictor_base"} <= set(list_predictors())
    config = encoder_config("vit_base_moe", use_activation_checkpointing=True)
    assert config["moe_block_indices"] == (1, 3, 5, 7, 9, 11) and config["use_activation_checkpointing"]
    config["moe"]["num_experts"] = 99  # a fresh copy: the registry is not mutated
    assert encoder_config("vit_base_moe")["moe"]["num_experts"] == 16
    with pytest.raises(KeyError, match="vit_huge"):
        build_encoder("vit_huge")


def test_tiny_models_pair_up():
    encoder, predictor = build_encoder("vit_tiny"), build_predictor("predictor_tiny")
    assert encoder.embed_dim == predictor.encoder_embed_dim and encoder.grid_size == predictor.grid_size
