"""Attentive and linear heads: shapes, docs/method.md §8.2 structure and init, masking, and that they can learn."""

import math

import pytest
import torch

from neurojepa_pl.models.heads import AttentiveClassifier, AttentivePooler, LinearProbe, masked_mean


def _tokens(b=3, n=10, c=32, seed=0):
    return torch.randn(b, n, c, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("depth", [1, 3])
def test_attentive_classifier_shapes_and_structure(depth):
    head = AttentiveClassifier(embed_dim=32, num_classes=5, depth=depth, num_heads=4)
    assert head(_tokens()).shape == (3, 5)
    assert head.pool(_tokens()).shape == (3, 32)
    assert len(head.pooler.blocks) == depth - 1
    # Cross-attention has q and kv projections but no output projection (docs/method.md §8.2).
    xattn = head.pooler.cross_attention_block.xattn
    assert {name for name, _ in xattn.named_children()} == {"q", "kv"}
    assert head.pooler.query_tokens.shape == (1, 1, 32)
    for module in head.modules():
        if isinstance(module, torch.nn.LayerNorm):
            assert module.eps == 1e-5


def test_attentive_head_parameter_count_at_vit_base_width():
    # depth 3, 16 heads at 768: 2 self-attention blocks + 1 cross block + query + linear, counted by hand.
    c, hidden = 768, 3072
    ln = 2 * c
    mlp = c * hidden + hidden + hidden * c + c
    self_block = 2 * ln + (c * 3 * c + 3 * c) + (c * c + c) + mlp
    cross_block = 2 * ln + (c * c + c) + (c * 2 * c + 2 * c) + mlp
    expected = 2 * self_block + cross_block + c + (c * 2 + 2)
    head = AttentiveClassifier(embed_dim=c, num_classes=2, depth=3, num_heads=16)
    assert sum(p.numel() for p in head.parameters()) == expected


def test_residual_rescale_follows_layer_index():
    # With std 0.02 init, proj / fc2 weights of block i are divided by sqrt(2 * (i + 1)); the cross block's fc2 by
    # sqrt(2 * (last index + 1)). Compare the empirical std on a wide layer.
    torch.manual_seed(0)
    pooler = AttentivePooler(embed_dim=256, num_heads=4, depth=3)
    stds = [float(b.attn.proj.weight.detach().std()) for b in pooler.blocks]
    assert stds[0] == pytest.approx(0.02 / math.sqrt(2), rel=0.1)
    assert stds[1] == pytest.approx(0.02 / math.sqrt(4), rel=0.1)
    assert float(pooler.blocks[1].mlp.fc2.weight.detach().std()) == pytest.approx(0.02 / math.sqrt(4), rel=0.1)
    assert float(pooler.cross_attention_block.mlp.fc2.weight.detach().std()) == pytest.approx(
        0.02 / math.sqrt(4), rel=0.1
    )
    # Unscaled layers keep std 0.02; biases start at 0.
    assert float(pooler.blocks[0].attn.qkv.weight.detach().std()) == pytest.approx(0.02, rel=0.1)
    assert float(pooler.blocks[0].attn.qkv.bias.detach().abs().max()) == 0.0
    single = AttentivePooler(embed_dim=256, num_heads=4, depth=1)
    assert float(single.cross_attention_block.mlp.fc2.weight.detach().std()) == pytest.approx(
        0.02 / math.sqrt(2), rel=0.1
    )


def test_key_mask_ignores_padded_tokens():
    torch.manual_seed(0)
    head = AttentiveClassifier(embed_dim=32, num_classes=3, depth=2, num_heads=4).eval()
    x = _tokens(b=2, n=6)
    keep = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    garbage = x.clone()
    garbage[0, 4:] = 1000.0
    out_masked = head(garbage, keep)
    # Sample 0 equals the head run on its 4 real tokens alone; sample 1 is untouched.
    torch.testing.assert_close(out_masked[0], head(x[:1, :4])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_masked[1], head(x[1:])[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="at least one True"):
        head(x, torch.zeros(2, 6, dtype=torch.bool))


def test_linear_probe_is_linear_on_mean_tokens():
    probe = LinearProbe(embed_dim=32, num_classes=4)
    x = _tokens()
    torch.testing.assert_close(probe(x), probe.linear(x.mean(1)))
    keep = torch.tensor([[True, True] + [False] * 8] * 3)
    torch.testing.assert_close(masked_mean(x, keep), x[:, :2].mean(1))


def test_attentive_head_fits_a_separable_toy_set():
    # Class = whether one token among noise carries +v or -v along a fixed direction: needs attention to find it.
    g = torch.Generator().manual_seed(0)
    n, tokens, c = 64, 8, 16
    direction = torch.randn(c, generator=g)
    direction = direction / direction.norm()
    x = 0.3 * torch.randn(n, tokens, c, generator=g)
    y = torch.arange(n) % 2
    pos = torch.randint(0, tokens, (n,), generator=g)
    x[torch.arange(n), pos] += (2 * y - 1).float()[:, None] * 3 * direction
    torch.manual_seed(0)
    head = AttentiveClassifier(embed_dim=c, num_classes=2, depth=1, num_heads=2)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y)
        loss.backward()
        opt.step()
    accuracy = (head(x).argmax(1) == y).float().mean()
    assert loss.item() < 0.1
    assert float(accuracy) == 1.0
