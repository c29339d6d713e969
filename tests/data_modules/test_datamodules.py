"""EpochSampler, sampling weights, few-shot draws, FinetuneDataModule and PretrainDataModule (with a real Trainer)."""

from __future__ import annotations

import csv
import logging

import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from torchdata.stateful_dataloader import StatefulDataLoader
from trainers import tiny_trainer
from volume_factory import TINY_CROP, TINY_PATCH, make_cohort, truncate_file

from neurojepa_pl.data import ManifestError
from neurojepa_pl.data_modules.base import EpochSampler, TooManyBadScans
from neurojepa_pl.data_modules.datasets import TooManyFailedScans
from neurojepa_pl.data_modules.finetune import (
    FinetuneDataModule,
    class_balanced_weights,
    few_shot_subset,
    multilabel_balanced_weights,
)
from neurojepa_pl.data_modules.pretrain import PretrainDataModule
from neurojepa_pl.errors import UserError


def _subjects(dataset):
    return {r["subject_id"] for r in dataset.records}


# ---------------------------------------------------------------------------------------------------- sampler
def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    a, b = EpochSampler(20, seed=3), EpochSampler(20, seed=3)
    assert list(a) == list(b)
    first = [k[2] for k in a]
    assert sorted(first) == list(range(20))
    a.set_epoch(1)
    second = [k[2] for k in a]
    assert second != first and sorted(second) == list(range(20))
    assert [k[:2] for k in a] == [(1, p) for p in range(20)]
    b.set_epoch(1)
    assert [k[2] for k in b] == second
    assert [k[2] for k in EpochSampler(5, shuffle=False)] == [0, 1, 2, 3, 4]


def test_epoch_sampler_shards_cover_the_epoch():
    shards = [list(EpochSampler(10, seed=1, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]  # padded to 12 like DistributedSampler
    positions = sorted(k[1] for s in shards for k in s)
    assert positions == list(range(12))  # padded positions are new positions ...
    order = EpochSampler(10, seed=1).epoch_order(0).tolist()
    assert all(k[2] == order[k[1] % 10] for s in shards for k in s)  # ... wrapping around the order
    dropped = [list(EpochSampler(10, seed=1, num_replicas=3, rank=r, drop_last=True)) for r in range(3)]
    assert [len(s) for s in dropped] == [3, 3, 3]


def test_epoch_sampler_weighted_draws():
    labels = np.array([1] + [0] * 9)
    sampler = EpochSampler(10, seed=0, weights=class_balanced_weights(labels), num_draws=4000)
    draws = np.array([k[2] for k in sampler])
    assert len(draws) == 4000
    assert abs(labels[draws].mean() - 0.5) < 0.03
    with pytest.raises(ValueError, match="needs weights"):
        EpochSampler(10, num_draws=20)
    with pytest.raises(ValueError, match="weights sum to 0"):
        EpochSampler(3, weights=[0.0, 0.0, 0.0])


def test_epoch_sampler_keys_follow_set_epoch():
    sampler = EpochSampler(4, seed=1)
    sampler.set_epoch(2)
    keys = list(sampler)
    assert sampler.epoch == 2 and [k[:2] for k in keys] == [(2, p) for p in range(4)]
    assert sorted(k[2] for k in keys) == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------------- pure functions
def test_class_balanced_weights_hand_computed():
    np.testing.assert_allclose(class_balanced_weights([0, 0, 0, 1]), [2 / 3, 2 / 3, 2 / 3, 2.0])
    np.testing.assert_allclose(class_balanced_weights([2, 0, 1, 2]), [2 / 3, 4 / 3, 4 / 3, 2 / 3])


def test_multilabel_weights_hand_computed():
    labels = np.array([[1, 0], [0, 0], [1, 1], [0, 0]], dtype=float)
    # class weights 4/2 = 2 and 4/1 = 4; rows: 2, all-negative, mean(2, 4) = 3, all-negative (0.1 * median(2, 3))
    raw = np.array([2.0, 0.25, 3.0, 0.25])
    np.testing.assert_allclose(multilabel_balanced_weights(labels), raw / raw.mean(), rtol=1e-5)
    mask = np.array([[True, True], [True, True], [True, False], [True, True]])  # row 2's second label is missing
    # class weights 4/2 = 2 and 4/0 (no known positive) -> row 2 now only counts label 0: weight 2
    raw = np.array([2.0, 0.2, 2.0, 0.2])
    np.testing.assert_allclose(multilabel_balanced_weights(labels, mask), raw / raw.mean(), rtol=1e-5)


def test_few_shot_subset_classification():
    df = pd.DataFrame({"y": [0, 0, 0, 0, 1, 1, 2], "id": range(7)})
    sub = few_shot_subset(df, "multiclass", "y", k=2, seed=0)
    assert sorted(sub["y"].tolist()) == [0, 0, 1, 1, 2]  # all of class 2 (fewer than k)
    assert sub.index.is_unique
    again = few_shot_subset(df, "multiclass", "y", k=2, seed=0)
    assert sub.index.tolist() == again.index.tolist()
    picks = {tuple(sorted(few_shot_subset(df, "multiclass", "y", k=2, seed=s).index)) for s in range(8)}
    assert len(picks) > 1
    with pytest.raises(ValueError, match="not multilabel|defined for"):
        few_shot_subset(df, "survival", "y", k=1, seed=0)


def test_few_shot_subset_regression_quartiles():
    df = pd.DataFrame({"age": np.arange(20, 60, dtype=float)})  # 40 ages, 10 per quartile
    sub = few_shot_subset(df, "regression", "age", k=3, seed=1)
    quartile = np.searchsorted([30, 40, 50], sub["age"].to_numpy(), side="right")
    assert np.bincount(quartile, minlength=4).tolist() == [3, 3, 3, 3]


# ---------------------------------------------------------------------------------------------------- fine-tuning
@pytest.fixture(scope="module")
def binary_cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("binary"), n_subjects=10)


def test_finetune_binary_batches_and_splits(binary_cohort, tiny_dm_kwargs):
    dm = FinetuneDataModule(str(binary_cohort), task="binary", label_columns=["tumour"], **tiny_dm_kwargs)
    dm.setup("fit")
    dm.setup("test")
    train, val, test = (dm.datasets[s] for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (6, 2, 2)
    assert _subjects(train) == {f"{i:03d}" for i in range(6)} and _subjects(test) == {"008", "009"}
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, *TINY_CROP) and batch["image"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (2,)
    assert batch["label"].tolist() == [int(s) % 2 for s in batch["subject_id"]]
    assert batch["age"].dtype == torch.float32 and len(batch["path"]) == 2
    assert dm.num_classes == 2
    # evaluation is deterministic and complete
    first = [b["image"] for b in dm.val_dataloader()]
    second = [b["image"] for b in dm.val_dataloader()]
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))
    predicted = [s for b in dm.predict_dataloader() for s in b["subject_id"]] if "predict" in dm.datasets else None
    assert predicted is None  # predict is only built by setup("predict")
    dm.setup("predict")
    assert [s for b in dm.predict_dataloader() for s in b["subject_id"]] == ["008", "009"]


def test_finetune_drops_and_reports_nan_labels(tmp_path, tiny_dm_kwargs, caplog):
    manifest = make_cohort(tmp_path, n_subjects=10, labels=lambda s: {"tumour": "" if s == 3 else s % 2})
    dm = FinetuneDataModule(str(manifest), task="binary", label_columns=["tumour"], **tiny_dm_kwargs)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert "dropping 1 of 10 row(s) without a usable label" in caplog.text
    assert "row 3 (003/ses-0): tumour is empty" in caplog.text
    assert dm.dropped_rows["subject_id"].tolist() == ["003"]
    assert "003" not in _subjects(dm.datasets["train"]) and len(dm.datasets["train"]) == 5


def test_finetune_automatic_stratified_patient_split(tmp_path, tiny_dm_kwargs, caplog):
    manifest = make_cohort(tmp_path, n_subjects=10, sessions=2, with_split=False)
    dm = FinetuneDataModule(str(manifest), task="binary", label_columns=["tumour"], **tiny_dm_kwargs)
    with caplog.at_level(logging.WARNING):
        frame = dm.load_frame()  # the split is decided before any image is loaded
    assert "has no split column: assigning a patient-level split (0.6, 0.2, 0.2) with seed 0" in caplog.text
    groups = [set(frame.loc[frame["split"] == s, "subject_id"]) for s in ("train", "val", "test")]
    assert [len(g) for g in groups] == [6, 2, 2]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert (frame["split"] == "train").sum() == 12  # both sessions of each training subject
    for subjects in groups:  # stratified: both classes everywhere
        assert {int(s) % 2 for s in subjects} == {0, 1}
    dm.setup("test")
    assert _subjects(dm.datasets["test"]) == groups[2] and len(dm.datasets["test"]) == 4


def test_finetune_multilabel_masks_missing_labels(tmp_path, tiny_dm_kwargs):
    def labels(s):
        return {"wmh": s % 2, "infarct": "" if s == 0 else int(s % 3 == 0)}

    manifest = make_cohort(tmp_path, n_subjects=10, labels=labels)
    dm = FinetuneDataModule(
        str(manifest), task="multilabel", label_columns=["wmh", "infarct"], **{**tiny_dm_kwargs, "batch_size": 6}
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["label"].shape == (6, 2) and batch["label"].dtype == torch.float32
    assert batch["label_mask"].dtype == torch.bool
    for sid, label, mask in zip(batch["subject_id"], batch["label"], batch["label_mask"], strict=True):
        s = int(sid)
        assert label[0] == s % 2 and mask[0]
        assert bool(mask[1]) == (s != 0) and label[1] == (0 if s == 0 else int(s % 3 == 0))
    assert dm.num_classes == 2


def test_finetune_regression_and_survival_labels(tmp_path, tiny_dm_kwargs):
    def labels(s):
        return {"age": 40.5 + s, "survival_time": 0 if s == 1 else 100 * (s + 1), "survival_event": s % 2}

    manifest = make_cohort(tmp_path, n_subjects=10, labels=labels)
    reg = FinetuneDataModule(str(manifest), task="regression", label_columns=["age"], **tiny_dm_kwargs)
    reg.setup("fit")
    batch = next(iter(reg.train_dataloader()))
    assert batch["label"].dtype == torch.float32
    assert batch["label"].tolist() == [40.5 + int(s) for s in batch["subject_id"]]

    surv = FinetuneDataModule(
        str(manifest),
        task="survival",
        time_column="survival_time",
        event_column="survival_event",
        **tiny_dm_kwargs,
    )
    surv.setup("fit")
    assert surv.dropped_rows["drop_reason"].tolist() == ["survival_time <= 0"]
    batch = next(iter(surv.train_dataloader()))
    assert "label" not in batch
    assert batch["time"].dtype == torch.float32 and batch["event"].dtype == torch.int64
    assert batch["time"].tolist() == [100.0 * (int(s) + 1) for s in batch["subject_id"]]
    assert batch["event"].tolist() == [int(s) % 2 for s in batch["subject_id"]]


def test_finetune_multiclass_out_of_range_label_stops_setup(tmp_path, tiny_dm_kwargs):
    manifest = make_cohort(tmp_path, n_subjects=5, labels=lambda s: {"grade": s % 4})
    dm = FinetuneDataModule(str(manifest), task="multiclass", label_columns=["grade"], num_classes=3, **tiny_dm_kwargs)
    with pytest.raises(ManifestError, match=r"label 'grade' = 3; expected an integer class in 0\.\.2"):
        dm.setup("fit")


def test_few_shot_draws_only_from_training_split(binary_cohort, tiny_dm_kwargs):
    picks = set()
    for seed in range(4):
        dm = FinetuneDataModule(
            str(binary_cohort), task="binary", label_columns=["tumour"], k_shot=1, few_shot_seed=seed, **tiny_dm_kwargs
        )
        dm.setup("fit")
        train = dm.datasets["train"]
        assert len(train) == 2 and sorted(int(r["label"]) for r in train.records) == [0, 1]
        assert _subjects(train) <= {f"{i:03d}" for i in range(6)}
        assert len(dm.datasets["val"]) == 2  # untouched
        picks.add(frozenset(_subjects(train)))
    assert len(picks) > 1


def test_class_balanced_sampling(tmp_path, tiny_dm_kwargs):
    manifest = make_cohort(tmp_path, n_subjects=10, labels=lambda s: {"tumour": int(s == 0)})  # 1 of 6 train positive
    dm = FinetuneDataModule(
        str(manifest), task="binary", label_columns=["tumour"], samples_per_epoch=600, **tiny_dm_kwargs
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader.sampler) == 600
    labels = np.array([int(r["label"]) for r in dm.datasets["train"].records])
    draws = dm.train_sampler.epoch_order(0).numpy()
    assert abs(labels[draws].mean() - 0.5) < 0.07
    plain = FinetuneDataModule(
        str(manifest), task="binary", label_columns=["tumour"], class_balanced=False, **tiny_dm_kwargs
    )
    plain.setup("fit")
    plain.train_dataloader()
    assert sorted(plain.train_sampler.epoch_order(0).tolist()) == list(range(6))


def test_failed_scans_over_the_limit_stop_the_run(tmp_path, tiny_dm_kwargs):
    manifest = make_cohort(tmp_path, n_subjects=10)
    bad = tmp_path / "sub-001/ses-0/anat/sub-001_ses-0_T1w.nii.gz"
    truncate_file(bad)
    dm = FinetuneDataModule(str(manifest), task="binary", label_columns=["tumour"], **tiny_dm_kwargs)
    with pytest.raises(TooManyFailedScans, match=r"1 of 8 scans cannot be used \(12\.5%\), more than max_fai") as info:
        dm.setup("fit")
    assert isinstance(info.value, TooManyBadScans) and isinstance(info.value, UserError)
    (problem,) = info.value.problems
    assert (problem.kind, problem.path) == ("truncated", str(bad))
    assert f"{bad} | truncated: the compressed data ends early (EOFError:" in info.value.message
    assert info.value.fix.endswith("or set data.init_args.max_failed_fraction: 0.125 to skip them.")
    quarantine = tiny_dm_kwargs["quarantine_path"]
    assert [r["path"] for r in csv.DictReader(open(quarantine))] == [str(bad)]

    tolerant = FinetuneDataModule(
        str(manifest), task="binary", label_columns=["tumour"], **{**tiny_dm_kwargs, "max_failed_fraction": 0.2}
    )
    tolerant.setup("fit")
    assert len(tolerant.datasets["train"]) == 5 and "001" not in _subjects(tolerant.datasets["train"])
    assert tolerant.quarantine_file is not None and tolerant.quarantine_file.is_file()


def test_missing_files_are_reported_with_the_unreadable_ones(tmp_path, tiny_dm_kwargs):
    manifest = make_cohort(tmp_path, n_subjects=10)
    manifest.write_text(manifest.read_text().replace("sub-002/ses-0/anat/sub-002_ses-0_T1w", "sub-002/missing"))
    truncated = truncate_file(tmp_path / "sub-004/ses-0/anat/sub-004_ses-0_T1w.nii.gz")
    dm = FinetuneDataModule(str(manifest), task="binary", label_columns=["tumour"], **tiny_dm_kwargs)
    with pytest.raises(TooManyBadScans, match=r"^2 of 8 scans cannot be used \(25\.0%\)") as info:
        dm.setup("fit")
    assert [(p.kind, p.path) for p in info.value.problems] == [
        ("missing_file", str(tmp_path / "sub-002/missing.nii.gz")),
        ("truncated", str(truncated)),
    ]
    row = next(line for line in info.value.message.splitlines() if line.startswith(str(tmp_path / "sub-002")))
    path, reason, fix = (cell.strip() for cell in row.split("|"))
    assert (path, reason) == (str(tmp_path / "sub-002/missing.nii.gz"), "missing_file: the file does not exist")
    assert fix.startswith("correct the path (relative paths are resolved")  # the rest wraps onto the next line

    tolerant = FinetuneDataModule(
        str(manifest), task="binary", label_columns=["tumour"], **{**tiny_dm_kwargs, "max_failed_fraction": 0.25}
    )
    tolerant.setup("fit")
    assert _subjects(tolerant.datasets["train"]) == {"000", "001", "003", "005"}
    quarantined = [r["path"] for r in csv.DictReader(open(tiny_dm_kwargs["quarantine_path"]))]
    assert quarantined == [str(tmp_path / "sub-002/missing.nii.gz"), str(truncated)]


def test_manifest_errors_stop_setup_with_the_missing_files_in_the_same_report(tmp_path, tiny_dm_kwargs):
    manifest = make_cohort(tmp_path, n_subjects=5)
    text = manifest.read_text().replace("sub-002/ses-0/anat/sub-002_ses-0_T1w.nii.gz", "sub-002/missing.nii.gz")
    manifest.write_text(text.replace("sub-003/ses-0/anat/sub-003_ses-0_T1w.nii.gz,val", "sub-003/x.nii.gz,valid"))
    dm = FinetuneDataModule(str(manifest), task="binary", label_columns=["tumour"], **tiny_dm_kwargs)
    with pytest.raises(ManifestError) as info:
        dm.check_manifest()  # what `neurojepa` runs before building the model; setup runs it again
    assert info.value.report.kinds() == {"missing_file": 2, "bad_split": 1}
    with pytest.raises(ManifestError):
        dm.setup("fit")


def test_a_manifest_whose_files_all_miss_stops_before_loading(tmp_path, tiny_dm_kwargs):
    manifest = make_cohort(tmp_path, n_subjects=5)
    manifest.write_text(manifest.read_text().replace("sub-", "elsewhere/sub-"))
    dm = FinetuneDataModule(str(manifest), task="binary", label_columns=["tumour"], **tiny_dm_kwargs)
    with pytest.raises(ManifestError) as info:
        dm.check_manifest()
    assert info.value.report.kinds() == {"missing_file": 5}
    assert "relative paths are resolved against the manifest's folder" in info.value.message


def test_finetune_modality_selection(tmp_path, tiny_dm_kwargs):
    manifest = make_cohort(tmp_path, n_subjects=5, modalities=("T1w", "FLAIR"))
    with pytest.raises(ValueError, match=r"has modalities \['FLAIR', 'T1w'\]; unimodal fine-tuning needs one"):
        FinetuneDataModule(str(manifest), task="binary", label_columns=["tumour"], **tiny_dm_kwargs).setup("fit")
    dm = FinetuneDataModule(str(manifest), task="binary", label_columns=["tumour"], modality="FLAIR", **tiny_dm_kwargs)
    dm.setup("fit")
    assert {r["modality"] for r in dm.datasets["train"].records} == {"FLAIR"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "ordinal"}, "task must be one of"),
        ({"task": "binary", "label_columns": ["a", "b"]}, "exactly one label column"),
        ({"task": "multiclass", "label_columns": ["a"]}, "num_classes >= 2"),
        ({"task": "survival"}, "time_column and event_column"),
        ({"task": "multilabel", "label_columns": ["a"], "k_shot": 2}, "k_shot is defined"),
        ({"task": "regression", "label_columns": ["a"], "samples_per_epoch": 10}, "samples_per_epoch"),
    ],
)
def test_finetune_argument_checks(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FinetuneDataModule("unused.csv", **kwargs)


# ---------------------------------------------------------------------------------------------------- pretraining
@pytest.fixture(scope="module")
def mixed_cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("mixed"), n_subjects=5, modalities=("T1w", "T2w", "FLAIR"))


def _pretrain(manifest, kwargs, **extra):
    return PretrainDataModule(str(manifest), patch_size=TINY_PATCH, **{**kwargs, **extra})


def _finished(dm, loader):
    """The loader's batches as the training step sees them: after the data module's ``on_after_batch_transfer``
    (augmentation, foreground and masks with the default ``augment_on="device"``; nothing with ``"workers"``)."""
    for batch in loader:
        yield dm.on_after_batch_transfer(batch, 0)


def test_pretrain_batches_mix_modalities_with_masks(mixed_cohort, tiny_dm_kwargs):
    dm = _pretrain(mixed_cohort, tiny_dm_kwargs)
    dm.setup("fit")
    assert {r["modality"] for r in dm.datasets["train"].records} == {"T1w", "T2w", "FLAIR"}
    assert len(dm.datasets["train"]) == 9  # subjects 000-002, three modalities each
    loader = dm.train_dataloader()
    assert loader.drop_last and len(loader) == 4
    batch = next(_finished(dm, loader))
    assert batch["image"].shape == (2, 1, *TINY_CROP)
    assert [c.shape for c in batch["context_idx"]] == [(2, 144)] * 3
    assert [t.shape for t in batch["target_idx"]] == [(2, 432)] * 3
    assert batch["foreground"].shape == (2, 576) and batch["foreground"].dtype == torch.bool
    assert 0 < int(batch["foreground"].sum()) < 2 * 576
    for ctx, tgt in zip(batch["context_idx"], batch["target_idx"], strict=True):
        both = torch.cat([ctx, tgt], dim=1).sort(dim=1).values
        assert torch.equal(both, torch.arange(576).expand(2, -1))


def test_pretrain_mask_step_follows_epoch_and_resume(mixed_cohort, tiny_dm_kwargs):
    dm = _pretrain(mixed_cohort, tiny_dm_kwargs)
    dm.setup("fit")
    loader = dm.train_dataloader()
    epoch0 = [(b["mask_step"], b["path"]) for b in _finished(dm, loader)]
    assert [s for s, _ in epoch0] == [0, 1, 2, 3]
    loader.sampler.set_epoch(1)  # what Lightning does at every epoch start
    epoch1 = [(b["mask_step"], b["path"], b["context_idx"][0]) for b in _finished(dm, loader)]
    assert [s for s, _, _ in epoch1] == [4, 5, 6, 7] and [p for _, p, _ in epoch1] != [p for _, p in epoch0]

    resumed = _pretrain(mixed_cohort, tiny_dm_kwargs)
    resumed.load_state_dict({"global_step": 4, "epoch": 1, "seed": 0, "augment_on": "device"})
    resumed.setup("fit")
    again = [(b["mask_step"], b["path"], b["context_idx"][0]) for b in _finished(resumed, resumed.train_dataloader())]
    assert [(s, p) for s, p, _ in again] == [(s, p) for s, p, _ in epoch1]
    assert all(torch.equal(a[2], r[2]) for a, r in zip(again, epoch1, strict=True))


@pytest.mark.parametrize("num_workers, augment_on", [(0, "device"), (2, "device"), (2, "workers")])
def test_pretrain_loader_resumes_mid_epoch(mixed_cohort, tiny_dm_kwargs, num_workers, augment_on):
    """The train loader's state after two batches continues with batch 2 (same samples and masks) in a new loader."""
    kwargs = {**tiny_dm_kwargs, "num_workers": num_workers, "augment_on": augment_on}
    dm = _pretrain(mixed_cohort, kwargs)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, StatefulDataLoader)
    full, state, last = [], None, None
    for i, batch in enumerate(_finished(dm, loader)):
        full.append(batch)
        if i == 1:
            state = loader.state_dict()
        if i == 3:
            last = loader.state_dict()  # after the epoch's last batch (a checkpoint at an epoch boundary)
    resumed = _pretrain(mixed_cohort, kwargs)
    resumed.setup("fit")
    new_loader = resumed.train_dataloader()
    new_loader.load_state_dict(state)
    rest = list(_finished(resumed, new_loader))
    assert [b["mask_step"] for b in rest] == [2, 3]
    other = _pretrain(mixed_cohort, {**kwargs, "num_workers": 2 - num_workers})
    other.setup("fit")
    with pytest.raises(UserError, match=f"resume with --data.init_args.num_workers {num_workers}"):
        other.train_dataloader().load_state_dict(state)
    # Lightning goes on to the next epoch with the same loader: it must start from its first batch
    boundary = resumed.train_dataloader()  # the data module's epoch: 0, the one the checkpoint was written in
    boundary.load_state_dict(last)
    assert boundary.sampler.epoch == 1 and [b["mask_step"] for b in _finished(resumed, boundary)] == [4, 5, 6, 7]
    for want, got in zip(full[2:], rest, strict=True):
        assert want["path"] == got["path"] and torch.equal(want["image"], got["image"])
        assert all(torch.equal(a, b) for a, b in zip(want["context_idx"], got["context_idx"], strict=True))


def test_pretrain_val_masks_are_fixed(mixed_cohort, tiny_dm_kwargs):
    dm = _pretrain(mixed_cohort, tiny_dm_kwargs)
    dm.setup("fit")
    loader = dm.val_dataloader()
    first = [b["context_idx"][1] for b in loader]
    second = [b["context_idx"][1] for b in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert [b["mask_step"] for b in loader] == [0, 1][: len(first)]
    loader.sampler.set_epoch(3)  # Lightning sets the epoch of val samplers too: the masks must not follow it
    third = [b["context_idx"][1] for b in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, third, strict=True))


def test_pretrain_options(mixed_cohort, tiny_dm_kwargs):
    everything = _pretrain(mixed_cohort, tiny_dm_kwargs, use_all_for_pretraining=True, modalities=["T1w", "FLAIR"])
    everything.setup("fit")
    assert len(everything.datasets["train"]) == 10 and everything.val_dataloader() == []
    half = _pretrain(mixed_cohort, tiny_dm_kwargs, mask_ratio=0.5)
    half.setup("fit")
    batch = next(_finished(half, half.train_dataloader()))
    assert [c.shape[1] for c in batch["context_idx"]] == [288] * 3
    vjepa = _pretrain(mixed_cohort, tiny_dm_kwargs, masking="vjepa2")
    vjepa.setup("fit")
    batch = next(_finished(vjepa, vjepa.train_dataloader()))
    assert len(batch["context_idx"]) == 2
    with pytest.raises(ValueError, match="not a multiple of patch_size 5"):
        PretrainDataModule(str(mixed_cohort), patch_size=5, **tiny_dm_kwargs)
    with pytest.raises(ValueError, match="masking must be one of"):
        PretrainDataModule(str(mixed_cohort), masking="random", **tiny_dm_kwargs)


class _Recorder(LightningModule):
    """Records what each training step sees; the loss only exists so that the optimizer has something to do."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[int, int, tuple[str, ...]]] = []
        self.checksums: list[tuple[float, int]] = []  # of the (augmented) images and the masks

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, int(batch["mask_step"]), tuple(batch["path"])))
        masks = sum(int(ids.sum()) for ids in [*batch["context_idx"], *batch["target_idx"]])
        self.checksums.append((float(batch["image"].double().sum()), masks))
        return (self.weight * batch["image"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path, max_epochs):
    return tiny_trainer(max_epochs=max_epochs, limit_val_batches=0, default_root_dir=str(tmp_path))


def test_pretrain_with_trainer_resumes_exactly(mixed_cohort, tiny_dm_kwargs, tmp_path):
    full = _Recorder()
    _trainer(tmp_path, 2).fit(full, datamodule=_pretrain(mixed_cohort, tiny_dm_kwargs))
    assert [(e, s) for e, s, _ in full.seen] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 4), (1, 5), (1, 6), (1, 7)]

    first = _Recorder()
    trainer = _trainer(tmp_path, 1)
    trainer.fit(first, datamodule=_pretrain(mixed_cohort, tiny_dm_kwargs))
    ckpt = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)["PretrainDataModule"]
    assert state == {"global_step": 4, "epoch": 1, "seed": 0, "augment_on": "device"}

    second = _Recorder()
    _trainer(tmp_path, 2).fit(second, datamodule=_pretrain(mixed_cohort, tiny_dm_kwargs), ckpt_path=str(ckpt))
    assert second.seen == full.seen[4:]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_pretrain_with_trainer_resumes_mid_epoch(mixed_cohort, tiny_dm_kwargs, tmp_path, num_workers, recwarn):
    kwargs = {**tiny_dm_kwargs, "num_workers": num_workers}
    full = _Recorder()
    _trainer(tmp_path, 2).fit(full, datamodule=_pretrain(mixed_cohort, kwargs))
    first = _Recorder()
    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=3, save_top_k=-1)
    stopped = tiny_trainer(
        max_steps=3, limit_val_batches=0, default_root_dir=str(tmp_path), callbacks=[every], enable_checkpointing=True
    )
    stopped.fit(first, datamodule=_pretrain(mixed_cohort, kwargs))
    assert first.seen == full.seen[:3]
    second = _Recorder()
    ckpt = tmp_path / "ckpt" / "step=3.ckpt"
    _trainer(tmp_path, 2).fit(second, datamodule=_pretrain(mixed_cohort, kwargs), ckpt_path=str(ckpt))
    assert second.seen == full.seen[3:]  # batch 3 of epoch 0 next, not the epoch's first batch again
    assert first.checksums == full.checksums[:3] and second.checksums == full.checksums[3:]  # same augmentation, masks
    assert not [w for w in recwarn if "not resumable" in str(w.message)]


# ---------------------------------------------------------------------------------------------------- SynthBrain
def _synth_available() -> bool:
    import neurojepa_pl.synth as synth

    return hasattr(synth, "generate_cohort")


@pytest.mark.slow
@pytest.mark.skipif(not _synth_available(), reason="neurojepa_pl.synth.generate_cohort is not available yet")
def test_synthbrain_cohort_end_to_end(synth_cohort, tiny_dm_kwargs):
    """The SynthBrain manifest validates (full read) and feeds both data modules on the tiny grid."""
    report = validate_manifest_full(synth_cohort)
    assert report.ok, str(report)
    pretrain = _pretrain(synth_cohort, tiny_dm_kwargs)
    pretrain.setup("fit")
    batch = next(_finished(pretrain, pretrain.train_dataloader()))
    assert batch["image"].shape == (2, 1, *TINY_CROP) and len(batch["context_idx"]) == 3
    assert float(batch["foreground"].float().mean()) > 0.2  # brains fill a good part of the crop
    finetune = FinetuneDataModule(
        str(synth_cohort),
        task="binary",
        label_columns=["any_lesion"],
        modality="T1w",
        stratify_split=False,  # 12 subjects: a class may have too few subjects to stratify
        **tiny_dm_kwargs,
    )
    finetune.setup("fit")
    batch = next(iter(finetune.train_dataloader()))
    assert batch["label"].dtype == torch.int64 and set(batch["label"].tolist()) <= {0, 1}
    frame = finetune.load_frame()
    assert frame.groupby("subject_id")["split"].nunique().max() == 1


def validate_manifest_full(path):
    from neurojepa_pl.data import validate_manifest

    return validate_manifest(path, check_readable=True)


def test_unstratifiable_automatic_split_names_the_fix(tmp_path, tiny_dm_kwargs):
    manifest = make_cohort(tmp_path, n_subjects=6, with_split=False, labels=lambda s: {"tumour": int(s == 0)})
    dm = FinetuneDataModule(str(manifest), task="binary", label_columns=["tumour"], **tiny_dm_kwargs)
    with pytest.raises(ValueError, match="fix: set data.init_args.stratify_split: false"):
        dm.load_frame()
    relaxed = FinetuneDataModule(
        str(manifest), task="binary", label_columns=["tumour"], stratify_split=False, **tiny_dm_kwargs
    )
    assert relaxed.load_frame()["split"].value_counts().to_dict() == {
        "train": 3,
        "val": 1,
        "test": 2,
    }  # sklearn rounds test up
