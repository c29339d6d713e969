"""3D Vision Transformer encoder of Neuro-JEPA (docs/method.md §2): patch GEMM, RoPE, gated attention, optional MoE.

No cls token and no absolute position embedding: positions enter only through 3D RoPE on the token ids, so a
masked forward (kept ids only) is the same network as a full one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neurojepa_pl.models.blocks import LAYER_NORM_EPS, TransformerBlock, init_transformer_weights, run_block
from neurojepa_pl.models.moe import MoEConfig, MoEDispatch, MoEFeedForward
from neurojepa_pl.models.rope import PositionLayout, RopeDtype, RopeTable, rope_axis_dim

__all__ = [
    "PatchEmbed3D",
    "VisionTransformer3D",
    "no_weight_decay_names",
    "as_triple",
    "rope_compute_dtype",
    "unfold_patches",
]

RopeLayoutOption = Literal["reference", "grid"]
_ROPE_LAYOUTS = ("reference", "grid")
_ROPE_DTYPES = ("float32", "activation")


def as_triple(value: int | Sequence[int], what: str) -> tuple[int, int, int]:
    """An int or a 3-sequence of ints as a 3-tuple (``what`` names the argument in errors)."""
    triple = (value,) * 3 if isinstance(value, int) else tuple(int(v) for v in value)
    if len(triple) != 3 or min(triple) <= 0:
        raise ValueError(f"Expected {what} as a positive int or 3 positive ints; found {value!r}.")
    return triple


def rope_compute_dtype(rope_dtype: RopeDtype, activation: Tensor) -> torch.dtype:
    """float32, or the dtype the activations have inside the blocks (the autocast dtype when autocast is on)."""
    if rope_dtype == "float32":
        return torch.float32
    if torch.is_autocast_enabled(activation.device.type):
        return torch.get_autocast_dtype(activation.device.type)
    return activation.dtype


def no_weight_decay_names(module: nn.Module) -> set[str]:
    """Parameter names excluded from weight decay by the reference rule: "bias" in the name, or 1-D.

    Listed in full (not just the specials timm lists) because stacked expert biases are 2-D and would otherwise
    escape the 1-D rule.
    """
    return {name for name, p in module.named_parameters() if "bias" in name or p.ndim <= 1}


class PatchEmbed3D(nn.Module):
    """Non-overlapping 3D patches to tokens: ``[B, in_chans, D, H, W] -> [B, N, C]``, tokens in C order.

    The parameters are those of ``Conv3d(kernel = stride = patch)`` (``proj.weight`` ``[C, in_chans, p0, p1, p2]``,
    ``proj.bias`` ``[C]``: the reference's keys, shapes and init), but the product runs as one GEMM of the unfolded
    patches ``[B*N, in_chans*p0*p1*p2]`` with the weight viewed as ``[C, in_chans*p0*p1*p2]``. With kernel = stride
    the convolution is exactly that product; cuDNN ran it as a generic 3D implicit GEMM plus layout transposes, ~10%
    of the compiled H200 step (benchmarks/README.md).

    ``gemm`` picks the implementation: ``None`` (default) runs the GEMM on CUDA and the convolution elsewhere, because
    on CPU the convolution was the faster of the two (0.70x for the GEMM at the paper geometry,
    ``benchmarks/pretrain_step.py --device cpu``); ``True`` / ``False`` force one. Both give the same numbers within
    rounding (tests/models/test_vit3d.py).
    """

    def __init__(self, patch_size: tuple[int, int, int], in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.gemm: bool | None = None

    def forward(self, x: Tensor) -> Tensor:
        """``[B, in_chans, D, H, W]`` (each side a multiple of the patch) -> ``[B, N, C]``."""
        if not (x.is_cuda if self.gemm is None else self.gemm):
            return self.proj(x).flatten(2).transpose(1, 2)
        if torch.is_autocast_enabled(x.device.type):
            # The cast autocast would apply inside F.linear, done before the unfold copies half the bytes.
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return F.linear(unfold_patches(x, self.patch_size), self.proj.weight.flatten(1), self.proj.bias)


def unfold_patches(x: Tensor, patch_size: Sequence[int]) -> Tensor:
    """Cut volumes into non-overlapping patches, in token (C) order: ``[B, C, D, H, W] -> [B, N, C*p0*p1*p2]``.

    Row ``n`` holds token ``n``'s voxels in the order of a ``Conv3d`` weight's ``[C, p0, p1, p2]``.
    """
    b, c, d, h, w = x.shape
    p0, p1, p2 = (int(p) for p in patch_size)
    g0, g1, g2 = d // p0, h // p1, w // p2
    x = x.reshape(b, c, g0, p0, g1, p1, g2, p2).permute(0, 2, 4, 6, 1, 3, 5, 7)  # [B, g0, g1, g2, C, p0, p1, p2]
    return x.reshape(b, g0 * g1 * g2, c * p0 * p1 * p2)


class VisionTransformer3D(nn.Module):
    """3D ViT encoder (``vit_base_moe`` in the registry is the paper's model).

    Token ids are C-order on the patch grid ``(g0, g1, g2)``: ``id = g1*g2*i0 + g2*i1 + i2``.

    Args:
        img_size: input volume ``(D, H, W)``, each divisible by the patch size.
        patch_size: cubic patch side (or 3 sides).
        in_chans: input channels.
        embed_dim: width C.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: dense MLP hidden width / C.
        moe_block_indices: 0-based blocks whose MLP is an MoE layer (paper: 1, 3, 5, 7, 9, 11).
        moe: MoE sizes (a :class:`MoEConfig` or a dict of its fields); defaults to the paper's when
            ``moe_block_indices`` is non-empty.
        attn_gate: per-head sigmoid attention output gate (present in the released weights).
        rope_layout: ``"reference"`` (the released weights' position decomposition, docs/method.md §2.2) or ``"grid"``.
        rope_dtype: ``"float32"`` (default) or ``"activation"`` (the reference: angles in the autocast dtype).
        use_activation_checkpointing: non-reentrant checkpoint per block while grad is enabled.
        moe_dispatch: ``"grouped"`` or ``"loop"``.

    Attributes:
        embed_dim, num_heads, grid_size (3-tuple), num_patches, config (constructor kwargs as a JSON-able dict).
    """

    def __init__(
        self,
        img_size: Sequence[int] = (96, 108, 96),
        patch_size: int | Sequence[int] = 12,
        in_chans: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        moe_block_indices: Sequence[int] = (),
        moe: MoEConfig | dict[str, Any] | None = None,
        attn_gate: bool = True,
        rope_layout: RopeLayoutOption = "reference",
        rope_dtype: RopeDtype = "float32",
        use_activation_checkpointing: bool = False,
        moe_dispatch: MoEDispatch = "grouped",
    ) -> None:
        super().__init__()
        img = as_triple(img_size, "img_size")
        patch = as_triple(patch_size, "patch_size")
        if any(i % p for i, p in zip(img, patch)):
            raise ValueError(f"Expected img_size {img} divisible by patch_size {patch} on every axis.")
        if rope_layout not in _ROPE_LAYOUTS:
            raise ValueError(f"Expected rope_layout in {_ROPE_LAYOUTS}; found {rope_layout!r}.")
        if rope_dtype not in _ROPE_DTYPES:
            raise ValueError(f"Expected rope_dtype in {_ROPE_DTYPES}; found {rope_dtype!r}.")
        moe_blocks = tuple(sorted({int(i) for i in moe_block_indices}))
        if moe_blocks and not (0 <= moe_blocks[0] and moe_blocks[-1] < depth):
            raise ValueError(f"Expected moe_block_indices within [0, {depth}); found {list(moe_block_indices)}.")
        moe_config = (MoEConfig() if moe is None else MoEConfig.from_any(moe)) if moe_blocks else None

        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.grid_size = tuple(i // p for i, p in zip(img, patch))
        self.num_patches = self.grid_size[0] * self.grid_size[1] * self.grid_size[2]
        self.rope_layout = rope_layout
        self.rope_dtype = rope_dtype
        self._position_layout: PositionLayout = "reference_encoder" if rope_layout == "reference" else "grid"
        self._rope_axis_dim = rope_axis_dim(embed_dim // num_heads)
        self.grad_checkpointing = use_activation_checkpointing
        self.config: dict[str, Any] = {
            "img_size": list(img),
            "patch_size": patch_size if isinstance(patch_size, int) else list(patch),
            "in_chans": in_chans,
            "embed_dim": embed_dim,
            "depth": depth,
            "num_heads": num_heads,
            "mlp_ratio": mlp_ratio,
            "moe_block_indices": list(moe_blocks),
            "moe": moe_config.to_dict() if moe_config else None,
            "attn_gate": attn_gate,
            "rope_layout": rope_layout,
            "rope_dtype": rope_dtype,
            "use_activation_checkpointing": use_activation_checkpointing,
            "moe_dispatch": moe_dispatch,
        }

        self.patch_embed = PatchEmbed3D(patch, in_chans, embed_dim)
        self.rope = RopeTable(self.grid_size, self._position_layout, self._rope_axis_dim)
        blocks = [
            TransformerBlock(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                attn_gate=attn_gate,
                moe=moe_config if i in moe_blocks else None,
                moe_dispatch=moe_dispatch,
            )
            for i in range(depth)
        ]
        # The typed list feeds the init; the ModuleList may later hold wrapped blocks (FSDP, compile).
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        init_transformer_weights(self, blocks)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, masks: Tensor | Sequence[Tensor] | None = None) -> Tensor:
        """Encode a volume, optionally keeping only masked-in tokens.

        Args:
            x: ``[B, in_chans, D, H, W]``.
            masks: ``None`` (all ``N`` tokens), a LongTensor ``[B, K]`` of kept token ids, or a list of such
                tensors (same K); the patch embedding is computed once on the full volume and the outputs of the
                masks are concatenated along the batch.

        Returns:
            Final-normed tokens ``[B, N, C]``, ``[B, K, C]`` or ``[len(masks) * B, K, C]``.
        """
        tokens, cos, sin = self._embed(x, masks)
        for block in self.blocks:
            tokens = self._run_block(block, tokens, cos, sin)
        return self.norm(tokens)

    forward_features = forward

    def forward_intermediates(
        self, x: Tensor, indices: int | Sequence[int], masks: Tensor | Sequence[Tensor] | None = None
    ) -> list[Tensor]:
        """Final-norm applied to the outputs of chosen blocks (the reference's ``out_layers``).

        Args:
            x: ``[B, in_chans, D, H, W]``.
            indices: block indices (negative counts from the end), or an int n for the last n blocks.
            masks: as in :meth:`forward`.

        Returns:
            One ``[B', K, C]`` tensor per requested index, in the requested order.
        """
        depth = len(self.blocks)
        wanted = list(range(depth - indices, depth)) if isinstance(indices, int) else [int(i) for i in indices]
        resolved = [i + depth if i < 0 else i for i in wanted]
        if not resolved or min(resolved) < 0 or max(resolved) >= depth:
            raise ValueError(f"Expected block indices in [-{depth}, {depth}); found {indices!r}.")
        tokens, cos, sin = self._embed(x, masks)
        taken: dict[int, Tensor] = {}
        for i, block in enumerate(self.blocks[: max(resolved) + 1]):
            tokens = self._run_block(block, tokens, cos, sin)
            if i in resolved:
                taken[i] = self.norm(tokens)
        return [taken[i] for i in resolved]

    def _embed(self, x: Tensor, masks: Tensor | Sequence[Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
        expected = (
            self.patch_embed.proj.in_channels,
            *(g * p for g, p in zip(self.grid_size, self.patch_embed.proj.kernel_size)),
        )
        if x.dim() != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"Expected input [B, {', '.join(map(str, expected))}]; found {list(x.shape)}.")
        tokens = self.patch_embed(x)
        ids = None
        if masks is not None:
            tokens, ids = gather_masked_tokens(tokens, masks)
        cos, sin = self.rope(ids, rope_compute_dtype(self.rope_dtype, tokens))
        return tokens, cos, sin

    def _run_block(self, block: nn.Module, tokens: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return run_block(block, tokens, cos, sin, self.grad_checkpointing)

    # ------------------------------------------------------------------ backbone API
    def no_weight_decay(self) -> set[str]:
        """Names of parameters that get no weight decay (biases and 1-D parameters)."""
        return no_weight_decay_names(self)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn per-block non-reentrant activation checkpointing on or off."""
        self.grad_checkpointing = enable

    def moe_layers(self) -> list[MoEFeedForward]:
        """The MoE feed-forward layers in depth order (empty for a dense encoder)."""
        return [block.mlp for block in self.blocks if isinstance(block.mlp, MoEFeedForward)]


def gather_masked_tokens(tokens: Tensor, masks: Tensor | Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Keep the listed tokens of each sample; several masks are concatenated along the batch.

    Args:
        tokens: ``[B, N, C]``.
        masks: LongTensor ``[B, K]`` of token ids, or a list of them with the same K.

    Returns:
        ``([M*B, K, C], ids [M*B, K])`` with M the number of masks.
    """
    mask_list = [masks] if isinstance(masks, Tensor) else list(masks)
    if not mask_list:
        raise ValueError("Expected at least one mask; found an empty list. Pass masks=None for all tokens.")
    batch = tokens.shape[0]
    for j, mask in enumerate(mask_list):
        if mask.dim() != 2 or mask.shape[0] != batch or mask.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"Expected mask {j} as an integer tensor [B={batch}, K]; found {mask.dtype} {list(mask.shape)}."
            )
        if mask.shape[1] != mask_list[0].shape[1]:
            raise ValueError(
                f"Expected all masks to keep the same number of tokens K to concatenate them; mask 0 keeps "
                f"{mask_list[0].shape[1]}, mask {j} keeps {mask.shape[1]}."
            )
    width = tokens.shape[-1]
    gathered = [tokens.gather(1, m.long().unsqueeze(-1).expand(-1, -1, width)) for m in mask_list]
    ids = torch.cat([m.long() for m in mask_list], dim=0)
    return torch.cat(gathered, dim=0), ids
