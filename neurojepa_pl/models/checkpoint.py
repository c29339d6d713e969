"""Weight I/O: load encoders/predictors from every checkpoint format we meet, export backbones.

Accepted sources (``load_backbone``, ``load_predictor``):

* reference pretraining checkpoints (``torch.save`` dict with ``encoder``, ``target_encoder``, ``predictor``, keys
  prefixed ``module.backbone.``); ``which="target"`` takes the EMA ``target_encoder``, ``"context"`` the online
  ``encoder``. The reference loader silently takes ``encoder`` (docs/method.md §9.3); we make the choice explicit;
* bare ``.safetensors`` files, reference (``experts.{e}.fc1.weight``) or native (``experts.fc1_weight``) layout;
* exported folders (``config.json`` + ``model.safetensors``) written by :func:`export_backbone`, and folders whose
  ``config.json`` is not ours (e.g. the authors' Hub repository): their weights file is read as a flat state dict;
* Hugging Face Hub repository ids (``"org/name"``, ``revision=``), through :mod:`neurojepa_pl.models.hub`;
* our Lightning checkpoints: ``state_dict`` keys ``target_encoder.*`` / ``context_encoder.*`` (pretraining) or
  ``backbone.*`` (downstream), architecture in ``hyper_parameters["encoder"]`` (a full spec, or a registry name plus
  ``hyper_parameters["encoder_overrides"]``), or ``["backbone"]`` and ``["backbone_kwargs"]`` (downstream modules);
* flat state-dict files (``pytorch_model.bin``-style).

Every ``torch.load`` uses ``weights_only=True``: we never unpickle arbitrary objects. Keys may carry any of the
wrapper prefixes ``module.``, ``backbone.``, ``_orig_mod.``, ``_checkpoint_wrapped_module.``. Loading is strict by
default: missing, unexpected or mis-shaped keys raise an error naming them with both shapes (routed experts are
compared in the native stacked layout), also when the architecture had to be inferred from the weights (then from
the closest registry entry); ``strict=False`` loads what matches and warns naming the rest. Files that are empty,
truncated or not checkpoints at all are reported by name with what was found (docs/method.md §9.3).
"""

from __future__ import annotations

import fnmatch
import json
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from neurojepa_pl.errors import UserFileNotFoundError, UserValueError
from neurojepa_pl.models.hub import hub_snapshot, is_hub_id
from neurojepa_pl.models.predictor import Predictor3D
from neurojepa_pl.models.registry import ENCODERS, PREDICTORS, encoder_spec, predictor_spec, split_spec
from neurojepa_pl.models.vit3d import VisionTransformer3D

__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_FORMAT_VERSION",
    "LoadedCheckpoint",
    "strip_wrapper_prefixes",
    "reference_to_native",
    "native_to_reference",
    "read_checkpoint",
    "read_torch_file",
    "load_backbone",
    "load_backbone_with_info",
    "load_predictor",
    "load_predictor_with_info",
    "load_state_dict_checked",
    "export_backbone",
    "infer_encoder_name",
    "infer_predictor_name",
]

EXPORT_FORMAT = "neurojepa_pl.backbone"
EXPORT_FORMAT_VERSION = 2
"""Version 2 added ``contents`` (one encoder, or context + target + predictor) and the predictor's config."""
READABLE_FORMAT_VERSIONS = (1, 2)
CONFIG_FILENAME = "config.json"
WEIGHTS_FILENAME = "model.safetensors"
_FOREIGN_WEIGHTS = (WEIGHTS_FILENAME, "pytorch_model.bin")

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
_ROLE_NAMES = {"target": "target_encoder", "context": "context_encoder", "predictor": "predictor"}
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
        shapes = {tuple(experts[e].shape) for e in expected}
        if len(shapes) > 1:
            found = {f"{prefix}experts.{e}.{fc}.{kind}": list(experts[e].shape) for e in expected}
            raise ValueError(f"Routed-expert tensors of one layer differ in shape: {found}")
        native[name] = torch.stack([experts[e] for e in expected])
    return native


def native_to_reference(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Split native stacked experts into reference per-expert keys (contiguous, non-shared tensors).

    The keys come out in the reference's state-dict order too: a layer's experts expert by expert
    (``experts.0.fc1.weight, experts.0.fc1.bias, experts.0.fc2.weight, experts.0.fc2.bias, experts.1...``), where
    the stacked layout groups them tensor by tensor. The order matters for optimizer states, whose parameters are
    numbered in ``named_parameters()`` order.
    """
    reference: StateDict = {}
    done: set[str] = set()
    for key, value in state_dict.items():
        match = _NATIVE_EXPERT.match(key)
        if match is None:
            reference[key] = value
            continue
        prefix = match["prefix"]
        if prefix in done:
            continue
        done.add(prefix)
        stacked = {
            (fc, kind): state_dict[name]
            for fc in ("fc1", "fc2")
            for kind in ("weight", "bias")
            if (name := f"{prefix}experts.{fc}_{kind}") in state_dict
        }
        for expert in range(value.shape[0]):
            for (fc, kind), tensor in stacked.items():
                reference[f"{prefix}experts.{expert}.{fc}.{kind}"] = tensor[expert].clone()
    return reference


# ---------------------------------------------------------------------------------------------- reading files
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
        predictor_name: the predictor's registry name, if stored.
        raw: the top-level object of a ``torch.load``-ed file (None for safetensors / folders), for callers that need
            more than the networks (the optimizer state of a reference checkpoint).
        step: the optimizer step the weights were saved at, when the source records it.
    """

    description: str
    encoders: dict[str, StateDict] = field(default_factory=dict)
    predictor: StateDict | None = None
    encoder_kwargs: dict[str, Any] | None = None
    encoder_name: str | None = None
    predictor_kwargs: dict[str, Any] | None = None
    predictor_name: str | None = None
    raw: Mapping[str, Any] | None = field(default=None, repr=False)
    step: int | None = None


_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # pickle of torch's magic number
_GZIP_MAGIC = b"\x1f\x8b"
_REREAD = "copy or download the file again (compare its size with the original), or save it again"


def _head(path: Path, n: int = 64) -> bytes:
    with path.open("rb") as handle:
        return handle.read(n)


def _is_safetensors(head: bytes, size: int) -> bool:
    """safetensors: an 8-byte little-endian header length, then a JSON header starting with ``{``."""
    if len(head) < 9:
        return False
    header = int.from_bytes(head[:8], "little")
    return 0 < header <= size - 8 and head[8:9] == b"{"


def _describe_bytes(head: bytes) -> str:
    start = head[:16]
    if start and all(32 <= b < 127 or b in (9, 10, 13) for b in start):
        return f"text {start.decode('ascii')!r}"
    return f"bytes {start.hex(' ')}"


def read_torch_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file and what it holds.

    Zip-format files are memory-mapped: a reference checkpoint is ~2 GB with optimizer state, of which only what is
    used is then read. Legacy (pre-zip) files cannot be mapped and are read whole.

    Raises:
        UserFileNotFoundError: if there is no such file.
        UserValueError: for an empty, truncated or damaged file, a file that is not a ``torch.save`` checkpoint
            (naming its size and first bytes), or one that pickles Python objects beyond tensors and containers.
    """
    path = Path(path)
    if not path.is_file():
        raise UserFileNotFoundError(f"Checkpoint file {path} does not exist.", "check the path.")
    size = path.stat().st_size
    if size == 0:
        raise UserValueError(f"{path} is empty (0 bytes), not a checkpoint.", _REREAD + ".")
    head = _head(path)
    if head.startswith(_ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            raise UserValueError(
                f"{path} is a truncated or damaged zip archive ({size:,} bytes, no central directory): a torch.save "
                "checkpoint that was not completely written or copied.",
                _REREAD + ".",
            )
        with zipfile.ZipFile(path) as archive:
            members = archive.namelist()
        if not any(name.endswith("data.pkl") for name in members):
            raise UserValueError(
                f"{path} is a zip archive but not a torch.save checkpoint (no data.pkl among {members[:5]}).",
                "pass the checkpoint file itself (.pt / .ckpt / .safetensors) or an exported folder.",
            )
    elif not head.startswith(_LEGACY_TORCH_MAGIC[:4]):
        kind = "gzip-compressed data (a .nii.gz scan?)" if head.startswith(_GZIP_MAGIC) else _describe_bytes(head)
        raise UserValueError(
            f"{path} is not a checkpoint: {size:,} bytes starting with {kind}; expected a torch.save file (a zip "
            "archive) or safetensors.",
            "pass the checkpoint file itself (.pt / .ckpt / .safetensors) or an exported folder.",
        )
    mmap = head.startswith(_ZIP_MAGIC)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise UserValueError(
            f"Cannot read {path} with torch.load(weights_only=True): it pickles Python objects beyond tensors and "
            f"plain containers ({str(err).strip().splitlines()[-1]}). We never unpickle arbitrary objects.",
            "if it is a Lightning checkpoint whose hyper-parameters hold custom classes, save those as plain values "
            "(registry name + dict of overrides), or, in a trusted environment, re-save just the state dict: "
            "torch.save({'state_dict': ckpt['state_dict'], 'hyper_parameters': {...plain...}}, path).",
        ) from err
    except (RuntimeError, EOFError, OSError) as err:  # torch's reader: truncated tensor data, unexpected EOF, ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserValueError(
            f"{path} could not be read ({size:,} bytes): it is truncated or damaged ({reason}).", _REREAD + "."
        ) from err


def _read_safetensors(path: Path, device: str) -> StateDict:
    try:
        return load_file(path, device=device)
    except SafetensorError as err:
        raise UserValueError(
            f"{path} could not be read as safetensors ({path.stat().st_size:,} bytes): {err}.", _REREAD + "."
        ) from err


def _as_tensor_dict(obj: Any, where: str) -> StateDict:
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UserValueError(
            f"Expected {where} to be a state dict (a mapping of names to tensors); found {type(obj).__name__}.",
            "pass a checkpoint that holds the network's weights.",
        )
    return dict(obj)


def _clean(state_dict: Mapping[str, Tensor], where: str) -> StateDict:
    # Expert stacking (reference_to_native) is left to the caller, for the one network it selects: stacking reads
    # every expert tensor, which for a memory-mapped 2 GB checkpoint is most of the cost of loading.
    try:
        return strip_wrapper_prefixes(state_dict)
    except ValueError as err:
        raise UserValueError(f"{where}: {err}", "keep one copy of each tensor.") from err


def _split_roles(flat: Mapping[str, Tensor], where: str) -> tuple[dict[str, StateDict], StateDict | None]:
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
    encoders = {role: _clean(sd, where) for role, sd in roles.items()}
    if not encoders and rest:
        encoders["backbone"] = _clean(rest, where)
    return encoders, (_clean(predictor, where) if predictor is not None else None)


def _strip_leading(key: str, prefixes: Iterable[str]) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def _spec_from_hparams(
    hparams: Mapping[str, Any],
    key: str,
    expand: Callable[..., dict[str, Any]],
    where: str,
    alias: tuple[str, str] | None,
) -> tuple[str | None, dict[str, Any] | None]:
    """Architecture from ``hparams[key]`` (a full spec, a registry name or a kwargs dict), ``hparams[key +
    "_overrides"]`` and the linked geometry, else from the ``alias`` pair (downstream ``backbone`` +
    ``backbone_kwargs``)."""
    spec, overrides_key = hparams.get(key), f"{key}_overrides"
    if spec is None and alias is not None and isinstance(hparams.get(alias[0]), str):
        spec, overrides_key = hparams.get(alias[0]), alias[1]
    if spec is None:
        return None, None
    overrides = dict(hparams.get(overrides_key) or {})
    for geometry_key in ("img_size", "patch_size"):  # stated once for all networks (linked from the data module)
        if hparams.get(geometry_key) is not None:
            overrides[geometry_key] = hparams[geometry_key]
    if not isinstance(spec, (str, Mapping)):
        raise UserValueError(
            f"{where}: expected hyper_parameters[{key!r}] to be a registry name or a mapping of constructor "
            f"arguments; found {type(spec).__name__}.",
            "pass name= (and overrides=) to load_backbone.",
        )
    try:
        name, kwargs = split_spec(expand(spec, **overrides))
    except (KeyError, ValueError, TypeError) as err:
        raise UserValueError(
            f"{where}: hyper_parameters[{key!r}] = {spec!r} does not describe a network: {err}",
            "pass name= (and overrides=) to load_backbone.",
        ) from err
    return name, kwargs


def _read_folder(path: Path, device: str) -> LoadedCheckpoint:
    config_path = path / CONFIG_FILENAME
    weights = next((path / name for name in _FOREIGN_WEIGHTS if (path / name).is_file()), None)
    if not config_path.is_file() or weights is None:
        raise UserValueError(
            f"Expected an exported folder with {CONFIG_FILENAME} and {WEIGHTS_FILENAME} in {path}; found "
            f"{sorted(p.name for p in path.iterdir())}.",
            "write one with `neurojepa export`, or pass the checkpoint file itself.",
        )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserValueError(f"{config_path} is not valid JSON ({err}).", "export the folder again.") from err
    if not isinstance(config, dict) or "format" not in config:
        # Not written by us (e.g. the authors' Hub repository): read the weights file as a flat state dict; the
        # architecture then comes from name= or from the weights.
        return _read_file(weights, device, description=f"{weights} (its {CONFIG_FILENAME} is not ours: ignored)")
    version = config.get("format_version")
    if config.get("format") != EXPORT_FORMAT or version not in READABLE_FORMAT_VERSIONS:
        raise UserValueError(
            f"{config_path}: expected format {EXPORT_FORMAT!r} version "
            f"{' or '.join(map(str, READABLE_FORMAT_VERSIONS))}; found {config.get('format')!r} version {version!r}.",
            "export it again with this version of neurojepa_pl.",
        )
    if not isinstance(config.get("config"), dict) or weights.name != WEIGHTS_FILENAME:
        raise UserValueError(
            f"{config_path}: lacks the encoder's constructor arguments ('config') or {WEIGHTS_FILENAME}.",
            "export the folder again.",
        )
    encoders, predictor = _split_roles(_read_safetensors(weights, device), str(weights))
    predictor_config = config.get("predictor") or {}
    return LoadedCheckpoint(
        str(path),
        encoders,
        predictor,
        dict(config["config"]),
        config.get("name"),
        dict(predictor_config["config"]) if predictor_config.get("config") else None,
        predictor_config.get("name"),
        step=(config.get("source") or {}).get("step"),
    )


def _read_file(path: Path, device: str, description: str | None = None) -> LoadedCheckpoint:
    description = description or str(path)
    size = path.stat().st_size
    if path.suffix == ".safetensors" or (size and _is_safetensors(_head(path), size)):
        encoders, predictor = _split_roles(_read_safetensors(path, device), description)
        return LoadedCheckpoint(description, encoders, predictor)
    obj = read_torch_file(path, device)
    if not isinstance(obj, Mapping):
        raise UserValueError(
            f"{path}: expected a dict checkpoint; found {type(obj).__name__}.",
            "pass a reference, Lightning or state-dict checkpoint.",
        )
    step = obj.get("global_step") if isinstance(obj.get("global_step"), int) else None
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):  # Lightning
        # Modules may store non-tensor `_extra_state` entries; they are never encoder weights.
        tensors = {k: v for k, v in obj["state_dict"].items() if isinstance(v, Tensor)}
        encoders, predictor = _split_roles(tensors, description)
        hparams = obj.get("hyper_parameters") or {}
        name, kwargs = _spec_from_hparams(
            hparams, "encoder", encoder_spec, description, ("backbone", "backbone_kwargs")
        )
        predictor_name, predictor_kwargs = _spec_from_hparams(hparams, "predictor", predictor_spec, description, None)
        return LoadedCheckpoint(
            description, encoders, predictor, kwargs, name, predictor_kwargs, predictor_name, obj, step
        )
    reference_roles = {"target_encoder": "target", "encoder": "context"}
    if any(key in obj for key in (*reference_roles, "predictor")):  # reference pretraining checkpoint
        encoders = {
            role: _clean(_as_tensor_dict(obj[key], f"{path}[{key!r}]"), description)
            for key, role in reference_roles.items()
            if obj.get(key) is not None
        }
        predictor = obj.get("predictor")
        predictor_sd = None
        if predictor is not None:
            predictor_sd = _clean(_as_tensor_dict(predictor, f"{path}['predictor']"), description)
        return LoadedCheckpoint(description, encoders, predictor_sd, raw=obj, step=step)
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        encoders, predictor = _split_roles(obj, description)
        return LoadedCheckpoint(description, encoders, predictor, raw=obj)
    raise UserValueError(
        f"{path}: unrecognised checkpoint with top-level keys {sorted(map(str, obj))[:_MAX_NAMED]}; expected a "
        "reference checkpoint (encoder/target_encoder/predictor), a Lightning checkpoint (state_dict), or a flat state "
        "dict.",
        "pass a checkpoint that holds the network's weights.",
    )


def read_checkpoint(
    source: str | Path,
    map_location: str | torch.device = "cpu",
    revision: str | None = None,
    token: str | bool | None = None,
) -> LoadedCheckpoint:
    """Read any supported source into a :class:`LoadedCheckpoint` (no model is built).

    Args:
        source: file, exported folder, or Hugging Face Hub repository id ``"org/name"`` (when no such local path
            exists).
        map_location: passed to ``torch.load`` / device for safetensors.
        revision: Hub branch, tag or commit (Hub ids only).
        token: Hub token (None: ``HF_TOKEN`` or the saved login).

    Raises:
        UserFileNotFoundError: if the source does not exist (locally, nor on the Hub for an ``org/name`` id).
        UserValueError: if the format is not recognised or cannot be read safely, naming the file and what it holds.
    """
    path = Path(source)
    if not path.exists():
        if not is_hub_id(source):
            raise UserFileNotFoundError(
                f"Checkpoint source {path} does not exist.",
                "check the path (a Hugging Face Hub id has the form 'org/name').",
            )
        snapshot = hub_snapshot(os.fspath(source), revision=revision, token=token)
        loaded = _read_folder(snapshot, str(map_location))
        loaded.description = f"{source}@{revision or 'main'} ({snapshot})"
        return loaded
    if revision is not None:
        raise UserValueError(f"revision={revision!r} applies to Hub ids only; {path} is a local path.", "drop it.")
    if path.is_dir():
        return _read_folder(path, str(map_location))
    return _read_file(path, str(map_location))


# ---------------------------------------------------------------------------------------------- architecture
def _shape_signature(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@dataclass(frozen=True)
class _Candidate:
    name: str
    key_overlap: float  # Jaccard index of the key names
    shape_overlap: float  # share of all keys present in both with the same shape
    matching: int  # tensors with the same name and shape
    total: int  # tensors of the registry entry


def _rank_candidates(
    state_dict: StateDict, registry: Mapping[str, dict[str, Any]], build: Callable[..., nn.Module]
) -> list[_Candidate]:
    """Registry entries by closeness to these weights (best first): key names in common, then shapes in common."""
    given = {k: tuple(v.shape) for k, v in state_dict.items()}
    ranked = []
    for name, kwargs in registry.items():
        with torch.device("meta"):
            expected = _shape_signature(build(**kwargs))
        union = len(given.keys() | expected.keys()) or 1
        common = given.keys() & expected.keys()
        same = sum(given[k] == expected[k] for k in common)
        ranked.append(_Candidate(name, len(common) / union, same / union, same, len(expected)))
    return sorted(ranked, key=lambda c: (c.key_overlap, c.shape_overlap), reverse=True)


def _describe_encoder_shapes(sd: StateDict) -> str:
    patch = sd.get("patch_embed.proj.weight")
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.split(".")[1].isdigit()})
    moe = sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.endswith("mlp.gate.gate.weight")})
    experts = sd[f"blocks.{moe[0]}.mlp.gate.gate.weight"].shape[0] if moe else 0
    embed_dim = patch.shape[0] if patch is not None else "?"
    patch_size = tuple(patch.shape[2:]) if patch is not None else "?"
    return (
        f"embed_dim={embed_dim}, patch={patch_size}, "
        f"depth={len(blocks)}, moe_block_indices={moe}, num_experts={experts}"
    )


def _describe_predictor_shapes(sd: StateDict) -> str:
    width = sd.get("predictor_embed.weight")
    width_shape = list(width.shape) if width is not None else "?"
    num_blocks = len({k.split(".")[1] for k in sd if k.startswith("predictor_blocks.")})
    return f"predictor_embed {width_shape}, {num_blocks} blocks"


_MIN_KEY_OVERLAP = 0.5  # below this share of common key names the weights are not "a variant of" the entry


def _infer_name(
    state_dict: StateDict,
    registry: Mapping[str, dict[str, Any]],
    build: Callable[..., nn.Module],
    kind: str,
    describe: Callable[[StateDict], str],
    where: str,
) -> tuple[str, str]:
    """``(registry name, note)``: the entry whose keys and shapes equal the weights' (note ``""``), else the closest
    one, with a note saying so (the key check then names the differences).

    Raises:
        UserValueError: if several entries match exactly, or none is close (fewer than half the key names shared).
    """
    ranked = _rank_candidates(state_dict, registry, build)
    exact = [c.name for c in ranked if c.matching == c.total == len(state_dict)]
    if len(exact) == 1:
        return exact[0], ""
    if exact:
        raise UserValueError(
            f"{where}: cannot infer the {kind} architecture: several registry entries match the weights {exact}.",
            "pass name=<registry name>.",
        )
    best = ranked[0]
    found = f"no registry {kind} matches the weights ({describe(state_dict)})"
    if best.key_overlap < _MIN_KEY_OVERLAP:
        raise UserValueError(
            f"{where}: cannot infer the {kind} architecture: {found}, and none is close (the closest, "
            f"{best.name!r}, shares {best.key_overlap:.0%} of the key names).",
            "pass name=<registry name> (and overrides={...} for non-registry sizes).",
        )
    return best.name, (
        f"{found} exactly; compared with the closest, {best.name!r} ({best.matching} of its {best.total} tensors agree)"
    )


def infer_encoder_name(state_dict: StateDict) -> str:
    """The registry encoder whose state-dict keys and shapes equal these (native layout).

    Raises:
        ValueError: if none or several match, describing the shapes found and the closest entry.
    """
    name, note = _infer_name(
        state_dict, ENCODERS, VisionTransformer3D, "encoder", _describe_encoder_shapes, "encoder weights"
    )
    if note:
        raise UserValueError(f"encoder weights: {note}.", "pass name=<registry name> (and overrides={...}).")
    return name


def infer_predictor_name(state_dict: StateDict) -> str:
    """The registry predictor whose state-dict keys and shapes equal these.

    Raises:
        ValueError: if none or several match.
    """
    name, note = _infer_name(
        state_dict, PREDICTORS, Predictor3D, "predictor", _describe_predictor_shapes, "predictor weights"
    )
    if note:
        raise UserValueError(f"predictor weights: {note}.", "pass name=<registry name> (and overrides={...}).")
    return name


@dataclass(frozen=True)
class _Architecture:
    kwargs: dict[str, Any]
    name: str | None  # registry name (stored, given or inferred)
    against: str  # what the weights are compared with, for messages ("the weights do not match ...")


def _resolve_architecture(
    stored_kwargs: dict[str, Any] | None,
    stored_name: str | None,
    name: str | None,
    overrides: Mapping[str, Any] | None,
    state_dict: StateDict,
    kind: Literal["encoder", "predictor"],
    where: str,
) -> _Architecture:
    expand = encoder_spec if kind == "encoder" else predictor_spec
    overrides = dict(overrides or {})
    if stored_kwargs is not None:
        if name is not None and stored_name is not None and name != stored_name:
            raise UserValueError(
                f"{where} was saved as {stored_name!r} but name={name!r} was passed.", "drop name= or fix it."
            )
        stored = f" ({stored_name!r})" if stored_name else ""
        against = f"the weights do not match the architecture stored with them{stored}"
        return _Architecture({**stored_kwargs, **overrides}, stored_name or name, against)
    against = f"the weights do not match {name!r}"
    if name is None:
        if kind == "encoder":
            name, note = _infer_name(state_dict, ENCODERS, VisionTransformer3D, kind, _describe_encoder_shapes, where)
        else:
            name, note = _infer_name(state_dict, PREDICTORS, Predictor3D, kind, _describe_predictor_shapes, where)
        against = note or f"the weights do not match {name!r} (inferred from them)"
    try:
        kwargs = split_spec(expand(name, **overrides))[1]
    except (KeyError, ValueError) as err:
        raise UserValueError(f"{where}: {err}", f"pass a registered {kind} name and valid overrides.") from err
    return _Architecture(kwargs, name, against)


# ---------------------------------------------------------------------------------------------- strict loading
def _ignored(key: str, patterns: Iterable[str]) -> bool:
    return any(key == p or fnmatch.fnmatchcase(key, p) for p in patterns)


def _named(keys: list[str]) -> str:
    more = f" (+{len(keys) - _MAX_NAMED} more)" if len(keys) > _MAX_NAMED else ""
    return f"{keys[:_MAX_NAMED]}{more}"


def load_state_dict_checked(
    model: nn.Module,
    state_dict: StateDict,
    strict: bool = True,
    ignore_keys: Iterable[str] = (),
    what: str = "weights",
    architecture: str = "",
) -> None:
    """Load with our own key check: missing / unexpected / mis-shaped keys raise (strict) or warn (non-strict).

    Args:
        model: target module.
        state_dict: native-layout tensors.
        strict: raise on any problem not covered by ``ignore_keys``; otherwise load the tensors that match and warn
            naming the others (which keep the model's initialisation).
        ignore_keys: exact names or ``fnmatch`` patterns excused from the check (and not loaded).
        what: the source, for messages (e.g. ``"latest.pt (target encoder)"``).
        architecture: what the weights are compared with, as the message's lead, e.g. ``"the weights do not match
            'vit_base_moe'"`` or the closest-registry-entry note (default: ``"the weights do not match the
            VisionTransformer3D"``).

    Raises:
        UserValueError: on a mismatch when ``strict``: one line naming the source, each key (with both shapes for a
            mis-shaped one) and the fix.
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
    problems = [
        f"{len(keys)} {label} key(s): {_named(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched))
        if keys
    ]
    loadable = {
        k: v
        for k, v in state_dict.items()
        if k in expected and v.shape == expected[k].shape and not _ignored(k, patterns)
    }
    if problems:
        lead = architecture or f"the weights do not match the {type(model).__name__}"
        message = f"{what}: {lead}: {'; '.join(problems)}."
        fix = (
            "check the architecture (name= / overrides=; routed experts are compared stacked, experts.fc1_weight "
            "[E, ...]), excuse keys with ignore_keys=[...], or pass strict=False to load the tensors that match."
        )
        if strict:
            raise UserValueError(message, fix)
        warnings.warn(
            f"{message} strict=False: loaded the {len(loadable)} matching tensor(s); the others keep their "
            "initialisation.",
            UserWarning,
            stacklevel=3,
        )
    model.load_state_dict(loadable, strict=False)


_ModuleT = TypeVar("_ModuleT", bound=nn.Module)


def _instantiate(
    cls: type[_ModuleT], kwargs: dict[str, Any], state_dict: StateDict, ignore_keys: Iterable[str], where: str
) -> _ModuleT:
    """Build ``cls(**kwargs)``; skip the (slow, about 8 s for the paper encoder) random init when every tensor will
    be overwritten by a correctly shaped checkpoint tensor, by building on the meta device and allocating empty."""
    try:
        with torch.device("meta"):
            probe = cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise UserValueError(
            f"{where}: cannot build a {cls.__name__} from {kwargs}: {err}", "fix the architecture (name= / overrides=)."
        ) from err
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
        raise UserValueError(f"Expected which='target' or 'context'; found {which!r}.", "pass one of those.")
    encoders = checkpoint.encoders
    if which in encoders:
        return encoders[which]
    if "backbone" in encoders and len(encoders) == 1:
        return encoders["backbone"]  # a single-encoder source: `which` has nothing to choose between
    found = sorted(encoders) or ["none"]
    raise UserValueError(
        f"{checkpoint.description}: asked for the {which} encoder (which={which!r}) but the checkpoint holds "
        f"encoder role(s) {found}.",
        "reference checkpoints name them 'target_encoder' (which='target') and 'encoder' (which='context').",
    )


def _native(state_dict: StateDict, where: str) -> StateDict:
    try:
        return reference_to_native(state_dict)
    except ValueError as err:
        raise UserValueError(f"{where}: {err}", "pass a checkpoint with every expert of every MoE layer.") from err


@dataclass(frozen=True)
class LoadedEncoder:
    """An encoder with where it came from (see :func:`load_backbone_with_info`).

    Attributes:
        encoder: the loaded network.
        name: registry name it was built from (stored, given or inferred), or None.
        checkpoint: what the source holds.
    """

    encoder: VisionTransformer3D
    name: str | None
    checkpoint: LoadedCheckpoint


def load_backbone_with_info(
    source: str | Path,
    strict: bool = True,
    which: Which = "target",
    name: str | None = None,
    ignore_keys: Iterable[str] = (),
    map_location: str | torch.device = "cpu",
    overrides: Mapping[str, Any] | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> LoadedEncoder:
    """:func:`load_backbone`, also returning the registry name and the source's contents (for exporters)."""
    ignore_keys = tuple(ignore_keys)
    checkpoint = read_checkpoint(source, map_location, revision=revision, token=token)
    where = f"{checkpoint.description} ({which} encoder)"
    state_dict = _native(_select_encoder(checkpoint, which), where)
    arch = _resolve_architecture(
        checkpoint.encoder_kwargs, checkpoint.encoder_name, name, overrides, state_dict, "encoder", where
    )
    encoder = _instantiate(VisionTransformer3D, arch.kwargs, state_dict, ignore_keys, where)
    load_state_dict_checked(encoder, state_dict, strict, ignore_keys, where, arch.against)
    return LoadedEncoder(encoder, arch.name, checkpoint)


def load_backbone(
    source: str | Path,
    strict: bool = True,
    which: Which = "target",
    name: str | None = None,
    ignore_keys: Iterable[str] = (),
    map_location: str | torch.device = "cpu",
    overrides: Mapping[str, Any] | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> VisionTransformer3D:
    """Build an encoder and load weights from any supported source (see module docstring).

    The architecture comes from the stored config (exported folder ``config.json``, Lightning hyper-parameters),
    else from ``name``, else from the registry entry whose state-dict shapes match exactly, else from the closest
    entry (the key check then names every difference). Image size is not visible in the weights (no position
    embedding); inferred architectures use the registry entry's.

    Args:
        source: checkpoint file, exported folder, or Hugging Face Hub repository id ``"org/name"``.
        strict: fail on any missing / unexpected / mis-shaped key (default); otherwise warn and load the rest.
        which: ``"target"`` (EMA encoder, default) or ``"context"`` (online encoder) for checkpoints holding both.
        name: registry name, when the source stores no config.
        ignore_keys: key names or ``fnmatch`` patterns to excuse from the check.
        map_location: device for reading.
        overrides: constructor kwargs applied on top of the resolved config (e.g. ``use_activation_checkpointing``).
        revision: Hub branch, tag or commit hash (Hub ids only; pin a commit for reproducibility).
        token: Hub token; None reads ``HF_TOKEN`` or the saved login. ``HF_HUB_OFFLINE=1`` reads the cache only.

    Returns:
        The encoder, in training mode, on the device the weights were read to (``map_location``).

    Raises:
        UserFileNotFoundError: if the source does not exist.
        UserValueError: for an unreadable source or weights that do not match, naming the file and the keys.
    """
    return load_backbone_with_info(
        source, strict, which, name, ignore_keys, map_location, overrides, revision, token
    ).encoder


def load_predictor_with_info(
    source: str | Path,
    strict: bool = True,
    name: str | None = None,
    ignore_keys: Iterable[str] = (),
    map_location: str | torch.device = "cpu",
    overrides: Mapping[str, Any] | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> tuple[Predictor3D, str | None]:
    """:func:`load_predictor`, also returning the predictor's registry name (stored, given or inferred) or None."""
    ignore_keys = tuple(ignore_keys)
    checkpoint = read_checkpoint(source, map_location, revision=revision, token=token)
    where = f"{checkpoint.description} (predictor)"
    if checkpoint.predictor is None:
        raise UserValueError(
            f"{checkpoint.description} holds no predictor weights (no 'predictor' dict or 'predictor.*' keys).",
            "pass a pretraining checkpoint, or an export made with `neurojepa export --full`.",
        )
    state_dict = checkpoint.predictor
    arch = _resolve_architecture(
        checkpoint.predictor_kwargs, checkpoint.predictor_name, name, overrides, state_dict, "predictor", where
    )
    predictor = _instantiate(Predictor3D, arch.kwargs, state_dict, ignore_keys, where)
    load_state_dict_checked(predictor, state_dict, strict, ignore_keys, where, arch.against)
    return predictor, arch.name


def load_predictor(
    source: str | Path,
    strict: bool = True,
    name: str | None = None,
    ignore_keys: Iterable[str] = (),
    map_location: str | torch.device = "cpu",
    overrides: Mapping[str, Any] | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> Predictor3D:
    """Build a predictor and load it from a reference checkpoint (``predictor``), our Lightning checkpoint
    (``predictor.*`` keys; architecture from ``hyper_parameters["predictor"]``) or a ``--full`` export.

    Args: as :func:`load_backbone` (without ``which``).
    """
    return load_predictor_with_info(source, strict, name, ignore_keys, map_location, overrides, revision, token)[0]


# ---------------------------------------------------------------------------------------------- export
def _overrides_of(config: Mapping[str, Any], name: str | None, kind: Literal["encoder", "predictor"]) -> dict[str, Any]:
    """The constructor arguments in which ``config`` differs from the registry entry ``name`` (provenance)."""
    if name is None:
        return {}
    expand = encoder_spec if kind == "encoder" else predictor_spec
    try:
        preset = split_spec(expand(name))[1]
    except KeyError:
        return {}
    full = split_spec(expand({**dict(config)}))[1]
    return {k: v for k, v in full.items() if preset.get(k) != v}


def _cpu_state(module: nn.Module) -> StateDict:
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def export_backbone(
    encoder: VisionTransformer3D,
    out_dir: str | Path,
    name: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    context_encoder: VisionTransformer3D | None = None,
    predictor: Predictor3D | None = None,
    predictor_name: str | None = None,
    source: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (reference key layout: per-expert tensors, no wrapper prefixes).

    ``config.json`` holds the format and version, the registry ``name`` and ``overrides`` (provenance: what differs
    from that registry entry), the full constructor kwargs (``config``), which :func:`load_backbone` builds from,
    and ``contents``. With ``context_encoder`` and ``predictor`` (``neurojepa export --full``) the file holds the
    whole self-supervised state under the prefixes ``target_encoder.``, ``context_encoder.``, ``predictor.``, and
    ``config.json`` the predictor's ``{"name", "config"}`` too; otherwise just ``encoder``, unprefixed.

    Args:
        encoder: the encoder to export (the EMA target encoder in a full export).
        out_dir: folder to create or fill.
        name: registry name it was built from, if any.
        overrides: what differs from that entry; None computes it from ``encoder.config``.
        context_encoder: the online encoder, for a full export (with ``predictor``).
        predictor: the predictor, for a full export.
        predictor_name: the predictor's registry name, if any.
        source: provenance recorded as ``config.json["source"]`` (e.g. ``{"checkpoint": ..., "step": ...}``).

    Returns:
        ``out_dir`` as a Path.
    """
    if (context_encoder is None) != (predictor is None):
        raise UserValueError(
            "A full export needs both context_encoder and predictor (with the target encoder as encoder).",
            "pass both, or neither for an encoder-only export.",
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if context_encoder is None or predictor is None:
        tensors = native_to_reference(_cpu_state(encoder))
        contents = ["encoder"]
    else:
        tensors = {}
        for prefix, module in (("target_encoder.", encoder), ("context_encoder.", context_encoder)):
            tensors.update({prefix + k: v for k, v in native_to_reference(_cpu_state(module)).items()})
        tensors.update({f"predictor.{k}": v for k, v in _cpu_state(predictor).items()})
        contents = ["target_encoder", "context_encoder", "predictor"]
    save_file(tensors, out / WEIGHTS_FILENAME, metadata={"format": "pt", "key_layout": "reference"})
    config: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "name": name,
        "overrides": dict(overrides) if overrides is not None else _overrides_of(encoder.config, name, "encoder"),
        "config": encoder.config,
        "contents": contents,
    }
    if predictor is not None:
        config["predictor"] = {"name": predictor_name, "config": predictor.config}
    if source is not None:
        config["source"] = dict(source)
    (out / CONFIG_FILENAME).write_text(json.dumps(config, indent=2) + "\n")
    return out
