"""JEPAMaskCollator: output layout, masks as a pure function of the batch's sample keys, worker independence."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from neurojepa_pl.data_modules.base import EpochSampler
from neurojepa_pl.data_modules.collate import JEPAMaskCollator, stack_masks
from neurojepa_pl.masks import foreground_token_map, paper_mask_generators, vjepa2_mask_generators

GRID = (4, 4, 4)
PATCH = 4
SIDE = 16  # 16^3 volumes, 4^3 patches -> 4x4x4 = 64 tokens, 16 context / 48 target


def _sample(i: int, epoch: int = 0, position: int | None = None) -> dict:
    generator = torch.Generator().manual_seed(i)
    image = torch.zeros(1, SIDE, SIDE, SIDE)
    image[:, 2:14, 3:13, 2:14] = 0.5 + torch.rand(1, 12, 10, 12, generator=generator)  # a "brain" with background
    key = torch.tensor([epoch, i if position is None else position])
    return {"image": image, "age": float(60 + i), "path": f"sub-{i:02d}.nii.gz", "sample_key": key}


def _batch_samples(batch_index: int, epoch: int = 0, size: int = 2, world: int = 1, rank: int = 0) -> list[dict]:
    """The samples rank ``rank`` gets for batch ``batch_index`` of ``epoch`` (positions r + W * (b * B + j))."""
    positions = [rank + world * (batch_index * size + j) for j in range(size)]
    return [_sample(j, epoch, p) for j, p in enumerate(positions)]


class _Volumes(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        epoch, position, index = key
        return _sample(index, epoch, position)


def _collator(**kwargs) -> JEPAMaskCollator:
    kwargs.setdefault("seed", 0)
    kwargs.setdefault("batch_size", 2)
    kwargs.setdefault("batches_per_epoch", 4)
    return JEPAMaskCollator(paper_mask_generators(GRID), patch_size=PATCH, **kwargs)


def _masks(batch: dict) -> list[torch.Tensor]:
    return [*batch["context_idx"], *batch["target_idx"]]


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(x, y) for x, y in zip(_masks(a), _masks(b)))


def test_output_layout():
    samples = [_sample(i) for i in range(3)]
    batch = _collator(batch_size=3)(samples)
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
    assert torch.equal(batch["sample_key"], torch.tensor([[0, 0], [0, 1], [0, 2]]))
    assert batch["mask_step"] == 0
    assert stack_masks(batch["context_idx"]).shape == (3, 3, 16)


def test_masks_are_a_function_of_the_sample_keys():
    a, b = _collator(), _collator()
    first = a(_batch_samples(0))
    assert _same(first, b(_batch_samples(0)))  # no hidden counter: a second call with the same keys repeats
    assert _same(first, a(_batch_samples(0))) and a(_batch_samples(0))["mask_step"] == 0
    second = a(_batch_samples(1))
    assert second["mask_step"] == 1 and not _same(first, second)
    next_epoch = a(_batch_samples(1, epoch=2))
    assert next_epoch["mask_step"] == 2 * 4 + 1 and not _same(second, next_epoch)
    # the order of the samples inside the batch does not matter (the smallest position names the batch)
    assert a(list(reversed(_batch_samples(1))))["mask_step"] == 1
    assert not _same(first, _collator(seed=1)(_batch_samples(0)))


def test_rank_comes_from_the_positions():
    # 2 ranks: rank r's batch b holds positions r + 2 * (2b + j); same global batch index, different masks.
    rank0 = _collator(world_size=2)(_batch_samples(1, world=2, rank=0))
    rank1 = _collator(world_size=2)(_batch_samples(1, world=2, rank=1))
    assert rank0["mask_step"] == rank1["mask_step"] == 1
    assert not _same(rank0, rank1)
    contexts, targets = _collator(world_size=2).draw_masks(2, rank1["foreground"], step=1, rank=1)
    assert all(torch.equal(x, y) for x, y in zip(contexts + targets, _masks(rank1)))
    with pytest.raises(ValueError, match="one epoch and one rank"):
        _collator(world_size=2)([_sample(0, 0, 0), _sample(1, 0, 1)])
    with pytest.raises(ValueError, match="one epoch and one rank"):
        _collator()([_sample(0, 0, 0), _sample(1, 1, 1)])


def test_fixed_masks_ignore_the_epoch():
    fixed = _collator(fixed=True)
    assert _same(fixed(_batch_samples(1, epoch=0)), fixed(_batch_samples(1, epoch=5)))
    assert fixed(_batch_samples(1, epoch=5))["mask_step"] == 1


def test_a_short_last_batch_keeps_its_index():
    short = _collator(batch_size=4, batches_per_epoch=3)([_sample(0, 0, 8)])  # positions 8.. = batch 2 of size 4
    assert short["mask_step"] == 2


def test_draw_masks_is_the_pure_core():
    collator = _collator()
    batch = collator(_batch_samples(3))
    contexts, targets = collator.draw_masks(2, batch["foreground"], step=3, rank=0)
    assert all(torch.equal(x, y) for x, y in zip(contexts + targets, _masks(batch)))


def test_foreground_awareness_switch():
    samples = _batch_samples(0)
    aware, plain = _collator(), _collator(foreground_aware=False)
    a, p = aware(samples), plain(samples)
    assert torch.equal(a["foreground"], p["foreground"])  # the map is returned either way
    contexts, _ = plain.draw_masks(2, None, step=0, rank=0)
    assert all(torch.equal(x, y) for x, y in zip(contexts, p["context_idx"]))
    assert not _same(a, p)


@pytest.mark.parametrize("persistent", [False, True])
def test_workers_see_the_same_masks_as_the_main_process(persistent):
    # Each worker collates whole batches whose masks depend on their sample keys only: any num_workers (and
    # persistent workers across epochs) gives the same sequence.
    def run(num_workers: int) -> list[dict]:
        sampler = EpochSampler(8, seed=3)
        loader = DataLoader(
            _Volumes(),
            batch_size=2,
            sampler=sampler,
            num_workers=num_workers,
            collate_fn=_collator(),
            persistent_workers=persistent and num_workers > 0,
        )
        batches = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            batches += list(loader)
        return batches

    main, workers = run(0), run(2)
    assert [b["mask_step"] for b in workers] == list(range(8))
    assert all(_same(x, y) for x, y in zip(main, workers, strict=True))
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(main, workers))


def test_pickle_round_trip_keeps_the_masks():
    collator = _collator(seed=3)
    clone = pickle.loads(pickle.dumps(collator))
    assert _same(collator(_batch_samples(2)), clone(_batch_samples(2)))


def test_uneven_vjepa2_masks_stay_a_list():
    collator = JEPAMaskCollator(
        vjepa2_mask_generators(GRID), patch_size=PATCH, seed=0, batch_size=4, batches_per_epoch=2
    )
    batch = collator([_sample(i) for i in range(4)])
    assert len(batch["context_idx"]) == 2
    # Short- and long-range masks keep different numbers of tokens, so they cannot be stacked.
    assert batch["context_idx"][0].shape[1] > batch["context_idx"][1].shape[1]
    with pytest.raises(ValueError, match="different shapes"):
        stack_masks(batch["context_idx"])


def test_errors_name_the_problem():
    collator = _collator()
    with pytest.raises(ValueError, match="keys 'image' and 'sample_key'"):
        collator([{"img": torch.zeros(1, SIDE, SIDE, SIDE)}])
    with pytest.raises(ValueError, match="emit_sample_key"):
        collator([{"image": torch.zeros(1, SIDE, SIDE, SIDE)}])
    with pytest.raises(ValueError, match="token grid"):
        collator([{"image": torch.zeros(1, 24, 24, 24), "sample_key": torch.tensor([0, 0])}])
    with pytest.raises(ValueError, match="collator writes"):
        collator([{**_sample(0), "foreground": 1}])
    with pytest.raises(ValueError, match="empty batch"):
        collator([])
    with pytest.raises(ValueError, match="one token grid"):
        JEPAMaskCollator(
            [*paper_mask_generators(GRID), *paper_mask_generators((8, 9, 8))],
            patch_size=PATCH,
            batch_size=2,
            batches_per_epoch=1,
        )
    with pytest.raises(ValueError, match="world_size"):
        _collator(world_size=0)
    with pytest.raises(TypeError, match="batch_size"):
        _collator(batch_size=0)
