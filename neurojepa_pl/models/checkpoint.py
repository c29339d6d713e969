"""Weight I/O: load encoders/predictors from every checkpoint format we meet, export backbones.

Accepted sources (``load_backbone``):

* reference pretraining checkpoints (``torch.save`` dict with ``encoder``, ``target_encoder``, ``predictor``, keys
  prefixed ``module.backbone.``); ``which="target"`` takes the EMA ``target_encoder``, ``"context"`` the online
  ``encoder``. The reference loader silently takes ``encoder`` (docs/method.md §9.3); we make the choice explicit;
* bare ``.safetensors`` files, reference (``experts.{e}.fc1.weight``) or native (``experts.fc1_weight``) layout;
* exported folders (``config.json`` + ``model.safetensors``) written by :func:`export_backbone`;
* our Lightning checkpoints: ``state_dict`` keys ``target_encoder.*`` / ``context_encoder.*`` (pretraining) or
  ``backbone.*`` (downstream), architecture in ``hyper_parameters["encoder"]`` (registry name) and
  ``hyper_parameters["encoder_overrides"]``, or ``["backbone"]`` and ``["backbone_kwargs"]`` (downstream modules);
* flat state-dict files (``pytorch_model.bin``-style).

Every ``torch.load`` uses ``weights_only=True``: we never unpickle arbitrary objects. Keys may carry any of the
wrapper prefixes ``module.``, ``backbone.``, ``_orig_mod.``, ``_checkpoint_wrapped_module.``. Loading is strict by
default: missing, unexpected or mis-shaped keys raise an error naming them (routed experts are compared in the
native stacked layout).
"""

from __future__ import annotations

import fnmatch
import json
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from neurojepa_pl.models.predictor import Predictor3D
from neurojepa_pl.models.registry import ENCODERS, PREDICTORS, encoder_config, predictor_config
from neurojepa_pl.models.vit3d import VisionTransformer3D

__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_FORMAT_VERSION",
    "strip_wrapper_prefixes",
    "reference_to_native",
    "native_to_reference",
    "read_checkpoint",
    "load_backbone",
    "load_predictor",
    "load_state_dict_checked",
    "export_backbone",
    "infer_encoder_name",
    "infer_predictor_name",
]

EXPORT_FORMAT = "neurojepa_pl.backbone"
EXPORT_FORMAT_VERSION = 1
CONFIG_FILENAME = "config.json"
WEIGHTS_FILENAME = "model.safetensors"

StateDict = dict[str, Tensor]
Which = Literal["target", "context"]

_LEADING_PREFIXES = ("module.", "backbone.", "_orig_mod.")
_ANYWHERE_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")
# Prefixes naming which network a key of a flat (Lightning-style) state dict belongs to.
_ROLE_PREFIXES = (
    ("target_encoder.", "target"),
    ("context_encoder.", "context"),
    ("encoder.", "context"),
    ("backbone.", "backbone"),
    ("predictor.", "predictor"),
)
_REF_EXPERT = re.compile(r"^(?P<prefix>(?:.*\.)?)experts\.(?P<index>\d+)\.(?P<fc>fc[12])\.(?P<kind>weight|bias)$")
_NATIVE_EXPERT = re.compile(r"^(?P<prefix>(?:.*\.)?)experts\.(?P<fc>fc[12])_(?P<kind>weight|bias)$")
_MAX_NAMED = 10


# ---------------------------------------------------------------------------------------------- key conversion
def strip_wrapper_prefixes(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Drop DDP/compile/checkpoint-wrapper prefixes: ``module.backbone.blocks.0...`` -> ``blocks.0...``."""
    cleaned: StateDict = {}
    for key, value in state_dict.items():
        new = key
        for marker in _ANYWHERE_PREFIXES:
            new = new.replace(marker, "")
        changed = True
        while changed:
            changed = False
            for prefix in _LEADING_PREFIXES:
                if new.startswith(prefix):
                    new, changed = new[len(prefix) :], True
        if new in cleaned:
            raise ValueError(f"Two keys map to {new!r} after removing wrapper prefixes (one of them is {key!r}).")
        cleaned[new] = value
    return cleaned


def reference_to_native(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Stack per-expert reference tensors ``...experts.{e}.fc1.weight`` into native ``...experts.fc1_weight [E, ...]``.

    Keys already in native layout and all other keys pass through unchanged.

    Raises:
        ValueError: if a layer's expert indices are not exactly ``0..E-1`` for every tensor, naming what is missing.
    """
    native: StateDict = {}
    groups: dict[tuple[str, str, str], dict[int, Tensor]] = {}
    for key, value in state_dict.items():
        match = _REF_EXPERT.match(key)
        if match is None:
            native[key] = value
            continue
        groups.setdefault((match["prefix"], match["fc"], match["kind"]), {})[int(match["index"])] = value
    layers: dict[str, set[int]] = {}
    for (prefix, _, _), experts in groups.items():
        layers.setdefault(prefix, set()).update(experts)
    for (prefix, fc, kind), experts in groups.items():
        expected = range(max(layers[prefix]) + 1)
        missing = [f"{prefix}experts.{e}.{fc}.{kind}" for e in expected if e not in experts]
        if missing:
            raise ValueError(
                f"Missing routed-expert tensors (expected experts 0..{len(expected) - 1}): {missing[:_MAX_NAMED]}"
            )
        name = f"{prefix}experts.{fc}_{kind}"
        if name in native:
            raise ValueError(f"Both per-expert keys and the stacked key {name!r} are present; keep one layout.")
        native[name] = torch.stack([experts[e] for e in expected])
    return native


def native_to_reference(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Split native stacked experts into reference per-expert keys (contiguous, non-shared tensors)."""
    reference: StateDict = {}
    for key, value in state_dict.items():
        match = _NATIVE_EXPERT.match(key)
        if match is None:
            reference[key] = value
            continue
        for expert, tensor in enumerate(value.unbind(0)):
            reference[f"{match['prefix']}experts.{expert}.{match['fc']}.{match['kind']}"] = tensor.clone()
    return reference


# ---------------------------------------------------------------------------------------------- reading sources
@dataclass
class LoadedCheckpoint:
    """What a source holds, with wrapper prefixes removed (experts still in the layout of the source).

    Attributes:
        description: the source, for error messages.
        encoders: state dicts by role: ``target``, ``context``, ``backbone`` (single encoder).
        predictor: predictor state dict, if any.
        encoder_kwargs: constructor kwargs stored with the weights (exported folders, Lightning hyper-parameters).
        encoder_name: registry name stored with the weights, if any.
        predictor_kwargs: predictor constructor kwargs stored with the weights, if any.
    """

    description: str
    encoders: dict[str, StateDict] = field(default_factory=dict)
    predictor: StateDict | None = None
    encoder_kwargs: dict[str, Any] | None = None
    encoder_name: str | None = None
    predictor_kwargs: dict[str, Any] | None = None


def _torch_load(path: Path, map_location: str | torch.device) -> Any:
    # Memory-map zip-format files: a reference checkpoint is ~2 GB with optimizer state, of which only the encoder
    # we select is then actually read. Legacy (pre-zip) files cannot be mapped and are read whole.
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"Cannot read {path} with torch.load(weights_only=True): it pickles Python objects beyond tensors and "
            f"plain containers ({err}). We never unpickle arbitrary objects. If it is a Lightning checkpoint whose "
            "hyper-parameters hold custom classes, save those as plain values (registry name + dict of overrides), "
            "or, in a trusted environment, re-save just the state dict: "
            "torch.save({'state_dict': ckpt['state_dict'], 'hyper_parameters': {...plain...}}, path)."
        ) from err


def _as_tensor_dict(obj: Any, where: str) -> StateDict:
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(
            f"Expected {where} to be a state dict (a mapping of names to tensors); found {type(obj).__name__}."
        )
    return dict(obj)


def _clean(state_dict: Mapping[str, Tensor]) -> StateDict:
    # Expert stacking (reference_to_native) is left to the caller, for the one network it selects: stacking reads
    # every expert tensor, which for a memory-mapped 2 GB checkpoint is most of the cost of loading.
    return strip_wrapper_prefixes(state_dict)


def _split_roles(flat: Mapping[str, Tensor]) -> tuple[dict[str, StateDict], StateDict | None]:
    """Group a flat state dict by role prefix; unprefixed keys are the encoder only if no role prefix occurs."""
    flat = {_strip_leading(k, ("module.", "_orig_mod.")): v for k, v in flat.items()}
    roles: dict[str, dict[str, Tensor]] = {}
    rest: dict[str, Tensor] = {}
    for key, value in flat.items():
        for prefix, role in _ROLE_PREFIXES:
            if key.startswith(prefix):
                roles.setdefault(role, {})[key[len(prefix) :]] = value
                break
        else:
            rest[key] = value
    predictor = roles.pop("predictor", None)
    encoders = {role: _clean(sd) for role, sd in roles.items()}
    if not encoders and rest:
        encoders["backbone"] = _clean(rest)
    return encoders, (_clean(predictor) if predictor is not None else None)


def _strip_leading(key: str, prefixes: Iterable[str]) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def _kwargs_from_hparams(
    hparams: Mapping[str, Any], key: str, registry: Mapping[str, Any], alias: tuple[str, str] | None = None
) -> tuple[str | None, dict[str, Any] | None]:
    """Architecture from ``hparams[key]`` + ``hparams[key + "_overrides"]``, else from the ``alias`` pair
    (the downstream modules' ``backbone`` + ``backbone_kwargs``)."""
    spec, overrides_key = hparams.get(key), f"{key}_overrides"
    if spec is None and alias is not None and isinstance(hparams.get(alias[0]), str):
        spec, overrides_key = hparams.get(alias[0]), alias[1]
    overrides = dict(hparams.get(overrides_key) or {})
    for geometry_key in ("img_size", "patch_size"):  # stated once for all networks (linked from the data module)
        if hparams.get(geometry_key) is not None:
            overrides[geometry_key] = hparams[geometry_key]
    if spec is None:
        return None, None
    if isinstance(spec, str):
        if spec not in registry:
            raise ValueError(
                f"hyper_parameters[{key!r}] = {spec!r} is not a registered name; expected one of {sorted(registry)}."
            )
        config = encoder_config(spec, **overrides) if registry is ENCODERS else predictor_config(spec, **overrides)
        return spec, config
    if isinstance(spec, Mapping):
        return None, {**dict(spec), **overrides}
    raise ValueError(
        f"Expected hyper_parameters[{key!r}] to be a registry name or a dict of kwargs; found {type(spec).__name__}."
    )


def read_checkpoint(source: str | Path, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Read any supported source into a :class:`LoadedCheckpoint` (no model is built).

    Args:
        source: file or exported folder.
        map_location: passed to ``torch.load`` / device for safetensors.

    Raises:
        FileNotFoundError: if the source does not exist.
        ValueError: if the format is not recognised or cannot be read safely.
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint source {path} does not exist.")
    device = str(map_location)
    if path.is_dir():
        config_path, weights_path = path / CONFIG_FILENAME, path / WEIGHTS_FILENAME
        if not config_path.is_file() or not weights_path.is_file():
            raise ValueError(
                f"Expected an exported folder with {CONFIG_FILENAME} and {WEIGHTS_FILENAME} in {path}; found "
                f"{sorted(p.name for p in path.iterdir())}. Write one with `neurojepa export`."
            )
        config = json.loads(config_path.read_text())
        if config.get("format") != EXPORT_FORMAT or config.get("format_version") != EXPORT_FORMAT_VERSION:
            raise ValueError(
                f"{config_path}: expected format {EXPORT_FORMAT!r} version {EXPORT_FORMAT_VERSION}; found "
                f"{config.get('format')!r} version {config.get('format_version')!r}."
            )
        encoders, predictor = _split_roles(load_file(weights_path, device=device))
        return LoadedCheckpoint(str(path), encoders, predictor, dict(config["config"]), config.get("name"))
    if path.suffix == ".safetensors":
        encoders, predictor = _split_roles(load_file(path, device=device))
        return LoadedCheckpoint(str(path), encoders, predictor)

    obj = _torch_load(path, map_location)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a dict checkpoint; found {type(obj).__name__}.")
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):  # Lightning
        # Modules may store non-tensor `_extra_state` entries; they are never encoder weights.
        tensors = {k: v for k, v in obj["state_dict"].items() if isinstance(v, Tensor)}
        encoders, predictor = _split_roles(tensors)
        hparams = obj.get("hyper_parameters") or {}
        name, kwargs = _kwargs_from_hparams(hparams, "encoder", ENCODERS, alias=("backbone", "backbone_kwargs"))
        _, predictor_kwargs = _kwargs_from_hparams(hparams, "predictor", PREDICTORS)
        return LoadedCheckpoint(str(path), encoders, predictor, kwargs, name, predictor_kwargs)
    reference_roles = {"target_encoder": "target", "encoder": "context"}
    if any(key in obj for key in (*reference_roles, "predictor")):  # reference pretraining checkpoint
        encoders = {
            role: _clean(_as_tensor_dict(obj[key], f"{path}[{key!r}]"))
            for key, role in reference_roles.items()
            if obj.get(key) is not None
        }
        predictor = obj.get("predictor")
        predictor_sd = _clean(_as_tensor_dict(predictor, f"{path}['predictor']")) if predictor is not None else None
        return LoadedCheckpoint(str(path), encoders, predictor_sd)
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        encoders, predictor = _split_roles(obj)
        return LoadedCheckpoint(str(path), encoders, predictor)
    raise ValueError(
        f"{path}: unrecognised checkpoint with top-level keys {sorted(map(str, obj))[:_MAX_NAMED]}; expected a "
        "reference checkpoint (encoder/target_encoder/predictor), a Lightning checkpoint (state_dict), or a flat state "
        "dict."
    )


# ---------------------------------------------------------------------------------------------- architecture
def _shape_signature(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _matching_names(
    state_dict: StateDict, registry: Mapping[str, dict[str, Any]], build: Callable[..., nn.Module]
) -> list[str]:
    given = {k: tuple(v.shape) for k, v in state_dict.items()}
    matches = []
    for name, kwargs in registry.items():
        with torch.device("meta"):
            model = build(**kwargs)
        if _shape_signature(model) == given:
            matches.append(name)
    return matches


def _describe_encoder_shapes(sd: StateDict) -> str:
    patch = sd.get("patch_embed.proj.weight")
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.")})
    moe = sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.endswith("mlp.gate.gate.weight")})
    experts = sd[f"blocks.{moe[0]}.mlp.gate.gate.weight"].shape[0] if moe else 0
    embed_dim = patch.shape[0] if patch is not None else "?"
    patch_size = tuple(patch.shape[2:]) if patch is not None else "?"
    return (
        f"embed_dim={embed_dim}, patch={patch_size}, "
        f"depth={len(blocks)}, moe_block_indices={moe}, num_experts={experts}"
    )


def infer_encoder_name(state_dict: StateDict) -> str:
    """The registry encoder whose state-dict keys and shapes equal these (native layout).

    Raises:
        ValueError: if none or several match, describing the shapes found.
    """
    matches = _matching_names(state_dict, ENCODERS, VisionTransformer3D)
    if len(matches) == 1:
        return matches[0]
    raise ValueError(
        f"Cannot infer the encoder architecture from the weights ({_describe_encoder_shapes(state_dict)}): "
        f"{'several registry entries match: ' + str(matches) if matches else 'no registry entry matches'}. "
        "Pass name=<registry name> (and overrides={...} for non-registry sizes)."
    )


def infer_predictor_name(state_dict: StateDict) -> str:
    """The registry predictor whose state-dict keys and shapes equal these.

    Raises:
        ValueError: if none or several match.
    """
    matches = _matching_names(state_dict, PREDICTORS, Predictor3D)
    if len(matches) == 1:
        return matches[0]
    width = state_dict.get("predictor_embed.weight")
    width_shape = tuple(width.shape) if width is not None else "?"
    num_blocks = len({k.split(".")[1] for k in state_dict if k.startswith("predictor_blocks.")})
    raise ValueError(
        f"Cannot infer the predictor architecture from the weights (predictor_embed {width_shape}, "
        f"{num_blocks} blocks): "
        f"{'several registry entries match: ' + str(matches) if matches else 'no registry entry matches'}. "
        "Pass name=<registry name>."
    )


def _resolve_kwargs(
    stored_kwargs: dict[str, Any] | None,
    stored_name: str | None,
    name: str | None,
    overrides: Mapping[str, Any] | None,
    state_dict: StateDict,
    config_fn: Callable[..., dict[str, Any]],
    infer_fn: Callable[[StateDict], str],
    description: str,
) -> dict[str, Any]:
    if stored_kwargs is not None:
        if name is not None and stored_name is not None and name != stored_name:
            raise ValueError(
                f"{description} was saved as {stored_name!r} but name={name!r} was passed; drop name= or fix it."
            )
        return {**stored_kwargs, **dict(overrides or {})}
    chosen = name if name is not None else infer_fn(state_dict)
    return config_fn(chosen, **dict(overrides or {}))


# ---------------------------------------------------------------------------------------------- strict loading
def _ignored(key: str, patterns: Iterable[str]) -> bool:
    return any(key == p or fnmatch.fnmatchcase(key, p) for p in patterns)


def load_state_dict_checked(
    model: nn.Module, state_dict: StateDict, strict: bool = True, ignore_keys: Iterable[str] = (), what: str = "weights"
) -> None:
    """Load with our own key check: missing / unexpected / mis-shaped keys raise (strict) or warn (non-strict).

    Args:
        model: target module.
        state_dict: native-layout tensors.
        strict: raise on any problem not covered by ``ignore_keys``.
        ignore_keys: exact names or ``fnmatch`` patterns excused from the check (and not loaded).
        what: description of the source for messages.

    Raises:
        ValueError: on a mismatch when ``strict``.
    """
    patterns = tuple(ignore_keys)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not _ignored(k, patterns)]
    unexpected = [k for k in state_dict if k not in expected and not _ignored(k, patterns)]
    mismatched = [
        f"{k}: checkpoint {list(state_dict[k].shape)} vs model {list(expected[k].shape)}"
        for k in state_dict
        if k in expected and state_dict[k].shape != expected[k].shape and not _ignored(k, patterns)
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)):
        if keys:
            more = f" (+{len(keys) - _MAX_NAMED} more)" if len(keys) > _MAX_NAMED else ""
            problems.append(f"{len(keys)} {label} key(s): {keys[:_MAX_NAMED]}{more}")
    if problems:
        message = (
            f"{what} do not match the {type(model).__name__} ({'; '.join(problems)}). Routed experts are compared "
            "stacked (experts.fc1_weight [E, ...]). Check the architecture (name=/overrides=) or excuse keys with "
            "ignore_keys=[...]."
        )
        if strict:
            raise ValueError(message)
        warnings.warn(message, stacklevel=3)
    loadable = {
        k: v
        for k, v in state_dict.items()
        if k in expected and v.shape == expected[k].shape and not _ignored(k, patterns)
    }
    model.load_state_dict(loadable, strict=False)


_ModuleT = TypeVar("_ModuleT", bound=nn.Module)


def _instantiate(
    cls: type[_ModuleT], kwargs: dict[str, Any], state_dict: StateDict, ignore_keys: Iterable[str]
) -> _ModuleT:
    """Build ``cls(**kwargs)``; skip the (slow, about 8 s for the paper encoder) random init when every tensor will
    be overwritten by a correctly shaped checkpoint tensor, by building on the meta device and allocating empty."""
    with torch.device("meta"):
        probe = cls(**kwargs)
    device = next(iter(state_dict.values())).device if state_dict else torch.device("cpu")
    patterns = tuple(ignore_keys)
    complete = all(
        k in state_dict and state_dict[k].shape == v.shape and not _ignored(k, patterns)
        for k, v in probe.state_dict().items()
    )
    if complete:
        return probe.to_empty(device=device)
    return cls(**kwargs).to(device)


# ---------------------------------------------------------------------------------------------- public loaders
def _select_encoder(checkpoint: LoadedCheckpoint, which: Which) -> StateDict:
    if which not in ("target", "context"):
        raise ValueError(f"Expected which='target' or 'context'; found {which!r}.")
    encoders = checkpoint.encoders
    if which in encoders:
        return encoders[which]
    if "backbone" in encoders and len(encoders) == 1:
        return encoders["backbone"]  # a single-encoder source: `which` has nothing to choose between
    found = sorted(encoders) or ["none"]
    raise ValueError(
        f"{checkpoint.description}: asked for the {which} encoder (which={which!r}) but the checkpoint holds "
        f"encoder role(s) {found}. Reference checkpoints name them 'target_encoder' (which='target') and "
        "'encoder' (which='context')."
    )


def load_backbone(
    source: str | Path,
    strict: bool = True,
    which: Which = "target",
    name: str | None = None,
    ignore_keys: Iterable[str] = (),
    map_location: str | torch.device = "cpu",
    overrides: Mapping[str, Any] | None = None,
) -> VisionTransformer3D:
    """Build an encoder and load weights from any supported source (see module docstring).

    The architecture comes from the stored config (exported folder ``config.json``, Lightning hyper-parameters),
    else from ``name``, else from the registry entry whose state-dict shapes match exactly. Image size is not
    visible in the weights (no position embedding); inferred architectures use the registry entry's.

    Args:
        source: checkpoint file or exported folder.
        strict: fail on any missing / unexpected / mis-shaped key (default); otherwise warn and load the rest.
        which: ``"target"`` (EMA encoder, default) or ``"context"`` (online encoder) for checkpoints holding both.
        name: registry name, when the source stores no config.
        ignore_keys: key names or ``fnmatch`` patterns to excuse from the check.
        map_location: device for reading.
        overrides: constructor kwargs applied on top of the resolved config (e.g. ``use_activation_checkpointing``).

    Returns:
        The encoder, in training mode, on the device the weights were read to (``map_location``).
    """
    ignore_keys = tuple(ignore_keys)
    checkpoint = read_checkpoint(source, map_location)
    state_dict = reference_to_native(_select_encoder(checkpoint, which))
    kwargs = _resolve_kwargs(
        checkpoint.encoder_kwargs, checkpoint.encoder_name, name, overrides, state_dict,
        encoder_config, infer_encoder_name, checkpoint.description,
    )  # fmt: skip
    encoder = _instantiate(VisionTransformer3D, kwargs, state_dict, ignore_keys)
    load_state_dict_checked(encoder, state_dict, strict, ignore_keys, f"{checkpoint.description} ({which} encoder)")
    return encoder


def load_predictor(
    source: str | Path,
    strict: bool = True,
    name: str | None = None,
    ignore_keys: Iterable[str] = (),
    map_location: str | torch.device = "cpu",
    overrides: Mapping[str, Any] | None = None,
) -> Predictor3D:
    """Build a predictor and load it from a reference checkpoint (``predictor``) or our Lightning checkpoint
    (``predictor.*`` keys; architecture from ``hyper_parameters["predictor"]`` / ``["predictor_overrides"]``).

    Args: as :func:`load_backbone` (without ``which``).
    """
    ignore_keys = tuple(ignore_keys)
    checkpoint = read_checkpoint(source, map_location)
    if checkpoint.predictor is None:
        raise ValueError(
            f"{checkpoint.description} holds no predictor weights (no 'predictor' dict or 'predictor.*' keys)."
        )
    state_dict = checkpoint.predictor
    kwargs = _resolve_kwargs(
        checkpoint.predictor_kwargs, None, name, overrides, state_dict,
        predictor_config, infer_predictor_name, checkpoint.description,
    )  # fmt: skip
    predictor = _instantiate(Predictor3D, kwargs, state_dict, ignore_keys)
    load_state_dict_checked(predictor, state_dict, strict, ignore_keys, f"{checkpoint.description} (predictor)")
    return predictor


def export_backbone(
    encoder: VisionTransformer3D,
    out_dir: str | Path,
    name: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (reference key layout, no prefixes).

    ``config.json`` holds the format and version, the registry ``name`` and ``overrides`` (provenance) and the full
    constructor kwargs (``config``), which :func:`load_backbone` builds from.

    Args:
        encoder: the encoder to export.
        out_dir: folder to create or fill.
        name: registry name it was built from, if any.
        overrides: overrides it was built with, if any.

    Returns:
        ``out_dir`` as a Path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().to("cpu").contiguous() for k, v in encoder.state_dict().items()}
    save_file(
        native_to_reference(state_dict), out / WEIGHTS_FILENAME, metadata={"format": "pt", "key_layout": "reference"}
    )
    config = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "name": name,
        "overrides": dict(overrides or {}),
        "config": encoder.config,
    }
    (out / CONFIG_FILENAME).write_text(json.dumps(config, indent=2) + "\n")
    return out
