"""Predictor: output order, invariance to context order, mask tokens, batching, checkpointing."""

from __future__ import annotations

import pytest
import torch

from neurojepa_pl.models import build_predictor


def _split(batch: int, num_context: int, num_target: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    perms = torch.stack([torch.randperm(576, generator=gen) for _ in range(batch)])
    return perms[:, :num_context], perms[:, num_context : num_context + num_target]


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    model = build_predictor("predictor_tiny").eval()
    with torch.no_grad():  # non-zero mask tokens and sharper attention so that order effects would show
        for token in model.mask_tokens:
            token.normal_()
        for block in model.predictor_blocks:
            block.attn.qkv.weight.mul_(20)
    return model


@pytest.fixture(scope="module")
def inputs():
    context_idx, target_idx = _split(2, 40, 30, seed=1)
    context = torch.randn(2, 40, 64, generator=torch.Generator().manual_seed(2))
    return context, context_idx, target_idx


def test_shape_and_target_order(predictor, inputs):
    context, context_idx, target_idx = inputs
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = predictor(context, context_idx, target_idx)
        out_perm = predictor(context, context_idx, target_idx[:, perm])
    assert out.shape == (2, 30, 64)
    assert torch.allclose(out[:, perm], out_perm, atol=1e-5)


def test_context_order_does_not_matter(predictor, inputs):
    context, context_idx, target_idx = inputs
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = predictor(context, context_idx, target_idx)
        out_perm = predictor(context[:, perm], context_idx[:, perm], target_idx)
    assert torch.allclose(out, out_perm, atol=1e-5)


def test_batched_equals_per_sample(predictor, inputs):
    context, context_idx, target_idx = inputs
    with torch.no_grad():
        together = predictor(context, context_idx, target_idx)
        separate = torch.cat(
            [predictor(context[i : i + 1], context_idx[i : i + 1], target_idx[i : i + 1]) for i in range(2)]
        )
    assert torch.allclose(together, separate, atol=1e-5)


def test_target_ids_matter(predictor, inputs):
    context, context_idx, target_idx = inputs
    other_targets = _split(2, 40, 30, seed=1)[1].roll(1, dims=1)
    with torch.no_grad():
        out = predictor(context, context_idx, target_idx)
        out_other = predictor(context, context_idx, other_targets)
    assert not torch.allclose(out, out_other, atol=1e-3)


def test_mask_tokens_zero_init_and_only_selected_one_trains():
    model = build_predictor("predictor_tiny")
    assert len(model.mask_tokens) == 3
    assert all(torch.equal(t, torch.zeros(1, 1, 32)) for t in model.mask_tokens)
    context_idx, target_idx = _split(1, 10, 5, seed=5)
    out = model(torch.randn(1, 10, 64), context_idx, target_idx, mask_index=3)  # 3 % 3 == 0
    out.sum().backward()
    assert model.mask_tokens[0].grad is not None
    assert model.mask_tokens[1].grad is None and model.mask_tokens[2].grad is None


def test_activation_checkpointing_same_output_and_grads():
    torch.manual_seed(0)
    model = build_predictor("predictor_tiny")
    context_idx, target_idx = _split(2, 20, 12, seed=6)
    context = torch.randn(2, 20, 64)
    results = []
    for enabled in (False, True):
        model.set_grad_checkpointing(enabled)
        model.zero_grad(set_to_none=True)
        out = model(context, context_idx, target_idx)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert results[0][1].keys() == results[1][1].keys()
    for name, grad in results[0][1].items():
        assert torch.allclose(grad, results[1][1][name], atol=1e-6), name


def test_input_validation(predictor):
    with pytest.raises(ValueError, match="context_idx"):
        predictor(torch.zeros(2, 5, 64), torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))


def test_no_weight_decay_keeps_mask_tokens_decayed(predictor):
    names = predictor.no_weight_decay()
    assert "predictor_norm.weight" in names and "predictor_embed.bias" in names
    assert "mask_tokens.0" not in names and "predictor_embed.weight" not in names
