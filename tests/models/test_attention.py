"""Gated RoPE attention against an explicit softmax implementation and the gate's defining invariants."""

from __future__ import annotations

import math

import torch

from neurojepa_pl.models.attention import GatedRopeAttention
from neurojepa_pl.models.rope import rope_tables, token_positions


def _explicit_attention(attn: GatedRopeAttention, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Literal per-head computation: rotate each 2-element pair with its tiled angle, softmax(q k^T / sqrt(d)) v."""
    batch, n, dim = x.shape
    heads, hd = attn.num_heads, attn.head_dim
    axis = 2 * ((hd // 3) // 2)
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = qkv.view(batch, n, 3, heads, hd).unbind(2)

    def rotate(t):
        out = t.clone()
        for a in range(3):
            for i in range(0, axis, 2):
                base = a * axis + i
                freq_even = 10000 ** (-(i % (axis // 2)) / (axis / 2))
                freq_odd = 10000 ** (-((i + 1) % (axis // 2)) / (axis / 2))
                ang_e = positions[..., a, None] * freq_even
                ang_o = positions[..., a, None] * freq_odd
                x0, x1 = t[..., base], t[..., base + 1]
                out[..., base] = x0 * torch.cos(ang_e) - x1 * torch.sin(ang_e)
                out[..., base + 1] = x1 * torch.cos(ang_o) + x0 * torch.sin(ang_o)
        return out

    q, k = rotate(q), rotate(k)
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(hd)
    out = torch.einsum("bhnm,bmhd->bnhd", scores.softmax(-1), v)
    if attn.proj_attn_gate is not None:
        out = out * torch.sigmoid(x @ attn.proj_attn_gate.weight.T + attn.proj_attn_gate.bias)[..., None]
    return out.reshape(batch, n, dim) @ attn.proj.weight.T + attn.proj.bias


def test_gated_attention_matches_explicit_computation():
    torch.manual_seed(0)
    attn = GatedRopeAttention(dim=24, num_heads=2)  # head dim 12: axis width 4, all 12 channels rotated
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 5, 24)
    ids = torch.tensor([[0, 3, 7, 11, 20], [5, 1, 9, 2, 23]])
    positions = token_positions(ids, (2, 3, 4), "reference_encoder").float()
    cos, sin = rope_tables(positions, 4)
    assert torch.allclose(attn(x, cos, sin), _explicit_attention(attn, x, positions), atol=1e-5)


def test_gate_halves_heads_at_zero_logits_and_closes_at_large_negative():
    torch.manual_seed(1)
    gated = GatedRopeAttention(dim=16, num_heads=2)
    plain = GatedRopeAttention(dim=16, num_heads=2, attn_gate=False)
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if "gate" not in k})
    x = torch.randn(1, 4, 16)
    cos, sin = rope_tables(token_positions(torch.arange(4)[None], (1, 2, 2), "grid"), 2)
    with torch.no_grad():
        gated.proj_attn_gate.weight.zero_()
        gated.proj_attn_gate.bias.zero_()
        bias = gated.proj.bias
        assert torch.allclose(gated(x, cos, sin) - bias, 0.5 * (plain(x, cos, sin) - bias), atol=1e-6)
        gated.proj_attn_gate.bias.copy_(torch.tensor([-1e4, 0.0]))  # close head 0 only
        closed = gated(x, cos, sin)
        gated.qkv.weight[32:40].normal_()  # head 0's value rows: invisible once the head is closed
        assert torch.allclose(gated(x, cos, sin), closed, atol=1e-6)
        gated.qkv.weight[40:48].normal_()  # head 1's value rows: visible
        assert not torch.allclose(gated(x, cos, sin), closed, atol=1e-3)
    assert "proj_attn_gate.weight" not in plain.state_dict()
