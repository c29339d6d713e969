"""RoPE position layouts (docs/method.md §2.2 table), the rotation on hand-computed cases, and the cached tables."""

from __future__ import annotations

import math

import pytest
import torch

from neurojepa_pl.models.rope import RopeTable, apply_rope, rope_axis_dim, rope_tables, token_positions

PAPER_GRID = (8, 9, 8)
SPEC_TOKENS = torch.tensor([8, 71, 72, 575])


def _triples(positions: torch.Tensor) -> list[tuple[int, int, int]]:
    return [tuple(int(v) for v in row) for row in positions]


def test_spec_table_encoder_predictor_and_grid():
    assert _triples(token_positions(SPEC_TOKENS, PAPER_GRID, "grid")) == [(0, 1, 0), (0, 8, 7), (1, 0, 0), (7, 8, 7)]
    assert _triples(token_positions(SPEC_TOKENS, PAPER_GRID, "reference_encoder")) == [
        (0, 0, 8), (0, 7, 8), (1, 0, 0), (7, 7, 8)
    ]  # fmt: skip
    assert _triples(token_positions(SPEC_TOKENS, PAPER_GRID, "reference_predictor")) == [
        (0, 1, 0), (1, 0, 7), (1, 1, 0), (8, 7, 7)
    ]  # fmt: skip


@pytest.mark.parametrize(
    "layout, ranges",
    [("grid", (7, 8, 7)), ("reference_encoder", (7, 7, 8)), ("reference_predictor", (8, 7, 7))],
)
def test_layouts_injective_with_spec_ranges(layout, ranges):
    positions = token_positions(torch.arange(576), PAPER_GRID, layout)
    assert len(set(_triples(positions))) == 576
    assert tuple(int(v) for v in positions.min(0).values) == (0, 0, 0)
    assert tuple(int(v) for v in positions.max(0).values) == ranges


@pytest.mark.parametrize("layout", ["grid", "reference_encoder", "reference_predictor"])
def test_layouts_injective_on_other_grid(layout):
    grid = (3, 5, 4)
    positions = token_positions(torch.arange(60).view(3, 20), grid, layout)
    assert positions.shape == (3, 20, 3)
    assert len(set(_triples(positions.view(-1, 3)))) == 60


def test_grid_layout_is_c_order():
    ids = torch.arange(72 * 8)
    pos = token_positions(ids, PAPER_GRID, "grid")
    assert torch.equal(pos[:, 0] * 72 + pos[:, 1] * 8 + pos[:, 2], ids)


def test_axis_dims():
    assert rope_axis_dim(64) == 20 and rope_axis_dim(32) == 10 and rope_axis_dim(16) == 4 and rope_axis_dim(8) == 2


def test_tables_tiled_frequencies_per_element():
    # axis width 4: omega = [1, 10000**-0.5 = 0.01]; tiled -> element i uses omega[i % 2].
    positions = torch.tensor([[2.0, 3.0, 5.0]])
    cos, sin = rope_tables(positions, axis_dim=4)
    assert cos.shape == (1, 12)
    omega = [1.0, 0.01]
    expected = [p * omega[i % 2] for p in (2.0, 3.0, 5.0) for i in range(4)]
    assert torch.allclose(sin[0], torch.tensor(expected).sin(), atol=1e-7)
    assert torch.allclose(cos[0], torch.tensor(expected).cos(), atol=1e-7)


def test_apply_rope_hand_case_with_quirk_and_passthrough():
    # head_dim 14: axis width 4 (rot 12), 2 unrotated channels.
    x = torch.arange(1.0, 15.0).view(1, 1, 1, 14)
    positions = torch.tensor([[[1.0, 0.0, 2.0]]])
    cos, sin = rope_tables(positions, axis_dim=4)
    out = apply_rope(x, cos, sin)[0, 0, 0]
    # axis d, position 1: elements (1, 2) pair, element 0 uses angle 1*1, element 1 uses angle 1*0.01 (quirk).
    assert out[0].item() == pytest.approx(1 * math.cos(1.0) - 2 * math.sin(1.0), abs=1e-6)
    assert out[1].item() == pytest.approx(2 * math.cos(0.01) + 1 * math.sin(0.01), abs=1e-6)
    # axis h, position 0: identity.
    assert torch.allclose(out[4:8], x[0, 0, 0, 4:8])
    # axis w, position 2: elements (9, 10) with angles 2 and 0.02.
    assert out[8].item() == pytest.approx(9 * math.cos(2.0) - 10 * math.sin(2.0), abs=1e-5)
    assert out[9].item() == pytest.approx(10 * math.cos(0.02) + 9 * math.sin(0.02), abs=1e-5)
    assert torch.equal(out[12:], x[0, 0, 0, 12:])


def test_relative_position_invariance_of_scores():
    # With axis width 2 each slice is a true rotation, so q.k depends only on the position difference.
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 1, 1, 6, generator=gen)

    def score(pq, pk):
        cq, sq = rope_tables(torch.tensor([[pq]], dtype=torch.float32), 2)
        ck, sk = rope_tables(torch.tensor([[pk]], dtype=torch.float32), 2)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    base = score([1.0, 2.0, 3.0], [4.0, 0.0, 1.0])
    shifted = score([3.0, 7.0, 4.0], [6.0, 5.0, 2.0])
    assert torch.allclose(base, shifted, atol=1e-5)


def test_activation_dtype_tables():
    positions = token_positions(torch.arange(576), PAPER_GRID, "reference_encoder")
    cos32, _ = rope_tables(positions, 20)
    cos16, _ = rope_tables(positions, 20, dtype=torch.bfloat16)
    assert cos16.dtype == torch.bfloat16
    assert (cos16.float() - cos32).abs().max() < 0.05
    assert not torch.equal(cos16.float(), cos32)


# ------------------------------------------------------------------------------------------ cached tables
@pytest.mark.parametrize("layout", ["grid", "reference_encoder", "reference_predictor"])
def test_table_rows_equal_the_uncached_computation(layout):
    table = RopeTable(PAPER_GRID, layout, 20)
    gen = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(576, generator=gen)[:144] for _ in range(3)])  # [B, K], random order
    cos, sin = table(ids)
    want_cos, want_sin = rope_tables(token_positions(ids, PAPER_GRID, layout), 20)
    assert cos.shape == (3, 144, 60) and cos.dtype == torch.float32
    torch.testing.assert_close(cos, want_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, want_sin, rtol=0, atol=1e-6)
    full_cos, _ = table(None)  # all tokens in id order, broadcastable over the batch
    torch.testing.assert_close(
        full_cos, rope_tables(token_positions(torch.arange(576)[None], PAPER_GRID, layout), 20)[0]
    )


def test_table_is_computed_once_and_reused(monkeypatch):
    import neurojepa_pl.models.rope as rope

    calls = []
    original = rope.rope_tables
    monkeypatch.setattr(rope, "rope_tables", lambda *a, **k: calls.append(a[0].shape) or original(*a, **k))
    table = RopeTable(PAPER_GRID, "reference_encoder", 20)
    assert calls == [(576, 3)]  # once, at construction, for the whole grid
    stored = table.cos.data_ptr()
    for seed in range(3):
        ids = torch.randperm(576, generator=torch.Generator().manual_seed(seed))[:100][None]
        table(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos, _ = table(ids)
    assert cos.dtype == torch.float32  # float32 asked for: autocast does not touch the tables
    assert calls == [(576, 3)] and table.cos.data_ptr() == stored
    table(ids, torch.bfloat16)  # another dtype (rope_dtype="activation") is computed per call, as the reference does
    assert len(calls) == 2


def test_different_geometries_give_different_tables():
    paper, cube = RopeTable(PAPER_GRID, "grid", 20), RopeTable((4, 4, 4), "grid", 20)
    assert paper.cos.shape == (576, 60) and cube.cos.shape == (64, 60)
    ids = torch.tensor([[9, 17, 63]])
    # id 9 is (0, 1, 1) on 8x9x8 but (0, 2, 1) on 4x4x4
    assert not torch.equal(paper(ids)[0], cube(ids)[0])
    torch.testing.assert_close(cube(ids)[0], rope_tables(token_positions(ids, (4, 4, 4), "grid"), 20)[0])
    narrow = RopeTable(PAPER_GRID, "grid", 10)  # another head width, same grid
    assert narrow.cos.shape == (576, 30)


def test_table_survives_casts_and_meta_materialisation():
    table = RopeTable(PAPER_GRID, "reference_predictor", 20)
    expected = table.cos.clone()
    table.to(torch.bfloat16)  # e.g. precision "bf16-true": the tables are recomputed, not rounded
    assert table.cos.dtype == torch.float32 and torch.equal(table.cos, expected)
    with torch.device("meta"):
        lazy = RopeTable(PAPER_GRID, "reference_predictor", 20)
    assert lazy.cos.is_meta
    lazy.to_empty(device="cpu")  # what FSDP / Lightning do after a meta-device init
    assert torch.equal(lazy.cos, expected)
    assert "cos" not in table.state_dict()  # a pure function of the geometry: never in a checkpoint
