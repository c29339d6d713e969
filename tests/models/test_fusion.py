"""Fusion heads: shapes, missing modalities never vote (whatever their placeholder holds: zeros, noise, 1e30, +-Inf,
NaN; forward and backward), MIL attention normalisation, gate range, and learning."""

import pytest
import torch

from neurojepa_pl.losses.poe import product_of_experts
from neurojepa_pl.models.fusion import (
    FUSION_HEADS,
    ClassifyThenAggregateMIL,
    GatedCrossAttentionFusion,
    LogitAveraging,
    ProductOfExperts,
    ProductOfExpertsJoint,
    build_fusion_head,
)

B, M, N, C, K = 3, 2, 6, 32, 2
SMALL = {
    "avg": {},
    "late": {"proj_dim": 16, "num_heads": 4},
    "mil": {"hidden_dim": 16, "instance_hidden_dim": 8},
    "poe": {"head_heads": 4},
    "poe_joint": {"head_heads": 4},
}


def _head(name, num_classes=K, num_modalities=M, embed_dim=C):
    torch.manual_seed(0)
    return build_fusion_head(name, embed_dim, num_classes, num_modalities, **SMALL[name]).eval()


def _tokens(seed=1, b=B, m=M, n=N, c=C):
    return torch.randn(b, m, n, c, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(FUSION_HEADS))
def test_output_shape_and_kind(name):
    head = _head(name, num_classes=3)
    out = head(_tokens(), torch.ones(B, M, dtype=torch.bool))
    assert out.shape == (B, 3) and torch.isfinite(out).all()
    if head.returns_log_probs:
        assert torch.allclose(out.exp().sum(-1), torch.ones(B), atol=1e-5)


@pytest.mark.parametrize("name", sorted(FUSION_HEADS))
@pytest.mark.parametrize("missing", [0, 1])
def test_missing_modality_never_votes(name, missing):
    head = _head(name)
    tokens = _tokens()
    validity = torch.ones(B, M, dtype=torch.bool)
    validity[1, missing] = False  # only sample 1 misses a modality
    out = head(tokens, validity)
    changed = tokens.clone()
    changed[1, missing] = torch.randn(N, C) * 50  # anything in the missing slot, e.g. a zero image's features
    changed[1, missing, 0] = 0.0
    out_changed = head(changed, validity)
    assert torch.allclose(out, out_changed, atol=1e-5)
    # a present modality of the same sample does matter
    moved = tokens.clone()
    moved[1, 1 - missing] += torch.randn(N, C, generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(head(moved, validity)[1], out[1], atol=1e-4)


FILLERS = {
    "zero": 0.0,
    "random": "random",
    "huge": 1e30,
    "+inf": float("inf"),
    "-inf": float("-inf"),
    "nan": float("nan"),
}


def _fill(tokens, validity, filler):
    """``tokens`` with every invalid modality's slot holding ``filler`` (a float, or large noise for "random")."""
    out = tokens.clone()
    if filler == "random":
        out[~validity] = 1e3 * torch.randn(out[~validity].shape, generator=torch.Generator().manual_seed(9))
    else:
        out[~validity] = filler
    return out


def _output_and_grads(head, tokens, validity):
    """Forward + backward of a fixed loss (dropout drawn from the same seed each call); returns (output, grads)."""
    head.zero_grad()
    torch.manual_seed(123)
    out = head(tokens, validity)
    # A loss that weighs the classes differently, so the gradients are not trivially zero (softmax rows sum to 1).
    loss = (out.float() * torch.arange(1, out.shape[1] + 1, dtype=torch.float32)).sum()
    loss.backward()
    return out.detach(), {name: p.grad.detach().clone() for name, p in head.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", sorted(FUSION_HEADS))
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("filler", sorted(FILLERS))
def test_placeholder_values_reach_neither_output_nor_gradients(name, mode, filler):
    """Issue 18 item 2: whatever a missing slot holds, output and parameter gradients equal the zero-filler ones."""
    m = 2 if name == "late" else 3
    head = _head(name, num_modalities=m).train(mode == "train")
    tokens = _tokens(b=4, m=m)
    validity = torch.ones(4, m, dtype=torch.bool)
    validity[1, 1] = False  # the second modality missing
    validity[2, 0] = False  # the first one missing
    if m == 3:
        validity[3, :2] = False  # all but the last missing
    reference, reference_grads = _output_and_grads(head, _fill(tokens, validity, 0.0), validity)
    out, grads = _output_and_grads(head, _fill(tokens, validity, FILLERS[filler]), validity)
    assert torch.isfinite(out).all(), f"{name}: non-finite output with a {filler} placeholder"
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    assert grads.keys() == reference_grads.keys() and grads
    for key, grad in grads.items():
        assert torch.isfinite(grad).all(), f"{name}: non-finite gradient of {key} with a {filler} placeholder"
        torch.testing.assert_close(grad, reference_grads[key], rtol=1e-5, atol=1e-6)
    # The gradient is not trivially zero: the heads do learn from these samples.
    assert any(grad.abs().sum() > 0 for grad in grads.values())


@pytest.mark.parametrize("name", sorted(FUSION_HEADS))
def test_gradient_never_flows_into_a_missing_slot(name):
    """The placeholder's slot gets an exactly-zero gradient (a selection, not a multiplication by 0)."""
    head = _head(name)
    validity = torch.tensor([[True, True], [True, False], [False, True]])
    tokens = _fill(_tokens(), validity, float("nan")).requires_grad_(True)
    head(tokens, validity).sum().backward()
    assert torch.all(tokens.grad[~validity] == 0)
    assert torch.isfinite(tokens.grad).all() and tokens.grad[validity].abs().sum() > 0


def test_logit_averaging_equals_single_modality_when_other_missing():
    head = _head("avg")
    tokens = _tokens()
    out = head(tokens, torch.tensor([[True, False]] * B))
    assert torch.allclose(out, head.classifiers[0].linear(tokens[:, 0].mean(1)), atol=1e-6)
    out = head(tokens, torch.tensor([[False, True]] * B))
    assert torch.allclose(out, head.classifiers[1].linear(tokens[:, 1].mean(1)), atol=1e-6)
    both = head(tokens, torch.ones(B, M, dtype=torch.bool))
    mean = (head.classifiers[0].linear(tokens[:, 0].mean(1)) + head.classifiers[1].linear(tokens[:, 1].mean(1))) / 2
    assert torch.allclose(both, mean, atol=1e-6)


@pytest.mark.parametrize("name", ["poe", "poe_joint"])
def test_poe_equals_single_modality_expert_when_other_missing(name):
    head = _head(name)
    tokens = _tokens()
    validity = torch.tensor([[True, False]] * B)
    single = torch.log_softmax(head.experts[0](tokens[:, 0]), -1)
    if name == "poe":
        assert torch.allclose(head(tokens, validity), single, atol=1e-5)
    else:
        # the always-valid joint expert, which sees only the valid modality's tokens, joins the product
        joint = head.joint_expert(tokens[:, 0])
        expected = product_of_experts(torch.stack([head.experts[0](tokens[:, 0]), joint], dim=1))
        assert torch.allclose(head(tokens, validity), expected, atol=1e-5)


def test_poe_all_valid_is_the_product_of_the_experts():
    head = _head("poe")
    tokens = _tokens()
    p = [torch.softmax(head.experts[m](tokens[:, m]), -1) for m in range(M)]
    expected = (p[0] * p[1]) / (p[0] * p[1]).sum(-1, keepdim=True)
    assert torch.allclose(head(tokens, torch.ones(B, M, dtype=torch.bool)).exp(), expected, atol=1e-5)


def test_gated_fusion_gate_lies_in_unit_interval_and_tanh_option_does_not():
    tokens = _tokens(b=16) * 3
    sig = _head("late")
    f1, f2 = sig.proj1(tokens[:, 0]).mean(1), sig.proj2(tokens[:, 1]).mean(1)
    g = sig.gate_values(f1, f2)
    assert g.min() > 0 and g.max() < 1
    torch.manual_seed(0)
    tanh = GatedCrossAttentionFusion(C, K, 2, proj_dim=16, num_heads=4, gate="tanh").eval()
    assert tanh.gate_values(f1, f2).min() < 0  # the reference's tanh gate extrapolates
    with pytest.raises(ValueError, match="sigmoid"):
        GatedCrossAttentionFusion(C, K, 2, gate="relu")


def test_gated_fusion_with_one_modality_is_its_single_path():
    head = _head("late")
    tokens = _tokens()
    p1 = head.norm1(head.proj1(tokens[:, 0])).mean(1)  # no cross-attention term from the missing modality
    assert torch.allclose(head(tokens, torch.tensor([[True, False]] * B)), head.classifier(p1), atol=1e-5)


def test_gated_fusion_needs_two_modalities():
    with pytest.raises(ValueError, match="exactly 2 modalities"):
        GatedCrossAttentionFusion(C, K, num_modalities=3)


def test_mil_attention_sums_to_one_per_class_per_bag_and_skips_missing():
    head = _head("mil", num_classes=3, num_modalities=3)
    tokens = _tokens(m=3)
    validity = torch.tensor([[True, True, True], [True, False, True], [False, False, True]])
    attn = head.attention(tokens, validity)
    assert attn.shape == (B, 3 * N, 3) and attn.dtype == torch.float32
    assert torch.allclose(attn.sum(dim=1), torch.ones(B, 3), atol=1e-6)
    token_valid = validity.repeat_interleave(N, dim=1)
    assert torch.all(attn[~token_valid] == 0) and torch.all(attn[token_valid] > 0)


def test_mil_forward_is_attention_weighted_instance_logits():
    head = _head("mil", num_classes=3)
    with torch.no_grad():
        head.scale.copy_(torch.tensor([2.0, 0.5, 1.0]))
        head.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    tokens = _tokens()
    validity = torch.tensor([[True, True], [False, True], [True, False]])
    attn = head.attention(tokens, validity)
    inst = head.instance_mlp(head.instance_norm(tokens.reshape(B, M * N, C)))
    expected = (attn * inst).sum(1) * head.scale + head.bias
    assert torch.allclose(head(tokens, validity), expected, atol=1e-5)


def test_mil_init_is_truncated_normal():
    head = ClassifyThenAggregateMIL(64, 2, 2)
    w = head.attention_v.weight
    assert w.abs().max() <= 0.04 + 1e-7 and 0.01 < w.std() < 0.02
    assert torch.all(head.attention_v.bias == 0) and torch.all(head.scale == 1) and torch.all(head.bias == 0)


def test_sample_without_any_valid_modality_is_rejected():
    validity = torch.tensor([[True, True], [False, False], [True, False]])
    for name in FUSION_HEADS:
        with pytest.raises(ValueError, match=r"samples \[1\].*no valid modality"):
            _head(name)(_tokens(), validity)


def test_wrong_shapes_are_rejected():
    head = LogitAveraging(C, K, M)
    with pytest.raises(ValueError, match="expects tokens"):
        head(torch.zeros(B, 3, N, C), torch.ones(B, 3))
    with pytest.raises(ValueError, match="expects validity"):
        head(torch.zeros(B, M, N, C), torch.ones(B, 3))
    with pytest.raises(ValueError, match="unknown fusion head"):
        build_fusion_head("early", C, K, M)
    assert isinstance(build_fusion_head("vit_poe_joint", C, K, M, head_heads=4), ProductOfExpertsJoint)
    assert issubclass(ProductOfExpertsJoint, ProductOfExperts)


@pytest.mark.parametrize("name", sorted(FUSION_HEADS))
def test_heads_learn_a_task_carried_by_the_second_modality(name):
    """Class is in modality 2 only; modality 1 is noise. Every head must find it (train acc on held-out data)."""
    gen = torch.Generator().manual_seed(0)
    d = 16

    def make(n):
        y = torch.randint(0, 2, (n,), generator=gen)
        x = torch.randn(n, 2, 4, d, generator=gen)
        x[:, 1, :, 0] += 2.0 * (2 * y[:, None].float() - 1)
        return x, y

    x_train, y_train = make(384)
    x_test, y_test = make(128)
    torch.manual_seed(0)  # init and dropout
    head = build_fusion_head(name, d, 2, 2, **SMALL[name])
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    loss_fn = torch.nn.functional.nll_loss if head.returns_log_probs else torch.nn.functional.cross_entropy
    head.train()
    for _ in range(80):
        opt.zero_grad()
        loss_fn(head(x_train, torch.ones(384, 2, dtype=torch.bool)), y_train).backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        acc = (head(x_test, torch.ones(128, 2, dtype=torch.bool)).argmax(-1) == y_test).float().mean().item()
    assert acc > 0.9, f"{name}: held-out accuracy {acc:.2f}"
