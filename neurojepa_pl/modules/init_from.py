"""``JEPAPretrainModule(init_from=...)``: start a run from another run's full state (docs/method.md §7.1).

Two sources:

* a Lightning checkpoint of ``JEPAPretrainModule`` (phase 1 of ours): ``state_dict`` loaded strictly, the AdamW state
  (``optimizer_states[0]``) loaded as Lightning saved it (same module, same parameter order);
* a reference pretraining checkpoint (``encoder``, ``target_encoder``, ``predictor``, ``opt``, ``scaler``, ...; keys
  prefixed ``module.backbone.``): context encoder, EMA target encoder and predictor (MoE balance biases included)
  loaded strictly into ours, the AdamW moments mapped by parameter name
  (:func:`neurojepa_pl.models.reference_state.map_reference_optimizer_state`).

The weights are loaded when :meth:`InitFrom.read` runs (the module's ``setup``, before any wrapping); the optimizer
state is applied by :meth:`InitFrom.restore_optimizer` once the optimizer exists (``on_fit_start``). Whatever cannot
be carried over (no optimizer state, states without a parameter, per-expert step counts that differ, a GradScaler
state) is listed; ``mismatch="error"`` refuses to start, ``"warn"`` warns and lets AdamW start afresh for those
parameters. The step counter restarts at 0 in both cases (the reference's cool-down does the same).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from neurojepa_pl.errors import UserValueError
from neurojepa_pl.models.checkpoint import load_state_dict_checked, read_checkpoint, reference_to_native
from neurojepa_pl.models.reference_state import map_reference_optimizer_state

__all__ = ["InitFrom"]

Mismatch = Literal["error", "warn"]
_NETWORKS = {"encoder": "context_encoder.", "predictor": "predictor."}


@dataclass
class InitFrom:
    """What ``init_from`` carries into a run, after its weights were loaded into the module.

    Attributes:
        source: the checkpoint path.
        kind: ``"lightning"`` or ``"reference"``.
        restore: applies the optimizer state to ``(optimizer, module)``; None when there is none to apply.
        notes: what could not be carried over (already reported by :meth:`read`).
        step: the source's optimizer step, when it records one.
    """

    source: str
    kind: Literal["lightning", "reference"]
    restore: Callable[[torch.optim.Optimizer, nn.Module], None] | None = None
    notes: list[str] = field(default_factory=list)
    step: int | None = None

    @classmethod
    def read(cls, source: str | Path, module: nn.Module, mismatch: Mismatch = "error") -> InitFrom:
        """Load ``source``'s weights into ``module`` (a ``JEPAPretrainModule``) and prepare its optimizer state.

        Raises:
            UserValueError: for an unreadable file, weights that do not match (naming keys and shapes), or, with
                ``mismatch="error"``, any optimizer state that cannot be carried over (naming each item).
        """
        checkpoint = read_checkpoint(source)
        raw = checkpoint.raw or {}
        if "state_dict" in raw:
            init = cls._read_lightning(str(source), raw, module)
        elif {"encoder", "target_encoder", "predictor"} & set(raw):
            init = cls._read_reference(str(source), checkpoint.encoders, checkpoint.predictor, raw, module)
        else:
            raise UserValueError(
                f"init_from {source}: expected a Lightning checkpoint of JEPAPretrainModule (state_dict, "
                f"optimizer_states) or a reference pretraining checkpoint (encoder, target_encoder, predictor, opt); "
                f"found {checkpoint.description} with {sorted(map(str, raw))[:10] or 'no dict'}.",
                "pass the phase-1 checkpoint (ours: a .ckpt; the reference's: e.g. e200.pt).",
            )
        init.step = checkpoint.step
        if init.notes:
            listed = "; ".join(init.notes)
            message = f"init_from {source}: part of the optimizer state cannot be carried over: {listed}."
            if mismatch == "error":
                raise UserValueError(
                    message,
                    "fix the checkpoint, or set model.init_args.init_from_mismatch: warn to start with what maps "
                    "(AdamW starts afresh for the rest).",
                )
            warnings.warn(f"{message} init_from_mismatch=warn: AdamW starts afresh for those.", UserWarning, 2)
        return init

    # ------------------------------------------------------------------------------------------------ Lightning
    @classmethod
    def _read_lightning(cls, source: str, raw: Mapping[str, Any], module: nn.Module) -> InitFrom:
        tensors = {k: v for k, v in raw["state_dict"].items() if isinstance(v, Tensor)}
        load_state_dict_checked(module, tensors, strict=True, what=f"init_from {source}")
        states = raw.get("optimizer_states") or []
        if not states:
            return cls(source, "lightning", notes=["no optimizer state (optimizer_states is empty or absent)"])
        saved = states[0]

        def restore(optimizer: torch.optim.Optimizer, _: nn.Module) -> None:
            try:
                optimizer.load_state_dict(saved)
            except ValueError as err:  # group / parameter counts differ: another configuration wrote it
                raise UserValueError(
                    f"init_from {source}: its AdamW state does not fit this module's optimizer ({err}).",
                    "start from a checkpoint of the same configuration, or set init_from_mismatch: warn.",
                ) from err

        return cls(source, "lightning", restore)

    # ------------------------------------------------------------------------------------------------ reference
    @classmethod
    def _read_reference(
        cls,
        source: str,
        encoders: Mapping[str, dict[str, Tensor]],
        predictor: dict[str, Tensor] | None,
        raw: Mapping[str, Any],
        module: nn.Module,
    ) -> InitFrom:
        missing = [key for key, have in (("encoder", "context" in encoders), ("target_encoder", "target" in encoders),
                                         ("predictor", predictor is not None)) if not have]  # fmt: skip
        if missing:
            raise UserValueError(
                f"init_from {source}: a reference checkpoint must hold encoder, target_encoder and predictor; "
                f"{missing} missing.",
                "pass a pretraining checkpoint of the reference (latest.pt / e<N>.pt), not an exported encoder.",
            )
        assert predictor is not None
        where = f"init_from {source}"
        for attribute, state in (
            ("context_encoder", encoders["context"]),
            ("target_encoder", encoders["target"]),
            ("predictor", predictor),
        ):
            network = getattr(module, attribute)
            try:
                native = reference_to_native(state)
            except ValueError as err:
                raise UserValueError(f"{where} ({attribute}): {err}", "pass a complete checkpoint.") from err
            load_state_dict_checked(network, native, strict=True, what=f"{where} ({attribute})")

        notes: list[str] = []
        if raw.get("scaler") is not None:
            notes.append("scaler: a GradScaler state (fp16 training) is not carried over; Lightning's starts afresh")
        opt = raw.get("opt")
        if opt is None:
            notes.append("no optimizer state ('opt' is absent or None)")
            return cls(source, "reference", notes=notes)
        parameters = {
            "encoder": dict(module.context_encoder.named_parameters()),
            "predictor": dict(module.predictor.named_parameters()),
        }
        trainable = {f"{n}.{k}" for n, params in parameters.items() for k, p in params.items() if p.requires_grad}
        networks = {"encoder": encoders["context"], "predictor": predictor}
        mapped = map_reference_optimizer_state(opt, networks, parameters, trainable, _NETWORKS)
        notes.extend(mapped.problems)
        state_by_name = mapped.state

        def restore(optimizer: torch.optim.Optimizer, owner: nn.Module) -> None:
            _load_named_state(optimizer, owner, state_by_name)

        return cls(source, "reference", restore if state_by_name else None, notes)


def _clean(name: str) -> str:
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


def _load_named_state(
    optimizer: torch.optim.Optimizer, module: nn.Module, state_by_name: Mapping[str, Mapping[str, Any]]
) -> None:
    """Put per-parameter states (by our parameter name) into ``optimizer`` through ``load_state_dict``, which casts
    moments to each parameter's dtype and device (and the step as the optimizer's implementation wants it)."""
    names = {id(p): _clean(n) for n, p in module.named_parameters()}
    packed = optimizer.state_dict()
    index = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = state_by_name.get(names.get(id(param), ""))
            if state is not None:
                packed["state"][index] = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in state.items()}
            index += 1
    optimizer.load_state_dict(packed)
