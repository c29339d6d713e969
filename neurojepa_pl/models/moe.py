"""Mixture-of-Experts feed-forward with aux-loss-free bias balancing (docs/method.md §3).

Per token ``x`` (flattened to ``[T, C]``):

1. ``scores = softmax(router(x))`` in float32 (router Linear without bias);
2. selection = ``topk(scores + bias, k)``; the bias buffer only changes *which* experts are picked;
3. weights = ``scores`` gathered at the selection (not renormalised) ``* route_scale``, cast to the compute dtype
   (the reference casts to ``x.dtype``; the two differ only under autocast, see ``MoEFeedForward.forward``);
4. ``out = sum_k w_k * Expert_k(x) + Shared(x)``.

Routed experts are stored stacked (``experts.fc1_weight [E, H, C]`` ...) so that the default ``"grouped"`` dispatch
is one sort plus two ``torch._grouped_mm`` calls, with no host synchronisation (torch.compile / CUDA-graph
friendly). ``"loop"`` is the naive per-expert loop of the reference, kept as test oracle and benchmark baseline.
Reference checkpoints name each expert separately (``experts.{e}.fc1.weight``); ``models.checkpoint`` converts.

Balancing state, owned by each layer and updated once per applied optimizer update by
:func:`rebalance_moe_layers_` (called by ``MoELoadBalance`` in pretraining and by ``DownstreamModule`` in
fine-tuning):

* ``gate.bias`` (float32 ``[E]``, buffer): selection bias, identical on all ranks;
* ``counts`` (int64 ``[E]``, buffer): tokens routed to each expert since the last update, *per rank*. It grows only
  in training-mode forwards with grad enabled, and not again when activation checkpointing recomputes a block
  during backward, so evaluation, ``no_grad`` and EMA-target forwards never count (a deliberate fix of the
  reference, which counts everywhere). :func:`rebalance_moe_layers_` all-reduces it (SUM), calls
  :func:`balance_bias_update`, writes ``gate.bias`` and zeroes ``counts``. DDP must not broadcast ``counts`` from
  rank 0: see :data:`DDP_IGNORED_BUFFERS` and :func:`ddp_ignored_buffer_names`.

Routing of individual tokens can be observed with a forward hook on ``layer.gate``, whose output is
``(weights [T, k], indices [T, k], scores [T, E])``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from neurojepa_pl.models.mlp import Mlp

__all__ = [
    "MoEConfig",
    "MoEDispatch",
    "BiasedTopKRouter",
    "GroupedExperts",
    "MoEFeedForward",
    "DDP_IGNORED_BUFFERS",
    "ddp_ignored_buffer_names",
    "balance_bias_update",
    "all_reduce_counts",
    "rebalance_moe_layers_",
    "recomputing_moe",
]

MoEDispatch = Literal["grouped", "loop"]
_DISPATCHES = ("grouped", "loop")

DDP_IGNORED_BUFFERS: tuple[str, ...] = ("counts",)
"""Buffer names of :class:`MoEFeedForward` that differ per rank and must not be broadcast by DDP."""


@dataclass(frozen=True)
class MoEConfig:
    """Sizes of one MoE feed-forward layer (paper defaults, docs/method.md §3.1).

    Attributes:
        num_experts: routed experts E.
        top_k: experts selected per token.
        expert_hidden: hidden width of each routed expert.
        shared_hidden: hidden width of the always-on shared expert (the reference's "2 shared experts" are one MLP).
        route_scale: multiplier of the selected softmax scores.
    """

    num_experts: int = 16
    top_k: int = 6
    expert_hidden: int = 384
    shared_hidden: int = 768
    route_scale: float = 4.0

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"Expected 1 <= top_k <= num_experts; found top_k={self.top_k}, num_experts={self.num_experts}."
            )
        if self.expert_hidden <= 0 or self.shared_hidden <= 0:
            raise ValueError(
                f"Expected positive hidden widths; found expert_hidden={self.expert_hidden}, "
                f"shared_hidden={self.shared_hidden}."
            )

    @classmethod
    def from_any(cls, value: MoEConfig | Mapping[str, Any]) -> MoEConfig:
        """Accept a config or a plain dict (as stored in config.json / hyper-parameters)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ValueError(
                    f"Unknown MoEConfig keys {sorted(unknown)}; expected a subset of {cls.__annotations__}."
                )
            return cls(**value)
        raise TypeError(f"Expected a MoEConfig or a dict of its fields; found {type(value).__name__}.")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (JSON-serialisable)."""
        return dataclasses.asdict(self)


class BiasedTopKRouter(nn.Module):
    """Softmax router with a selection-only bias (reference names ``gate.weight`` under ``gate``, buffer ``bias``).

    Args:
        dim: token width C.
        num_experts: E.
        top_k: experts per token.
        route_scale: multiplier of the gathered scores.
    """

    bias: Tensor  # buffer [E] float32 (registered in __init__; declared so that it types as a Tensor)

    def __init__(self, dim: int, num_experts: int, top_k: int, route_scale: float) -> None:
        super().__init__()
        self.top_k = top_k
        self.route_scale = route_scale
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.register_buffer("bias", torch.zeros(num_experts, dtype=torch.float32))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Route tokens.

        Args:
            x: ``[T, C]``.

        Returns:
            weights ``[T, k]`` (float32, scores x route_scale), indices ``[T, k]`` (int64), scores ``[T, E]``
            (float32 softmax probabilities).
        """
        # Logits in float32 even under autocast: routing decisions are discrete, so bf16 rounding of the logits
        # would flip selections. (The reference computes logits in the autocast dtype, softmax in float32.)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.gate.weight.float())
        scores = logits.softmax(dim=-1)
        indices = torch.topk(scores + self.bias.float(), self.top_k, dim=-1).indices
        weights = scores.gather(1, indices) * self.route_scale
        return weights, indices, scores


class GroupedExperts(nn.Module):
    """E GELU experts ``C -> H -> C`` stored as stacked tensors.

    Parameters: ``fc1_weight [E, H, C]``, ``fc1_bias [E, H]``, ``fc2_weight [E, C, H]``, ``fc2_bias [E, C]`` (the
    ``nn.Linear`` layout per expert, so reference expert ``e`` is slice ``e``).

    Because the parameters are shared tensors, every expert receives a gradient (zero when it got no token) in both
    dispatch paths, so DDP needs no ``find_unused_parameters`` and no dummy forward.
    """

    def __init__(self, num_experts: int, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.fc1_bias = nn.Parameter(torch.zeros(num_experts, hidden_dim))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.fc2_bias = nn.Parameter(torch.zeros(num_experts, dim))
        nn.init.trunc_normal_(self.fc1_weight, std=0.02)
        nn.init.trunc_normal_(self.fc2_weight, std=0.02)

    def forward_grouped(self, x_sorted: Tensor, expert_ids: Tensor, group_ends: Tensor) -> Tensor:
        """Apply expert ``expert_ids[m]`` to row ``m`` with two grouped matmuls, in ``x_sorted.dtype``.

        Args:
            x_sorted: ``[M, C]`` rows sorted by expert, contiguous, in the compute dtype.
            expert_ids: ``[M]`` expert of each row (non-decreasing).
            group_ends: ``[E]`` int32 exclusive end offset of each expert's rows.

        Returns:
            ``[M, C]`` in ``x_sorted.dtype``.
        """
        dtype = x_sorted.dtype
        # Weights used transposed ([E, C, H] column-major views): the layout grouped GEMM kernels expect.
        hidden = torch._grouped_mm(x_sorted, self.fc1_weight.to(dtype).transpose(-2, -1), offs=group_ends)
        hidden = F.gelu(_AddGroupedBias.apply(hidden, self.fc1_bias.to(dtype), expert_ids, group_ends))
        out = torch._grouped_mm(hidden, self.fc2_weight.to(dtype).transpose(-2, -1), offs=group_ends)
        return _AddGroupedBias.apply(out, self.fc2_bias.to(dtype), expert_ids, group_ends)

    def forward_one(self, x: Tensor, expert: int) -> Tensor:
        """Apply a single expert: ``[M, C] -> [M, C]``."""
        hidden = F.gelu(F.linear(x, self.fc1_weight[expert], self.fc1_bias[expert]))
        return F.linear(hidden, self.fc2_weight[expert], self.fc2_bias[expert])


# The three autograd Functions below exist for speed on CUDA: the natural formulations (index_select, and
# `bias[expert_ids]`) have atomic or sort-based scatters in their backward (about 5x slower at paper size on an
# H200); these gather in backward instead, and reduce bias gradients per expert with one grouped GEMM.
class _GatherSortedRows(torch.autograd.Function):
    """``x [T, C] -> x[order // k] [T*k, C]``; backward un-sorts with ``inverse`` and sums the k copies."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, order: Tensor, inverse: Tensor, top_k: int) -> Tensor:
        ctx.save_for_backward(inverse)
        ctx.top_k = top_k
        return x.index_select(0, torch.div(order, top_k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (inverse,) = ctx.saved_tensors
        grad_x = grad.index_select(0, inverse).view(-1, ctx.top_k, grad.shape[-1]).sum(dim=1)
        return grad_x, None, None, None


class _PermuteRows(torch.autograd.Function):
    """``x[perm]`` for a permutation ``perm`` whose inverse is given; backward is ``grad[inverse]``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, perm: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class _AddGroupedBias(torch.autograd.Function):
    """``x [M, H] + bias[expert_ids]`` for rows grouped by expert; the bias gradient is each group's column sum,
    computed as ``grad^T @ ones`` by a grouped GEMM with offsets along the reduction dimension."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, bias: Tensor, expert_ids: Tensor, group_ends: Tensor) -> Tensor:
        ctx.save_for_backward(group_ends)
        return x + bias.index_select(0, expert_ids)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
        (group_ends,) = ctx.saved_tensors
        grad = grad.contiguous()
        ones = grad.new_ones(grad.shape[0], 8)  # 8 columns: 16-byte aligned rows in bf16; column 0 is used
        grad_bias = torch._grouped_mm(grad.t(), ones, offs=group_ends)[..., 0]
        return grad, grad_bias, None, None


def _compute_dtype(x: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _inside_backward() -> bool:
    # Activation checkpointing (ours or a wrapper's) re-runs the forward while the autograd engine executes a
    # backward graph task; a normal forward never runs inside one. There is no public "am I being recomputed" API;
    # the graph-task id is what torch.utils.checkpoint itself consults. Dynamo cannot trace this call, so compiled
    # code relies on the explicit flag set by `recomputing_moe` instead (see `MoEFeedForward.counts_this_forward`).
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


@contextmanager
def recomputing_moe(layers: Sequence[MoEFeedForward]) -> Iterator[None]:
    """Mark MoE layers as being recomputed by activation checkpointing, so they do not count again.

    Used as the recompute context of ``torch.utils.checkpoint.checkpoint(..., context_fn=...)``.
    """
    for layer in layers:
        layer._recomputing = True
    try:
        yield
    finally:
        for layer in layers:
            layer._recomputing = False


class MoEFeedForward(nn.Module):
    """Routed + shared experts feed-forward with load counting (drop-in for a block's MLP).

    Reference state-dict names under the layer: ``gate.gate.weight [E, C]``, ``gate.bias [E]`` (buffer),
    ``counts [E]`` (buffer), ``shared_experts.fc1/fc2``; routed experts natively ``experts.fc{1,2}_{weight,bias}``.

    Args:
        dim: token width C.
        config: layer sizes.
        dispatch: ``"grouped"`` (default, ``torch._grouped_mm``) or ``"loop"`` (per-expert loop, reference style).
    """

    DDP_IGNORED_BUFFERS = DDP_IGNORED_BUFFERS
    counts: Tensor  # buffer [E] int64 (registered in __init__; declared so that it types as a Tensor)

    def __init__(self, dim: int, config: MoEConfig, dispatch: MoEDispatch = "grouped") -> None:
        super().__init__()
        self.config = config
        self.gate = BiasedTopKRouter(dim, config.num_experts, config.top_k, config.route_scale)
        self.experts = GroupedExperts(config.num_experts, dim, config.expert_hidden)
        self.shared_experts = Mlp(dim, config.shared_hidden)
        self.register_buffer("counts", torch.zeros(config.num_experts, dtype=torch.int64))
        self._dim = dim
        self._recomputing = False
        self.dispatch = dispatch

    @property
    def dispatch(self) -> MoEDispatch:
        """``"grouped"`` or ``"loop"``; may be switched at any time (same parameters)."""
        return self._dispatch

    @dispatch.setter
    def dispatch(self, value: MoEDispatch) -> None:
        if value not in _DISPATCHES:
            raise ValueError(f"Expected MoE dispatch in {_DISPATCHES}; found {value!r}.")
        if value == "grouped":
            if not hasattr(torch, "_grouped_mm"):
                raise RuntimeError(
                    "MoE dispatch 'grouped' needs torch._grouped_mm (torch >= 2.8); "
                    f"this is torch {torch.__version__}. "
                    "Upgrade torch or pass moe_dispatch='loop'."
                )
            # Grouped GEMM needs 16-byte aligned row strides: 8 elements in bf16/fp16 (4 would do for fp32).
            for name, width in (("dim", self._dim), ("expert_hidden", self.config.expert_hidden)):
                if width % 8:
                    raise ValueError(
                        f"MoE dispatch 'grouped' needs {name} divisible by 8 (16-byte aligned rows); found {width}. "
                        "Choose another size or pass moe_dispatch='loop'."
                    )
        self._dispatch = value

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def top_k(self) -> int:
        return self.config.top_k

    def counts_this_forward(self) -> bool:
        """Whether a forward now adds to ``counts``: training mode, grad enabled, and not an activation-checkpoint
        recomputation (flagged by :func:`recomputing_moe`, or detected as running inside backward in eager mode).

        Caveat: a *compiled* layer recomputed by a checkpoint wrapper other than the encoder's/predictor's own
        (which flag the recompute) cannot be detected and would count twice.
        """
        return self.training and torch.is_grad_enabled() and not self._recomputing and not _inside_backward()

    def forward(self, x: Tensor) -> Tensor:
        """``[..., C] -> [..., C]``; also adds this forward's selections to ``counts`` when it should count."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, indices, _ = self.gate(flat)
        # The reference casts the weights to x's dtype (float32 under autocast, so its routed sum is float32); we use
        # the compute dtype, so that under autocast the layer returns bf16 like any Linear and no float32 copy of the
        # [T, k, C] expert outputs is made.
        weights = weights.to(_compute_dtype(flat))
        if self._dispatch == "grouped":
            routed, per_expert = self._routed_grouped(flat, weights, indices)
        else:
            routed, per_expert = self._routed_loop(flat, weights, indices)
        if self.counts_this_forward():
            self.counts.add_(per_expert)
        return (routed + self.shared_experts(flat)).view(shape)

    def _routed_grouped(self, flat: Tensor, weights: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
        num_tokens, top_k = indices.shape
        flat_ids = indices.reshape(-1)
        sorted_ids, order = torch.sort(flat_ids, stable=True)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        experts = torch.arange(self.num_experts, device=flat.device, dtype=sorted_ids.dtype)
        group_ends = torch.searchsorted(sorted_ids, experts, right=True, out_int32=True)
        per_expert = torch.diff(group_ends, prepend=group_ends.new_zeros(1)).long()
        # Cast before gathering: half the traffic under autocast.
        x_sorted = _GatherSortedRows.apply(flat.to(weights.dtype), order, inverse, top_k)
        out_sorted = self.experts.forward_grouped(x_sorted, sorted_ids, group_ends)
        out = _PermuteRows.apply(out_sorted, inverse, order).view(num_tokens, top_k, -1)  # slot order of `indices`
        # Weighted sum over the k slots: deterministic, no atomics. Elementwise rather than a [T,1,k]@[T,k,C] bmm,
        # whose backward (T tiny GEMMs) measured 1.2 ms of 4.8 per step at paper size on an H200.
        routed = (out * weights.unsqueeze(-1)).sum(dim=1)
        return routed, per_expert

    def _routed_loop(self, flat: Tensor, weights: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
        # Reference-style oracle/baseline: host syncs and data-dependent shapes are fine here.
        per_expert = torch.bincount(indices.reshape(-1), minlength=self.num_experts)
        routed = torch.zeros_like(flat, dtype=weights.dtype)
        for expert in range(self.num_experts):
            token_idx, slot = torch.where(indices == expert)
            if token_idx.numel() == 0:
                continue
            out = self.experts.forward_one(flat.index_select(0, token_idx), expert)
            routed = routed.index_add(0, token_idx, (out * weights[token_idx, slot, None]).to(routed.dtype))
        return routed, per_expert


def ddp_ignored_buffer_names(model: nn.Module) -> list[str]:
    """Full dotted names of buffers DDP must not broadcast (per-rank MoE ``counts``).

    Pass the result to ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)``
    before wrapping.

    Args:
        model: any module containing MoE layers.

    Returns:
        e.g. ``["blocks.1.mlp.counts", "blocks.3.mlp.counts", ...]``.
    """
    names = []
    for prefix, module in model.named_modules():
        for buffer in getattr(type(module), "DDP_IGNORED_BUFFERS", ()):
            names.append(f"{prefix}.{buffer}" if prefix else buffer)
    return names


def balance_bias_update(
    bias: Tensor, counts: Tensor, rate: float, proportional: bool, clip: float = 0.3
) -> tuple[Tensor, Tensor, Tensor]:
    """One aux-loss-free balancing step for one MoE layer (docs/method.md §3.3 steps 2-6 and 8).

    With ``c`` the (all-reduced) counts and ``c_bar = mean(c)``: ``err = c_bar - c``; ``u = err / (c_bar + 1e-6)``
    if ``proportional`` (pretraining) else ``sign(err)`` (fine-tuning); ``u -= mean(u)``; ``b = bias + rate * u``;
    ``b = clamp(b, -clip, clip)`` if ``clip > 0``; ``b -= mean(b)``. If ``c_bar == 0`` the bias is returned
    unchanged and both violations are 1.0. No host synchronisation (the empty case is a ``torch.where``).

    Args:
        bias: float32 ``[E]`` current selection bias.
        counts: ``[E]`` tokens per expert (any numeric dtype).
        rate: update rate (1e-4 in the paper; 0 leaves only clip and re-centre).
        proportional: token-averaged error correction instead of the sign.
        clip: bias bound; ``<= 0`` disables the clamp.

    Returns:
        ``(new_bias [E] float32, min_violation [], max_violation [])`` where the violations are
        ``min(c)/c_bar`` and ``max(c)/c_bar``.
    """
    if bias.shape != counts.shape or bias.dim() != 1:
        raise ValueError(
            f"Expected bias and counts of the same shape [E]; found {tuple(bias.shape)} and {tuple(counts.shape)}."
        )
    bias = bias.float()
    c = counts.to(device=bias.device, dtype=torch.float32)
    c_bar = c.mean()
    error = c_bar - c
    step = error / (c_bar + 1e-6) if proportional else torch.sign(error)
    step = step - step.mean()
    new_bias = bias + rate * step
    if clip > 0:
        new_bias = new_bias.clamp(-clip, clip)
    new_bias = new_bias - new_bias.mean()
    empty = c_bar == 0
    safe_mean = torch.where(empty, torch.ones_like(c_bar), c_bar)
    neutral = torch.ones_like(c_bar)
    min_violation = torch.where(empty, neutral, c.min() / safe_mean)
    max_violation = torch.where(empty, neutral, c.max() / safe_mean)
    return torch.where(empty, bias, new_bias), min_violation, max_violation


def all_reduce_counts(counts: Tensor) -> Tensor:
    """Sum routing counts over all ranks, in place; a no-op without an initialised process group of size > 1.

    Args:
        counts: int64 ``[L, E]``, one row per MoE layer (one collective for all layers).

    Returns:
        ``counts`` itself, now the sum over ranks.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return counts


@torch.no_grad()
def rebalance_moe_layers_(
    layers: Sequence[MoEFeedForward], rate: float, *, proportional: bool, clip: float
) -> tuple[Tensor, Tensor]:
    """One balance-bias update of every MoE layer, in place (docs/method.md §3.3): the step shared by pretraining
    (proportional rule, scheduled rate) and fine-tuning (sign rule, fixed rate).

    Stacks the layers' ``counts`` into ``[L, E]``, sums them over ranks in one collective when a process group is
    initialised (:func:`all_reduce_counts`; every rank then computes the same biases, so no broadcast is needed),
    applies :func:`balance_bias_update` per layer, writes ``gate.bias`` and zeroes ``counts``. Must run on every rank
    (collective) and once per applied optimizer update.

    Args:
        layers: the model's MoE layers (at least one), e.g. ``encoder.moe_layers()``.
        rate: bias update rate.
        proportional: token-averaged error correction (pretraining) instead of the sign rule (fine-tuning).
        clip: bias bound; ``<= 0`` disables the clamp.

    Returns:
        ``(min_violation [], max_violation [])``: float32 means over the layers of ``min(c)/c_bar`` and
        ``max(c)/c_bar`` of the summed counts (1.0 for a layer that saw no token).
    """
    if not layers:
        raise ValueError("rebalance_moe_layers_ needs at least one MoE layer; skip the call for a dense model.")
    counts = all_reduce_counts(torch.stack([layer.counts for layer in layers]))  # [L, E]
    min_vio, max_vio = [], []
    for layer, layer_counts in zip(layers, counts):
        new_bias, lo, hi = balance_bias_update(layer.gate.bias, layer_counts, rate, proportional, clip=clip)
        layer.gate.bias.copy_(new_bias)
        layer.counts.zero_()
        min_vio.append(lo)
        max_vio.append(hi)
    return torch.stack(min_vio).mean(), torch.stack(max_vio).mean()
