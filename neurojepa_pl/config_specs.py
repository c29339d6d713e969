"""Config values that expand a preset name into every argument it stands for, when the config is parsed.

``encoder: vit_base_moe`` in a YAML is short, but a record that says only that does not describe the run once the
preset changes. The pretraining module's ``encoder`` / ``predictor`` and the pretraining data module's ``masking``
are typed with the classes below, which jsonargparse (LightningCLI's parser) knows through
``jsonargparse.typing.register_type``: a value is *deserialised* into the class when the config is parsed (a preset
name, a partial mapping or a full one; an unknown name or argument fails there, before anything is built) and
*serialised* as the full mapping. So ``neurojepa fit ... --print_config``, the run's saved ``config.yaml`` and the
checkpoint's hyper-parameters hold, e.g.::

    encoder:
      preset: vit_base_moe          # provenance
      img_size: [96, 108, 96]
      patch_size: 12
      ...
      moe: {num_experts: 16, top_k: 6, expert_hidden: 384, shared_hidden: 768, route_scale: 4.0}

and a saved config rebuilds the same networks and masks after a preset changes (docs/method.md §9.4). Written by
hand because jsonargparse offers no "named preset of a dataclass" type: a dataclass-typed argument would be expanded
but could not be given by name, a ``str`` one is never expanded.

The registration lives here, on the Lightning side, so that ``neurojepa_pl.models`` and ``neurojepa_pl.masks``
stay free of parser imports; the modules whose signatures use these types import this module.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, ClassVar

__all__ = [
    "EncoderSpec",
    "PredictorSpec",
    "MaskingSpec",
    "PAPER_ENCODER",
    "PAPER_PREDICTOR",
    "PAPER_MASKING",
    "as_plain",
]


def _encoder_spec(value: Any) -> dict[str, Any]:
    from neurojepa_pl.models.registry import encoder_spec

    return encoder_spec(value)


def _predictor_spec(value: Any) -> dict[str, Any]:
    from neurojepa_pl.models.registry import predictor_spec

    return predictor_spec(value)


def _masking_spec(value: Any) -> dict[str, Any]:
    from neurojepa_pl.masks.presets import masking_spec

    return masking_spec(value)


def _kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: copy.deepcopy(v) for k, v in spec.items() if k != "preset"}


class _Spec:
    """A preset-or-mapping value, expanded (and validated) on construction; ``to_dict()`` is the full record."""

    _expand: ClassVar[Callable[[Any], dict[str, Any]]]

    def __init__(self, value: Any) -> None:
        if isinstance(value, _Spec):
            value = value.to_dict()
        self._value: dict[str, Any] = type(self)._expand(value)

    @property
    def preset(self) -> str | None:
        """The preset the values were expanded from (provenance), or None."""
        return self._value.get("preset")

    def to_dict(self) -> dict[str, Any]:
        """The full record: ``{"preset": ..., <every argument>: value}`` (a fresh, plain dict)."""
        return copy.deepcopy(self._value)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.to_dict() == self.to_dict()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(repr(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._value!r})"


class EncoderSpec(_Spec):
    """An encoder architecture: a registry name or a mapping of constructor arguments (see
    :func:`neurojepa_pl.models.registry.encoder_spec`)."""

    _expand = staticmethod(_encoder_spec)

    @property
    def kwargs(self) -> dict[str, Any]:
        """``VisionTransformer3D`` constructor kwargs."""
        return _kwargs(self._value)


class PredictorSpec(_Spec):
    """A predictor architecture: a registry name or a mapping of constructor arguments."""

    _expand = staticmethod(_predictor_spec)

    @property
    def kwargs(self) -> dict[str, Any]:
        """``Predictor3D`` constructor kwargs."""
        return _kwargs(self._value)


class MaskingSpec(_Spec):
    """The mask generators of pretraining: a preset name or a list of generators (see
    :func:`neurojepa_pl.masks.presets.masking_spec`)."""

    _expand = staticmethod(_masking_spec)


def _register() -> None:
    try:
        from jsonargparse.typing import register_type
    except ImportError:  # no CLI parser installed: the classes still work from Python
        return
    for cls in (EncoderSpec, PredictorSpec, MaskingSpec):
        register_type(
            cls,
            serializer=lambda value, cls=cls: cls(value).to_dict(),
            deserializer=cls,
            type_check=lambda value, cls: isinstance(value, cls),
        )


_register()

# Defaults of the signatures that take these types (module-level values, not calls in the signature).
PAPER_ENCODER = EncoderSpec("vit_base_moe")
PAPER_PREDICTOR = PredictorSpec("predictor_base")
PAPER_MASKING = MaskingSpec("multiscale")


def as_plain(value: Any) -> Any:
    """A spec as its plain dict (for hyper-parameters, which checkpoints store with ``weights_only`` pickling)."""
    return value.to_dict() if isinstance(value, _Spec) else value
