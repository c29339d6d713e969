"""Product-of-experts combination: hand-computed cases and the missing-expert invariants."""

import math

import pytest
import torch

from neurojepa_pl.losses.poe import product_of_experts


def _logits_from_probs(*probs):
    return torch.log(torch.tensor([probs], dtype=torch.float64))  # [1, E, C]


def test_two_experts_multiply_and_renormalise():
    # p1 = [0.8, 0.2], p2 = [0.6, 0.4] -> product [0.48, 0.08] -> [6/7, 1/7].
    out = product_of_experts(_logits_from_probs([0.8, 0.2], [0.6, 0.4]))
    assert out.shape == (1, 2)
    assert torch.allclose(out.exp(), torch.tensor([[6 / 7, 1 / 7]], dtype=torch.float64), atol=1e-12)


def test_three_classes_matches_hand_product():
    p1, p2, p3 = [0.5, 0.3, 0.2], [0.2, 0.2, 0.6], [0.1, 0.6, 0.3]
    prod = [a * b * c for a, b, c in zip(p1, p2, p3)]  # [0.01, 0.036, 0.036]
    expected = torch.tensor([[x / sum(prod) for x in prod]], dtype=torch.float64)
    out = product_of_experts(_logits_from_probs(p1, p2, p3))
    assert torch.allclose(out.exp(), expected, atol=1e-12)


def test_unnormalised_logits_give_the_same_product():
    logits = torch.tensor([[[2.0, -1.0, 0.5], [0.3, 0.3, 4.0]]])
    shifted = logits + torch.tensor([[[10.0], [-7.0]]])  # per-expert shifts do not change softmax
    assert torch.allclose(product_of_experts(logits), product_of_experts(shifted), atol=1e-6)


def test_missing_expert_does_not_vote_even_with_extreme_logits():
    valid_logits = torch.tensor([1.5, -0.5])
    logits = torch.stack([valid_logits, torch.tensor([float("inf"), float("-inf")])]).unsqueeze(0)
    out = product_of_experts(logits, torch.tensor([[True, False]]))
    assert torch.isfinite(out).all()
    assert torch.allclose(out, torch.log_softmax(valid_logits, -1).unsqueeze(0), atol=1e-6)


def test_missing_expert_gets_no_gradient():
    logits = torch.randn(3, 2, 4, requires_grad=True)
    validity = torch.tensor([[True, True], [True, False], [False, True]])
    target = torch.tensor([0, 1, 2])
    torch.nn.functional.nll_loss(product_of_experts(logits, validity), target).backward()
    assert torch.all(logits.grad[1, 1] == 0) and torch.all(logits.grad[2, 0] == 0)
    assert logits.grad[0].abs().sum() > 0 and logits.grad[1, 0].abs().sum() > 0


def test_rows_are_distributions_and_empty_product_is_uniform():
    logits = torch.randn(5, 3, 4)
    validity = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 1, 1], [0, 0, 1], [0, 0, 0]])
    out = product_of_experts(logits, validity)
    assert torch.allclose(out.exp().sum(-1), torch.ones(5), atol=1e-6)
    assert torch.allclose(out[4], torch.full((4,), -math.log(4)), atol=1e-6)


def test_bfloat16_input_keeps_dtype():
    logits = torch.randn(2, 2, 3).bfloat16()
    out = product_of_experts(logits)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), product_of_experts(logits.float()), atol=2e-2)


@pytest.mark.parametrize(
    "logits, validity",
    [(torch.zeros(2, 3), None), (torch.zeros(2, 3, 4), torch.ones(2, 2)), (torch.zeros(2, 3, 4), torch.ones(3))],
)
def test_shape_errors(logits, validity):
    with pytest.raises(ValueError, match=r"\[B, E"):
        product_of_experts(logits, validity)
