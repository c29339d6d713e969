"""JEPAMaskCollator: output layout, seeding by (seed, rank, step), fast-forward, worker independence, pickling."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from neurojepa_pl.data_modules.collate import JEPAMaskCollator, stack_masks
from neurojepa_pl.masks import foreground_token_map, paper_mask_generators, vjepa2_mask_generators

GRID = (4, 4, 4)
PATCH = 4
SIDE = 16  # 16^3 volumes, 4^3 patches -> 4x4x4 = 64 tokens, 16 context / 48 target


def _sample(i: int) -> dict:
    generator = torch.Generator().manual_seed(i)
    image = torch.zeros(1, SIDE, SIDE, SIDE)
    image[:, 2:14, 3:13, 2:14] = 0.5 + torch.rand(1, 12, 10, 12, generator=generator)  # a "brain" with background
    return {"image": image, "age": float(60 + i), "path": f"sub-{i:02d}.nii.gz"}


class _Volumes(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        return _sample(i)


def _collator(**kwargs) -> JEPAMaskCollator:
    kwargs.setdefault("seed", 0)
    return JEPAMaskCollator(paper_mask_generators(GRID), patch_size=PATCH, **kwargs)


def _masks(batch: dict) -> list[torch.Tensor]:
    return [*batch["context_idx"], *batch["target_idx"]]


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(x, y) for x, y in zip(_masks(a), _masks(b)))


def test_output_layout():
    samples = [_sample(i) for i in range(3)]
    batch = _collator()(samples)
    assert batch["image"].shape == (3, 1, SIDE, SIDE, SIDE) and type(batch["image"]) is torch.Tensor
    assert len(batch["context_idx"]) == len(batch["target_idx"]) == 3
    for context, target in zip(batch["context_idx"], batch["target_idx"]):
        assert context.shape == (3, 16) and target.shape == (3, 48) and context.dtype == torch.int64
        assert torch.equal(torch.cat([context, target], 1).sort(1).values, torch.arange(64).expand(3, 64))
    assert batch["foreground"].dtype == torch.bool and batch["foreground"].shape == (3, 64)
    assert torch.equal(batch["foreground"], foreground_token_map(batch["image"], PATCH))
    assert 0 < batch["foreground"].sum() < 3 * 64
    assert torch.equal(batch["age"], torch.tensor([60.0, 61.0, 62.0], dtype=batch["age"].dtype))
    assert batch["path"] == ["sub-00.nii.gz", "sub-01.nii.gz", "sub-02.nii.gz"]
    assert batch["mask_step"] == 0
    assert stack_masks(batch["context_idx"]).shape == (3, 3, 16)


def test_masks_are_a_function_of_seed_rank_and_step():
    samples = [_sample(i) for i in range(2)]
    a, b = _collator(), _collator()
    first_a, first_b = a(samples), b(samples)
    assert _same(first_a, first_b)
    second_a = a(samples)
    assert second_a["mask_step"] == 1 and not _same(first_a, second_a)
    other_rank = _collator()
    other_rank.set_rank(1)
    assert not _same(first_a, other_rank(samples))
    assert not _same(first_a, _collator(seed=1)(samples))


def test_draw_masks_is_the_pure_core():
    collator = _collator()
    batch = collator([_sample(i) for i in range(2)])
    contexts, targets = collator.draw_masks(2, batch["foreground"], step=0, rank=0)
    assert all(torch.equal(x, y) for x, y in zip(contexts + targets, _masks(batch)))


def test_fast_forward_reproduces_the_sequence():
    samples = [_sample(i) for i in range(2)]
    running = _collator()
    sequence = [running(samples) for _ in range(5)]
    resumed = _collator()
    resumed.set_step(3)
    assert _same(resumed(samples), sequence[3]) and _same(resumed(samples), sequence[4])
    epoch = _collator()
    epoch.set_epoch(1, batches_per_epoch=2)
    assert _same(epoch(samples), sequence[2])


def test_foreground_awareness_switch():
    samples = [_sample(i) for i in range(2)]
    aware, plain = _collator(), _collator(foreground_aware=False)
    a, p = aware(samples), plain(samples)
    assert torch.equal(a["foreground"], p["foreground"])  # the map is returned either way
    contexts, _ = plain.draw_masks(2, None, step=0, rank=0)
    assert all(torch.equal(x, y) for x, y in zip(contexts, p["context_idx"]))
    assert not _same(a, p)


def test_workers_see_the_same_masks_as_the_main_process():
    # Worker w collates global batches w, w + W, ...; its masks depend on the global batch index only, so any
    # num_workers gives the same sequence.
    def run(num_workers: int) -> list[dict]:
        loader = DataLoader(_Volumes(), batch_size=2, num_workers=num_workers, collate_fn=_collator())
        return list(loader)

    main, workers = run(0), run(2)
    assert [b["mask_step"] for b in workers] == [0, 1, 2, 3]
    assert all(_same(x, y) for x, y in zip(main, workers))
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(main, workers))


def test_pickle_round_trip_keeps_state_and_masks():
    samples = [_sample(i) for i in range(2)]
    collator = _collator(seed=3)
    collator.set_step(7)
    clone = pickle.loads(pickle.dumps(collator))
    assert clone.rank == 0
    assert _same(collator(samples), clone(samples))


def test_uneven_vjepa2_masks_stay_a_list():
    collator = JEPAMaskCollator(vjepa2_mask_generators(GRID), patch_size=PATCH, seed=0)
    batch = collator([_sample(i) for i in range(4)])
    assert len(batch["context_idx"]) == 2
    # Short- and long-range masks keep different numbers of tokens, so they cannot be stacked.
    assert batch["context_idx"][0].shape[1] > batch["context_idx"][1].shape[1]
    with pytest.raises(ValueError, match="different shapes"):
        stack_masks(batch["context_idx"])


def test_errors_name_the_problem():
    collator = _collator()
    with pytest.raises(ValueError, match="key 'image'"):
        collator([{"img": torch.zeros(1, SIDE, SIDE, SIDE)}])
    with pytest.raises(ValueError, match="token grid"):
        collator([{"image": torch.zeros(1, 24, 24, 24)}])
    with pytest.raises(ValueError, match="collator writes"):
        collator([{**_sample(0), "foreground": 1}])
    with pytest.raises(ValueError, match="empty batch"):
        collator([])
    with pytest.raises(ValueError, match="one token grid"):
        JEPAMaskCollator([*paper_mask_generators(GRID), *paper_mask_generators((8, 9, 8))], patch_size=PATCH, seed=0)
    with pytest.raises(ValueError, match="rank"):
        collator.set_rank(-1)
