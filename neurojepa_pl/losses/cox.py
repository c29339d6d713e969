"""Cox proportional-hazards loss (negative partial log-likelihood) for time-to-event fine-tuning (docs/method.md §8.5).

Differences from the reference, on purpose:

* tied event times are handled properly (Breslow: every event at time t sees the full risk set {j : t_j >= t};
  Efron optionally), instead of letting the argsort order decide who is "at risk";
* under data parallelism the risk sets span all ranks: :func:`gather_survival_batch` all-gathers the log-risks (with
  gradients) and the times/events before the loss, instead of computing per-rank partial likelihoods.

The loss is a pure function; it imports nothing of Lightning.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["cox_ph_loss", "gather_survival_batch", "all_gather_with_grad"]


def _check_survival_inputs(log_risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> None:
    if log_risk.dim() != 1 or time.shape != log_risk.shape or event.shape != log_risk.shape:
        raise ValueError(
            "cox_ph_loss expects 1-D log_risk, time and event of equal length [B]; got shapes "
            f"{tuple(log_risk.shape)}, {tuple(time.shape)}, {tuple(event.shape)}. "
            "Squeeze the head output [B, 1] -> [B]."
        )


def cox_ph_loss(
    log_risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor, ties: str = "breslow", l2: float = 0.0
) -> torch.Tensor:
    """Mean negative Cox partial log-likelihood over the events of a batch.

    For events i (``event_i = 1``) with risk set R(t_i) = {j : t_j >= t_i} (Breslow)::

        loss = -1/n_events * sum_i [h_i - log sum_{j in R(t_i)} exp(h_j)]  +  l2 * mean(h^2)

    Efron's approximation instead subtracts, for the d events tied at one time with summed risk S_D,
    ``sum_{l<d} log(S_R - l/d * S_D)``.

    Args:
        log_risk: predicted log-hazard ratios h ``[B]``.
        time: observed times ``[B]`` (event or censoring).
        event: 1 for an observed event, 0 for censored ``[B]`` (bool, int or float).
        ties: "breslow" or "efron".
        l2: weight of the ``mean(h^2)`` penalty (the reference's ``l2_lambda``).

    Returns:
        Scalar loss. With no event in the batch the partial likelihood is empty: the loss is
        ``0 * sum(h) + l2 * mean(h^2)``, still connected to the graph so every rank runs the same backward.
    """
    _check_survival_inputs(log_risk, time, event)
    if ties not in ("breslow", "efron"):
        raise ValueError(f"ties must be 'breslow' or 'efron'; got {ties!r}.")
    # bf16/fp16 head outputs are promoted: the cumulative logsumexp needs the range and precision.
    h = log_risk if log_risk.dtype in (torch.float32, torch.float64) else log_risk.float()
    penalty = l2 * h.pow(2).mean() if l2 else h.sum() * 0.0
    is_event = event.to(torch.bool)
    n_events = int(is_event.sum())
    if n_events == 0:
        return h.sum() * 0.0 + penalty

    order = torch.argsort(time, stable=True)
    t_sorted, h_sorted, e_sorted = time[order], h[order], is_event[order]
    # log sum_{j >= k} exp(h_j) along the time-ascending order = a reversed cumulative logsumexp.
    suffix_lse = torch.logcumsumexp(h_sorted.flip(0), dim=0).flip(0)
    # Risk set of time t starts at the FIRST sample with that time, so ties share one risk set.
    first_of_time = torch.searchsorted(t_sorted.contiguous(), t_sorted.contiguous(), right=False)
    log_risk_set = suffix_lse[first_of_time]

    if ties == "breslow":
        nll = -(h_sorted - log_risk_set)[e_sorted].sum()
        return nll / n_events + penalty

    # Efron: within each tied-event group, the l-th event (l = 0..d-1) sees S_R - (l/d) * S_D.
    ev_times = t_sorted[e_sorted]
    ev_h = h_sorted[e_sorted]
    ev_log_risk_set = log_risk_set[e_sorted]
    unique_times, group = torch.unique_consecutive(ev_times, return_inverse=True)
    n_groups = unique_times.numel()
    d = torch.zeros(n_groups, dtype=h.dtype, device=h.device).index_add_(0, group, torch.ones_like(ev_h))
    # log S_D per group via a numerically safe scatter-logsumexp.
    group_max = torch.full((n_groups,), float("-inf"), dtype=h.dtype, device=h.device)
    group_max = group_max.scatter_reduce(0, group, ev_h.detach(), reduce="amax")
    s_d_scaled = torch.zeros(n_groups, dtype=h.dtype, device=h.device).index_add_(
        0, group, torch.exp(ev_h - group_max[group])
    )
    log_s_d = torch.log(s_d_scaled) + group_max
    # Rank of each event inside its group: position minus the group's first position.
    positions = torch.arange(ev_h.numel(), device=h.device)
    group_start = torch.zeros(n_groups, dtype=torch.long, device=h.device).scatter_reduce(
        0, group, positions, reduce="amin", include_self=False
    )
    rank_in_group = (positions - group_start[group]).to(h.dtype)
    frac = rank_in_group / d[group]
    # log(S_R - frac * S_D) = log S_R + log(1 - frac * exp(log S_D - log S_R)); frac < 1 and S_D <= S_R keep it > 0.
    log_denominator = ev_log_risk_set + torch.log1p(-frac * torch.exp(log_s_d[group] - ev_log_risk_set))
    nll = -(ev_h - log_denominator).sum()
    return nll / n_events + penalty


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather of equally sized tensors whose backward returns the gradient summed over ranks for the local piece.

    Written here because ``torch.distributed.nn.functional.all_gather`` is deprecated (torch 2.13) in favour of a
    private API; the backward is one all-reduce, which every backend (gloo included) supports.
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        ctx.rank = dist.get_rank()
        ctx.local_n = tensor.shape[0]
        pieces = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(pieces, tensor.contiguous())
        return torch.cat(pieces, dim=0)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.local_n
        return grad[start : start + ctx.local_n]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` ``[b_r, ...]`` from all ranks along dim 0, keeping the autograd path to the local part.

    Ranks may hold different batch sizes (the last batch of an epoch): sizes are exchanged first and every tensor is
    padded to the largest before the collective. Without an initialised process group (or with one rank) the input
    is returned unchanged.

    Gradients: in backward, the gradients that every rank's (identical) loss sends to each piece are summed over
    ranks. A rank therefore receives ``world_size x`` the gradient of the global loss for its own samples, and DDP's
    gradient *averaging* turns that back into exactly the single-process gradient.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    world = dist.get_world_size()
    local_n = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(local_n) for _ in range(world)]
    dist.all_gather(sizes, local_n)
    sizes_list = [int(s.item()) for s in sizes]
    max_n = max(sizes_list)
    if tensor.shape[0] < max_n:
        pad = tensor.new_zeros((max_n - tensor.shape[0], *tensor.shape[1:]))
        tensor = torch.cat([tensor, pad], dim=0)
    if tensor.requires_grad:
        gathered = _AllGatherWithGrad.apply(tensor)
    else:
        pieces = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(pieces, tensor.contiguous())
        gathered = torch.cat(pieces, dim=0)
    return torch.cat([gathered[r * max_n : r * max_n + n] for r, n in enumerate(sizes_list)], dim=0)


def gather_survival_batch(
    log_risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All-gather a survival batch across ranks so Cox risk sets span the global batch (docs/method.md §8.5 fixed).

    Args:
        log_risk: local log-risks ``[b]`` (gradients flow back to them).
        time: local times ``[b]``.
        event: local event indicators ``[b]``.

    Returns:
        ``(log_risk [B], time [B], event [B])`` concatenated over ranks in rank order; unchanged when not distributed.
    """
    _check_survival_inputs(log_risk, time, event)
    return all_gather_with_grad(log_risk), all_gather_with_grad(time), all_gather_with_grad(event)
