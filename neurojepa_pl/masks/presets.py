"""Mask presets and full masking specs: ``masking: multiscale`` spelled out generator by generator.

See docs/method.md §5.1.

A *masking spec* lists every generator of a run with its settings:

.. code-block:: yaml

    masking:
      preset: multiscale            # provenance: the preset the list was expanded from
      generators:
      - {kind: multiscale, num_blocks: 32, spatial_scale: [0.0, 0.2], depth_scale: [0.0, 1.0],
         aspect_ratio: [0.75, 1.5]}
      - {kind: multiscale, num_blocks: 16, spatial_scale: [0.2, 0.5], ...}
      - {kind: multiscale, num_blocks: 4, spatial_scale: [0.5, 0.7], ...}

The token grid, the mask ratio and foreground awareness are not per generator: they come from the data module
(``spatial_size / patch_size``, ``mask_ratio``, ``foreground_aware``) and apply to every multiscale generator. A
saved spec builds the same generators after a preset changes; :data:`MASKING_PRESETS` are the paper's masks
(``multiscale``) and V-JEPA 2's (``vjepa2``, the ablation).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from neurojepa_pl.masks.multiscale import MultiscaleBlockMaskGenerator
from neurojepa_pl.masks.vjepa2 import VJEPA2BlockMaskGenerator

__all__ = ["MASKING_PRESETS", "GENERATOR_KINDS", "masking_spec", "build_mask_generators"]

MaskGenerator = MultiscaleBlockMaskGenerator | VJEPA2BlockMaskGenerator

GENERATOR_KINDS: dict[str, type[MultiscaleBlockMaskGenerator] | type[VJEPA2BlockMaskGenerator]] = {
    "multiscale": MultiscaleBlockMaskGenerator,
    "vjepa2": VJEPA2BlockMaskGenerator,
}
"""Generator classes by the ``kind`` of a spec entry."""

# Set by the data module for the whole run, never per generator.
_RUN_LEVEL = ("grid", "mask_ratio", "foreground_aware")

_MULTISCALE_SHAPE = {"depth_scale": [0.0, 1.0], "aspect_ratio": [0.75, 1.5]}
MASKING_PRESETS: dict[str, list[dict[str, Any]]] = {
    # docs/method.md §5.1: 32 blocks at spatial scale 0-0.2, 16 at 0.2-0.5, 4 at 0.5-0.7.
    "multiscale": [
        {"kind": "multiscale", "num_blocks": 32, "spatial_scale": [0.0, 0.2], **_MULTISCALE_SHAPE},
        {"kind": "multiscale", "num_blocks": 16, "spatial_scale": [0.2, 0.5], **_MULTISCALE_SHAPE},
        {"kind": "multiscale", "num_blocks": 4, "spatial_scale": [0.5, 0.7], **_MULTISCALE_SHAPE},
    ],
    # V-JEPA 2: short range 8 blocks at 0.15, long range 2 blocks at 0.7, full-depth tubes.
    "vjepa2": [
        {
            "kind": "vjepa2",
            "num_blocks": n,
            "spatial_scale": [s, s],
            "depth_scale": [1.0, 1.0],
            "aspect_ratio": [0.75, 1.5],
            "truncation": "random",
        }
        for n, s in ((8, 0.15), (2, 0.7))
    ],  # fmt: skip
}
"""Named maskings: lists of generator settings (without the run-level grid / mask ratio / foreground flag)."""


def _settings(kind: str) -> dict[str, Any]:
    """Per-generator settings of a kind with their constructor defaults (``inspect.empty`` when required)."""
    parameters = inspect.signature(GENERATOR_KINDS[kind]).parameters
    return {name: p.default for name, p in parameters.items() if name not in _RUN_LEVEL}


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _generator_spec(entry: Any, position: int) -> dict[str, Any]:
    where = f"masking generator {position}"
    if not isinstance(entry, Mapping):
        raise ValueError(f"Expected {where} to be a mapping with a 'kind'; found {entry!r}.")
    kind = entry.get("kind")
    if kind not in GENERATOR_KINDS:
        raise ValueError(f"Expected {where}'s kind to be one of {sorted(GENERATOR_KINDS)}; found {kind!r}.")
    settings = _settings(kind)
    given = {k: v for k, v in entry.items() if k != "kind"}
    unknown = sorted(set(given) - set(settings))
    if unknown:
        run_level = [k for k in unknown if k in _RUN_LEVEL]
        hint = f" ({run_level} are set once for all generators by the data module)" if run_level else ""
        raise ValueError(f"Unknown setting(s) {unknown} for {where} (kind {kind}){hint}; it takes {sorted(settings)}.")
    full = {**settings, **given}
    missing = sorted(k for k, v in full.items() if v is inspect.Parameter.empty)
    if missing:
        raise ValueError(f"{where} (kind {kind}) lacks {missing}.")
    return {"kind": kind, **{k: _plain(v) for k, v in full.items()}}


def masking_spec(value: str | Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Every mask generator of a masking with all its settings.

    Args:
        value: a preset name (``"multiscale"``, ``"vjepa2"``), a list of generator entries (``kind`` plus settings;
            missing settings take the generator's constructor defaults), or a mapping ``{preset, generators}`` (what
            a saved config holds; ``generators`` wins over ``preset``, which is provenance).

    Returns:
        ``{"preset": name or None, "generators": [{"kind": ..., <every setting>: value}, ...]}``.

    Raises:
        ValueError: for an unknown preset or kind, an unknown or missing setting, naming it.
    """
    preset: str | None
    entries: list[Any]
    if isinstance(value, str):
        if value not in MASKING_PRESETS:
            raise ValueError(
                f"masking must be one of {tuple(MASKING_PRESETS)} or a list of generators; found {value!r}."
            )
        preset, entries = value, copy.deepcopy(MASKING_PRESETS[value])
    elif isinstance(value, Mapping):
        unknown = sorted(set(value) - {"preset", "generators"})
        if unknown:
            raise ValueError(f"Unknown masking key(s) {unknown}; expected 'preset' and/or 'generators'.")
        preset = value.get("preset")
        if value.get("generators") is not None:
            entries = list(value["generators"])
        elif isinstance(preset, str):
            return masking_spec(preset)
        else:
            raise ValueError("A masking mapping needs 'generators' (a list) or 'preset' (a name).")
    elif isinstance(value, Sequence):
        preset, entries = None, list(value)
    else:
        raise ValueError(f"Expected a masking preset name or a list of generators; found {type(value).__name__}.")
    if not entries:
        raise ValueError("A masking needs at least one generator.")
    return {"preset": preset, "generators": [_generator_spec(entry, i) for i, entry in enumerate(entries)]}


def build_mask_generators(
    spec: str | Mapping[str, Any] | Sequence[Mapping[str, Any]],
    grid: Sequence[int],
    mask_ratio: float = 0.75,
    foreground_aware: bool = True,
) -> list[MaskGenerator]:
    """The generators of a masking spec on a token grid.

    Args:
        spec: anything :func:`masking_spec` takes.
        grid: token grid ``(g0, g1, g2)``.
        mask_ratio: target share of every multiscale generator (V-JEPA 2 generators have no fixed ratio).
        foreground_aware: foreground-first count adjustment of every multiscale generator.

    Returns:
        One generator per entry, in order.
    """
    generators: list[MaskGenerator] = []
    for entry in masking_spec(spec)["generators"]:
        settings = {k: v for k, v in entry.items() if k != "kind"}
        if entry["kind"] == "multiscale":
            generators.append(
                MultiscaleBlockMaskGenerator(grid, mask_ratio=mask_ratio, foreground_aware=foreground_aware, **settings)
            )
        else:
            generators.append(VJEPA2BlockMaskGenerator(grid, **settings))
    return generators
