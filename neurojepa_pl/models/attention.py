"""Multi-head self-attention with 3D RoPE and the reference's per-head sigmoid output gate (docs/method.md §2.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neurojepa_pl.models.rope import apply_rope

__all__ = ["GatedRopeAttention"]


class GatedRopeAttention(nn.Module):
    """RoPE self-attention; optionally each head's output is scaled by ``sigmoid(proj_attn_gate(x))``.

    The gate is not in the paper but is in the released weights (``proj_attn_gate``: Linear(C, heads)), applied to
    the same normed input as ``qkv`` and multiplied into each head's attention output before ``proj``.

    Args:
        dim: model width C.
        num_heads: number of heads H (C must be divisible by H).
        attn_gate: build and apply ``proj_attn_gate``.
    """

    def __init__(self, dim: int, num_heads: int, attn_gate: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Expected the width {dim} to be divisible by num_heads {num_heads}.")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_attn_gate = nn.Linear(dim, num_heads) if attn_gate else None

    def forward(self, x: Tensor, rope_cos: Tensor, rope_sin: Tensor) -> Tensor:
        """Attend over all tokens.

        Args:
            x: normed tokens ``[B, N, C]``.
            rope_cos: ``[B or 1, N, rot]`` RoPE cosine table (see ``rope.rope_tables``).
            rope_sin: same shape as ``rope_cos``.

        Returns:
            ``[B, N, C]``.
        """
        batch, num_tokens, dim = x.shape
        qkv = self.qkv(x).view(batch, num_tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(dim=2)  # [B, N, H, hd]
        q = apply_rope(q, rope_cos, rope_sin).transpose(1, 2)
        k = apply_rope(k, rope_cos, rope_sin).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2))  # [B, H, N, hd]
        if self.proj_attn_gate is not None:
            gate = torch.sigmoid(self.proj_attn_gate(x))  # [B, N, H]
            out = out * gate.transpose(1, 2).unsqueeze(-1)
        return self.proj(out.transpose(1, 2).reshape(batch, num_tokens, dim))
