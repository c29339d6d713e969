"""Multiscale block masks (docs/method.md §5.1, 5.2): exact counts, partition, determinism, scale statistics, the
phase-2 ordering rules on hand-made cases, phase 2b, and the foreground preference on a synthetic ellipsoid brain."""

from __future__ import annotations

import pytest
import torch

from neurojepa_pl.masks import MultiscaleBlockMaskGenerator, paper_mask_generators


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_partition(context: torch.Tensor, target: torch.Tensor, num_tokens: int) -> None:
    assert context.dtype == target.dtype == torch.int64
    both = torch.cat([context, target], dim=1).sort(dim=1).values
    assert torch.equal(both, torch.arange(num_tokens).expand_as(both)), "context and target must partition [0, N)"


def _ellipsoid_brain(grid=(8, 9, 8)) -> torch.Tensor:
    """Foreground tokens of an ellipsoid filling 94% of each half-axis: 332 of 576 on 8x9x8 (docs/method.md §5.3)."""
    axes = [torch.arange(g, dtype=torch.float32) for g in grid]
    i0, i1, i2 = torch.meshgrid(*axes, indexing="ij")
    centre = [(g - 1) / 2 for g in grid]
    radius = [g / 2 for g in grid]
    r2 = sum(((i - c) / r) ** 2 for i, c, r in zip((i0, i1, i2), centre, radius))
    return (r2 <= 1).reshape(1, -1)


def test_paper_generators_configuration():
    small, medium, large = paper_mask_generators()
    assert [g.num_blocks for g in (small, medium, large)] == [32, 16, 4]
    assert [g.spatial_scale for g in (small, medium, large)] == [(0.0, 0.2), (0.2, 0.5), (0.5, 0.7)]
    for g in (small, medium, large):
        assert g.depth_scale == (0.0, 1.0) and g.aspect_ratio == (0.75, 1.5) and g.mask_ratio == 0.75
        assert (g.num_tokens, g.num_context, g.num_target) == (576, 144, 432)


@pytest.mark.parametrize("grid", [(8, 9, 8), (4, 4, 4), (3, 5, 2)])
def test_exact_counts_and_partition(grid):
    n = grid[0] * grid[1] * grid[2]
    generator = _gen(0)
    for mask_gen in paper_mask_generators(grid):
        context, target = mask_gen(6, generator)
        assert context.shape == (6, n - int(n * 0.75)) and target.shape == (6, int(n * 0.75))
        _assert_partition(context, target, n)


def test_exact_counts_with_foreground_and_rows_are_shuffled():
    fg = _ellipsoid_brain().expand(8, -1)
    for mask_gen in paper_mask_generators():
        context, target = mask_gen(8, _gen(1), fg)
        assert context.shape == (8, 144) and target.shape == (8, 432)
        _assert_partition(context, target, 576)
        # Phase 3 permutes the ids: sorted rows would leak spatial order.
        assert not torch.equal(target, target.sort(dim=1).values)


def test_same_generator_seed_same_masks_different_seed_different_masks():
    mask_gen = paper_mask_generators()[0]
    a = mask_gen(4, _gen(5))
    b = mask_gen(4, _gen(5))
    c = mask_gen(4, _gen(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_samples_in_a_batch_differ():
    context, _ = paper_mask_generators()[1](4, _gen(0))
    rows = {tuple(sorted(r.tolist())) for r in context}
    assert len(rows) == 4


def test_block_size_means_match_the_reference_measurement():
    # docs/method.md §5.1 measured mean (d, h, w) per generator: (4.0, 2.6, 2.5), (4.0, 5.1, 4.8), (4.0, 6.7, 6.4).
    expected = [(4.0, 2.6, 2.5), (4.0, 5.1, 4.8), (4.0, 6.7, 6.4)]
    generator = _gen(0)
    for mask_gen, means in zip(paper_mask_generators(), expected):
        sizes = torch.tensor([mask_gen.sample_block_size(generator) for _ in range(3000)], dtype=torch.float32)
        d, h, w = sizes.unbind(1)
        assert d.min() >= 1 and d.max() <= 8 and h.max() <= 8 and w.max() <= 9
        assert torch.allclose(sizes.mean(0), torch.tensor(means), atol=0.12), sizes.mean(0)


def test_block_size_formula_at_the_range_ends():
    # spatial (1, 1), depth (1, 1), aspect (1, 1): area = 72 -> h = round(sqrt(72)) = 8, w = 8, d = 8.
    full = MultiscaleBlockMaskGenerator(
        num_blocks=1, spatial_scale=(1.0, 1.0), depth_scale=(1.0, 1.0), aspect_ratio=(1.0, 1.0)
    )
    assert full.sample_block_size(_gen(0)) == (8, 8, 8)
    # spatial lower bound is raised to 1/72 and depth to 1/8: the smallest block is one cell.
    tiny = MultiscaleBlockMaskGenerator(
        num_blocks=1, spatial_scale=(0.0, 1 / 72), depth_scale=(0.0, 1 / 8), aspect_ratio=(1.0, 1.0)
    )
    assert tiny.sample_block_size(_gen(0)) == (1, 1, 1)


def test_phase1_blocks_stay_inside_the_grid_and_mask_something():
    mask_gen = paper_mask_generators()[2]
    generator = _gen(3)
    kept = [mask_gen.place_blocks(generator) for _ in range(50)]
    assert all(k.shape == (8, 9, 8) and (~k).any() for k in kept)
    # Large blocks: phase 1 keeps about 192 tokens on average (docs/method.md §5.2 measured 192).
    assert 170 < torch.stack(kept).sum((1, 2, 3)).float().mean() < 215


def _line_generator(foreground_aware: bool = True) -> MultiscaleBlockMaskGenerator:
    # A 1x1x10 line with mask ratio 0.5: 5 context, 5 target tokens.
    return MultiscaleBlockMaskGenerator(
        (1, 1, 10), num_blocks=1, spatial_scale=(1.0, 1.0), mask_ratio=0.5, foreground_aware=foreground_aware
    )


def _line(kept_ids) -> torch.Tensor:
    kept = torch.zeros(1, 1, 10, dtype=torch.bool)
    kept[0, 0, list(kept_ids)] = True
    return kept


def test_erosion_follows_the_front_and_masks_background_first():
    # Kept 1..8 (masked 0 and 9). Round 1 masks the front {1, 8}; round 2 must mask one of {2, 7}: with token 7
    # foreground, background token 2 goes first, leaving exactly 3..7.
    fg = torch.zeros(10, dtype=torch.bool)
    fg[7] = True
    for seed in range(10):
        out = _line_generator().adjust_count(_line(range(1, 9)), _gen(seed), fg)
        assert torch.equal(out, _line(range(3, 8)))
    # Without the map either end may go, but the result stays one contiguous run.
    plain_runs = [_line_generator().adjust_count(_line(range(1, 9)), _gen(s)) for s in range(20)]
    results = {tuple(run[0, 0].nonzero().flatten().tolist()) for run in plain_runs}
    assert results == {(2, 3, 4, 5, 6), (3, 4, 5, 6, 7)}


def test_dilation_follows_the_front_and_restores_foreground_first():
    # Kept {4, 5}. Round 1 restores {3, 6}; round 2 must restore one of {2, 7}: foreground 7 first.
    fg = torch.zeros(10, dtype=torch.bool)
    fg[7] = True
    for seed in range(10):
        assert torch.equal(_line_generator().adjust_count(_line([4, 5]), _gen(seed), fg), _line(range(3, 8)))


def test_foreground_aware_false_ignores_the_map():
    fg = torch.zeros(10, dtype=torch.bool)
    fg[7] = True
    plain = _line_generator(foreground_aware=False)
    for seed in range(5):
        with_map = plain.adjust_count(_line([4, 5]), _gen(seed), fg)
        assert torch.equal(with_map, plain.adjust_count(_line([4, 5]), _gen(seed)))
    mask_gen = paper_mask_generators(foreground_aware=False)[0]
    fg_batch = _ellipsoid_brain().expand(3, -1)
    with_map, without_map = mask_gen(3, _gen(2), fg_batch), mask_gen(3, _gen(2), None)
    assert torch.equal(with_map[0], without_map[0]) and torch.equal(with_map[1], without_map[1])


def test_phase_2b_random_fallback_when_everything_is_masked():
    # One block covering the whole 4x4x4 grid: phase 1 masks all 64 tokens, there is no dilation front, and only
    # phase 2b can bring the context to 16.
    full = MultiscaleBlockMaskGenerator(
        (4, 4, 4), num_blocks=1, spatial_scale=(1.0, 1.0), depth_scale=(1.0, 1.0), aspect_ratio=(1.0, 1.0)
    )
    assert not full.place_blocks(_gen(0)).any()
    context, target = full(5, _gen(0))
    assert context.shape == (5, 16) and target.shape == (5, 48)
    _assert_partition(context, target, 64)
    # The fallback picks random tokens, so the context is not one coherent block: rows differ.
    assert len({tuple(sorted(r.tolist())) for r in context}) == 5


def test_phase_2b_random_fallback_when_nothing_is_masked():
    mask_gen = paper_mask_generators((4, 4, 4))[0]
    out = mask_gen.adjust_count(torch.ones(4, 4, 4, dtype=torch.bool), _gen(0))
    assert int(out.sum()) == 16


def test_foreground_awareness_keeps_more_foreground_in_context():
    # docs/method.md §5.3 (reference, 332-token ellipsoid): context foreground share 0.38 / 0.28 / 0.38 with awareness,
    # 0.27 / 0.19 / 0.25 without. Ours on this ellipsoid (64 samples, seed 0) is asserted to show a clear gain.
    fg = _ellipsoid_brain()
    assert int(fg.sum()) == 332
    batch = fg.expand(64, -1)
    shares = {}
    for aware in (True, False):
        generator = _gen(0)
        shares[aware] = [
            float(torch.gather(batch, 1, mask_gen(64, generator, batch)[0]).float().mean())
            for mask_gen in paper_mask_generators(foreground_aware=aware)
        ]
    for aware_share, plain_share in zip(shares[True], shares[False]):
        assert aware_share > plain_share + 0.04, shares
    for plain_share, reference in zip(shares[False], (0.27, 0.19, 0.25)):
        assert abs(plain_share - reference) < 0.05, shares


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_blocks": 0, "spatial_scale": (0.0, 0.2)}, "num_blocks"),
        ({"num_blocks": 2, "spatial_scale": (0.5, 0.2)}, "spatial_scale"),
        ({"num_blocks": 2, "spatial_scale": (0.0, 0.2), "aspect_ratio": (0.0, 1.0)}, "aspect_ratio"),
        ({"num_blocks": 2, "spatial_scale": (0.0, 0.2), "mask_ratio": 1.0}, "mask_ratio"),
    ],
)
def test_invalid_configuration_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiscaleBlockMaskGenerator((8, 9, 8), **kwargs)


def test_foreground_map_layouts_are_equivalent():
    mask_gen = paper_mask_generators()[1]
    fg = _ellipsoid_brain().expand(2, -1)
    a = mask_gen(2, _gen(4), fg)
    b = mask_gen(2, _gen(4), fg.reshape(2, 8, 9, 8).float())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="foreground map"):
        mask_gen(3, _gen(4), fg)
