"""Paired multimodal data: pairing protocol, validity, missing/failed scans, training-only modality dropout.

(Named test_multimodal_datamodule.py, not test_multimodal.py: tests/modules/test_multimodal.py exists and the test
folders are not packages, so two files with one basename would collide at collection.)
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from volume_factory import TINY_CROP, make_cohort, truncate_file

from neurojepa_pl.data import load_manifest, pair_modalities
from neurojepa_pl.data.transforms import TransformSettings, eval_transforms
from neurojepa_pl.data_modules.datasets import MRIScanDataset
from neurojepa_pl.data_modules.multimodal import MultimodalDataModule, modality_dropout
from neurojepa_pl.errors import UserValueError

# make_cohort: subjects 0-5 train, 6-7 val, 8-9 test; label tumour = subject % 2.
NO_FLAIR, BROKEN_FLAIR = "001", "002"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mm_cohort")
    manifest = make_cohort(root, n_subjects=10, modalities=("T1w", "FLAIR", "T2w"))
    df = pd.read_csv(manifest, dtype=str)
    df = df[~((df["subject_id"] == NO_FLAIR) & (df["modality"] == "FLAIR"))]
    df.to_csv(manifest, index=False)
    broken = df[(df["subject_id"] == BROKEN_FLAIR) & (df["modality"] == "FLAIR")]["path"].iloc[0]
    truncate_file(root / broken)
    return manifest


@pytest.fixture
def dm_kwargs(tiny_dm_kwargs, cohort) -> dict:
    # One cache for the module: the loading chain runs once per scan instead of once per test.
    return {**tiny_dm_kwargs, "cache_dir": str(cohort.parent / "cache")}


def _dm(manifest, kwargs, **overrides) -> MultimodalDataModule:
    args = dict(modalities=["T1w", "FLAIR"], label_columns=["tumour"], modality_dropout=0.0, max_failed_fraction=0.5)
    args.update(kwargs)
    args.update(overrides)
    return MultimodalDataModule(manifest=str(manifest), **args)


def _subjects(dataset) -> list[str]:
    return sorted(r["subject_id"] for r in dataset.records)


# ---------------------------------------------------------------------------------------------------- modality_dropout
def test_modality_dropout_keeps_a_uniform_nonempty_proper_subset():
    rng = np.random.default_rng(0)
    seen = Counter(tuple(modality_dropout(np.array([1, 1, 1], bool), 1.0, rng)) for _ in range(3000))
    # the 2**3 - 2 = 6 non-empty proper subsets, each about 1/6 of the draws
    assert set(seen) == {
        s for s in map(tuple, np.array(np.meshgrid(*[[0, 1]] * 3)).T.reshape(-1, 3).astype(bool)) if 0 < sum(s) < 3
    }
    assert all(400 < c < 600 for c in seen.values()), seen


def test_modality_dropout_probability_and_untouched_cases():
    rng = np.random.default_rng(1)
    both = np.array([True, True])
    changed = sum(not modality_dropout(both, 0.2, rng).all() for _ in range(4000))
    assert 0.17 < changed / 4000 < 0.23
    assert modality_dropout(np.array([True, False]), 1.0, rng).tolist() == [True, False]  # one valid: never dropped
    assert modality_dropout(both, 0.0, rng).tolist() == [True, True]
    a = [modality_dropout(both, 0.5, np.random.default_rng(7)).tolist() for _ in range(3)]
    assert a[0] == a[1] == a[2]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        modality_dropout(both, 1.5, rng)


# ---------------------------------------------------------------------------------------------------- paper protocol
def test_require_all_keeps_complete_sessions_and_drops_failed_scans(cohort, dm_kwargs):
    dm = _dm(cohort, dm_kwargs)
    dm.setup("fit")
    train = dm.datasets["train"]
    # 001 has no FLAIR (dropped at pairing), 002's FLAIR is truncated (reported, session dropped)
    assert _subjects(train) == ["000", "003", "004", "005"]
    assert [Path(f.path).name for f in dm.failure_log] == ["sub-002_ses-0_FLAIR.nii.gz"]
    assert train.dropped == [("002", "ses-0", "FLAIR missing or failed to load (require_all)")]
    assert train.validity.all()
    assert dm.num_classes == 2

    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (2, 2, 1, *TINY_CROP) and batch["images"].dtype == torch.float32
    assert batch["validity"].dtype == torch.bool and batch["validity"].all()
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (2,)
    assert batch["modality"] == ["T1w+FLAIR", "T1w+FLAIR"]
    assert all(p.endswith("_T1w.nii.gz") for p in batch["path"])
    assert all(p.endswith("_FLAIR.nii.gz") for p in batch["flair_path"])


def test_slots_hold_each_modality_in_order(cohort, dm_kwargs):
    dm = _dm(cohort, dm_kwargs, modalities=["T1w", "T2w"])
    dm.setup("validate")
    val = dm.datasets["val"]
    assert _subjects(val) == ["006", "007"]
    sample = val[0]
    settings = TransformSettings(
        pad_crop_size=None, target_spacing=None, resize_to=dm.settings.resize_to, spatial_size=TINY_CROP
    )
    for slot, column in enumerate(["t1w_path", "t2w_path"]):
        alone = MRIScanDataset([{"path": sample[column]}], settings, augment=eval_transforms(settings))[0]["image"]
        assert torch.equal(sample["images"][slot], alone)
    assert not torch.equal(sample["images"][0], sample["images"][1])
    assert sample["label"] == int(sample["subject_id"]) % 2


def test_missing_modalities_allowed_for_robustness(cohort, dm_kwargs):
    dm = _dm(cohort, dm_kwargs, require_all=False)
    dm.setup("fit")
    train = dm.datasets["train"]
    assert _subjects(train) == ["000", "001", "002", "003", "004", "005"]
    for i, rec in enumerate(train.records):
        sample = train[i]
        if rec["subject_id"] in (NO_FLAIR, BROKEN_FLAIR):
            assert sample["validity"].tolist() == [True, False]
            assert torch.count_nonzero(sample["images"][1]) == 0  # zero image AND validity 0
            assert sample["modality"] == "T1w"
        else:
            assert sample["validity"].tolist() == [True, True]


def test_anchor_is_required(cohort, dm_kwargs):
    dm = _dm(cohort, dm_kwargs, modalities=["FLAIR", "T2w"], anchor="FLAIR", require_all=False)
    dm.setup("fit")
    # 001 has no FLAIR row and 002's FLAIR failed: both lack the anchor
    assert _subjects(dm.datasets["train"]) == ["000", "003", "004", "005"]


# ---------------------------------------------------------------------------------------------------- modality dropout
def test_modality_dropout_is_training_only_and_reproducible(cohort, dm_kwargs):
    dm = _dm(cohort, dm_kwargs, modality_dropout=1.0)
    dm.setup("fit")
    train, val = dm.datasets["train"], dm.datasets["val"]
    kept = []
    for position in range(8):
        sample = train[(0, position, position % len(train))]
        assert sample["validity"].sum() == 1  # p = 1 with two modalities: exactly one survives
        hidden = int(np.flatnonzero(~sample["validity"].numpy())[0])
        assert torch.count_nonzero(sample["images"][hidden]) == 0
        kept.append(sample["modality"])
        again = train[(0, position, position % len(train))]
        assert torch.equal(again["validity"], sample["validity"]) and torch.equal(again["images"], sample["images"])
    assert set(kept) == {"T1w", "FLAIR"}
    for batch in (next(iter(dm.val_dataloader())), next(iter(dm.val_dataloader()))):
        assert batch["validity"].all()
    assert val.dropout_p == 0.0


# ---------------------------------------------------------------------------------------------------- paired form
def test_paired_manifest_gives_the_same_sessions(cohort, dm_kwargs, tmp_path):
    paired = pair_modalities(load_manifest(cohort), ("T1w", "FLAIR", "T2w"), anchor="T1w", require_all=False)
    paired = paired.drop(columns=[c for c in paired.columns if c.endswith("_valid")])
    paired_csv = tmp_path / "paired.csv"
    paired.to_csv(paired_csv, index=False)
    dm = _dm(paired_csv, dm_kwargs)
    dm.setup("fit")
    assert _subjects(dm.datasets["train"]) == ["000", "003", "004", "005"]
    assert all(r["t2w_path"] == "" for r in dm.frame.to_dict("records"))  # unrequested modality blanked
    assert next(iter(dm.train_dataloader()))["images"].shape[1] == 2


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"task": "regression"}, "classification"),
        ({"anchor": "T2w"}, "anchor"),
        ({"modalities": ["T1w", "T1w"]}, "distinct"),
        ({"modality": "T1w"}, "modalities"),
        ({"modality_dropout": 2.0}, r"\[0, 1\]"),
    ],
)
def test_bad_arguments(cohort, dm_kwargs, overrides, message):
    # A plain user error (the CLI prints it in two lines with exit status 2), naming the option to change.
    with pytest.raises(UserValueError, match=message) as error:
        _dm(cohort, dm_kwargs, **overrides)
    assert "data.init_args." in error.value.fix
