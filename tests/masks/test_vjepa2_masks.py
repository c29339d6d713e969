"""V-JEPA 2 multiblock masks: full-depth tubes, batch-minimum truncation, empty-context redraw."""

from __future__ import annotations

import pytest
import torch

from neurojepa_pl.masks import VJEPA2BlockMaskGenerator, vjepa2_mask_generators


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_settings_and_block_sizes():
    short, long = vjepa2_mask_generators()
    assert (short.num_blocks, short.spatial_scale) == (8, (0.15, 0.15))
    assert (long.num_blocks, long.spatial_scale) == (2, (0.7, 0.7))
    generator = _gen(0)
    # Short range: area int(72 * 0.15) = 10, aspect in [0.75, 1.5] -> h, w in {3, 4}; full depth 8.
    short_sizes = {short.sample_block_size(generator) for _ in range(200)}
    assert short_sizes <= {(8, h, w) for h in (3, 4) for w in (3, 4)}
    # Long range: area int(72 * 0.7) = 50 -> h = round(sqrt(50 * ar)) in 6..9 clamped to 8, w in 6..8.
    long_sizes = {long.sample_block_size(generator) for _ in range(200)}
    assert all(d == 8 and 6 <= h <= 8 and 6 <= w <= 8 for d, h, w in long_sizes)


def test_blocks_span_the_whole_depth_axis():
    for mask_gen in vjepa2_mask_generators():
        generator = _gen(1)
        block = mask_gen.sample_block_size(generator)
        for _ in range(20):
            kept = mask_gen.sample_kept_mask(block, generator)
            # A depth column (fixed axis0, axis1) is either entirely kept or entirely masked.
            assert torch.equal(kept.all(dim=2), kept.any(dim=2))
        context, target = mask_gen(1, generator)  # B = 1: nothing is truncated
        both = torch.cat([context, target], 1).sort(1).values
        assert torch.equal(both, torch.arange(576)[None])
        masked_columns = {int(t) // 8 for t in target[0]}
        kept_columns = {int(c) // 8 for c in context[0]}
        assert not masked_columns & kept_columns


@pytest.mark.parametrize("truncation", ["random", "lowest"])
def test_truncation_to_the_batch_minimum(truncation):
    mask_gen = VJEPA2BlockMaskGenerator(num_blocks=8, spatial_scale=(0.15, 0.15), truncation=truncation)
    context, target = mask_gen(6, _gen(7))
    # Replay the same draws to get the untruncated masks.
    replay = _gen(7)
    block = mask_gen.sample_block_size(replay)
    kept = [mask_gen.sample_kept_mask(block, replay).view(-1) for _ in range(6)]
    counts = torch.stack([k.sum() for k in kept])
    assert context.shape == (6, int(counts.min())) and target.shape == (6, int((576 - counts).min()))
    assert counts.min() < counts.max(), "this seed should give unequal counts, or the test proves nothing"
    for b in range(6):
        ctx, tgt = set(context[b].tolist()), set(target[b].tolist())
        assert len(ctx) == context.shape[1] and len(tgt) == target.shape[1]
        assert ctx <= set(kept[b].nonzero().flatten().tolist())
        assert tgt <= set((~kept[b]).nonzero().flatten().tolist())
        if truncation == "lowest":
            assert context[b].tolist() == kept[b].nonzero().flatten().tolist()[: context.shape[1]]
    if truncation == "random":
        largest = int(counts.argmax())
        lowest = kept[largest].nonzero().flatten()[: context.shape[1]]
        assert not torch.equal(context[largest].sort().values, lowest)


def test_empty_context_is_redrawn():
    # Plane 1x2, depth 2, two 1x1 full-depth tubes: half of the draws mask everything and must be redrawn; every
    # accepted sample keeps exactly one column (2 tokens).
    mask_gen = VJEPA2BlockMaskGenerator((1, 2, 2), num_blocks=2, spatial_scale=(0.5, 0.5), aspect_ratio=(1.0, 1.0))
    context, target = mask_gen(32, _gen(0))
    assert context.shape == (32, 2) and target.shape == (32, 2)
    assert set(map(tuple, context.sort(1).values.tolist())) <= {(0, 1), (2, 3)}


def test_context_that_can_never_survive_is_an_error():
    mask_gen = VJEPA2BlockMaskGenerator((2, 2, 2), num_blocks=1, spatial_scale=(1.0, 1.0))
    with pytest.raises(RuntimeError, match="masked the whole grid"):
        mask_gen(1, _gen(0))


def test_foreground_is_ignored_and_seed_reproduces():
    mask_gen = vjepa2_mask_generators()[0]
    fg = torch.ones(3, 576, dtype=torch.bool)
    a, b = mask_gen(3, _gen(2), fg), mask_gen(3, _gen(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
