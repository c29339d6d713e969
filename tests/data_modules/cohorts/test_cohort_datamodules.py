"""Cohort LightningDataModules: manifest built in prepare_data/setup, then FinetuneDataModule / MultimodalDataModule."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from volume_factory import TINY_CROP, TINY_RESIZE, blob_volume, write_nifti

import neurojepa_pl.data_modules.cohorts as cohorts
from neurojepa_pl.data_modules.cohorts import get_cohort_spec, read_split_files
from neurojepa_pl.data_modules.cohorts.datamodules import (
    ADNI,
    BINDMGH,
    COHORT_DATAMODULES,
    CohortDataModule,
    GenericCohort,
    MultimodalCohort,
)
from neurojepa_pl.data_modules.cohorts.split_files import SCAN_ID_PREFIX

TINY = {
    "batch_size": 2,
    "num_workers": 0,
    "spatial_size": TINY_CROP,
    "resize_to": TINY_RESIZE,
    "pad_crop_size": None,
    "target_spacing": None,
}


def _scan_table(tmp_path, rows: list[tuple[str, str, str]]) -> str:
    """Write tiny NIfTIs for (subject, session, modality) and a scan table listing them."""
    records = []
    for i, (subject, session, modality) in enumerate(rows):
        path = write_nifti(tmp_path / "scans" / f"{i:03d}_{modality}.nii.gz", blob_volume(seed=i))
        records.append({"subject_id": subject, "session_id": session, "modality": modality, "path": str(path)})
    table = tmp_path / "scan_table.csv"
    pd.DataFrame(records).to_csv(table, index=False)
    return str(table)


def _pick(table: pd.DataFrame, label: str, per_split: int = 4) -> pd.DataFrame:
    """Rows with both label values in every split (the class-balanced sampler needs both classes)."""
    parts = []
    for _, rows in table.groupby("split", sort=False):
        parts += [rows[rows[label] == 0].head(per_split // 2), rows[rows[label] == 1].head(per_split // 2)]
    return pd.concat(parts)


def test_unimodal_cohort_builds_its_manifest_and_serves_batches(tmp_path, split_dir):
    spec_rows, _, _ = read_split_files(get_cohort_spec("ADNI", "amyloid", "T1w"), split_dir)
    chosen = _pick(spec_rows, "AMYLPET")
    table = _scan_table(tmp_path, [(s, i, "T1w") for s, i in zip(chosen["subject_id"], chosen[SCAN_ID_PREFIX + "T1w"])])
    work = tmp_path / "work"
    dm = ADNI(task="amyloid", modality="T1w", scan_table=table, split_dir=str(split_dir), work_dir=str(work), **TINY)
    assert (dm.task, dm.label_columns) == ("binary", ["AMYLPET"])

    dm.prepare_data()
    manifest = pd.read_csv(work / "ADNI_amyloid_T1w_manifest.csv")
    assert len(manifest) == 12 and set(manifest["split"]) == {"train", "val", "test"}
    report = json.loads((work / "ADNI_amyloid_T1w_report.json").read_text())
    assert report["dropped_counts"]["no_scan"] == {"train": 96, "val": 29, "test": 30}  # 100/33/34 rows - 4 each
    assert len(pd.read_csv(work / "ADNI_amyloid_T1w_dropped.csv")) == 167 - 12

    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, *TINY_CROP)
    assert batch["label"].dtype == torch.int64 and set(batch["label"].tolist()) <= {0, 1}
    assert all(s in set(chosen["subject_id"]) for s in batch["subject_id"])


def test_setup_without_prepare_data_builds_the_manifest(tmp_path, split_dir):
    spec_rows, _, _ = read_split_files(get_cohort_spec("ADNI", "tte", "T1w"), split_dir)
    chosen = spec_rows.groupby("split", sort=False).head(3)
    table = _scan_table(tmp_path, [(s, i, "T1w") for s, i in zip(chosen["subject_id"], chosen[SCAN_ID_PREFIX + "T1w"])])
    dm = ADNI(task="tte", scan_table=table, split_dir=str(split_dir), work_dir=str(tmp_path / "w"), **TINY)
    assert dm.task == "survival" and dm.hparams.time_column == "days_until_conversion"
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["time"].dtype == torch.float32 and (batch["time"] > 0).all()
    assert set(batch["event"].tolist()) <= {0, 1}


def test_multimodal_cohort_pairs_from_the_published_multimodal_split(tmp_path, split_dir):
    spec_rows, _, _ = read_split_files(get_cohort_spec("SOOP", "rankin", "T1w+FLAIR"), split_dir)
    chosen = _pick(spec_rows, "gs_rankin_binary")
    rows = [(s, "1", m) for s in chosen["subject_id"] for m in ("T1w", "FLAIR")]
    table = _scan_table(tmp_path, rows)
    dm = MultimodalCohort("SOOP", modality="T1w+FLAIR", scan_table=table, split_dir=str(split_dir),
                          work_dir=str(tmp_path / "w"), **TINY)  # fmt: skip
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (2, 2, 1, *TINY_CROP)
    assert batch["validity"].all()


def test_generic_cohort_multilabel_with_paths_in_the_split_files(tmp_path):
    splits = tmp_path / "splits"
    splits.mkdir()
    for split, count in (("train", 4), ("val", 2), ("test", 2)):
        rows = []
        for i in range(count):
            name = f"{split}{i}"
            write_nifti(tmp_path / "data" / f"{name}.nii.gz", blob_volume(seed=hash(name) % 1000))
            rows.append({"patient_id": name, "img_path": f"{name}.nii.gz", "cancer": i % 2,
                         "edema": float("nan") if i == 1 else (i + 1) % 2})  # fmt: skip
        pd.DataFrame(rows).to_csv(splits / f"{split}_MRI_T1w_labels.csv", index=False)
    dm = GenericCohort(
        name="NYU", split_dir=str(splits), split_pattern="{split}_MRI_T1w_labels.csv", subject_column="patient_id",
        label_columns=["cancer", "edema"], path_columns={"T1w": "img_path"}, data_root=str(tmp_path / "data"),
        work_dir=str(tmp_path / "w"), **TINY,
    )  # fmt: skip
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["label"].shape == (2, 2) and batch["label_mask"].dtype == torch.bool
    assert dm.num_classes == 2


def test_one_finding_of_bind_mgh_is_a_binary_task_and_errors_are_clear():
    dm = BINDMGH(modality="FLAIR", labels=["Edema"], scan_table="x")
    assert (dm.task, dm.label_columns, dm.spec.task) == ("binary", ["Edema"], "findings")
    assert BINDMGH(modality="T1w", scan_table="x").task == "multilabel"
    with pytest.raises(ValueError, match="several tasks"):
        ADNI(scan_table="x")
    with pytest.raises(ValueError, match="MultimodalCohort"):
        ADNI(task="ad", modality="T1w+T2w", scan_table="x")
    with pytest.raises(ValueError, match="data_root"):
        ADNI(task="ad")
    with pytest.raises(ValueError, match="not task labels"):
        BINDMGH(labels=["Tumour"], scan_table="x")
    with pytest.raises(TypeError, match="cohort class"):
        CohortDataModule(scan_table="x")
    assert len(COHORT_DATAMODULES) == 13 and cohorts.ADNI is ADNI  # lazily re-exported by the package


def test_lightning_cli_can_configure_a_cohort_module():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(ADNI, "data")
    config = parser.parse_args(["--data.task", "amyloid", "--data.modality", "FLAIR", "--data.allow_leakage", "true",
                                "--data.data_root", "/data/adni", "--data.batch_size", "16"])  # fmt: skip
    assert config.data.batch_size == 16 and config.data.allow_leakage is True
    dm = ADNI(**config.data.as_dict())
    assert dm.hparams.batch_size == 16 and dm.spec.key == ("ADNI", "amyloid", "FLAIR")
