"""Manifest loading, validation (each bad case with its own message), leakage, patient splits, pairing, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from volume_factory import blob_volume, make_cohort, truncate_file, write_manifest, write_nifti

from neurojepa_pl.data import (
    LabelSpec,
    ManifestError,
    Problem,
    assign_patient_splits,
    check_leakage,
    load_manifest,
    pair_modalities,
    validate_manifest,
)
from neurojepa_pl.data.problems import problem_table
from neurojepa_pl.data.validation import diagnose_scan
from neurojepa_pl.errors import UserError
from neurojepa_pl.tools.validate_manifest import main as validate_main


@pytest.fixture
def cohort(tmp_path):
    return make_cohort(tmp_path, n_subjects=5)


def _rows(manifest):
    return pd.read_csv(manifest, dtype=str).fillna("").to_dict("records")


def _only(report, kind):
    found = [p for p in report.problems if p.kind == kind]
    assert found, f"no {kind!r} problem in:\n{report}"
    return found


# ---------------------------------------------------------------------------------------------------- loading
def test_load_manifest_resolves_relative_paths_and_keeps_string_ids(cohort, tmp_path):
    df = load_manifest(cohort)
    assert df["subject_id"].tolist()[:2] == ["000", "001"]  # leading zeros kept
    assert all(p.startswith(str(tmp_path)) for p in df["path"])
    assert df.attrs["manifest_path"] == str(cohort.resolve())


def test_load_manifest_missing_file_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        load_manifest(tmp_path / "nope.csv")
    assert isinstance(info.value, UserError)
    assert info.value.message == f"manifest {tmp_path / 'nope.csv'} does not exist"
    assert info.value.fix.startswith("pass the CSV written by `neurojepa synth`")


def test_manifest_error_is_a_user_error_with_the_whole_report(cohort):
    rows = _rows(cohort)
    rows[0]["split"] = "valid"
    rows[1]["tumour"] = "7"
    write_manifest(cohort, rows)
    with pytest.raises(ManifestError) as info:
        validate_manifest(cohort, check_files=False).raise_if_errors()
    err = info.value
    assert isinstance(err, UserError) and isinstance(err, ValueError)
    assert "bad_split" in err.message and "label_out_of_range" in err.message
    assert err.fix == (
        f"correct the rows above in {cohort.resolve()} (`neurojepa validate-manifest {cohort.resolve()}` checks it, "
        "reading every file), then rerun."
    )


def test_problem_table_keeps_paths_whole_and_wraps_reason_and_fix():
    long_path = "/data/" + "x" * 90 + ".nii.gz"
    problems = [
        Problem("truncated", 0, long_path, "the compressed data ends early " + "e" * 80, "re-copy the file."),
        Problem("missing_file", 1, "/data/b.nii.gz", "the file does not exist", "correct the path."),
    ]
    lines = problem_table(problems).splitlines()
    assert lines[0].split() == ["path", "|", "reason", "|", "fix"]
    assert set(lines[1]) <= {"-", "+"}
    assert lines[2].startswith(long_path + " | truncated: the compressed data ends early")
    assert lines[2].endswith("| re-copy the file.")
    assert any(
        line.startswith("/data/b.nii.gz ") and "| missing_file: the file does not exist" in line for line in lines
    )
    assert len(lines) == 5  # header, rule, the wrapped reason on two lines, the second problem


# ---------------------------------------------------------------------------------------------------- validation
def test_valid_manifest_is_ok_with_full_read(cohort):
    report = validate_manifest(cohort, check_readable=True)
    assert report.ok, str(report)
    assert report.problems == []
    assert "OK: no errors." in str(report)


def test_missing_split_column_is_only_a_warning(tmp_path):
    manifest = make_cohort(tmp_path, n_subjects=3, with_split=False)
    report = validate_manifest(manifest)
    assert report.ok
    assert [p.kind for p in report.problems] == ["no_split"]
    assert report.problems[0].severity == "warning"


def test_missing_column_reported_by_name(cohort):
    rows = _rows(cohort)
    for r in rows:
        del r["session_id"]
    write_manifest(cohort, rows)
    report = validate_manifest(cohort)
    (problem,) = _only(report, "missing_column")
    assert "'session_id'" in problem.message and "session_id" in problem.fix
    with pytest.raises(ManifestError, match="session_id"):
        report.raise_if_errors()


def test_unrecognised_form(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", [{"subject_id": "1", "file": "a.nii.gz"}])
    (problem,) = _only(validate_manifest(manifest), "missing_column")
    assert "neither the per-scan columns" in problem.message


def test_missing_file_row_and_path(cohort, tmp_path):
    rows = _rows(cohort)
    rows[3]["path"] = "sub-003/does_not_exist.nii.gz"
    write_manifest(cohort, rows)
    report = validate_manifest(cohort)
    (problem,) = _only(report, "missing_file")
    assert problem.row == 3
    assert problem.path == str(tmp_path / "sub-003/does_not_exist.nii.gz")
    text = str(report)
    assert "row 3 (line 5 of manifest.csv)" in text and "does not exist" in text and "fix:" in text


def test_truncated_gzip_is_truncated(cohort):
    path = load_manifest(cohort)["path"][1]
    truncate_file(Path(path))
    report = validate_manifest(cohort, check_readable=True)
    (problem,) = _only(report, "truncated")
    assert problem.row == 1 and problem.path == path
    assert problem.message.startswith("the compressed data ends early (EOFError: ")
    assert problem.fix == "re-export or re-copy the file (it is corrupt or truncated), or remove the row."
    # a header-only read does not decompress the data and does not notice
    assert validate_manifest(cohort, check_readable="header").ok
    assert validate_manifest(cohort, check_readable=False).ok


def test_nan_volume_reported_with_voxel_count(cohort):
    path = load_manifest(cohort)["path"][2]
    data = blob_volume(seed=2)
    data[10, 10, 10] = np.nan
    data[11, 10, 10] = np.inf
    write_nifti(Path(path), data)
    (problem,) = _only(validate_manifest(cohort), "non_finite")
    assert problem.row == 2
    assert problem.message.startswith("2 of ")


def test_constant_volume_is_an_empty_brain(cohort):
    path = load_manifest(cohort)["path"][3]
    write_nifti(Path(path), np.zeros((48, 54, 48), dtype=np.float32))
    (problem,) = _only(validate_manifest(cohort), "empty_brain")
    assert problem.row == 3
    assert problem.message == "the volume is constant (every voxel = 0): there is no brain in it"
    assert validate_manifest(cohort, check_readable="header").ok  # the header cannot tell


def test_diagnose_scan_names_each_kind_of_broken_file(tmp_path):
    good = write_nifti(tmp_path / "good.nii.gz", blob_volume())
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    text = tmp_path / "text.nii.gz"
    text.write_text("subject_id,age\n1,40\n")
    assert diagnose_scan(str(good)) is None
    assert diagnose_scan(str(tmp_path / "nope.nii.gz"), row=4) == Problem(
        "missing_file",
        4,
        str(tmp_path / "nope.nii.gz"),
        "the file does not exist",
        "correct the path (relative paths are resolved against the manifest's folder) or remove the row.",
    )
    assert diagnose_scan(str(tmp_path)).message == "the file does not exist (it is a directory)"
    assert diagnose_scan(str(empty)).kind == "unreadable"
    assert "Empty file" in diagnose_scan(str(empty)).message
    assert diagnose_scan(str(text)).kind == "unreadable"
    assert "is not a gzip file" in diagnose_scan(str(text)).message


def test_4d_volume_is_bad_shape_even_header_only(cohort):
    path = load_manifest(cohort)["path"][0]
    write_nifti(Path(path), np.stack([blob_volume()] * 2, axis=-1))
    (problem,) = _only(validate_manifest(cohort, check_readable="header"), "bad_shape")
    assert "(48, 54, 48, 2)" in problem.message


def test_bad_modality_suggests_spelling(cohort):
    rows = _rows(cohort)
    rows[0]["modality"] = "t1w"
    rows[1]["modality"] = "PET"
    write_manifest(cohort, rows)
    first, second = _only(validate_manifest(cohort, check_files=False), "bad_modality")
    assert "'T1w'" in first.fix
    assert "one of" in second.fix


def test_empty_identifier(cohort):
    rows = _rows(cohort)
    rows[4]["subject_id"] = ""
    write_manifest(cohort, rows)
    (problem,) = _only(validate_manifest(cohort, check_files=False), "missing_value")
    assert problem.row == 4 and "'subject_id' is empty" in problem.message


def test_bad_and_partial_split_values(cohort):
    rows = _rows(cohort)
    rows[0]["split"] = "validation"
    rows[1]["split"] = ""
    write_manifest(cohort, rows)
    report = validate_manifest(cohort, check_files=False)
    (bad,) = _only(report, "bad_split")
    (partial,) = _only(report, "missing_split")
    assert bad.row == 0 and "'val'" in bad.fix
    assert partial.row == 1


def test_leakage_same_subject_in_two_splits(tmp_path):
    manifest = make_cohort(tmp_path, n_subjects=3, sessions=2)
    rows = _rows(manifest)
    rows[1]["split"] = "test"  # subject 000, session 1
    write_manifest(manifest, rows)
    report = validate_manifest(manifest, check_files=False)
    (problem,) = _only(report, "leakage")
    assert "'000'" in problem.message and "test (1 row(s))" in problem.message and "train (1 row(s))" in problem.message
    assert problem.row == 0
    assert check_leakage(load_manifest(manifest)) == [problem]
    assert not report.ok


def test_duplicates(cohort):
    rows = _rows(cohort)
    rows.append(dict(rows[2]))  # exact repeat of row 2 -> row 5
    other = dict(rows[3])
    other["session_id"] = "ses-9"  # same file under another session -> row 6
    rows.append(other)
    write_manifest(cohort, rows)
    report = validate_manifest(cohort, check_files=False)
    (dup_row,) = _only(report, "duplicate_row")
    (dup_path,) = _only(report, "duplicate_path")
    assert dup_row.row == 5 and "repeats row 2" in dup_row.message
    assert dup_path.row == 6 and "row 3" in dup_path.message


def test_two_scans_of_one_modality_is_a_warning(cohort):
    rows = _rows(cohort)
    extra = dict(rows[0])
    extra["path"] = rows[1]["path"].replace("sub-001", "sub-000").replace("ses-0_T1w", "ses-0_run-2_T1w")
    write_nifti(cohort.parent / extra["path"], blob_volume(seed=7))
    rows.append(extra)
    write_manifest(cohort, rows)
    report = validate_manifest(cohort)
    assert report.ok
    (problem,) = _only(report, "duplicate_scan")
    assert problem.severity == "warning"


@pytest.mark.parametrize(
    ("column", "value", "spec", "kind"),
    [
        ("tumour", "2", None, "label_out_of_range"),  # default SynthBrain spec: binary
        ("tumour", "yes", None, "bad_label"),
        ("tumour", "", None, "missing_label"),
        ("grade", "3", {"grade": "categorical:3"}, "label_out_of_range"),
        ("grade", "1.5", {"grade": "categorical:3"}, "label_out_of_range"),
        ("os", "0", {"os": "time"}, "label_out_of_range"),
        ("score", "121", {"score": "continuous:0:120"}, "label_out_of_range"),
        ("age", "-3", None, "label_out_of_range"),
        ("sex", "X", None, "bad_label"),
    ],
)
def test_label_problems(cohort, column, value, spec, kind):
    rows = _rows(cohort)
    for r in rows:
        r.setdefault(column, "1")
    rows[2][column] = value
    write_manifest(cohort, rows)
    report = validate_manifest(cohort, label_specs=spec, check_files=False)
    (problem,) = _only(report, kind)
    assert problem.row == 2
    assert column in problem.message
    assert not report.ok


def test_allowed_nan_and_explicit_missing_label_column(cohort):
    rows = _rows(cohort)
    rows[0]["tumour"] = ""
    write_manifest(cohort, rows)
    assert validate_manifest(cohort, label_specs={"tumour": "binary:nan"}, check_files=False).ok
    report = validate_manifest(cohort, label_specs={"grade": LabelSpec("categorical", 3)}, check_files=False)
    (problem,) = _only(report, "missing_column")
    assert "'grade'" in problem.message


def test_label_spec_parse():
    assert LabelSpec.parse("binary") == LabelSpec("binary")
    assert LabelSpec.parse("categorical:4") == LabelSpec("categorical", num_classes=4)
    assert LabelSpec.parse("continuous:0:120:nan") == LabelSpec("continuous", minimum=0, maximum=120, allow_nan=True)
    assert LabelSpec.parse("event").describe() == "0 or 1"
    for bad in ("categorical", "continuous:1", "ordinal", "time:3"):
        with pytest.raises(ValueError, match="cannot parse label spec|kind must be"):
            LabelSpec.parse(bad)


def test_report_truncates_long_lists(tmp_path):
    rows = [
        {"subject_id": str(i), "session_id": "1", "modality": "T1w", "path": f"missing_{i}.nii.gz"} for i in range(30)
    ]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    report = validate_manifest(manifest)
    assert report.kinds()["missing_file"] == 30
    assert "... and 10 more problem(s) of kind 'missing_file'" in str(report)


# ---------------------------------------------------------------------------------------------------- splits
def _subject_frame(n_subjects=20, sessions=2):
    return pd.DataFrame(
        [
            {"subject_id": f"s{i:02d}", "session_id": str(j), "label": int(i % 4 == 0)}
            for i in range(n_subjects)
            for j in range(sessions)
        ]
    )


def test_patient_split_is_patient_level_sized_and_deterministic():
    df = _subject_frame()
    out = assign_patient_splits(df, seed=3)
    assert out.groupby("subject_id")["split"].nunique().max() == 1
    per_split = out.drop_duplicates("subject_id")["split"].value_counts().to_dict()
    assert per_split == {"train": 12, "val": 4, "test": 4}
    assert out["split"].equals(assign_patient_splits(df, seed=3)["split"])
    assert not out["split"].equals(assign_patient_splits(df, seed=4)["split"])
    shuffled = df.sample(frac=1.0, random_state=0)
    again = assign_patient_splits(shuffled, seed=3)
    assert (
        again.set_index(["subject_id", "session_id"])["split"]
        .sort_index()
        .equals(out.set_index(["subject_id", "session_id"])["split"].sort_index())
    )
    assert check_leakage(out) == []


def test_patient_split_stratified_keeps_positives_everywhere():
    df = _subject_frame(n_subjects=20)  # 5 positive subjects
    out = assign_patient_splits(df, seed=0, stratify="label").drop_duplicates("subject_id")
    positives = out[out["label"] == 1]["split"].value_counts().to_dict()
    assert positives == {"train": 3, "val": 1, "test": 1}


def test_patient_split_errors():
    df = _subject_frame(n_subjects=5)
    with pytest.raises(ValueError, match="summing to 1"):
        assign_patient_splits(df, fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="already has a split"):
        assign_patient_splits(assign_patient_splits(df))
    with pytest.raises(ValueError, match="cannot split 2 subject"):
        assign_patient_splits(_subject_frame(n_subjects=2))
    out = assign_patient_splits(df, fractions=(0.8, 0.0, 0.2))
    assert set(out["split"]) == {"train", "test"}


# ---------------------------------------------------------------------------------------------------- pairing
def test_pair_modalities(tmp_path):
    manifest = make_cohort(tmp_path, n_subjects=4, modalities=("T1w", "T2w", "FLAIR"))
    df = load_manifest(manifest)
    df = df[~((df["subject_id"] == "001") & (df["modality"] == "FLAIR"))]  # 001 lacks FLAIR
    df = df[~((df["subject_id"] == "002") & (df["modality"] == "T1w"))]  # 002 lacks the anchor
    paired = pair_modalities(df, modalities=("T1w", "FLAIR"), anchor="T1w")
    assert paired["subject_id"].tolist() == ["000", "003"]
    assert list(paired.columns[:5]) == ["subject_id", "session_id", "t1w_path", "t2w_path", "flair_path"]
    assert paired["t2w_path"].tolist() == ["", ""]  # not requested
    assert paired["t1w_valid"].all() and paired["flair_valid"].all() and not paired["t2w_valid"].any()
    assert paired.loc[0, "flair_path"].endswith("sub-000_ses-0_FLAIR.nii.gz")
    assert paired["tumour"].tolist() == [0, 1] and paired["split"].tolist() == ["train", "val"]
    assert [d[0] for d in paired.attrs["dropped_sessions"]] == ["001", "002"]

    relaxed = pair_modalities(df, modalities=("T1w", "FLAIR"), anchor="T1w", require_all=False)
    assert relaxed["subject_id"].tolist() == ["000", "001", "003"]
    assert relaxed["flair_valid"].tolist() == [True, False, True]
    assert validate_manifest(relaxed, check_files=True, check_readable=False).ok


def test_paired_rows_sharing_one_scan_warn_within_a_subject_and_fail_across(tmp_path):
    df = load_manifest(make_cohort(tmp_path, n_subjects=3, modalities=("T1w", "T2w")))
    paired = pair_modalities(df, modalities=("T1w", "T2w"), anchor="T1w")
    assert validate_manifest(paired, check_files=False).ok
    reuse = paired.iloc[[0]].copy()  # subject 000's T1w paired again, with another T2w (as PPMI's pairs do)
    reuse["session_id"] = "ses-0+T2w-run2"
    reuse["t2w_path"] = paired.loc[0, "t2w_path"].replace("_T2w", "_run-2_T2w")
    shared = pd.concat([paired, reuse], ignore_index=True)
    report = validate_manifest(shared, check_files=False)
    assert report.ok
    (problem,) = _only(report, "shared_scan")
    assert problem.severity == "warning" and problem.row == 3 and "row 0" in problem.message
    stolen = shared.copy()
    stolen.loc[3, "subject_id"] = paired.loc[1, "subject_id"]  # another patient's scan: still an error
    stolen.loc[3, "split"] = paired.loc[1, "split"]
    bad = validate_manifest(stolen, check_files=False)
    assert not bad.ok and [p.row for p in _only(bad, "duplicate_path")] == [3]


def test_pair_modalities_rejects_disagreeing_session_labels(tmp_path):
    df = load_manifest(make_cohort(tmp_path, n_subjects=2, modalities=("T1w", "FLAIR")))
    df.loc[1, "tumour"] = 1  # FLAIR row of subject 000 says tumour, T1w row says none
    with pytest.raises(ValueError, match="'tumour' disagrees"):
        pair_modalities(df)


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_exit_codes_and_output(cohort, capsys):
    assert validate_main([str(cohort), "--labels", "tumour:binary", "age:continuous:0:120"]) == 0
    assert "0 error(s)" in capsys.readouterr().out
    rows = _rows(cohort)
    rows[0]["tumour"] = "3"
    write_manifest(cohort, rows)
    assert validate_main([str(cohort), "--no-read"]) == 1
    out = capsys.readouterr().out
    assert "label_out_of_range" in out and "fix:" in out
    assert validate_main([str(cohort), "--labels", "tumour:categorical:4", "--header-only"]) == 0
    with pytest.raises(SystemExit) as exc:
        validate_main(["--help"])
    assert exc.value.code == 0
    with pytest.raises(SystemExit):
        validate_main([str(cohort), "--labels", "tumour:ordinal"])


def test_cli_missing_manifest_and_every_broken_file_kind(cohort, tmp_path, capsys):
    assert validate_main([str(tmp_path / "nope.csv")]) == 1
    assert capsys.readouterr().err == (
        f"neurojepa validate-manifest: error: manifest {tmp_path / 'nope.csv'} does not exist\n"
        "fix: pass the CSV written by `neurojepa synth` or your own manifest with the columns subject_id, session_id, "
        "modality, path (e.g. --data.init_args.manifest PATH).\n"
    )
    paths = load_manifest(cohort)["path"]
    truncate_file(Path(paths[0]))
    write_nifti(Path(paths[1]), np.zeros((48, 54, 48), dtype=np.float32))
    assert validate_main([str(cohort)]) == 1
    out = capsys.readouterr().out
    assert "[error] truncated: row 0" in out and "[error] empty_brain: row 1" in out and "2 error(s)" in out
