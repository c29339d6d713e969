"""Named model configurations: plain dicts of constructor kwargs, so a config can be saved and rebuilt.

Encoders: ``vit_tiny`` / ``vit_tiny_moe`` (tests; 48x54x48 volumes, patch 6, same 8x9x8 token grid as the paper),
``vit_small``, ``vit_base`` (dense, 86,494,608 params) and ``vit_base_moe`` (the paper's encoder, 122,054,544).
Predictors: ``predictor_tiny`` (pairs with the tiny encoders) and ``predictor_base`` (the paper's, 21,941,904).

A registry entry is a *preset*: it lists only what differs from the constructor defaults, and it may change. What a
run or a checkpoint records is the *spec* (:func:`encoder_spec`, :func:`predictor_spec`): the preset's name as
provenance plus every constructor argument with its value, so that the record rebuilds the same network after a
preset or a constructor default changes (docs/method.md §9.4).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from neurojepa_pl.models.moe import MoEConfig
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
    "PRESET_KEY",
    "encoder_spec",
    "predictor_spec",
    "split_spec",
]

PRESET_KEY = "preset"
"""Key of a spec naming the registry entry it was expanded from (provenance; the other keys are the values)."""

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


# ---------------------------------------------------------------------------------------------- full specs
def _plain(value: Any) -> Any:
    """Tuples to lists, recursively: a spec is JSON/YAML-able and compares equal after a round trip."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _constructor_defaults(cls: Callable[..., Any]) -> dict[str, Any]:
    parameters = inspect.signature(cls).parameters
    return {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}


def _spec(
    value: str | Mapping[str, Any],
    table: dict[str, dict[str, Any]],
    cls: Callable[..., Any],
    kind: str,
    normalise: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    defaults = _constructor_defaults(cls)
    if isinstance(value, str):
        preset: str | None = value
        given: dict[str, Any] = {}
    elif isinstance(value, Mapping):
        given = dict(value)
        preset = given.pop(PRESET_KEY, None)
        if preset is not None and not isinstance(preset, str):
            raise ValueError(f"Expected the {kind} spec's {PRESET_KEY!r} to be a registry name; found {preset!r}.")
    else:
        raise TypeError(
            f"Expected a {kind} registry name or a mapping of constructor arguments; found {type(value).__name__}."
        )
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"Unknown {kind} argument(s) {unknown}; {cls.__name__} takes {sorted(defaults)}.")
    # A complete mapping (what a saved config holds) is self-sufficient: its preset is provenance only, so it builds
    # the same network even if that preset has changed or gone. An incomplete one fills the gaps from its preset.
    base = dict(defaults)
    if preset is not None and set(given) != set(defaults):
        base.update(_lookup(table, kind, preset))
    for key, item in given.items():
        if isinstance(item, Mapping) and isinstance(base.get(key), Mapping):
            item = {**dict(base[key]), **dict(item)}  # a partial nested dict (e.g. moe: {top_k: 4}) updates
        base[key] = item
    if normalise is not None:
        base = normalise(base)
    return {PRESET_KEY: preset, **_plain(base)}


def _normalise_encoder(kwargs: dict[str, Any]) -> dict[str, Any]:
    # As VisionTransformer3D.config: MoE sizes spelled out when there are MoE blocks, None otherwise.
    if kwargs.get("moe_block_indices"):
        kwargs["moe"] = MoEConfig.from_any(kwargs.get("moe") or {}).to_dict()
    else:
        kwargs["moe"] = None
    return kwargs


def encoder_spec(value: str | Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """Every constructor argument of an encoder, with the preset it came from.

    Args:
        value: a registry name (``"vit_base_moe"``), or a mapping of constructor arguments, optionally with
            ``preset: <name>``: a complete mapping (a saved spec) is taken as it is, an incomplete one is completed
            from its preset (or from the constructor defaults without one); a partial ``moe`` dict updates the
            preset's.
        **overrides: applied last, like :func:`encoder_config`'s.

    Returns:
        ``{"preset": name or None, <every VisionTransformer3D argument>: value}`` with lists for tuples, e.g.
        ``encoder_spec("vit_base_moe")["moe"] == {"num_experts": 16, "top_k": 6, "expert_hidden": 384,
        "shared_hidden": 768, "route_scale": 4.0}``.

    Raises:
        KeyError: for an unknown registry name. ValueError: for an argument the encoder does not take.
    """
    spec = _spec(value, ENCODERS, VisionTransformer3D, "encoder", _normalise_encoder)
    if overrides:
        spec = _spec({**spec, **overrides}, ENCODERS, VisionTransformer3D, "encoder", _normalise_encoder)
    return spec


def predictor_spec(value: str | Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """Every constructor argument of a predictor, with the preset it came from (as :func:`encoder_spec`)."""
    spec = _spec(value, PREDICTORS, Predictor3D, "predictor")
    if overrides:
        spec = _spec({**spec, **overrides}, PREDICTORS, Predictor3D, "predictor")
    return spec


def split_spec(spec: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """``(preset, constructor kwargs)`` of a spec from :func:`encoder_spec` / :func:`predictor_spec`."""
    kwargs = {k: copy.deepcopy(v) for k, v in spec.items() if k != PRESET_KEY}
    return spec.get(PRESET_KEY), kwargs
