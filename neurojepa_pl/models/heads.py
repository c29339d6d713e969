"""Downstream heads that turn encoder tokens ``[B, N, C]`` into task outputs ``[B, K]``.

* :class:`AttentiveClassifier` is the V-JEPA-style attentive probe of docs/method.md §8.2: ``depth - 1`` plain
  self-attention blocks, then one cross-attention block whose single learnable query attends over the tokens, then a
  linear layer.
* :class:`LinearProbe` is a linear layer on mean-pooled tokens (docs/method.md §8.2 "Linear pooler"; the multimodal
  ``vit_avg`` path uses the same recipe).

Both accept an optional boolean ``key_mask`` ``[B, N]`` (``True`` = a real token to attend to / average over), for
bags with padded tokens (docs/method.md §8.2: supported, never passed by the reference).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AttentiveClassifier", "AttentivePooler", "LinearProbe", "masked_mean"]


def _attention_mask(key_mask: torch.Tensor | None) -> torch.Tensor | None:
    """``[B, N]`` keep-mask -> boolean SDPA mask ``[B, 1, 1, N]`` (True = may attend), or None."""
    if key_mask is None:
        return None
    if key_mask.dtype != torch.bool or key_mask.dim() != 2:
        raise ValueError(
            f"key_mask must be a bool tensor [B, N] (True = real token); got dtype {key_mask.dtype}, "
            f"shape {tuple(key_mask.shape)}."
        )
    if not bool(key_mask.any(dim=1).all()):
        raise ValueError("key_mask has a sample with no real token: every row needs at least one True entry.")
    return key_mask[:, None, None, :]


class _MLP(nn.Module):
    """Linear -> GELU -> Linear, named ``fc1``/``fc2`` so the fc2 rescale of docs/method.md §8.2 can address it."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _SelfAttention(nn.Module):
    """Multi-head self-attention with a qkv bias and an output projection; no RoPE, no gate (docs/method.md §8.2)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {num_heads}.")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class _Block(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)); x + MLP(LN(x)).

    LayerNorm eps is PyTorch's 1e-5 (docs/method.md §8.2).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attn_mask)
        return x + self.mlp(self.norm2(x))


class _CrossAttention(nn.Module):
    """Queries attend over tokens; Linear q, Linear kv (bias), SDPA and deliberately no output projection.

    The layout of docs/method.md §8.2.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {num_heads}.")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=True)
        self.kv = nn.Linear(dim, 2 * dim, bias=True)

    def forward(self, q: torch.Tensor, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, m, c = q.shape
        n = x.shape[1]
        h = self.num_heads
        q = self.q(q).reshape(b, m, h, c // h).transpose(1, 2)
        kv = self.kv(x).reshape(b, n, 2, h, c // h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=attn_mask)
        return y.transpose(1, 2).reshape(b, m, c)


class _CrossAttentionBlock(nn.Module):
    """q <- q + XAttn(q, LN(x)); q <- q + MLP(LN(q)). Only the tokens are normalised before the cross-attention."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.xattn = _CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _MLP(dim, int(dim * mlp_ratio))

    def forward(self, q: torch.Tensor, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        q = q + self.xattn(q, self.norm1(x), attn_mask)
        return q + self.mlp(self.norm2(q))


class AttentivePooler(nn.Module):
    """Attentive pooling of tokens into one vector per sample (docs/method.md §8.2, steps 1-2).

    Args:
        embed_dim: token width C.
        num_heads: attention heads of every block.
        depth: total number of blocks; ``depth - 1`` self-attention blocks precede the cross-attention block.
        mlp_ratio: MLP hidden width as a multiple of ``embed_dim``.
        init_std: std of the truncated-normal init of the query and all Linear weights.
    """

    def __init__(
        self, embed_dim: int = 768, num_heads: int = 16, depth: int = 1, mlp_ratio: float = 4.0, init_std: float = 0.02
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1 (the cross-attention block counts as one); got {depth}.")
        self.query_tokens = nn.Parameter(torch.zeros(1, 1, embed_dim))
        blocks = [_Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth - 1)]
        self.blocks = nn.ModuleList(blocks)
        self.cross_attention_block = _CrossAttentionBlock(embed_dim, num_heads, mlp_ratio)
        self.init_std = init_std
        nn.init.trunc_normal_(self.query_tokens, std=init_std)
        self.apply(self._init_weights)
        self._rescale_residual_branches(blocks)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=self.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @torch.no_grad()
    def _rescale_residual_branches(self, blocks: list[_Block]) -> None:
        # Residual branch outputs shrink with depth (divide by sqrt(2 * layer_id)) so deep stacks start near identity.
        # The cross block reuses "last block index + 1" (1 when there is no self-attention block), as
        # docs/method.md §8.2 states.
        last = 0
        for last, block in enumerate(blocks):
            block.attn.proj.weight.div_(math.sqrt(2.0 * (last + 1)))
            block.mlp.fc2.weight.div_(math.sqrt(2.0 * (last + 1)))
        self.cross_attention_block.mlp.fc2.weight.div_(math.sqrt(2.0 * (last + 1)))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pool tokens.

        Args:
            x: tokens ``[B, N, C]``.
            key_mask: optional bool ``[B, N]``, True = real token.

        Returns:
            Pooled vectors ``[B, C]``.
        """
        attn_mask = _attention_mask(key_mask)
        for block in self.blocks:
            x = block(x, attn_mask)
        q = self.query_tokens.expand(x.shape[0], -1, -1)
        return self.cross_attention_block(q, x, attn_mask).squeeze(1)


class AttentiveClassifier(nn.Module):
    """Attentive probe: :class:`AttentivePooler` then ``Linear(embed_dim, num_classes)`` (docs/method.md §8.2).

    Args:
        embed_dim: token width C (768 for ViT-B).
        num_classes: number of outputs K (2 logits for binary tasks, 1 for regression / Cox log-risk).
        depth: number of blocks including the cross-attention block (3 for fine-tuning, 1 for time-to-event, 4 in
            the monitor).
        num_heads: attention heads.
        mlp_ratio: MLP hidden width as a multiple of ``embed_dim``.
        init_std: truncated-normal std for the query and Linear weights.
    """

    def __init__(
        self,
        embed_dim: int = 768,
        num_classes: int = 2,
        depth: int = 3,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        init_std: float = 0.02,
    ):
        super().__init__()
        self.pooler = AttentivePooler(embed_dim, num_heads, depth, mlp_ratio, init_std)
        self.linear = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=init_std)
        nn.init.zeros_(self.linear.bias)

    def pool(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens ``[B, N, C]`` -> pooled vector ``[B, C]`` (the input of the final linear layer)."""
        return self.pooler(x, key_mask)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens ``[B, N, C]`` (+ optional bool ``key_mask`` ``[B, N]``) -> outputs ``[B, num_classes]``."""
        return self.linear(self.pooler(x, key_mask))


def masked_mean(x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens ``[B, N, C] -> [B, C]``, counting only tokens where the bool ``key_mask`` ``[B, N]`` is True."""
    if key_mask is None:
        return x.mean(dim=1)
    _attention_mask(key_mask)  # validates dtype, shape and non-empty rows
    weights = key_mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1)


class LinearProbe(nn.Module):
    """``Linear(embed_dim, num_classes)`` on mean-pooled tokens.

    Args:
        embed_dim: token width C.
        num_classes: number of outputs K.
    """

    def __init__(self, embed_dim: int = 768, num_classes: int = 2):
        super().__init__()
        self.linear = nn.Linear(embed_dim, num_classes)

    def pool(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens ``[B, N, C]`` -> mean-pooled vector ``[B, C]``."""
        return masked_mean(x, key_mask)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens ``[B, N, C]`` (+ optional bool ``key_mask`` ``[B, N]``) -> outputs ``[B, num_classes]``."""
        return self.linear(masked_mean(x, key_mask))
