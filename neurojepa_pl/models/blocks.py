"""The pre-norm transformer block of the encoder and predictor; the reference initialisation (docs/method.md §2.4)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from neurojepa_pl.models.attention import GatedRopeAttention
from neurojepa_pl.models.mlp import Mlp
from neurojepa_pl.models.moe import GroupedExperts, MoEConfig, MoEDispatch, MoEFeedForward, recomputing_moe

__all__ = ["TransformerBlock", "init_transformer_weights", "run_block"]

LAYER_NORM_EPS = 1e-6


class TransformerBlock(nn.Module):
    """``x + Attn(LN1(x))`` then ``x + FFN(LN2(x))``, FFN a GELU MLP or an MoE layer.

    Args:
        dim: width C.
        num_heads: attention heads.
        mlp_ratio: dense MLP hidden width / C.
        attn_gate: per-head sigmoid output gate (reference weights have it).
        moe: MoE sizes, or ``None`` for a dense MLP.
        moe_dispatch: MoE dispatch path.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        attn_gate: bool = True,
        moe: MoEConfig | None = None,
        moe_dispatch: MoEDispatch = "grouped",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = GatedRopeAttention(dim, num_heads, attn_gate=attn_gate)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp: Mlp | MoEFeedForward = (
            Mlp(dim, int(dim * mlp_ratio)) if moe is None else MoEFeedForward(dim, moe, dispatch=moe_dispatch)
        )

    def forward(self, x: Tensor, rope_cos: Tensor, rope_sin: Tensor) -> Tensor:
        """``[B, N, C] -> [B, N, C]``; ``rope_cos``/``rope_sin`` ``[B or 1, N, rot]``."""
        x = x + self.attn(self.norm1(x), rope_cos, rope_sin)
        return x + self.mlp(self.norm2(x))


def run_block(block: nn.Module, x: Tensor, rope_cos: Tensor, rope_sin: Tensor, checkpointing: bool) -> Tensor:
    """Run a block, under non-reentrant activation checkpointing when asked and grad is enabled.

    The recomputation during backward is flagged to the block's MoE layer (if any) so that its expert ``counts``
    are not incremented twice.

    Args:
        block: a :class:`TransformerBlock`, or a wrapper of one (FSDP, ``torch.compile``) called the same way;
            hence ``nn.Module``, which is also what iterating an ``nn.ModuleList`` yields.
        x: tokens ``[B, N, C]``.
        rope_cos: ``[B or 1, N, rot]``.
        rope_sin: ``[B or 1, N, rot]``.
        checkpointing: recompute the block's activations in backward.

    Returns:
        ``[B, N, C]``.
    """
    if not (checkpointing and torch.is_grad_enabled()):
        return block(x, rope_cos, rope_sin)
    moe_layers = [m for m in block.modules() if isinstance(m, MoEFeedForward)]
    if not moe_layers or torch.compiler.is_compiling():
        # Compiled checkpoints recompute inside the compiled backward graph, which does not replay buffer updates.
        return torch.utils.checkpoint.checkpoint(block, x, rope_cos, rope_sin, use_reentrant=False)
    return torch.utils.checkpoint.checkpoint(
        block,
        x,
        rope_cos,
        rope_sin,
        use_reentrant=False,
        context_fn=lambda: (nullcontext(), recomputing_moe(moe_layers)),
    )


@torch.no_grad()
def init_transformer_weights(module: nn.Module, blocks: Sequence[TransformerBlock]) -> None:
    """Reference initialisation, in place.

    Linear and Conv3d weights trunc-normal(std 0.02, bounds +-2 absolute, so effectively untruncated), biases 0,
    LayerNorm 1/0, stacked expert weights trunc-normal; then, for block ``i`` (0-based), ``attn.proj.weight`` and the
    output projection(s) of its feed-forward (dense ``fc2``, or every routed expert's ``fc2`` and the shared expert's
    ``fc2``) are divided by ``sqrt(2 * (i + 1))``. The MoE router gets plain trunc-normal; its bias buffer stays 0.

    Args:
        module: the model to initialise.
        blocks: its transformer blocks in depth order.
    """
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Conv3d)):
            nn.init.trunc_normal_(sub.weight, std=0.02)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)
        elif isinstance(sub, GroupedExperts):
            nn.init.trunc_normal_(sub.fc1_weight, std=0.02)
            nn.init.trunc_normal_(sub.fc2_weight, std=0.02)
            nn.init.zeros_(sub.fc1_bias)
            nn.init.zeros_(sub.fc2_bias)
    for index, block in enumerate(blocks):
        scale = math.sqrt(2.0 * (index + 1))
        block.attn.proj.weight.div_(scale)
        if isinstance(block.mlp, MoEFeedForward):
            block.mlp.experts.fc2_weight.div_(scale)
            block.mlp.shared_experts.fc2.weight.div_(scale)
        else:
            block.mlp.fc2.weight.div_(scale)
