"""Masking presets and full masking specs (docs/method.md §5.1): the presets are the paper's and V-JEPA 2's
generators, a list of generators builds exactly those, and bad entries are named."""

from __future__ import annotations

import pytest
import torch

from neurojepa_pl.masks import paper_mask_generators, vjepa2_mask_generators
from neurojepa_pl.masks.presets import build_mask_generators, masking_spec

GRID = (8, 9, 8)


def test_presets_are_the_paper_and_vjepa2_generators():
    assert [repr(g) for g in build_mask_generators("multiscale", GRID)] == [
        repr(g) for g in paper_mask_generators(GRID)
    ]
    assert [repr(g) for g in build_mask_generators("vjepa2", GRID)] == [repr(g) for g in vjepa2_mask_generators(GRID)]
    spec = masking_spec("multiscale")
    assert spec["preset"] == "multiscale"
    assert [(g["num_blocks"], g["spatial_scale"]) for g in spec["generators"]] == [
        (32, [0.0, 0.2]),
        (16, [0.2, 0.5]),
        (4, [0.5, 0.7]),
    ]
    assert all(g["depth_scale"] == [0.0, 1.0] and g["aspect_ratio"] == [0.75, 1.5] for g in spec["generators"])


def test_a_spec_builds_the_same_masks_as_its_preset():
    spec = masking_spec("multiscale")
    from_spec = build_mask_generators(spec, GRID, mask_ratio=0.6, foreground_aware=False)
    from_name = build_mask_generators("multiscale", GRID, mask_ratio=0.6, foreground_aware=False)
    for a, b in zip(from_spec, from_name):
        ctx_a, tgt_a = a(2, torch.Generator().manual_seed(1))
        ctx_b, tgt_b = b(2, torch.Generator().manual_seed(1))
        assert torch.equal(ctx_a, ctx_b) and torch.equal(tgt_a, tgt_b)
        assert tgt_a.shape == (2, int(576 * 0.6))  # the run-level mask ratio reached every generator
    assert masking_spec(spec) == spec  # complete: taken as it is


def test_a_list_of_generators_takes_defaults_for_what_it_omits():
    spec = masking_spec([{"kind": "multiscale", "num_blocks": 8, "spatial_scale": [0.1, 0.3]}, {"kind": "vjepa2",
                         "num_blocks": 2, "spatial_scale": [0.7, 0.7]}])  # fmt: skip
    assert spec["preset"] is None
    assert spec["generators"][0] == {"kind": "multiscale", "num_blocks": 8, "spatial_scale": [0.1, 0.3],
                                     "depth_scale": [0.0, 1.0], "aspect_ratio": [0.75, 1.5]}  # fmt: skip
    assert spec["generators"][1]["truncation"] == "random" and spec["generators"][1]["depth_scale"] == [1.0, 1.0]
    assert len(build_mask_generators(spec, GRID)) == 2


@pytest.mark.parametrize(
    "value, message",
    [
        ("random", "masking must be one of ('multiscale', 'vjepa2') or a list of generators; found 'random'."),
        (
            [{"kind": "tube"}],
            "Expected masking generator 0's kind to be one of ['multiscale', 'vjepa2']; found 'tube'.",
        ),
        (
            [{"kind": "multiscale", "num_blocks": 4, "spatial_scale": [0, 1], "mask_ratio": 0.5}],
            "Unknown setting(s) ['mask_ratio'] for masking generator 0 (kind multiscale) (['mask_ratio'] are set once "
            "for all generators by the data module); it takes ['aspect_ratio', 'depth_scale', 'num_blocks', "
            "'spatial_scale'].",
        ),
        ([{"kind": "multiscale", "num_blocks": 4}], "masking generator 0 (kind multiscale) lacks ['spatial_scale']."),
        ([], "A masking needs at least one generator."),
    ],
)
def test_bad_maskings_are_named(value, message):
    with pytest.raises(ValueError) as err:
        masking_spec(value)
    assert str(err.value) == message
