"""Foreground-aware JEPA regression loss (docs/method.md §6.2).

For mask m, sample b and target token k, with predictor output ``z`` and layer-normed EMA-target features ``h``:

    l_bk   = mean_d |z_bkd - h_bkd|^p / p                     (p = loss_exp; p = 1 is the paper's L1)
    w_bk   = beta + (1 - beta) * f_bk                         (f = token foreground flag, beta = bg_weight)
    w^_bk  = w_bk / max(mean_k w_bk, 1e-6)                    (mean weight 1 per sample and mask)
    L_m    = mean_{b,k} w^_bk * l_bk
    L      = mean_m L_m

Without a foreground map, or with ``bg_weight >= 1``, ``L_m`` is the plain mean of ``l_bk``. All arithmetic is
float32 whatever the input dtype (bf16 autocast outputs included).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["foreground_weights", "jepa_loss", "token_regression_loss"]

_MEAN_WEIGHT_FLOOR = 1e-6

MaskedTensors = Tensor | Sequence[Tensor]


def foreground_weights(foreground: Tensor, bg_weight: float = 0.1) -> Tensor:
    """Per-token loss weights ``beta + (1 - beta) * f``, normalised to mean 1 per row.

    Args:
        foreground: ``[B, K]`` token foreground flags of the target tokens (bool, or floats in [0, 1]).
        bg_weight: weight ``beta`` of a background token before normalisation (0.1 in the paper).

    Returns:
        float32 ``[B, K]``; each row has mean 1 (unless all its weights are 0, which the 1e-6 floor keeps finite).
    """
    if bg_weight < 0:
        raise ValueError(f"Expected bg_weight >= 0; found {bg_weight}.")
    f = foreground.to(torch.float32)
    weights = bg_weight + (1.0 - bg_weight) * f
    return weights / weights.mean(dim=-1, keepdim=True).clamp_min(_MEAN_WEIGHT_FLOOR)


def token_regression_loss(pred: Tensor, target: Tensor, loss_exp: float = 1.0) -> Tensor:
    """Per-token ``mean_d |pred - target|^p / p`` in float32.

    Args:
        pred: ``[..., K, C]``.
        target: same shape as ``pred``.
        loss_exp: p > 0.

    Returns:
        float32 ``[..., K]``.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape; found {list(pred.shape)} and {list(target.shape)}."
        )
    if loss_exp <= 0:
        raise ValueError(f"Expected loss_exp > 0; found {loss_exp}.")
    diff = (pred.to(torch.float32) - target.to(torch.float32)).abs()
    if loss_exp != 1.0:
        diff = diff.pow(loss_exp)
    return diff.mean(dim=-1) / loss_exp


def _as_list(name: str, value: MaskedTensors) -> list[Tensor]:
    if isinstance(value, Tensor):
        if value.ndim != 4:
            raise ValueError(
                f"Expected `{name}` as [M, B, K, C] or a list of [B, K, C]; found shape {list(value.shape)}."
            )
        return list(value.unbind(0))
    return list(value)


def jepa_loss(
    pred: MaskedTensors,
    target: MaskedTensors,
    foreground: MaskedTensors | None = None,
    bg_weight: float = 0.1,
    loss_exp: float = 1.0,
) -> Tensor:
    """Foreground-weighted JEPA loss averaged over masks (docs/method.md §6.2).

    Args:
        pred: predictor outputs, ``[M, B, K, C]`` or a list of M tensors ``[B, K_m, C]``.
        target: target features at the same tokens and in the same order, same structure as ``pred``.
        foreground: token foreground flags of the target tokens, ``[M, B, K]`` or a list of ``[B, K_m]``
            (gather the collator's ``[B, N]`` map at each mask's ``target_idx``), or None for the plain mean.
        bg_weight: background weight ``beta``; ``>= 1`` disables the weighting.
        loss_exp: exponent p (1 = L1).

    Returns:
        float32 scalar.
    """
    preds = _as_list("pred", pred)
    targets = _as_list("target", target)
    if len(preds) != len(targets) or not preds:
        raise ValueError(
            f"Expected the same non-zero number of masks in pred and target; found {len(preds)} and {len(targets)}."
        )
    fgs: list[Tensor | None]
    if foreground is not None and bg_weight < 1.0:
        fgs = list(foreground.unbind(0) if isinstance(foreground, Tensor) else foreground)
        if len(fgs) != len(preds):
            raise ValueError(f"Expected one foreground map per mask ({len(preds)}); found {len(fgs)}.")
    else:
        fgs = [None] * len(preds)

    per_mask = []
    for m, (z, h, f) in enumerate(zip(preds, targets, fgs)):
        losses = token_regression_loss(z, h, loss_exp)  # [B, K]
        if f is None:
            per_mask.append(losses.mean())
            continue
        if tuple(f.shape) != tuple(losses.shape):
            raise ValueError(
                f"Mask {m}: expected foreground flags of shape [B, K] = {list(losses.shape)} (the target tokens); "
                f"found {list(f.shape)}. Gather the [B, N] map with torch.gather(fg, 1, target_idx)."
            )
        per_mask.append((foreground_weights(f, bg_weight) * losses).mean())
    return torch.stack(per_mask).mean()
