"""MoE layer: grouped == loop, routing semantics, gradients, counting rules, bias update, DDP buffer names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from neurojepa_pl.models import build_encoder
from neurojepa_pl.models.moe import MoEConfig, MoEFeedForward, balance_bias_update, ddp_ignored_buffer_names

CONFIG = MoEConfig(num_experts=4, top_k=2, expert_hidden=8, shared_hidden=16, route_scale=4.0)


def _layer(seed: int = 0, dispatch: str = "grouped") -> MoEFeedForward:
    torch.manual_seed(seed)
    layer = MoEFeedForward(16, CONFIG, dispatch=dispatch)
    with torch.no_grad():  # non-zero biases so that bias handling is exercised too
        for p in layer.experts.parameters():
            p.normal_(0, 0.3)
        layer.gate.gate.weight.normal_(0, 0.5)
    return layer


def _grads(layer, x):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}


def test_grouped_equals_loop_forward_and_backward():
    layer = _layer()
    x = torch.randn(3, 17, 16, generator=torch.Generator().manual_seed(1))
    out_g, dx_g, grads_g = _grads(layer, x)
    layer.dispatch = "loop"
    out_l, dx_l, grads_l = _grads(layer, x)
    assert out_g.shape == (3, 17, 16)
    assert torch.allclose(out_g, out_l, atol=1e-5)
    assert torch.allclose(dx_g, dx_l, atol=1e-5)
    assert grads_g.keys() == grads_l.keys()
    for name in grads_g:
        assert torch.allclose(grads_g[name], grads_l[name], atol=1e-5), name


def test_output_matches_literal_formula():
    layer = _layer()
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        layer.gate.bias.copy_(torch.tensor([0.0, 0.05, -0.02, 0.01]))
        out = layer(x)
        scores = torch.softmax(x @ layer.gate.gate.weight.T, dim=-1)
        e = layer.experts
        expected = layer.shared_experts.fc2(F.gelu(layer.shared_experts.fc1(x)))
        for t in range(10):
            chosen = torch.topk(scores[t] + layer.gate.bias, 2).indices
            for i in chosen.tolist():
                y = F.gelu(x[t] @ e.fc1_weight[i].T + e.fc1_bias[i]) @ e.fc2_weight[i].T + e.fc2_bias[i]
                expected[t] += 4.0 * scores[t, i] * y
    assert torch.allclose(out, expected, atol=1e-5)


def test_bias_changes_selection_not_weight_values():
    layer = _layer()
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        w0, idx0, s0 = layer.gate(x)
        layer.gate.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))  # force expert 3 into every selection
        w1, idx1, s1 = layer.gate(x)
    assert torch.equal(s0, s1)
    assert (idx1 == 3).any(dim=1).all()
    assert not torch.equal(idx0, idx1)
    # Weights are the unbiased scores at the selection, x4, not renormalised.
    assert torch.allclose(w1, 4.0 * s1.gather(1, idx1))
    assert torch.allclose(w0, 4.0 * s0.gather(1, idx0))
    assert (w0.sum(1) < 4.0).all()


@pytest.mark.parametrize("dispatch", ["grouped", "loop"])
def test_every_expert_gets_a_gradient_even_unused(dispatch):
    layer = _layer(dispatch=dispatch)
    with torch.no_grad():
        layer.gate.bias.copy_(torch.tensor([10.0, 10.0, 0.0, 0.0]))  # only experts 0 and 1 are ever selected
    x = torch.randn(8, 16)
    layer(x).sum().backward()
    e = layer.experts
    for p in (e.fc1_weight, e.fc1_bias, e.fc2_weight, e.fc2_bias):
        assert p.grad is not None
        assert p.grad[2:].abs().max() == 0
        assert p.grad[:2].abs().max() > 0
    assert layer.gate.gate.weight.grad is not None


def test_counts_only_in_training_with_grad():
    layer = _layer()
    x = torch.randn(5, 16)
    layer.eval()
    layer(x)
    assert layer.counts.sum() == 0
    layer.train()
    with torch.no_grad():
        layer(x)
    assert layer.counts.sum() == 0
    layer(x)
    assert layer.counts.sum() == 5 * 2
    _, idx, _ = layer.gate(x)
    assert torch.equal(layer.counts, torch.bincount(idx.flatten(), minlength=4))
    layer.dispatch = "loop"
    layer(x)
    assert torch.equal(layer.counts, 2 * torch.bincount(idx.flatten(), minlength=4))
    assert layer.counts.dtype == torch.int64


def test_counts_not_doubled_by_external_checkpoint():
    layer = _layer()
    x = torch.randn(6, 16, requires_grad=True)
    out = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
    out.sum().backward()  # recomputes the layer inside backward
    assert layer.counts.sum() == 6 * 2
    assert x.grad is not None


@pytest.mark.parametrize("name", ["vit_tiny_moe"])
def test_counts_not_doubled_by_encoder_checkpointing(name):
    x = torch.randn(1, 1, 48, 54, 48, generator=torch.Generator().manual_seed(0))
    counts = []
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        encoder = build_encoder(name, use_activation_checkpointing=checkpointing)
        encoder(x).square().mean().backward()
        counts.append(encoder.moe_layers()[0].counts.clone())
        grads.append(encoder.patch_embed.proj.weight.grad.clone())
    assert counts[0].sum() == 576 * 2
    assert torch.equal(counts[0], counts[1])
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_grouped_rejects_unaligned_sizes():
    with pytest.raises(ValueError, match="divisible by 8"):
        MoEFeedForward(12, CONFIG)
    MoEFeedForward(12, CONFIG, dispatch="loop")  # the loop has no alignment constraint


def test_grouped_as_accurate_as_loop_under_bf16_autocast():
    layer = _layer()
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        exact = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_g = layer(x)
            layer.dispatch = "loop"
            out_l = layer(x)
    assert out_g.dtype == out_l.dtype
    err_g, err_l = (out_g.float() - exact).abs().mean(), (out_l.float() - exact).abs().mean()
    assert err_g < 0.02 * exact.abs().mean()  # bf16 rounding only
    assert err_g < 2 * err_l


def test_grouped_traces_without_graph_breaks():
    # No host synchronisation / data-dependent Python in the grouped path: fullgraph tracing succeeds.
    # (bf16: torch 2.13's fake-tensor rule for _grouped_mm only admits bf16.)
    layer = _layer().to(torch.bfloat16)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    x = torch.randn(12, 16, dtype=torch.bfloat16)
    out = compiled(x)
    out.float().sum().backward()
    assert layer.counts.sum() == 12 * 2
    assert torch.allclose(out.float(), layer(x).float(), atol=1e-2)


# ------------------------------------------------------------------------------------------ bias update
def _tensor(values):
    return torch.tensor(values, dtype=torch.float32)


def test_balance_proportional_hand_numbers():
    bias, lo, hi = balance_bias_update(torch.zeros(4), torch.tensor([1, 3, 0, 4]), rate=0.1, proportional=True)
    # c_bar 2; error (1, -1, 2, -2); u = error / 2.000001
    u = _tensor([1, -1, 2, -2]) / (2 + 1e-6)
    assert torch.allclose(bias, 0.1 * u, atol=1e-7)
    assert lo.item() == 0.0 and hi.item() == 2.0


def test_balance_sign_zero_mean_projection():
    bias, lo, hi = balance_bias_update(torch.zeros(4), torch.tensor([2, 2, 2, 6]), rate=0.2, proportional=False)
    # c_bar 3; sign(error) = (1, 1, 1, -1), mean 0.5 -> u = (0.5, 0.5, 0.5, -1.5)
    assert torch.allclose(bias, _tensor([0.1, 0.1, 0.1, -0.3]), atol=1e-7)
    assert lo.item() == pytest.approx(2 / 3) and hi.item() == pytest.approx(2.0)


def test_balance_clip_then_recentre_can_exceed_clip():
    start = _tensor([0.25, 0.0, 0.0, -0.25])
    bias, _, _ = balance_bias_update(start, torch.tensor([0, 4, 4, 4]), rate=0.1, proportional=False)
    # sign (1, -1, -1, -1) -> u (1.5, -.5, -.5, -.5) -> (0.4, -0.05, -0.05, -0.3) -> clip (0.3, ...) -> -mean(-0.025)
    assert torch.allclose(bias, _tensor([0.325, -0.025, -0.025, -0.275]), atol=1e-6)
    unclipped, _, _ = balance_bias_update(start, torch.tensor([0, 4, 4, 4]), rate=0.1, proportional=False, clip=0)
    assert torch.allclose(unclipped, _tensor([0.4, -0.05, -0.05, -0.3]), atol=1e-6)


def test_balance_empty_counts_neutral():
    start = _tensor([0.1, -0.1, 0.0, 0.0])
    bias, lo, hi = balance_bias_update(start, torch.zeros(4, dtype=torch.int64), rate=0.5, proportional=True)
    assert torch.equal(bias, start)
    assert lo.item() == 1.0 and hi.item() == 1.0


def test_balance_rate_zero_only_clips_and_recentres():
    bias, _, _ = balance_bias_update(_tensor([0.5, 0.1, 0.0, 0.0]), torch.tensor([1, 2, 3, 4]), 0.0, False)
    assert torch.allclose(bias, _tensor([0.3, 0.1, 0.0, 0.0]) - 0.1)


def test_balance_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        balance_bias_update(torch.zeros(4), torch.zeros(3), 0.1, True)


# ------------------------------------------------------------------------------------------ DDP names
def test_ddp_ignored_buffer_names():
    assert ddp_ignored_buffer_names(build_encoder("vit_tiny_moe")) == ["blocks.1.mlp.counts"]
    assert ddp_ignored_buffer_names(build_encoder("vit_tiny")) == []
    with torch.device("meta"):
        paper = build_encoder("vit_base_moe")
    names = ddp_ignored_buffer_names(paper)
    assert names == [f"blocks.{i}.mlp.counts" for i in (1, 3, 5, 7, 9, 11)]
    buffers = dict(paper.named_buffers())
    assert all(name in buffers for name in names)


# ------------------------------------------------------------------------------------------ CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16-autocast", "fp32"])
def test_grouped_equals_loop_on_cuda(precision):
    torch.manual_seed(0)
    layer = MoEFeedForward(64, MoEConfig(num_experts=8, top_k=3, expert_hidden=32, shared_hidden=64)).cuda()
    x = torch.randn(4, 333, 64, device="cuda")  # 1332 tokens: uneven, unaligned group sizes
    grad_out = torch.randn(4, 333, 64, device="cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision != "fp32")
    results = {}
    for dispatch in ("loop", "grouped"):
        layer.dispatch = dispatch
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        with autocast:
            out = layer(xi)
        out.backward(grad_out.to(out.dtype))
        results[dispatch] = (out.float(), xi.grad.float(), layer.experts.fc1_weight.grad.float())
    tol = 1e-4 if precision == "fp32" else 5e-2
    for a, b in zip(results["loop"], results["grouped"]):
        assert torch.allclose(a, b, atol=tol, rtol=tol), (a - b).abs().max().item()
    assert layer.counts.sum().item() == 2 * 1332 * 3
