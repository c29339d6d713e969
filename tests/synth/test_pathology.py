import pytest
import torch

from neurojepa_pl.synth.pathology import CLASSES, class_index, paint, take, volume_threshold


def test_volume_threshold_on_a_hand_computed_case():
    score = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    capacity = torch.tensor([1.0, 0.5, 1.0, 1.0, 1.0])
    # From the top: 1.0 (score 5), 1.5 (4), 2.5 (3): a target of 2.5 voxels is reached at score 3.
    threshold = volume_threshold(score, capacity, 2.5)
    assert 2.99 <= threshold <= 3.01
    # Half-way through the bin of score 3 for a target of 2.0.
    assert 3.0 <= volume_threshold(score, capacity, 2.0) <= 3.01


def test_volume_threshold_refuses_a_lesion_that_cannot_fit():
    with pytest.raises(ValueError, match="does not fit"):
        volume_threshold(torch.rand(10), torch.full((10,), 0.1), 5.0)


def test_paint_hits_the_target_volume():
    generator = torch.Generator().manual_seed(0)
    score = torch.randn(20000, generator=generator)
    capacity = torch.rand(20000, generator=generator)
    amount = paint(score, capacity, 1234.0, softness=0.2)
    assert float((amount * capacity).sum()) == pytest.approx(1234.0, rel=0.02)
    assert float(amount.min()) >= 0.0 and float(amount.max()) <= 1.0


def test_take_moves_fractions_and_conserves_the_total():
    fractions = torch.zeros(len(CLASSES), 3)
    fractions[class_index("gm")] = torch.tensor([0.5, 0.2, 0.0])
    fractions[class_index("wm")] = torch.tensor([0.5, 0.8, 1.0])
    total = fractions.sum(dim=0).clone()
    take(fractions, "oedema", torch.tensor([1.0, 0.5, 0.0]), {"wm": 1.0, "gm": 0.3})
    assert torch.allclose(fractions.sum(dim=0), total)
    assert torch.allclose(fractions[class_index("oedema")], torch.tensor([0.5 + 0.15, 0.4 + 0.03, 0.0]))
