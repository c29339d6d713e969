"""JEPA predictor (docs/method.md §4): predicts target-token features from context features plus mask tokens."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from neurojepa_pl.models.blocks import LAYER_NORM_EPS, TransformerBlock, init_transformer_weights, run_block
from neurojepa_pl.models.rope import PositionLayout, RopeDtype, RopeTable, rope_axis_dim
from neurojepa_pl.models.vit3d import as_triple, no_weight_decay_names, rope_compute_dtype

__all__ = ["Predictor3D"]


class Predictor3D(nn.Module):
    """Narrow transformer over [context; mask tokens], sorted by token id (RoPE positions = sorted ids).

    Reference names: ``predictor_embed``, ``mask_tokens.{j}`` (``[1, 1, D]``, zero-init), ``predictor_blocks.{i}``,
    ``predictor_norm``, ``predictor_proj``. The reference only ever uses mask token 0 (docs/method.md §4); the others
    are kept for weight compatibility.

    Args:
        encoder_embed_dim: encoder width Ce (input and output width).
        embed_dim: predictor width D.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / D.
        img_size: encoder input volume (sets the token grid).
        patch_size: encoder patch size.
        num_mask_tokens: learnable mask tokens.
        attn_gate: per-head sigmoid attention output gate.
        rope_layout: ``"reference"`` (the reference predictor's cubic-grid decomposition, docs/method.md §2.2) or
            ``"grid"``.
        rope_dtype: ``"float32"`` or ``"activation"``.
        use_activation_checkpointing: non-reentrant checkpoint per block while grad is enabled.
    """

    def __init__(
        self,
        encoder_embed_dim: int = 768,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        img_size: Sequence[int] = (96, 108, 96),
        patch_size: int | Sequence[int] = 12,
        num_mask_tokens: int = 3,
        attn_gate: bool = True,
        rope_layout: Literal["reference", "grid"] = "reference",
        rope_dtype: RopeDtype = "float32",
        use_activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        img = as_triple(img_size, "img_size")
        patch = as_triple(patch_size, "patch_size")
        if any(i % p for i, p in zip(img, patch)):
            raise ValueError(f"Expected img_size {img} divisible by patch_size {patch} on every axis.")
        if rope_layout not in ("reference", "grid"):
            raise ValueError(f"Expected rope_layout 'reference' or 'grid'; found {rope_layout!r}.")
        if num_mask_tokens < 1:
            raise ValueError(f"Expected at least one mask token; found num_mask_tokens={num_mask_tokens}.")
        self.encoder_embed_dim = encoder_embed_dim
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.grid_size = tuple(i // p for i, p in zip(img, patch))
        self.num_patches = self.grid_size[0] * self.grid_size[1] * self.grid_size[2]
        self.rope_dtype = rope_dtype
        self._position_layout: PositionLayout = "reference_predictor" if rope_layout == "reference" else "grid"
        self._rope_axis_dim = rope_axis_dim(embed_dim // num_heads)
        self.grad_checkpointing = use_activation_checkpointing
        self.config: dict[str, Any] = {
            "encoder_embed_dim": encoder_embed_dim,
            "embed_dim": embed_dim,
            "depth": depth,
            "num_heads": num_heads,
            "mlp_ratio": mlp_ratio,
            "img_size": list(img),
            "patch_size": patch_size if isinstance(patch_size, int) else list(patch),
            "num_mask_tokens": num_mask_tokens,
            "attn_gate": attn_gate,
            "rope_layout": rope_layout,
            "rope_dtype": rope_dtype,
            "use_activation_checkpointing": use_activation_checkpointing,
        }

        self.predictor_embed = nn.Linear(encoder_embed_dim, embed_dim)
        self.mask_tokens = nn.ParameterList(nn.Parameter(torch.zeros(1, 1, embed_dim)) for _ in range(num_mask_tokens))
        blocks = [
            TransformerBlock(embed_dim, num_heads, mlp_ratio=mlp_ratio, attn_gate=attn_gate) for _ in range(depth)
        ]
        self.predictor_blocks = nn.ModuleList(blocks)
        self.predictor_norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.predictor_proj = nn.Linear(embed_dim, encoder_embed_dim)
        self.rope = RopeTable(self.grid_size, self._position_layout, self._rope_axis_dim)
        init_transformer_weights(self, blocks)  # mask tokens stay zero (not touched by the init)

    def forward(self, context: Tensor, context_idx: Tensor, target_idx: Tensor, mask_index: int = 0) -> Tensor:
        """Predict target-token features.

        Args:
            context: encoder features of the context tokens ``[B, Kc, Ce]``.
            context_idx: their token ids ``[B, Kc]``.
            target_idx: token ids to predict ``[B, Kt]``.
            mask_index: which mask token to use (taken modulo ``num_mask_tokens``).

        Returns:
            ``[B, Kt, Ce]``, row ``t`` the prediction for token ``target_idx[:, t]``.
        """
        batch, num_context, _ = context.shape
        if context_idx.shape != (batch, num_context):
            raise ValueError(f"Expected context_idx [B={batch}, Kc={num_context}]; found {list(context_idx.shape)}.")
        if target_idx.dim() != 2 or target_idx.shape[0] != batch:
            raise ValueError(f"Expected target_idx [B={batch}, Kt]; found {list(target_idx.shape)}.")
        num_target = target_idx.shape[1]
        x = self.predictor_embed(context)
        mask_token = self.mask_tokens[mask_index % len(self.mask_tokens)]
        targets = mask_token.to(x.dtype).expand(batch, num_target, -1)
        x = torch.cat((x, targets), dim=1)
        ids = torch.cat((context_idx, target_idx), dim=1).long()

        # Sort by token id so the sequence (and its RoPE positions) does not depend on the mask order.
        order = torch.argsort(ids, dim=1, stable=True)
        sorted_ids = ids.gather(1, order)
        x = x.gather(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

        cos, sin = self.rope(sorted_ids, rope_compute_dtype(self.rope_dtype, x))
        for block in self.predictor_blocks:
            x = run_block(block, x, cos, sin, self.grad_checkpointing)
        x = self.predictor_norm(x)

        # Un-sort: the token originally at position p sits where `order == p`.
        inverse = torch.argsort(order, dim=1)
        target_slots = inverse[:, num_context:]
        x = x.gather(1, target_slots.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return self.predictor_proj(x)

    def no_weight_decay(self) -> set[str]:
        """Biases and 1-D parameters (mask tokens, being 3-D, are decayed as in the reference)."""
        return no_weight_decay_names(self)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn per-block non-reentrant activation checkpointing on or off."""
        self.grad_checkpointing = enable
