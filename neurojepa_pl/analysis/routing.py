"""MoE routing of a frozen encoder over a cohort: which experts the tokens select, where, and for which modality
(docs/method.md §9.2; the paper's Fig. 5 and Appendix I).

Three parts, all streaming (memory does not grow with the number of scans):

* :class:`RoutingRecorder` observes the routing decision of every MoE layer through a forward hook on its router
  (``layer.gate``), whose output is ``(weights [T, k], indices [T, k], scores [T, E])``: the top-k selection made
  with the balance bias exactly as in training, the selected softmax scores times the route scale, and the softmax
  probabilities (docs/method.md §3.2). The hook only reads; the forward and the ``counts`` buffers are untouched
  (they do not grow in eval mode anyway, docs/method.md §3).
* :class:`RoutingAccumulator` adds one batch at a time into fixed-size tables: selections per (token position,
  expert) ``[L, N, E]`` with the summed weights and router probabilities, and selections per (modality, expert)
  split into foreground and background tokens by the token foreground map of training (docs/method.md §6.1).
  :func:`summarize_routing` turns them into frequencies and imbalance measures (below).
* :class:`TokenGridPlacement` follows each model input's voxel -> world affine (the loading chain crops every scan
  to its own foreground box before resizing, docs/method.md §1.2, so the model-input grid is a per-scan crop and
  resample of the scan's MNI152 space) and gives the token grid's mean affine plus the spread of the token centres
  across scans; :func:`routing_maps` writes the per-token maps as NIfTI images with that affine.

Measures, per MoE layer, with ``c_x[e]`` the selections of expert ``e`` among tokens of kind ``x`` and ``n_x`` the
number of such tokens:

* ``share_x[e] = c_x[e] / (k · n_x)``: the expert's share of the selections (sums to 1 over experts; 1/E when
  balanced);
* foreground / background imbalance ``(share_fg - share_bg) / (share_fg + share_bg)`` in [-1, 1]: +1 for an
  expert that only foreground tokens select, -1 for background only, 0 for no preference;
* modality imbalance (foreground tokens): ``(max_m share_m[e] - min_m share_m[e]) / mean_m share_m[e]`` over the
  modalities present, 0 when every modality routes to the expert equally;
* load violations ``min_e c[e] / mean_e c[e]`` and ``max_e c[e] / mean_e c[e]`` (what pretraining logs as
  ``moe_min_vio`` / ``moe_max_vio``) and the coefficient of variation of ``c``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from neurojepa_pl.models.moe import MoEFeedForward

__all__ = [
    "RoutingDecision",
    "RoutingRecorder",
    "RoutingAccumulator",
    "TokenGridPlacement",
    "token_grid_affine",
    "summarize_routing",
    "routing_maps",
    "NIFTI_XFORM_MNI_152",
]

NIFTI_XFORM_MNI_152 = 4
"""NIfTI ``sform_code`` / ``qform_code`` of MNI152 coordinates."""


@dataclass(frozen=True)
class RoutingDecision:
    """The routing of one MoE layer for one forward (the router's output).

    Attributes:
        weights: ``[T, k]`` float32 selected softmax scores times the route scale.
        indices: ``[T, k]`` int64 selected experts (top-k of scores + balance bias).
        scores: ``[T, E]`` float32 softmax probabilities.
    """

    weights: Tensor
    indices: Tensor
    scores: Tensor


class RoutingRecorder:
    """Record the routing decision of every MoE layer during forwards (context manager).

    Registers a forward hook on each layer's router on entry and removes it on exit. After a forward,
    :meth:`take` returns one :class:`RoutingDecision` per layer, in the order of ``layers``.

    Args:
        layers: the encoder's MoE layers, e.g. ``encoder.moe_layers()``.
    """

    def __init__(self, layers: Sequence[MoEFeedForward]) -> None:
        if not layers:
            raise ValueError("the encoder has no MoE layer: routing analysis needs an MoE encoder (e.g. vit_base_moe).")
        self.layers = list(layers)
        self._decisions: list[RoutingDecision | None] = [None] * len(self.layers)
        self._handles: list[RemovableHandle] = []

    def _hook(self, position: int) -> Any:
        def record(module: torch.nn.Module, inputs: Any, output: tuple[Tensor, Tensor, Tensor]) -> None:
            weights, indices, scores = output
            self._decisions[position] = RoutingDecision(weights.detach(), indices.detach(), scores.detach())

        return record

    def __enter__(self) -> RoutingRecorder:
        self._handles = [layer.gate.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def take(self) -> list[RoutingDecision]:
        """The decisions of the last forward, one per layer; clears them.

        Raises:
            RuntimeError: when a layer did not run since the last call.
        """
        missing = [i for i, d in enumerate(self._decisions) if d is None]
        if missing:
            raise RuntimeError(f"MoE layers {missing} recorded no routing; run a forward inside the recorder first.")
        decisions = [d for d in self._decisions if d is not None]
        self._decisions = [None] * len(self.layers)
        return decisions


class RoutingAccumulator:
    """Routing counts over a cohort, added batch by batch (fixed memory).

    Args:
        blocks: encoder block index of each MoE layer (``encoder.config["moe_block_indices"]``).
        num_tokens: tokens per scan N (the full grid: routing is analysed without masks).
        num_experts: routed experts E.
        top_k: experts per token k.
        modalities: the modality names that batches may carry, in report order.

    Attributes (numpy, on the CPU):
        token_counts: int64 ``[L, N, E]`` selections of expert e by the token at position n.
        token_weight_sum: float64 ``[L, N, E]`` summed routing weights of those selections.
        token_score_sum: float64 ``[L, N, E]`` summed router probabilities (selected or not).
        foreground_scans: int64 ``[N]`` scans in which position n is a foreground token.
        fg_counts, bg_counts: int64 ``[L, M, E]`` selections among foreground / background tokens per modality.
        fg_tokens, bg_tokens: int64 ``[M]`` foreground / background tokens seen per modality.
        scans: int64 ``[M]`` scans seen per modality.
    """

    def __init__(
        self, blocks: Sequence[int], num_tokens: int, num_experts: int, top_k: int, modalities: Sequence[str]
    ) -> None:
        if not modalities:
            raise ValueError("RoutingAccumulator needs at least one modality name.")
        self.blocks = [int(b) for b in blocks]
        self.num_tokens = int(num_tokens)
        self.num_experts = int(num_experts)
        self.top_k = int(top_k)
        self.modalities = [str(m) for m in modalities]
        layers, n, e, m = len(self.blocks), self.num_tokens, self.num_experts, len(self.modalities)
        self.token_counts = np.zeros((layers, n, e), dtype=np.int64)
        self.token_weight_sum = np.zeros((layers, n, e), dtype=np.float64)
        self.token_score_sum = np.zeros((layers, n, e), dtype=np.float64)
        self.foreground_scans = np.zeros(n, dtype=np.int64)
        self.fg_counts = np.zeros((layers, m, e), dtype=np.int64)
        self.bg_counts = np.zeros((layers, m, e), dtype=np.int64)
        self.fg_tokens = np.zeros(m, dtype=np.int64)
        self.bg_tokens = np.zeros(m, dtype=np.int64)
        self.scans = np.zeros(m, dtype=np.int64)

    @property
    def num_scans(self) -> int:
        """Scans added so far."""
        return int(self.scans.sum())

    def update(self, decisions: Sequence[RoutingDecision], foreground: Tensor, modalities: Sequence[str]) -> None:
        """Add one batch.

        Args:
            decisions: one :class:`RoutingDecision` per layer for a forward of the batch on all N tokens
                (``T = B * N`` rows in batch-major token order).
            foreground: bool ``[B, N]`` token foreground map of the batch's model inputs.
            modalities: the modality of each of the B scans.
        """
        if len(decisions) != len(self.blocks):
            raise ValueError(
                f"expected {len(self.blocks)} routing decisions (one per MoE layer); got {len(decisions)}."
            )
        batch = len(modalities)
        n, e, k = self.num_tokens, self.num_experts, self.top_k
        if tuple(foreground.shape) != (batch, n):
            raise ValueError(f"foreground map {tuple(foreground.shape)} does not match {batch} scans x {n} tokens.")
        unknown = sorted(set(modalities) - set(self.modalities))
        if unknown:
            raise ValueError(f"modalities {unknown} were not declared; expected some of {self.modalities}.")
        device = decisions[0].indices.device
        fg = foreground.to(device=device, dtype=torch.float64)  # [B, N]
        bg = 1.0 - fg
        which = torch.tensor([self.modalities.index(m) for m in modalities], device=device)
        onehot = torch.nn.functional.one_hot(which, len(self.modalities)).to(torch.float64)  # [B, M]
        for layer, decision in enumerate(decisions):
            if tuple(decision.indices.shape) != (batch * n, k):
                raise ValueError(
                    f"layer {layer}: expected routing indices [{batch * n}, {k}] (B x N tokens, top-{k}); "
                    f"found {list(decision.indices.shape)}. Run the encoder without masks."
                )
            indices = decision.indices.view(batch, n, k)
            # One-hot of the k selections per token: [B, N, E]. Counts stay exact in float64 (< 2**53).
            selected = torch.zeros(batch, n, e, dtype=torch.float64, device=device).scatter_(2, indices, 1.0)
            weights = torch.zeros_like(selected).scatter_(2, indices, decision.weights.view(batch, n, k).double())
            self.token_counts[layer] += _to_int(selected.sum(0))
            self.token_weight_sum[layer] += weights.sum(0).cpu().numpy()
            self.token_score_sum[layer] += decision.scores.view(batch, n, e).double().sum(0).cpu().numpy()
            self.fg_counts[layer] += _to_int(torch.einsum("bm,bn,bne->me", onehot, fg, selected))
            self.bg_counts[layer] += _to_int(torch.einsum("bm,bn,bne->me", onehot, bg, selected))
        self.foreground_scans += _to_int(fg.sum(0))
        self.fg_tokens += _to_int(onehot.T @ fg.sum(1))
        self.bg_tokens += _to_int(onehot.T @ bg.sum(1))
        self.scans += _to_int(onehot.sum(0))


def _to_int(values: Tensor) -> np.ndarray:
    return np.rint(values.cpu().numpy()).astype(np.int64)


# ----------------------------------------------------------------------------------------------------------------------
# Summary numbers
# ----------------------------------------------------------------------------------------------------------------------
def _share(counts: np.ndarray, tokens: float, top_k: int) -> np.ndarray:
    return counts / (tokens * top_k) if tokens > 0 else np.full(counts.shape, np.nan)


def _load(counts: np.ndarray) -> dict[str, float]:
    mean = float(counts.mean())
    if mean == 0:
        return {"min_violation": math.nan, "max_violation": math.nan, "cv": math.nan}
    return {
        "min_violation": float(counts.min()) / mean,
        "max_violation": float(counts.max()) / mean,
        "cv": float(counts.std()) / mean,
    }


def _contrast(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    total = a + b
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (a - b) / np.where(total > 0, total, 1.0), np.nan)


def summarize_routing(acc: RoutingAccumulator) -> dict[str, Any]:
    """Frequencies and imbalance measures of every layer (see the module docstring), JSON-ready (NaN stays NaN).

    Returns:
        ``{"num_scans", "scans_by_modality", "tokens_per_scan", "num_experts", "top_k", "foreground_tokens",
        "background_tokens", "layers": [{"block", "selections", "share", "fg_bg_imbalance", "load",
        "foreground_share_by_modality", "modality_imbalance"}, ...]}``; per-expert lists are in expert order
        (expert number ``e + 1`` at position ``e``).
    """
    k = acc.top_k
    fg_tokens, bg_tokens = int(acc.fg_tokens.sum()), int(acc.bg_tokens.sum())
    present = [i for i, _ in enumerate(acc.modalities) if acc.fg_tokens[i] > 0]
    layers = []
    for layer, block in enumerate(acc.blocks):
        fg = acc.fg_counts[layer].sum(0)
        bg = acc.bg_counts[layer].sum(0)
        everything = fg + bg
        share_fg, share_bg = _share(fg, fg_tokens, k), _share(bg, bg_tokens, k)
        by_modality = {acc.modalities[i]: _share(acc.fg_counts[layer, i], float(acc.fg_tokens[i]), k) for i in present}
        if len(present) >= 2:
            stacked = np.stack([by_modality[acc.modalities[i]] for i in present])  # [M', E]
            mean = stacked.mean(0)
            with np.errstate(invalid="ignore", divide="ignore"):
                modality_imbalance: list[float] | None = np.where(
                    mean > 0, (stacked.max(0) - stacked.min(0)) / np.where(mean > 0, mean, 1.0), np.nan
                ).tolist()
        else:
            modality_imbalance = None
        layers.append(
            {
                "block": block,
                "selections": {"all": everything.tolist(), "foreground": fg.tolist(), "background": bg.tolist()},
                "share": {
                    "all": _share(everything, fg_tokens + bg_tokens, k).tolist(),
                    "foreground": share_fg.tolist(),
                    "background": share_bg.tolist(),
                },
                "fg_bg_imbalance": _contrast(share_fg, share_bg).tolist(),
                "load": {"all": _load(everything), "foreground": _load(fg), "background": _load(bg)},
                "foreground_share_by_modality": {name: share.tolist() for name, share in by_modality.items()},
                "modality_imbalance": modality_imbalance,
            }
        )
    return {
        "num_scans": acc.num_scans,
        "scans_by_modality": {m: int(acc.scans[i]) for i, m in enumerate(acc.modalities)},
        "tokens_per_scan": acc.num_tokens,
        "num_experts": acc.num_experts,
        "top_k": k,
        "foreground_tokens": fg_tokens,
        "background_tokens": bg_tokens,
        "foreground_tokens_by_modality": {m: int(acc.fg_tokens[i]) for i, m in enumerate(acc.modalities)},
        "layers": layers,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Placement of the token grid in MNI152 space
# ----------------------------------------------------------------------------------------------------------------------
def token_grid_affine(input_affine: np.ndarray, patch_size: Sequence[int]) -> np.ndarray:
    """Voxel -> world affine of the token grid of a model input.

    Token ``(i0, i1, i2)`` covers input voxels ``[i·p, (i+1)·p)`` per axis, so its centre is input voxel
    ``i·p + (p - 1) / 2``: the input affine scaled by the patch and shifted to the patch centres.

    Args:
        input_affine: ``[4, 4]`` voxel -> world affine of the model input.
        patch_size: the three patch edges.

    Returns:
        ``[4, 4]`` float64.
    """
    patch = np.asarray([float(p) for p in patch_size])
    if patch.shape != (3,):
        raise ValueError(f"expected three patch edges; got {list(patch_size)}.")
    to_input = np.diag([*patch, 1.0])
    to_input[:3, 3] = (patch - 1.0) / 2.0
    return np.asarray(input_affine, dtype=np.float64) @ to_input


class TokenGridPlacement:
    """Mean token-grid affine of a cohort and how far the scans' token centres spread around it (streaming).

    Every scan's token grid is its own crop of MNI152 space (the foreground box); statistics per token position
    pool tokens whose centres differ by the spread reported here. For MNI-registered, skull-stripped scans the box is
    nearly the same for every scan and the spread is a small fraction of a token.

    Args:
        grid: token grid ``(g0, g1, g2)``.
        patch_size: the three patch edges.
    """

    def __init__(self, grid: Sequence[int], patch_size: Sequence[int]) -> None:
        self.grid = tuple(int(g) for g in grid)
        self.patch_size = tuple(int(p) for p in patch_size)
        # The 8 corner tokens: for affine maps, the largest displacement over the grid is at a corner.
        corners = np.array([[a, b, c] for a in (0, self.grid[0] - 1) for b in (0, self.grid[1] - 1)
                            for c in (0, self.grid[2] - 1)], dtype=np.float64)  # fmt: skip
        self._corners = np.concatenate([corners, np.ones((8, 1))], axis=1)  # [8, 4]
        self._sum = np.zeros((4, 4))
        self._low = np.full((8, 3), np.inf)
        self._high = np.full((8, 3), -np.inf)
        self.count = 0

    def update(self, input_affines: np.ndarray) -> None:
        """Add the model-input affines ``[B, 4, 4]`` of a batch."""
        for affine in np.asarray(input_affines, dtype=np.float64).reshape(-1, 4, 4):
            token = token_grid_affine(affine, self.patch_size)
            centres = (self._corners @ token.T)[:, :3]
            self._low = np.minimum(self._low, centres)
            self._high = np.maximum(self._high, centres)
            self._sum += token
            self.count += 1

    def mean_affine(self) -> np.ndarray:
        """Mean token-grid affine ``[4, 4]`` over the scans added."""
        if self.count == 0:
            raise ValueError("no scan was added: the token-grid affine is undefined.")
        return self._sum / self.count

    def spread_mm(self) -> float:
        """Largest range (max - min over scans) of a corner token's centre along a world axis, in millimetres."""
        if self.count == 0:
            return math.nan
        return float((self._high - self._low).max())

    def token_edge_mm(self) -> list[float]:
        """Token edge lengths (mm) along the three grid axes of the mean affine."""
        return [float(v) for v in np.linalg.norm(self.mean_affine()[:3, :3], axis=0)]


def _nifti(data: np.ndarray, affine: np.ndarray, xform_code: int) -> nib.Nifti1Image:
    image = nib.Nifti1Image(data, affine)
    image.header.set_sform(affine, code=xform_code)
    image.header.set_qform(affine, code=xform_code)
    return image


def routing_maps(
    acc: RoutingAccumulator,
    grid: Sequence[int],
    affine: np.ndarray,
    xform_code: int = NIFTI_XFORM_MNI_152,
) -> dict[str, nib.Nifti1Image]:
    """Per-token maps on the token grid as NIfTI images placed in world (MNI152) space by ``affine``.

    Args:
        acc: the accumulated routing (at least one scan).
        grid: token grid ``(g0, g1, g2)``; token id ``n = g1·g2·i0 + g2·i1 + i2`` (C order) is voxel ``(i0, i1, i2)``.
        affine: ``[4, 4]`` token-grid voxel -> world affine (:meth:`TokenGridPlacement.mean_affine`).
        xform_code: NIfTI sform / qform code (default 4, MNI152).

    Returns:
        ``{"foreground_fraction": [g0, g1, g2] float32 (share of scans in which the token is foreground)}`` and per
        layer, with ``b`` the block index: ``"block{b:02d}_expert_share"`` ``[g0, g1, g2, E]`` float32 (each
        expert's share of the token's k selections over the scans; sums to 1 over experts) and
        ``"block{b:02d}_dominant_expert"`` ``[g0, g1, g2]`` int16, the expert number (1..E) selected most often at
        the token (ties: the lower number).
    """
    grid = tuple(int(g) for g in grid)
    if math.prod(grid) != acc.num_tokens:
        raise ValueError(f"grid {grid} has {math.prod(grid)} tokens; the routing has {acc.num_tokens}.")
    scans = acc.num_scans
    if scans == 0:
        raise ValueError("no scan was routed: there is nothing to map.")
    maps = {
        "foreground_fraction": _nifti(
            (acc.foreground_scans / scans).reshape(grid).astype(np.float32), affine, xform_code
        )
    }
    for layer, block in enumerate(acc.blocks):
        counts = acc.token_counts[layer]  # [N, E]
        share = (counts / (scans * acc.top_k)).reshape(*grid, acc.num_experts).astype(np.float32)
        dominant = (counts.argmax(axis=1) + 1).reshape(grid).astype(np.int16)
        maps[f"block{block:02d}_expert_share"] = _nifti(share, affine, xform_code)
        maps[f"block{block:02d}_dominant_expert"] = _nifti(dominant, affine, xform_code)
    return maps
