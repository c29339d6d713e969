"""Product-of-experts combination of per-expert class distributions (paper Appendix B.4, docs/method.md §8.6 `vit_poe`).

Each expert (one per modality, plus an optional joint expert) gives a categorical distribution p_e = softmax(l_e).
The product of the valid experts, renormalised, is

    log p(y) = sum_e v_e * log_softmax(l_e)(y) - logsumexp_y'( sum_e v_e * log_softmax(l_e)(y') )

with v_e in {0, 1} the validity of expert e. Missing experts are removed from the product (v_e = 0), which fixes the
reference implementation's bug of letting zero-image placeholders vote (docs/method.md §8.6 [BUG]). The empty product
(no valid expert) is the uniform distribution; callers guarantee at least one valid expert per sample.

Train the result with ``torch.nn.functional.nll_loss`` (it is already a log-probability).
"""

from __future__ import annotations

import torch
from torch import Tensor


def product_of_experts(expert_logits: Tensor, validity: Tensor | None = None) -> Tensor:
    """Combine per-expert logits into the renormalised product distribution, in log space.

    Args:
        expert_logits: ``[B, E, C]`` unnormalised class scores of E experts.
        validity: ``[B, E]`` bool (or 0/1) mask; experts with 0 do not vote. ``None`` means all valid.

    Returns:
        ``[B, C]`` log-probabilities (each row's ``exp`` sums to 1), computed in float32 for stability and cast back
        to the input dtype.

    Raises:
        ValueError: if the shapes do not line up.
    """
    if expert_logits.dim() != 3:
        raise ValueError(
            f"expert_logits must be [B, E, C]; got shape {tuple(expert_logits.shape)}. "
            "Stack the per-expert logits along dim 1."
        )
    if validity is not None and validity.shape != expert_logits.shape[:2]:
        raise ValueError(f"validity must be [B, E] = {tuple(expert_logits.shape[:2])}; got {tuple(validity.shape)}.")
    log_probs = torch.log_softmax(expert_logits.float(), dim=-1)
    if validity is not None:
        # Multiplying by 0 would turn a -inf log-prob into NaN; masking with where() keeps invalid experts inert.
        log_probs = torch.where(validity.bool().unsqueeze(-1), log_probs, torch.zeros_like(log_probs))
    joint = log_probs.sum(dim=1)
    return (joint - torch.logsumexp(joint, dim=-1, keepdim=True)).to(expert_logits.dtype)
