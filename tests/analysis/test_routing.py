"""Routing analysis pieces: the recorder sees the router's decision without changing the forward, the accumulator's
counts add up and split by the foreground map, the token grid is placed in world space, the NIfTI maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neurojepa_pl.analysis.routing import (
    NIFTI_XFORM_MNI_152,
    RoutingAccumulator,
    RoutingRecorder,
    TokenGridPlacement,
    routing_maps,
    summarize_routing,
    token_grid_affine,
)
from neurojepa_pl.masks.foreground import foreground_token_map
from neurojepa_pl.models import build_encoder

IMG, PATCH = (24, 24, 24), 6
GRID = (4, 4, 4)
N = 64


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    model = build_encoder("vit_tiny_moe", img_size=IMG, patch_size=PATCH).eval()
    # A visible balance bias, so that the test can tell biased from unbiased top-k.
    model.moe_layers()[0].gate.bias.copy_(torch.tensor([0.3, -0.3, 0.1, -0.1]))
    return model


def _volumes(batch: int, seed: int = 0) -> torch.Tensor:
    """Bright cubes of different sizes on a zero background: a known mix of foreground and background tokens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(batch, 1, *IMG)
    for b in range(batch):
        edge = 6 + 4 * b
        x[b, 0, :edge, :edge, :edge] = 0.5 + 0.5 * torch.rand(edge, edge, edge, generator=g)
    return x


def test_recorder_reads_the_biased_top_k_without_changing_the_forward(encoder):
    x = _volumes(2)
    layer = encoder.moe_layers()[0]
    counts_before = layer.counts.clone()
    with torch.no_grad():
        plain = encoder(x)
        with RoutingRecorder(encoder.moe_layers()) as recorder:
            observed = encoder(x)
        (decision,) = recorder.take()
    torch.testing.assert_close(observed, plain, rtol=0, atol=0)
    assert torch.equal(layer.counts, counts_before)
    assert not layer.gate._forward_hooks  # removed on exit
    assert decision.indices.shape == (2 * N, 2) and decision.scores.shape == (2 * N, 4)
    biased = torch.topk(decision.scores + layer.gate.bias, 2, dim=-1).indices
    unbiased = torch.topk(decision.scores, 2, dim=-1).indices
    assert torch.equal(decision.indices, biased)
    assert not torch.equal(decision.indices, unbiased)  # the bias changes some selections: it is the training rule
    torch.testing.assert_close(decision.weights, decision.scores.gather(1, decision.indices) * 4.0)
    with pytest.raises(RuntimeError, match="recorded no routing"):
        recorder.take()


def _route(encoder, x):
    with torch.no_grad(), RoutingRecorder(encoder.moe_layers()) as recorder:
        encoder(x)
        return recorder.take()


def test_accumulator_counts_add_up_and_follow_the_foreground_map(encoder):
    x = _volumes(3)
    modalities = ["T1w", "FLAIR", "T1w"]
    decisions = _route(encoder, x)
    foreground = foreground_token_map(x, PATCH)
    acc = RoutingAccumulator([1], N, 4, 2, ["T1w", "T2w", "FLAIR"])
    acc.update(decisions, foreground, modalities)

    k = 2
    assert acc.token_counts.sum() == 3 * N * k  # every token makes k selections
    assert acc.fg_counts.sum() + acc.bg_counts.sum() == 3 * N * k
    assert acc.fg_tokens.sum() == int(foreground.sum()) and acc.bg_tokens.sum() == int((~foreground).sum())
    assert 0 < acc.fg_tokens.sum() < 3 * N
    np.testing.assert_array_equal(acc.foreground_scans, foreground.sum(0).numpy())
    np.testing.assert_array_equal(acc.scans, [2, 0, 1])
    # Hand count: the experts picked by the foreground tokens of the two T1w scans.
    picked = decisions[0].indices.view(3, N, k)
    t1w = torch.cat([picked[b][foreground[b]] for b in (0, 2)]).flatten()
    np.testing.assert_array_equal(acc.fg_counts[0, 0], torch.bincount(t1w, minlength=4).numpy())
    assert acc.fg_counts[0, 1].sum() == 0  # no T2w scan
    np.testing.assert_array_equal(acc.token_counts[0].sum(1), np.full(N, 3 * k))

    # Streaming: the same scans in two batches give the same tables.
    split = RoutingAccumulator([1], N, 4, 2, ["T1w", "T2w", "FLAIR"])
    split.update(_route(encoder, x[:1]), foreground[:1], modalities[:1])
    split.update(_route(encoder, x[1:]), foreground[1:], modalities[1:])
    for name in ("token_counts", "fg_counts", "bg_counts", "fg_tokens", "bg_tokens", "foreground_scans"):
        np.testing.assert_array_equal(getattr(split, name), getattr(acc, name))
    np.testing.assert_allclose(split.token_weight_sum, acc.token_weight_sum, rtol=1e-12)

    summary = summarize_routing(acc)
    layer = summary["layers"][0]
    assert summary["num_scans"] == 3 and summary["foreground_tokens"] == int(foreground.sum())
    for kind in ("all", "foreground", "background"):
        assert math.isclose(sum(layer["share"][kind]), 1.0)
    fg, bg = np.asarray(layer["share"]["foreground"]), np.asarray(layer["share"]["background"])
    with np.errstate(invalid="ignore"):  # an expert no token picks has no imbalance (NaN on both sides)
        np.testing.assert_allclose(layer["fg_bg_imbalance"], (fg - bg) / (fg + bg))
    counts = np.asarray(layer["selections"]["all"], dtype=float)
    assert layer["load"]["all"]["max_violation"] == pytest.approx(counts.max() / counts.mean())
    assert set(layer["foreground_share_by_modality"]) == {"T1w", "FLAIR"}  # T2w has no foreground token
    shares = np.stack([layer["foreground_share_by_modality"][m] for m in ("T1w", "FLAIR")])
    with np.errstate(invalid="ignore"):
        expected = (shares.max(0) - shares.min(0)) / shares.mean(0)
    np.testing.assert_allclose(layer["modality_imbalance"], expected, rtol=1e-12)


def test_accumulator_rejects_mismatched_inputs(encoder):
    x = _volumes(2)
    decisions = _route(encoder, x)
    acc = RoutingAccumulator([1], N, 4, 2, ["T1w"])
    with pytest.raises(ValueError, match="not declared"):
        acc.update(decisions, foreground_token_map(x, PATCH), ["T1w", "DWI"])
    with pytest.raises(ValueError, match="foreground map"):
        acc.update(decisions, foreground_token_map(x[:1], PATCH), ["T1w", "T1w"])


def test_token_grid_affine_puts_tokens_at_patch_centres():
    input_affine = np.diag([2.0, 3.0, 1.0, 1.0])
    input_affine[:3, 3] = [-10.0, -20.0, -30.0]
    token = token_grid_affine(input_affine, (4, 4, 4))
    # Token (1, 0, 2) covers input voxels 4-7, 0-3, 8-11: centre voxel (5.5, 1.5, 9.5).
    expected = input_affine @ np.array([5.5, 1.5, 9.5, 1.0])
    np.testing.assert_allclose(token @ np.array([1.0, 0.0, 2.0, 1.0]), expected)
    np.testing.assert_allclose(np.diag(token)[:3], [8.0, 12.0, 4.0])

    placement = TokenGridPlacement((4, 4, 4), (4, 4, 4))
    shifted = input_affine.copy()
    shifted[1, 3] += 3.0  # a second scan whose crop starts 3 mm further anterior
    placement.update(np.stack([input_affine, shifted]))
    assert placement.count == 2
    assert placement.spread_mm() == pytest.approx(3.0)
    np.testing.assert_allclose(placement.mean_affine()[1, 3], token[1, 3] + 1.5)
    assert placement.token_edge_mm() == pytest.approx([8.0, 12.0, 4.0])


def test_routing_maps_are_nifti_on_the_token_grid_with_the_given_affine(encoder):
    x = _volumes(2)
    acc = RoutingAccumulator([1], N, 4, 2, ["T1w"])
    acc.update(_route(encoder, x), foreground_token_map(x, PATCH), ["T1w", "T1w"])
    affine = token_grid_affine(np.diag([1.5, 1.5, 1.5, 1.0]), (PATCH,) * 3)
    maps = routing_maps(acc, GRID, affine)
    assert set(maps) == {"foreground_fraction", "block01_expert_share", "block01_dominant_expert"}
    share, dominant = maps["block01_expert_share"], maps["block01_dominant_expert"]
    assert share.shape == (*GRID, 4) and dominant.shape == GRID
    for image in maps.values():
        np.testing.assert_allclose(image.affine, affine)
        assert int(image.header["sform_code"]) == NIFTI_XFORM_MNI_152
    data = np.asarray(share.dataobj)
    np.testing.assert_allclose(data.sum(-1), 1.0, rtol=1e-6)
    # Token id 1*16 + 2*4 + 3 = 27 is voxel (1, 2, 3) (C order over the grid).
    np.testing.assert_allclose(data[1, 2, 3], acc.token_counts[0, 27] / (2 * 2))
    assert int(np.asarray(dominant.dataobj)[1, 2, 3]) == int(acc.token_counts[0, 27].argmax()) + 1
    with pytest.raises(ValueError, match="tokens"):
        routing_maps(acc, (4, 4, 3), affine)
