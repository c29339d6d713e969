"""Named model configurations: plain dicts of constructor kwargs, so a config can be saved and rebuilt.

Encoders: ``vit_tiny`` / ``vit_tiny_moe`` (tests; 48x54x48 volumes, patch 6, same 8x9x8 token grid as the paper),
``vit_small``, ``vit_base`` (dense, 86,494,608 params) and ``vit_base_moe`` (the paper's encoder, 122,054,544).
Predictors: ``predictor_tiny`` (pairs with the tiny encoders) and ``predictor_base`` (the paper's, 21,941,904).
"""

from __future__ import annotations

import copy
from typing import Any

from neurojepa_pl.models.predictor import Predictor3D
from neurojepa_pl.models.vit3d import VisionTransformer3D

__all__ = [
    "ENCODERS",
    "PREDICTORS",
    "list_encoders",
    "list_predictors",
    "encoder_config",
    "predictor_config",
    "build_encoder",
    "build_predictor",
]

PAPER_IMG_SIZE = (96, 108, 96)
TINY_IMG_SIZE = (48, 54, 48)
PAPER_MOE_BLOCKS = (1, 3, 5, 7, 9, 11)

_TINY: dict[str, Any] = {
    "img_size": TINY_IMG_SIZE,
    "patch_size": 6,
    "embed_dim": 64,
    "depth": 2,
    "num_heads": 4,
    "mlp_ratio": 4.0,
}
_BASE: dict[str, Any] = {"img_size": PAPER_IMG_SIZE, "patch_size": 12, "embed_dim": 768, "depth": 12, "num_heads": 12}

ENCODERS: dict[str, dict[str, Any]] = {
    "vit_tiny": dict(_TINY),
    "vit_tiny_moe": {
        **_TINY,
        "moe_block_indices": (1,),
        "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 32, "shared_hidden": 64, "route_scale": 4.0},
    },
    "vit_small": {"img_size": PAPER_IMG_SIZE, "patch_size": 12, "embed_dim": 384, "depth": 12, "num_heads": 6},
    "vit_base": dict(_BASE),
    "vit_base_moe": {
        **_BASE,
        "moe_block_indices": PAPER_MOE_BLOCKS,
        "moe": {"num_experts": 16, "top_k": 6, "expert_hidden": 384, "shared_hidden": 768, "route_scale": 4.0},
    },
}

PREDICTORS: dict[str, dict[str, Any]] = {
    "predictor_tiny": {
        "encoder_embed_dim": 64,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 4,
        "img_size": TINY_IMG_SIZE,
        "patch_size": 6,
    },
    "predictor_base": {
        "encoder_embed_dim": 768,
        "embed_dim": 384,
        "depth": 12,
        "num_heads": 12,
        "img_size": PAPER_IMG_SIZE,
        "patch_size": 12,
    },
}


def list_encoders() -> list[str]:
    """Registered encoder names."""
    return sorted(ENCODERS)


def list_predictors() -> list[str]:
    """Registered predictor names."""
    return sorted(PREDICTORS)


def _lookup(table: dict[str, dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    if name not in table:
        raise KeyError(f"Unknown {kind} {name!r}; expected one of {sorted(table)}.")
    return copy.deepcopy(table[name])


def encoder_config(name: str, **overrides: Any) -> dict[str, Any]:
    """Constructor kwargs of a registered encoder with ``overrides`` applied (a fresh dict)."""
    config = _lookup(ENCODERS, "encoder", name)
    config.update(overrides)
    return config


def predictor_config(name: str = "predictor_base", **overrides: Any) -> dict[str, Any]:
    """Constructor kwargs of a registered predictor with ``overrides`` applied (a fresh dict)."""
    config = _lookup(PREDICTORS, "predictor", name)
    config.update(overrides)
    return config


def build_encoder(name: str, **overrides: Any) -> VisionTransformer3D:
    """Build a registered encoder, e.g. ``build_encoder("vit_base_moe", use_activation_checkpointing=True)``."""
    return VisionTransformer3D(**encoder_config(name, **overrides))


def build_predictor(name: str = "predictor_base", **overrides: Any) -> Predictor3D:
    """Build a registered predictor, e.g. ``build_predictor("predictor_tiny")``."""
    return Predictor3D(**predictor_config(name, **overrides))
