"""Foreground-aware JEPA loss (docs/method.md §6.2) against hand computations."""

from __future__ import annotations

import pytest
import torch

from neurojepa_pl.losses import foreground_weights, jepa_loss, token_regression_loss

# Two masks, B = 1, K = 2 tokens, C = 2 channels.
Z0 = torch.tensor([[[1.0, 2.0], [3.0, 5.0]]])
H0 = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])  # |z - h| = [[1, 2], [2, 4]]
Z1 = torch.tensor([[[0.0, 0.0], [2.0, 2.0]]])
H1 = torch.tensor([[[1.0, -1.0], [2.0, 4.0]]])  # |z - h| = [[1, 1], [0, 2]]
FG0 = torch.tensor([[True, False]])
FG1 = torch.tensor([[False, False]])


def test_foreground_weights_by_hand():
    w = foreground_weights(torch.tensor([[1, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool), bg_weight=0.1)
    # Row 0: [1, .1, .1, 1] / .55; row 1: all .1 / .1 = 1.
    expected = torch.tensor([[1 / 0.55, 0.1 / 0.55, 0.1 / 0.55, 1 / 0.55], [1.0, 1.0, 1.0, 1.0]])
    assert torch.allclose(w, expected)
    assert torch.allclose(w.mean(dim=1), torch.ones(2))
    assert w.dtype == torch.float32


def test_foreground_weights_floor_keeps_an_all_zero_row_finite():
    w = foreground_weights(torch.zeros(1, 3, dtype=torch.bool), bg_weight=0.0)
    assert torch.equal(w, torch.zeros(1, 3))
    with pytest.raises(ValueError, match="bg_weight"):
        foreground_weights(torch.ones(1, 3), bg_weight=-0.5)


def test_token_loss_by_hand():
    assert torch.allclose(token_regression_loss(Z0, H0, 1.0), torch.tensor([[1.5, 3.0]]))
    # p = 2: mean_d d^2 / 2.
    assert torch.allclose(token_regression_loss(Z0, H0, 2.0), torch.tensor([[1.25, 5.0]]))


@pytest.mark.parametrize(
    "loss_exp, fg, expected",
    [
        # mask 0: (1.5 * 1/.55 + 3 * .1/.55) / 2 = 1.8 / 1.1; mask 1: all background -> plain mean 1.
        (1.0, True, (1.8 / 1.1 + 1.0) / 2),
        (1.0, False, ((1.5 + 3.0) / 2 + 1.0) / 2),
        # p = 2: mask 0 tokens [1.25, 5.0] -> (1.25 + 0.5) / 1.1; mask 1 tokens [0.5, 1.0] -> 0.75.
        (2.0, True, (1.75 / 1.1 + 0.75) / 2),
        (2.0, False, ((1.25 + 5.0) / 2 + 0.75) / 2),
    ],
)
def test_jepa_loss_by_hand(loss_exp, fg, expected):
    foreground = [FG0, FG1] if fg else None
    loss = jepa_loss([Z0, Z1], [H0, H1], foreground, bg_weight=0.1, loss_exp=loss_exp)
    assert loss.shape == () and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # The stacked [M, B, K, C] form gives the same number.
    stacked_fg = torch.stack([FG0, FG1]) if fg else None
    stacked = jepa_loss(torch.stack([Z0, Z1]), torch.stack([H0, H1]), stacked_fg, 0.1, loss_exp)
    assert stacked.item() == pytest.approx(expected, rel=1e-6)


def test_weights_are_normalised_per_sample_not_per_batch():
    # Sample 0: fg [1, 0], tokens [1.5, 3]; sample 1: fg [1, 1], tokens [2, 4]. Per-sample normalisation gives
    # (1.5/.55 + .3/.55 + 2 + 4) / 4; normalising over the whole batch (mean weight .775) would not.
    z = torch.cat([Z0, torch.tensor([[[2.0, 2.0], [4.0, 4.0]]])])
    h = torch.cat([H0, torch.zeros(1, 2, 2)])
    fg = torch.tensor([[True, False], [True, True]])
    expected = (1.5 / 0.55 + 0.3 / 0.55 + 2.0 + 4.0) / 4
    assert jepa_loss([z], [h], [fg]).item() == pytest.approx(expected, rel=1e-6)


def test_bg_weight_one_or_more_is_the_plain_mean():
    plain = jepa_loss([Z0, Z1], [H0, H1], None)
    assert jepa_loss([Z0, Z1], [H0, H1], [FG0, FG1], bg_weight=1.0).item() == pytest.approx(plain.item())
    assert jepa_loss([Z0, Z1], [H0, H1], [FG0, FG1], bg_weight=2.0).item() == pytest.approx(plain.item())


def test_masks_may_have_different_lengths():
    z_long, h_long = torch.ones(1, 3, 2), torch.zeros(1, 3, 2)
    loss = jepa_loss([Z0, z_long], [H0, h_long], [FG0, torch.tensor([[True, True, False]])])
    assert loss.item() == pytest.approx((1.8 / 1.1 + 1.0) / 2, rel=1e-6)


def test_bfloat16_inputs_accumulate_in_float32():
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 64, 32, generator=generator).to(torch.bfloat16)
    h = torch.randn(3, 4, 64, 32, generator=generator).to(torch.bfloat16)
    fg = torch.rand(3, 4, 64, generator=generator) > 0.4
    loss = jepa_loss(z, h, fg)
    assert loss.dtype == torch.float32
    reference = jepa_loss(z.float(), h.float(), fg)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)


def test_gradient_reaches_the_prediction_only_through_weighted_tokens():
    z = Z0.clone().requires_grad_(True)
    jepa_loss([z], [H0], [FG0]).backward()
    # d/dz of ŵ_k * mean_d |z - h| / (B K) = ŵ_k * sign / (C * K): fg token 1/.55 / 4, bg token .1/.55 / 4.
    expected = torch.tensor([[[1.0, 1.0], [0.1, 0.1]]]) / 0.55 / 4
    assert torch.allclose(z.grad, expected)


def test_shape_errors_are_explained():
    with pytest.raises(ValueError, match="same shape"):
        jepa_loss([Z0], [H0[:, :1]])
    with pytest.raises(ValueError, match="one foreground map per mask"):
        jepa_loss([Z0, Z1], [H0, H1], [FG0])
    with pytest.raises(ValueError, match="torch.gather"):
        jepa_loss([Z0], [H0], [torch.ones(1, 576, dtype=torch.bool)])
    with pytest.raises(ValueError, match="same non-zero number"):
        jepa_loss([Z0, Z1], [H0])
