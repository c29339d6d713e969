"""The reference's full pretraining state: its AdamW moments mapped onto our parameters by name (docs/method.md §7.1).

A reference checkpoint (``torch.save`` of ``encoder``, ``target_encoder``, ``predictor``, ``opt``, ``scaler``,
``epoch``, ``global_step``, ``loss``) stores the optimizer as ``torch.optim.Optimizer.state_dict()``: parameters are
numbered, not named. The numbering is that of the reference's ``init_opt``, four groups in this order:

0. encoder parameters whose name has no "bias" and that are not 1-D (decayed);
1. predictor parameters, same rule;
2. encoder parameters with "bias" in the name or 1-D (``WD_exclude``);
3. predictor parameters, same rule;

each in ``named_parameters()`` order, which is the order of the parameters among the network's state-dict keys (a
state dict lists a module's parameters, then its buffers, then its children, and ``named_parameters`` walks the same
tree). So the names are recovered from the checkpoint's own network dicts: filter their keys to parameters (the keys
that are parameters of our network, per-expert tensors included), split them by the rule, and check the group sizes
against ``opt["param_groups"]``. If a group carries ``param_names`` (optimizers built from named parameters, torch
>= 2.6), those names are used instead. Then each state is moved to our parameter of that name; the reference's
per-expert tensors ``experts.{e}.fc1.weight`` are stacked into our ``experts.fc1_weight [E, ...]`` (their moments
are stacked likewise, and their step counts must agree, since a stacked parameter has one).

What cannot be mapped is listed, never dropped silently: a group-size mismatch, a state without a parameter of ours,
a state of a parameter we freeze, per-expert step counts that differ, a moment whose shape differs, a non-empty
``scaler``. The caller decides whether that is an error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from neurojepa_pl.models.checkpoint import strip_wrapper_prefixes

__all__ = ["REFERENCE_GROUPS", "reference_parameter_groups", "MappedOptimizerState", "map_reference_optimizer_state"]

REFERENCE_GROUPS = (("encoder", True), ("predictor", True), ("encoder", False), ("predictor", False))
"""(network, decayed) of the reference optimizer's four parameter groups, in order."""

_REF_EXPERT = re.compile(r"^(?P<prefix>(?:.*\.)?)experts\.(?P<index>\d+)\.(?P<fc>fc[12])\.(?P<kind>weight|bias)$")
_MAX_LISTED = 10


def _native_name(key: str) -> tuple[str, int | None]:
    """Our parameter name for a reference key, and the expert index for a per-expert tensor."""
    match = _REF_EXPERT.match(key)
    if match is None:
        return key, None
    return f"{match['prefix']}experts.{match['fc']}_{match['kind']}", int(match["index"])


def _decayed(name: str, tensor: Tensor) -> bool:
    # The reference rule (docs/method.md §7): no weight decay when "bias" is in the name or the tensor is 1-D.
    return "bias" not in name and tensor.dim() != 1


def reference_parameter_groups(
    networks: Mapping[str, Mapping[str, Tensor]], parameters: Mapping[str, Sequence[str]]
) -> list[list[str]]:
    """The names of the reference optimizer's four groups (:data:`REFERENCE_GROUPS`), as ``"<network>.<key>"``.

    Args:
        networks: the checkpoint's state dicts, ``{"encoder": ..., "predictor": ...}`` in their saved key order
            (wrapper prefixes removed, reference key layout).
        parameters: our parameter names per network (native layout), used to tell parameters from buffers.

    Returns:
        Four lists of reference names, e.g. ``"encoder.blocks.1.mlp.experts.3.fc1.weight"``.
    """
    groups: list[list[str]] = []
    for network, decayed in REFERENCE_GROUPS:
        ours = set(parameters[network])
        groups.append(
            [
                f"{network}.{key}"
                for key, tensor in networks[network].items()
                if _native_name(key)[0] in ours and _decayed(key, tensor) == decayed
            ]
        )
    return groups


@dataclass
class MappedOptimizerState:
    """Per-parameter optimizer state under our names, and what could not be mapped.

    Attributes:
        state: ``{our parameter name: {"step": ..., "exp_avg": ..., "exp_avg_sq": ...}}`` (names like
            ``"context_encoder.blocks.1.mlp.experts.fc1_weight"``).
        problems: one line per item that could not be mapped (empty when everything mapped).
        mapped: number of reference parameter states that were moved.
    """

    state: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    mapped: int = 0


def _listed(items: Sequence[str]) -> str:
    more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"{list(items[:_MAX_LISTED])}{more}"


def map_reference_optimizer_state(
    opt: Any,
    networks: Mapping[str, Mapping[str, Tensor]],
    parameters: Mapping[str, Mapping[str, Tensor]],
    trainable: set[str],
    prefixes: Mapping[str, str],
) -> MappedOptimizerState:
    """Map a reference ``opt`` (``Optimizer.state_dict()``) onto our parameters by name.

    Args:
        opt: the checkpoint's ``opt`` entry (``{"state": {id: {...}}, "param_groups": [{"params": [ids]}, ...]}``).
        networks: the checkpoint's ``encoder`` and ``predictor`` state dicts (saved key order, prefixes removed).
        parameters: our parameters per network, ``{"encoder": {name: param}, "predictor": {...}}`` (native names).
        trainable: our names (with the network prefix, e.g. ``"predictor.mask_tokens.0"``) that the optimizer holds.
        prefixes: our module prefix per network, ``{"encoder": "context_encoder.", "predictor": "predictor."}``.

    Returns:
        The mapped states and the list of problems.
    """
    result = MappedOptimizerState()
    if not isinstance(opt, Mapping) or not isinstance(opt.get("param_groups"), Sequence):
        result.problems.append(
            f"optimizer state: expected an Optimizer.state_dict() ({{'state', 'param_groups'}}); found "
            f"{type(opt).__name__}"
        )
        return result
    groups = list(opt["param_groups"])
    states = opt.get("state") or {}
    expected = reference_parameter_groups(networks, {k: list(v) for k, v in parameters.items()})
    if len(groups) != len(expected):
        result.problems.append(
            f"optimizer state: {len(groups)} parameter group(s), expected the reference's {len(expected)} "
            "(encoder / predictor, decayed / not)"
        )
        return result
    names: list[list[str]] = []
    for index, (group, reconstructed) in enumerate(zip(groups, expected)):
        ids = list(group.get("params", []))
        given = group.get("param_names")
        if given is not None:
            network = REFERENCE_GROUPS[index][0]
            reconstructed = [f"{network}.{k}" for k in strip_wrapper_prefixes(dict.fromkeys(given, torch.empty(0)))]
        if len(ids) != len(reconstructed):
            network, decayed = REFERENCE_GROUPS[index]
            result.problems.append(
                f"optimizer group {index} ({network}, {'decayed' if decayed else 'no decay'}) holds {len(ids)} "
                f"parameters, but the checkpoint's {network} has {len(reconstructed)} of that kind"
            )
        names.append(reconstructed)
    if result.problems:
        return result

    # Reference name -> state, then gather per our parameter (experts: one entry per expert index).
    gathered: dict[str, dict[int | None, Mapping[str, Any]]] = {}
    for group, group_names in zip(groups, names):
        for pid, ref_name in zip(group["params"], group_names):
            state = states.get(pid)
            if state is None:
                continue  # never updated (e.g. the unused mask tokens): AdamW starts it fresh, as the reference would
            network, key = ref_name.split(".", 1)
            native, expert = _native_name(key)
            gathered.setdefault(f"{network}.{native}", {})[expert] = state
    for name, per_expert in gathered.items():
        network, native = name.split(".", 1)
        ours = f"{prefixes[network]}{native}"
        param = parameters[network].get(native)
        if param is None:
            result.problems.append(f"{name}: AdamW state for a parameter this model does not have")
            continue
        if f"{network}.{native}" not in trainable:
            result.problems.append(f"{ours}: AdamW state for a parameter this model freezes")
            continue
        mapped = _merge(ours, per_expert, tuple(param.shape), result.problems)
        if mapped is not None:
            result.state[ours] = mapped
            result.mapped += len(per_expert)
    return result


def _merge(
    name: str, per_expert: Mapping[int | None, Mapping[str, Any]], shape: tuple[int, ...], problems: list[str]
) -> dict[str, Any] | None:
    """One parameter's state; per-expert states stacked along a new dim 0 (step counts must agree)."""
    if None in per_expert:  # not an expert tensor
        state = dict(per_expert[None])
        bad = [k for k, v in state.items() if isinstance(v, Tensor) and v.dim() and tuple(v.shape) != shape]
        if bad:
            problems.append(f"{name}: AdamW {bad} of shape {list(state[bad[0]].shape)} vs parameter {list(shape)}")
            return None
        return state
    experts = sorted(e for e in per_expert if e is not None)
    if experts != list(range(shape[0])):
        problems.append(
            f"{name}: AdamW state for experts {_listed([str(e) for e in experts])} only, of {shape[0]} (the others "
            "were never updated)"
        )
        return None
    states = [per_expert[e] for e in experts]
    merged: dict[str, Any] = {}
    for key in states[0]:
        values = [s.get(key) for s in states]
        if all(isinstance(v, Tensor) and v.dim() > 0 for v in values):
            stacked = torch.stack([v for v in values if isinstance(v, Tensor)])
            if tuple(stacked.shape) != shape:
                problems.append(
                    f"{name}: stacked AdamW {key} of shape {list(stacked.shape)} vs parameter {list(shape)}"
                )
                return None
            merged[key] = stacked
        else:  # scalars: the step count
            plain = [float(v) if isinstance(v, (Tensor, int, float)) else 0.0 for v in values]
            if len(set(plain)) > 1:
                problems.append(
                    f"{name}: per-expert AdamW {key!r} values differ ({sorted(set(plain))[:4]}); stacked into one "
                    f"parameter, it takes {max(plain)}"
                )
            top = max(range(len(plain)), key=lambda i: plain[i])
            merged[key] = values[top]
    return merged
