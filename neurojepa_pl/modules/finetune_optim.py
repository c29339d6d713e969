"""Optimizer pieces of fine-tuning (docs/method.md §8.1): AdamW parameter groups and the warmup-cosine schedules.

* Groups: backbone / head x decay / no-decay (the reference's 4 groups), the head groups' lr multiplied by
  ``head_lr_scale``; with ``layer_decay`` the backbone groups are further split per transformer depth with lr scale
  ``layer_decay ** (num_blocks + 1 - layer_id)`` (patch embedding = layer 0, block i = layer i + 1, final norm =
  num_blocks + 1). Layer-wise decay is absent from the reference (its helper is dead code); it is opt-in here.
* LR: linear warm-up ``start_lr -> lr`` over the warm-up steps, then cosine ``lr -> final_lr`` at the end of the
  schedule (the reference's ``WarmupCosineSchedule``). WD: cosine ``weight_decay -> final_weight_decay``
  (``CosineWDSchedule``). Both are pure functions of the optimizer-update number, reusing
  :mod:`neurojepa_pl.schedules` (the k-th update uses the value at step k, as the reference steps its schedulers
  before ``optimizer.step()``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from neurojepa_pl.schedules import lr_at, weight_decay_at

__all__ = ["backbone_layer_id", "build_param_groups", "DownstreamSchedule"]

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_EMBEDDING_PREFIXES = ("patch_embed", "pos_embed", "rope", "cls_token", "mask_token")


def backbone_layer_id(name: str, num_blocks: int) -> int:
    """Depth index of a backbone parameter for layer-wise lr decay (0 = embedding, num_blocks + 1 = final norm)."""
    if name.startswith(_EMBEDDING_PREFIXES):
        return 0
    match = _BLOCK.match(name)
    if match:
        return int(match.group(1)) + 1
    return num_blocks + 1


def _no_decay(name: str, param: nn.Parameter, explicit: set[str]) -> bool:
    return name in explicit or param.ndim <= 1 or name.endswith(".bias")


def build_param_groups(
    backbone: nn.Module | None, head: nn.Module, head_lr_scale: float = 1.0, layer_decay: float | None = None
) -> list[dict]:
    """AdamW parameter groups with ``lr_scale`` / ``wd_scale`` entries (applied by :class:`DownstreamSchedule`).

    Only parameters with ``requires_grad`` are included (a frozen backbone contributes nothing).

    Args:
        backbone: the encoder (the ViT, or the from-scratch CNN's convolutional encoder).
        head: the task head.
        head_lr_scale: lr multiplier of the head groups.
        layer_decay: per-depth lr decay of the backbone (``None`` = off); needs a backbone with ``blocks``.

    Returns:
        Non-empty groups, each ``{"params", "name", "lr_scale", "wd_scale"}``.
    """
    groups: dict[tuple, dict] = {}

    def add(key: tuple, name: str, param: nn.Parameter, lr_scale: float, decay: bool) -> None:
        group = groups.setdefault(
            key, {"params": [], "name": name, "lr_scale": lr_scale, "wd_scale": 1.0 if decay else 0.0}
        )
        group["params"].append(param)

    if backbone is not None:
        explicit = set(backbone.no_weight_decay()) if hasattr(backbone, "no_weight_decay") else set()
        num_blocks = len(backbone.blocks) if hasattr(backbone, "blocks") else None
        if layer_decay is not None and num_blocks is None:
            raise ValueError("layer_decay needs a backbone with a `blocks` ModuleList (a ViT); set layer_decay: null.")
        for name, param in backbone.named_parameters():
            if not param.requires_grad:
                continue
            decay = not _no_decay(name, param, explicit)
            if layer_decay is None:
                add(("backbone", decay), f"backbone/{'decay' if decay else 'no_decay'}", param, 1.0, decay)
            else:
                layer = backbone_layer_id(name, num_blocks)
                scale = float(layer_decay) ** (num_blocks + 1 - layer)
                add(
                    ("backbone", layer, decay),
                    f"backbone/layer{layer}/{'decay' if decay else 'no_decay'}",
                    param,
                    scale,
                    decay,
                )
    for name, param in head.named_parameters():
        if not param.requires_grad:
            continue
        decay = not _no_decay(name, param, set())
        add(("head", decay), f"head/{'decay' if decay else 'no_decay'}", param, float(head_lr_scale), decay)
    if not groups:
        raise ValueError("no trainable parameter: the backbone is frozen and the head has no parameters.")
    return list(groups.values())


@dataclass(frozen=True)
class DownstreamSchedule:
    """Warmup-cosine lr and cosine wd as pure functions of the 1-based optimizer-update number.

    Attributes:
        lr: peak learning rate.
        start_lr: learning rate at step 0 (start of warm-up).
        final_lr: learning rate at ``total_steps``.
        warmup_steps: warm-up length in optimizer updates (clipped to ``total_steps``).
        total_steps: schedule length in optimizer updates.
        weight_decay: weight decay at step 0.
        final_weight_decay: weight decay at ``total_steps``.
    """

    lr: float
    start_lr: float
    final_lr: float
    warmup_steps: int
    total_steps: int
    weight_decay: float
    final_weight_decay: float

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"the schedule needs total_steps >= 1; got {self.total_steps}.")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0; got {self.lr}.")

    def lr_at(self, update: int) -> float:
        """Learning rate of the ``update``-th optimizer update (1-based)."""
        warmup = min(self.warmup_steps, self.total_steps)
        return lr_at(
            update,
            lr_start=self.start_lr,
            lr_peak=self.lr,
            lr_final=self.final_lr,
            warmup_steps=warmup,
            total_steps=self.total_steps,
            cooldown_steps=self.total_steps - warmup,
            cooldown_shape="cosine",
        )

    def lr_factor(self, update: int) -> float:
        """``lr_at(update) / lr``: the multiplier a ``LambdaLR`` applies to every group's base lr."""
        return self.lr_at(update) / self.lr

    def weight_decay_at(self, update: int) -> float:
        """Weight decay of the ``update``-th optimizer update (1-based)."""
        return weight_decay_at(
            update, start=self.weight_decay, end=self.final_weight_decay, total_steps=self.total_steps
        )


def trainable_parameters(modules: Iterable[nn.Module]) -> int:
    """Number of parameters with ``requires_grad`` across ``modules``."""
    return sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)
