"""Joins against real folders: BIDS trees of empty placeholder files, scan tables, and a GenericCohort with paths."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from neurojepa_pl.data import validate_manifest
from neurojepa_pl.data_modules.cohorts import (
    NO_SESSION,
    CohortLeakageError,
    build_cohort_manifest,
    generic_cohort_spec,
    get_cohort_spec,
    read_scan_table,
    read_split_files,
    scan_bids_tree,
)
from neurojepa_pl.data_modules.cohorts.split_files import SCAN_ID_PREFIX


def _bids_label(raw: str) -> str:
    return re.sub(r"[^0-9A-Za-z]", "", raw)  # what a BIDS converter does to "011_S_0003"


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


def test_adni_amyloid_bare_image_numbers_match_loni_session_folders(tmp_path, split_dir):
    spec = get_cohort_spec("ADNI", "amyloid", "T1w")
    table, _, _ = read_split_files(spec, split_dir)
    for subject, image in zip(table["subject_id"], table[SCAN_ID_PREFIX + "T1w"]):
        sub = _bids_label(subject)
        # LONI folders say I<number>; the ADNI4 split file stores the bare number.
        _touch(tmp_path / f"sub-{sub}" / f"ses-I{image}" / "anat" / f"sub-{sub}_ses-I{image}_T1w.nii.gz")
    first = table.iloc[0]
    sub, image = _bids_label(first["subject_id"]), first[SCAN_ID_PREFIX + "T1w"]
    session_dir = tmp_path / f"sub-{sub}" / f"ses-I{image}" / "anat"
    extra_run = _touch(session_dir / f"sub-{sub}_ses-I{image}_run-2_T1w.nii.gz")
    _touch(session_dir / f"sub-{sub}_ses-I{image}_T2star.nii.gz")  # other suffixes are ignored
    second = table.iloc[1]
    sub2, image2 = _bids_label(second["subject_id"]), second[SCAN_ID_PREFIX + "T1w"]
    lost_file = tmp_path / f"sub-{sub2}" / f"ses-I{image2}" / "anat" / f"sub-{sub2}_ses-I{image2}_T1w.nii.gz"
    lost_file.unlink()

    manifest, report = build_cohort_manifest("ADNI", "amyloid", "T1w", data_root=tmp_path, split_dir=split_dir)

    assert len(manifest) == 167 - 1
    assert report.ids_without_scans["subject_id"].tolist() == [second["subject_id"]]
    assert "no T1w scan of subject" in report.ids_without_scans["reason"].iloc[0]
    assert report.unused_scans["path"].tolist() == [str(extra_run)]
    assert "first by name is used" in report.unused_scans["reason"].iloc[0]
    row = manifest.iloc[0]
    assert row["subject_id"] == first["subject_id"] and row["session_id"] == f"I{image}"
    assert row["path"].endswith(f"ses-I{image}_T1w.nii.gz") and Path(row["path"]).is_file()
    validation = validate_manifest(manifest, label_specs=spec.label_specs(), check_readable=False)
    assert validation.ok, str(validation)


def test_oasis_sessions_named_by_day_label(tmp_path, split_dir):
    spec = get_cohort_spec("OASIS3", "ad", "FLAIR")
    table, _, _ = read_split_files(spec, split_dir)
    for subject, mr_id in set(zip(table["subject_id"], table[SCAN_ID_PREFIX + "FLAIR"])):
        day = mr_id.split("_")[-1]  # OAS30002_MR_d0653 -> the OASIS BIDS session ses-d0653
        _touch(tmp_path / f"sub-{subject}" / f"ses-{day}" / "anat" / f"sub-{subject}_ses-{day}_FLAIR.nii.gz")
    _touch(tmp_path / "sub-OAS39999" / "ses-d0001" / "anat" / "sub-OAS39999_ses-d0001_FLAIR.nii.gz")

    manifest, report = build_cohort_manifest(spec, data_root=tmp_path, split_dir=split_dir)

    assert sum(report.manifest_rows.values()) == 1028 - 20  # 20 verbatim duplicate rows collapsed
    assert report.unused_scans["subject"].tolist() == ["OAS39999"]
    assert manifest["path"].is_unique
    assert manifest["session_id"].str.fullmatch(r"d\d{4}").all()


def test_cnp_without_session_level(tmp_path, split_dir):
    spec = get_cohort_spec("CNP", "diagnosis", "T1w")
    table, _, _ = read_split_files(spec, split_dir)
    skipped = table["subject_id"].iloc[5]
    for subject in table["subject_id"]:
        if subject != skipped:
            _touch(tmp_path / subject / "anat" / f"{subject}_T1w.nii.gz")  # CNP IDs already read "sub-10189"

    manifest, report = build_cohort_manifest(spec, data_root=tmp_path, split_dir=split_dir)

    assert len(manifest) == 265 - 1
    assert (manifest["session_id"] == NO_SESSION).all()
    lost = report.ids_without_scans
    assert lost["subject_id"].tolist() == [skipped] and "no session" in lost["reason"].iloc[0]
    assert manifest["diagnosis_label"].isin([0, 1, 2]).all()


def test_per_visit_rows_take_sessions_in_natural_order(tmp_path, split_dir):
    spec = get_cohort_spec("NACC", "ad", "T2w")
    table, _, _ = read_split_files(spec, split_dir)
    counts = table.groupby("subject_id").size()
    for subject, count in counts.items():
        # ses-2 must come before ses-10 (natural order), so visits are numbered 2, 10, 18, ...
        for visit in range(count):
            session = f"ses-{2 + 8 * visit}"
            _touch(tmp_path / f"sub-{subject}" / session / "anat" / f"sub-{subject}_{session}_T2w.nii.gz")

    manifest, report = build_cohort_manifest(spec, data_root=tmp_path, split_dir=split_dir)

    assert len(manifest) == 1846 + 613 + 603
    twice = manifest[manifest["subject_id"] == "NACC226634"]  # one of the 2 subjects with conflicting visit labels
    assert twice["session_id"].tolist() == ["2", "10"]
    assert [entry["subject_id"] for entry in report.ambiguous_subjects] == ["NACC226634", "NACC312721"]
    assert manifest["site"].notna().all()  # NACCADC copied to site


def test_multimodal_subject_level_needs_all_modalities_in_one_session(tmp_path, split_dir):
    spec = get_cohort_spec("SOOP", "rankin", "T1w+FLAIR")
    table, _, _ = read_split_files(spec, split_dir)
    lacking = table["subject_id"].iloc[0]
    for subject in table["subject_id"]:
        _touch(tmp_path / subject / "ses-1" / "anat" / f"{subject}_ses-1_T1w.nii.gz")
        if subject != lacking:
            _touch(tmp_path / subject / "ses-1" / "anat" / f"{subject}_ses-1_FLAIR.nii.gz")

    manifest, report = build_cohort_manifest(spec, data_root=tmp_path, split_dir=split_dir)

    assert len(manifest) == 647 - 1
    assert report.ids_without_scans["subject_id"].tolist() == [lacking]
    assert report.unused_scans["reason"].tolist() == ["session lacks ['FLAIR'] needed for T1w+FLAIR"]
    assert manifest["t1w_valid"].all() and manifest["flair_valid"].all() and not manifest["t2w_valid"].any()
    assert (manifest["t2w_path"] == "").all()

    kept, kept_report = build_cohort_manifest(
        spec, data_root=tmp_path, split_dir=split_dir, require_all_modalities=False
    )
    assert len(kept) == 647
    only_t1 = kept[kept["subject_id"] == lacking].iloc[0]
    assert only_t1["t1w_valid"] and not only_t1["flair_valid"] and only_t1["flair_path"] == ""


def test_multimodal_scan_level_pairs_by_each_modalitys_image_id(tmp_path, split_dir):
    spec = get_cohort_spec("PPMI", "diagnosis", "T1w+T2w")
    table, _, _ = read_split_files(spec, split_dir)
    for modality in ("T1w", "T2w"):
        for subject, image in set(zip(table["subject_id"], table[SCAN_ID_PREFIX + modality])):
            _touch(
                tmp_path / f"sub-{subject}" / f"ses-{image}" / "anat" / f"sub-{subject}_ses-{image}_{modality}.nii.gz"
            )

    manifest, report = build_cohort_manifest(spec, data_root=tmp_path, split_dir=split_dir)

    assert len(manifest) == 1339 and len(report.dropped) == 0 and len(report.unused_scans) == 0
    first = manifest.iloc[0]  # Subject 3104: T1w I301552 paired with T2w I301553 (line 2 of the train file)
    assert first["session_id"] == "I301552+I301553"
    assert "ses-I301552" in first["t1w_path"] and "ses-I301553" in first["t2w_path"]
    # The published pairs reuse one T1w with several T2w scans.
    assert manifest["t1w_path"].duplicated().sum() == 1339 - table[SCAN_ID_PREFIX + "T1w"].nunique()


def test_scan_table_with_missing_files_and_relative_paths(tmp_path, split_dir):
    spec = get_cohort_spec("UCSF-PDGM", "survival", "T2w")
    table, _, _ = read_split_files(spec, split_dir)
    rows = []
    for i, subject in enumerate(table["subject_id"]):
        relative = f"scans/{subject}_T2w.nii.gz"
        if i != 3:
            _touch(tmp_path / relative)
        rows.append({"id": subject, "modality": "T2w", "path": relative})
    scan_table = tmp_path / "scans.csv"
    pd.DataFrame(rows).to_csv(scan_table, index=False)

    manifest, report = build_cohort_manifest(spec, scan_table=scan_table, split_dir=split_dir)

    missing = str(tmp_path / f"scans/{table['subject_id'].iloc[3]}_T2w.nii.gz")
    assert report.missing_files == [missing]
    assert report.ids_without_scans["subject_id"].tolist() == [table["subject_id"].iloc[3]]
    # One training row has no overall-survival time: dropped as a missing label, not silently.
    assert report.dropped_by("missing_label")["reason"].tolist() == ["missing label 'OS'"]
    assert len(manifest) == 495 - 2
    assert (manifest["OS"] > 0).all() and manifest["survival"].isin([0, 1]).all()

    summary_paths = report.write(tmp_path / "out", "ucsf")
    summary = json.loads(summary_paths["report"].read_text())
    assert not pd.isna(table["OS"].iloc[3])
    nan_split = table.loc[table["OS"].isna(), "split"].iloc[0]
    assert summary["dropped_counts"] == {"missing_label": {nan_split: 1}, "no_scan": {table["split"].iloc[3]: 1}}
    assert len(pd.read_csv(summary_paths["dropped"])) == 2
    assert "missing label 'OS'" in str(report)


def test_scan_table_and_tree_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no sub-"):
        scan_bids_tree(tmp_path)
    with pytest.raises(ValueError, match="no modality column"):
        read_scan_table(pd.DataFrame({"subject_id": ["a"], "path": ["/x"]}))
    with pytest.raises(ValueError, match="relative path"):
        read_scan_table(pd.DataFrame({"subject_id": ["a"], "modality": ["T1w"], "path": ["x.nii.gz"]}))
    with pytest.raises(ValueError, match=r"modalities \['T1'\] are not in"):
        read_scan_table(pd.DataFrame({"subject_id": ["a"], "modality": ["T1"], "path": ["/x"]}))


def _write_ehr_splits(folder: Path, leak: bool) -> None:
    rows = {
        "train": [("P1", "p1_a.nii.gz", 1, 0), ("P1", "p1_b.nii.gz", 0, 0), ("P2", "ses-01/p2.nii.gz", 0, 1)],
        "val": [("P3", "p3.nii.gz", 1, 1), *([("P2", "p2_late.nii.gz", 0, 1)] if leak else [])],
        "test": [("P4", "p4.nii.gz", 0, 0), ("P5", "missing.nii.gz", 1, 0)],
    }
    for split, records in rows.items():
        frame = pd.DataFrame(records, columns=["patient_id", "img_path", "cancer", "edema"])
        frame.to_csv(folder / f"{split}_MRI_T1w_labels.csv", index=False)


def test_generic_cohort_with_paths_in_the_split_files(tmp_path):
    splits, data = tmp_path / "splits", tmp_path / "data"
    splits.mkdir()
    _write_ehr_splits(splits, leak=False)
    for name in ("p1_a", "p1_b", "ses-01/p2", "p3", "p4"):
        _touch(data / f"{name}.nii.gz")
    spec = generic_cohort_spec(
        "NYU", "{split}_MRI_T1w_labels.csv", "patient_id", ["cancer", "edema"], path_columns={"T1w": "img_path"}
    )

    manifest, report = build_cohort_manifest(spec, data_root=data, split_dir=splits)

    assert report.manifest_rows == {"train": 3, "val": 1, "test": 1}
    assert report.ids_without_scans["reason"].str.contains("missing.nii.gz does not exist").all()
    assert manifest["cancer"].tolist() == [1, 0, 0, 1, 0]
    assert manifest["session_id"].tolist() == [NO_SESSION, NO_SESSION, "01", NO_SESSION, NO_SESSION]
    assert spec.task_type == "multilabel" and spec.task_labels == ("cancer", "edema")

    _write_ehr_splits(splits, leak=True)
    with pytest.raises(CohortLeakageError, match="P2"):
        build_cohort_manifest(spec, data_root=data, split_dir=splits)
