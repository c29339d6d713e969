"""Encoder behaviour: patch GEMM, cached RoPE tables, masking semantics, checkpointing, intermediates, init rules,
backbone API."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from neurojepa_pl.models import VisionTransformer3D, build_encoder
from neurojepa_pl.models.moe import MoEFeedForward
from neurojepa_pl.models.vit3d import PatchEmbed3D


@pytest.fixture(scope="module")
def volume() -> torch.Tensor:
    return torch.randn(2, 1, 48, 54, 48, generator=torch.Generator().manual_seed(0))


def _random_masks(batch: int, keep: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(576, generator=gen)[:keep] for _ in range(batch)])


@pytest.fixture(scope="module")
def moe_encoder() -> VisionTransformer3D:
    torch.manual_seed(0)
    return build_encoder("vit_tiny_moe").eval()


def _conv_reference(embed: PatchEmbed3D, x: torch.Tensor) -> torch.Tensor:
    """What the patch embedding computed before: Conv3d(kernel = stride), flattened to tokens in C order."""
    return embed.proj(x).flatten(2).transpose(1, 2)


def test_patch_gemm_equals_the_convolution_in_fp32():
    torch.manual_seed(0)
    embed = PatchEmbed3D((2, 3, 4), in_chans=2, embed_dim=16)  # non-cubic patch, two channels: the unfold order
    embed.gemm = True  # on CPU the default is the convolution
    with torch.no_grad():
        embed.proj.bias.normal_()
    x = torch.randn(3, 2, 6, 9, 8, requires_grad=True)
    gemm, conv = embed(x), _conv_reference(embed, x)
    assert gemm.shape == (3, 3 * 3 * 2, 16)
    torch.testing.assert_close(gemm, conv, rtol=1e-5, atol=1e-5)
    weight_grad, input_grad = torch.autograd.grad(gemm.square().sum(), (embed.proj.weight, x))
    want_weight_grad, want_input_grad = torch.autograd.grad(conv.square().sum(), (embed.proj.weight, x))
    torch.testing.assert_close(weight_grad, want_weight_grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(input_grad, want_input_grad, rtol=1e-5, atol=1e-5)
    # same parameters as the Conv3d of the reference: keys and shapes (tests/models/reference/*.tsv load through them)
    assert {k: tuple(v.shape) for k, v in embed.state_dict().items()} == {
        "proj.weight": (16, 2, 2, 3, 4),
        "proj.bias": (16,),
    }


def test_patch_gemm_equals_the_convolution_in_bf16(volume):
    torch.manual_seed(0)
    embed = build_encoder("vit_tiny").patch_embed  # the tiny encoder's 6^3 patches, 216 products per output
    embed.gemm = True
    with torch.no_grad():
        exact = _conv_reference(embed, volume)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            gemm, conv = embed(volume), _conv_reference(embed, volume)
    assert gemm.dtype == conv.dtype == torch.bfloat16
    # bf16 inputs and weights (8 mantissa bits): both ways stay within bf16 rounding of the fp32 product
    scale = exact.abs().max()
    assert (gemm.float() - exact).abs().max() < 2e-2 * scale
    assert (gemm.float() - conv.float()).abs().max() < 2e-2 * scale
    assert (gemm.float() - exact).abs().mean() < 2e-3 * scale


def test_patch_embedding_runs_the_convolution_on_cpu_by_default():
    embed = PatchEmbed3D((2, 2, 2), in_chans=1, embed_dim=4)
    x = torch.randn(1, 1, 4, 4, 4)
    calls = []
    embed.proj.register_forward_hook(lambda *_: calls.append(1))
    embed(x)
    assert calls == [1]  # the Conv3d ran
    embed.gemm = True
    embed(x)
    assert calls == [1]  # the GEMM path reads the weights without calling the Conv3d


def test_every_block_gets_the_cached_rope_tables(moe_encoder, volume):
    seen = []
    hooks = [
        block.attn.register_forward_pre_hook(lambda mod, args: seen.append((args[1].data_ptr(), args[1].shape)))
        for block in moe_encoder.blocks
    ]
    try:
        with torch.no_grad():
            moe_encoder(volume)  # all tokens: the table itself, broadcast over the batch
            assert seen == [(moe_encoder.rope.cos.data_ptr(), torch.Size([1, 576, 12]))] * 2
            seen.clear()
            moe_encoder(volume, _random_masks(2, 144, seed=0))  # masked: one gather, shared by all blocks
    finally:
        for hook in hooks:
            hook.remove()
    assert len({ptr for ptr, _ in seen}) == 1 and seen[0][1] == (2, 144, 12)


def test_compiled_encoder_does_not_recompile_for_new_masks(volume):
    # torch.compile's graph front end on CPU (aot_eager: no C++ toolchain needed); the masks change every call.
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    encoder = build_encoder("vit_tiny").eval()
    compiled = torch.compile(encoder, backend="aot_eager")
    with torch.no_grad():
        for seed in range(3):
            masks = [_random_masks(2, 144, seed=10 * seed + m) for m in range(3)]
            torch.testing.assert_close(compiled(volume, masks), encoder(volume, masks), rtol=1e-4, atol=1e-4)
            if seed == 0:
                frames = dict(torch._dynamo.utils.counters["frames"])
    assert frames["ok"] >= 1
    assert dict(torch._dynamo.utils.counters["frames"]) == frames  # nothing traced after the first call
    assert not torch._dynamo.utils.counters["graph_break"]


def test_attributes_and_full_forward(moe_encoder, volume):
    assert moe_encoder.grid_size == (8, 9, 8) and moe_encoder.num_patches == 576
    assert moe_encoder.embed_dim == 64 and moe_encoder.num_heads == 4
    with torch.no_grad():
        out = moe_encoder(volume)
    assert out.shape == (2, 576, 64)
    # final LayerNorm (weight 1, bias 0 at init): every token has mean 0, variance 1
    assert torch.allclose(out.mean(-1), torch.zeros(2, 576), atol=1e-5)
    assert torch.allclose(out.var(-1, unbiased=False), torch.ones(2, 576), atol=1e-3)


def test_identity_mask_equals_no_mask(moe_encoder, volume):
    ids = torch.arange(576).expand(2, -1)
    with torch.no_grad():
        assert torch.allclose(moe_encoder(volume, ids), moe_encoder(volume), atol=1e-6)


def test_permuted_ids_permute_outputs(moe_encoder, volume):
    ids = _random_masks(2, 100, seed=1)
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = moe_encoder(volume, ids)
        out_perm = moe_encoder(volume, ids[:, perm])
    assert torch.allclose(out[:, perm], out_perm, atol=1e-5)


def test_mask_list_concatenates_along_batch(moe_encoder, volume):
    masks = [_random_masks(2, 144, seed=s) for s in (3, 4, 5)]
    with torch.no_grad():
        together = moe_encoder(volume, masks)
        separate = torch.cat([moe_encoder(volume, m) for m in masks])
    assert together.shape == (6, 144, 64)
    assert torch.allclose(together, separate, atol=1e-5)


def test_mask_validation(moe_encoder, volume):
    with pytest.raises(ValueError, match="same number of tokens"):
        moe_encoder(volume, [_random_masks(2, 10, 0), _random_masks(2, 12, 0)])
    with pytest.raises(ValueError, match=r"\[B=2, K\]"):
        moe_encoder(volume, _random_masks(3, 10, 0))
    with pytest.raises(ValueError, match="Expected input"):
        moe_encoder(torch.zeros(1, 1, 48, 48, 48))


@pytest.mark.parametrize("name", ["vit_tiny", "vit_tiny_moe"])
def test_activation_checkpointing_same_output_and_grads(name, volume):
    torch.manual_seed(0)
    encoder = build_encoder(name)
    ids = _random_masks(2, 144, seed=6)
    results = []
    for enabled in (False, True):
        encoder.set_grad_checkpointing(enabled)
        encoder.zero_grad(set_to_none=True)
        out = encoder(volume[:1], ids[:1])
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in encoder.named_parameters()}))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    for name_, grad in results[0][1].items():
        assert torch.allclose(grad, results[1][1][name_], atol=1e-6), name_


def test_forward_intermediates(moe_encoder, volume):
    ids = _random_masks(2, 50, seed=7)
    with torch.no_grad():
        final = moe_encoder(volume, ids)
        inter = moe_encoder.forward_intermediates(volume, [0, -1], masks=ids)
        last_one = moe_encoder.forward_intermediates(volume, 1, masks=ids)
    assert len(inter) == 2 and inter[0].shape == (2, 50, 64)
    assert torch.allclose(inter[1], final, atol=1e-6)
    assert torch.allclose(last_one[0], final, atol=1e-6)
    assert not torch.allclose(inter[0], final, atol=1e-3)
    with pytest.raises(ValueError, match="block indices"):
        moe_encoder.forward_intermediates(volume, [2])


def test_forward_features_alias(moe_encoder, volume):
    with torch.no_grad():
        assert torch.equal(moe_encoder.forward_features(volume[:1]), moe_encoder(volume[:1]))


def test_init_rules():
    torch.manual_seed(0)
    encoder = build_encoder("vit_tiny_moe", embed_dim=256, num_heads=4,
                            moe={"num_experts": 4, "top_k": 2, "expert_hidden": 256, "shared_hidden": 256})  # fmt: skip
    blocks = encoder.blocks
    assert blocks[0].attn.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(2), rel=0.05)
    assert blocks[1].attn.proj.weight.std().item() == pytest.approx(0.02 / 2, rel=0.05)
    assert blocks[0].mlp.fc2.weight.std().item() == pytest.approx(0.02 / math.sqrt(2), rel=0.05)
    assert blocks[0].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.05)
    moe = blocks[1].mlp
    assert isinstance(moe, MoEFeedForward)
    assert moe.experts.fc2_weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert moe.experts.fc1_weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert moe.shared_experts.fc2.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert moe.gate.gate.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert encoder.patch_embed.proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert moe.gate.bias.abs().sum() == 0 and moe.counts.sum() == 0
    for name, p in encoder.named_parameters():
        if name.endswith("bias"):
            assert p.abs().sum() == 0, name
    assert torch.equal(encoder.norm.weight, torch.ones(256))


def test_no_weight_decay_and_moe_layers(moe_encoder):
    names = moe_encoder.no_weight_decay()
    assert "blocks.1.mlp.experts.fc1_bias" in names and "norm.weight" in names and "blocks.0.attn.qkv.bias" in names
    assert "blocks.0.attn.qkv.weight" not in names and "blocks.1.mlp.experts.fc1_weight" not in names
    assert [type(m) for m in moe_encoder.moe_layers()] == [MoEFeedForward]
    assert build_encoder("vit_tiny").moe_layers() == []


def test_grid_layout_and_rope_dtype_options(volume):
    torch.manual_seed(0)
    reference = build_encoder("vit_tiny").eval()
    with torch.no_grad():  # sharpen attention so that positions matter visibly
        for block in reference.blocks:
            block.attn.qkv.weight.mul_(20)
    grid = build_encoder("vit_tiny", rope_layout="grid").eval()
    activation = build_encoder("vit_tiny", rope_dtype="activation").eval()
    grid.load_state_dict(reference.state_dict())
    activation.load_state_dict(reference.state_dict())
    with torch.no_grad():
        base = reference(volume[:1])
        assert not torch.allclose(base, grid(volume[:1]), atol=1e-3)
        assert torch.equal(base, activation(volume[:1]))  # fp32 activations: identical
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a, b = reference(volume[:1]).float(), activation(volume[:1]).float()
    assert (a - b).abs().max() < 0.5 and not torch.equal(a, b)
    with pytest.raises(ValueError, match="rope_layout"):
        build_encoder("vit_tiny", rope_layout="bogus")


def test_config_rebuilds_identical_architecture(moe_encoder):
    rebuilt = VisionTransformer3D(**moe_encoder.config)
    assert rebuilt.config == moe_encoder.config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in moe_encoder.state_dict().items()
    }


@pytest.mark.gpu
def test_cuda_patch_gemm_equals_the_convolution():
    torch.manual_seed(0)
    embed = PatchEmbed3D((12, 12, 12), in_chans=1, embed_dim=768).cuda()  # the paper's patch embedding
    with torch.no_grad():
        embed.proj.bias.normal_()
        x = torch.randn(4, 1, 96, 108, 96, device="cuda")
        weight, bias = embed.proj.weight.double(), embed.proj.bias.double()
        exact = F.conv3d(x.double(), weight, bias, stride=12).flatten(2).transpose(1, 2)
        fp32 = embed(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16, conv16 = embed(x), _conv_reference(embed, x)
    scale = exact.abs().max().item()
    assert (fp32.double() - exact).abs().max().item() < 1e-4 * scale
    assert bf16.dtype == conv16.dtype == torch.bfloat16
    assert (bf16.double() - exact).abs().max().item() < 2e-2 * scale
    assert (bf16.double() - conv16.double()).abs().max().item() < 2e-2 * scale


@pytest.mark.gpu
def test_cuda_bf16_checkpointed_moe_encoder_counts_once():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 48, 54, 48, device="cuda")
    ids = _random_masks(2, 144, seed=8).cuda()
    counts = []
    for enabled in (False, True):
        torch.manual_seed(0)
        encoder = build_encoder("vit_tiny_moe", use_activation_checkpointing=enabled).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = encoder(x, [ids, ids.flip(1)])
        out.float().square().mean().backward()
        assert torch.isfinite(encoder.patch_embed.proj.weight.grad).all()
        counts.append(encoder.moe_layers()[0].counts.cpu())
    assert counts[0].sum() == 2 * 2 * 144 * 2
    assert torch.equal(counts[0], counts[1])


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_compiled_moe_encoder_fullgraph():
    torch.manual_seed(0)
    encoder = build_encoder("vit_tiny_moe", use_activation_checkpointing=True).cuda()
    x = torch.randn(2, 1, 48, 54, 48, device="cuda")
    ids = _random_masks(2, 144, seed=9).cuda()
    compiled = torch.compile(encoder, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = encoder(x, ids).float()
        out = compiled(x, ids).float()
    out.square().mean().backward()
    # bf16 rounding differs between compiled and eager kernels, and can flip a few routing decisions; compare in bulk.
    diff = (out - eager).abs()
    assert diff.mean() < 0.02 and (diff < 0.05).float().mean() > 0.99
    assert encoder.moe_layers()[0].counts.sum() == 2 * (2 * 144 * 2)  # eager + compiled forward, both counted once
