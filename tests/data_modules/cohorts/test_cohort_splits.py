"""Every registered cohort/task/modality against the real published split files (data_modules/cohorts/published_splits).

Oracles: the row counts of docs/method.md §11, the anomalies it lists (ADNI amyloid FLAIR label spelling and 1 leaked
subject, NACC amyloid leakage 3/2/2), the exact duplicate rows of the OASIS-3 files, and the per-task sample totals of
the paper's benchmark table (ICSPR, MCSA, UCSF-PDGM survival: rows with a missing task label are excluded).
"""

from __future__ import annotations

import pandas as pd
import pytest

from neurojepa_pl.data import PATH_COLUMNS
from neurojepa_pl.data_modules.cohorts import (
    COHORT_SPECS,
    CohortLeakageError,
    build_cohort_manifest,
    get_cohort_spec,
    list_cohort_specs,
    read_split_files,
)

# docs/method.md §11: rows (train, val, test) of each split-file family.
SPEC11_ROWS = {
    ("BIND-MGH", "*"): (13351, 4534, 4257),
    ("NACC", "ad", "T1w"): (3006, 1008, 980),
    ("NACC", "ad", "T2w"): (1846, 613, 603),
    ("NACC", "ad", "FLAIR"): (2257, 755, 743),
    ("NACC", "ad", "T1w+T2w"): (2638, 571, 563),
    ("NACC", "amyloid", "T1w"): (109, 36, 37),
    ("NACC", "amyloid", "T2w"): (58, 20, 19),
    ("NACC", "amyloid", "FLAIR"): (95, 32, 32),
    ("ADNI", "ad", "T1w"): (1135, 253, 244),
    ("ADNI", "tte", "T1w"): (125, 42, 42),
    ("ADNI", "amyloid", "T1w"): (100, 33, 34),
    ("ADNI", "amyloid", "T2w"): (123, 41, 42),
    ("ADNI", "amyloid", "FLAIR"): (190, 64, 64),
    ("OASIS3", "ad", "T1w"): (1143, 400, 381),
    ("OASIS3", "ad", "T2w"): (983, 341, 341),
    ("OASIS3", "ad", "FLAIR"): (620, 204, 204),
    ("OASIS3", "ad", "T1w+T2w"): (811, 282, 291),
    ("PPMI", "diagnosis", "T1w"): (1046, 361, 356),
    ("PPMI", "diagnosis", "T2w"): (769, 271, 256),
    ("PPMI", "diagnosis", "FLAIR"): (1419, 478, 468),
    ("PPMI", "diagnosis", "T1w+T2w"): (830, 256, 253),
    ("PPMI", "tte", "T1w"): (238, 79, 80),
    ("PPMI", "tte", "FLAIR"): (529, 176, 177),
    ("ICSPR", "*", "T1w"): (1364, 456, 461),
    ("ICSPR", "*", "T2w"): (1391, 471, 480),
    ("ICSPR", "*", "FLAIR"): (1499, 498, 511),
    ("ICSPR", "*", "DWI"): (1581, 523, 539),
    ("ICSPR", "*", "T1w+FLAIR"): (1321, 441, 450),
    ("MCSA", "*"): (1733, 543, 597),
    ("SOOP", "*"): (388, 129, 130),
    ("UCSF-PDGM", "*"): (246, 124, 125),
    ("ABIDE", "*"): (659, 220, 220),
    ("ADHD-200", "*"): (617, 73, 86),
    ("CNP", "*"): (132, 66, 67),
    ("OpenBHB", "*"): (2581, 646, 757),
}

# Rows repeating an earlier (subject, MR session) verbatim in the same OASIS-3 file (counted by hand with pandas).
DUPLICATES = {
    ("OASIS3", "ad", "T1w"): (15, 8, 2),
    ("OASIS3", "ad", "T2w"): (20, 2, 5),
    ("OASIS3", "ad", "FLAIR"): (12, 4, 4),
    ("OASIS3", "ad", "T1w+T2w"): (4, 4, 6),
}

# Subjects shared between splits (docs/method.md §11: NACC amyloid 3/2/2 for FLAIR/T1w/T2w, ADNI amyloid FLAIR 1).
LEAKAGE = {
    ("NACC", "amyloid", "FLAIR"): {"train&val": 1, "train&test": 2},
    ("NACC", "amyloid", "T1w"): {"train&val": 1, "train&test": 1},
    ("NACC", "amyloid", "T2w"): {"train&val": 1, "train&test": 1},
    ("ADNI", "amyloid", "FLAIR"): {"train&val": 1},
}

# NACC subjects whose per-visit rows carry different labels (counted by hand: NACCID groups with >1 distinct label).
AMBIGUOUS = {
    ("NACC", "ad", "T1w"): 25,
    ("NACC", "ad", "T2w"): 2,
    ("NACC", "ad", "FLAIR"): 17,
    ("NACC", "ad", "T1w+T2w"): 11,
}

# Samples per task in the paper's benchmark table (Supplementary, "sessions with missing labels are excluded").
PAPER_TOTALS = {
    ("ICSPR", "mrs", "DWI"): 1139, ("ICSPR", "mrs", "FLAIR"): 1099, ("ICSPR", "mrs", "T1w"): 1011,
    ("ICSPR", "mrs", "T2w"): 1019, ("ICSPR", "mrs", "T1w+FLAIR"): 993,
    ("ICSPR", "lesion_type", "DWI"): 2643, ("ICSPR", "lesion_type", "FLAIR"): 2508,
    ("ICSPR", "lesion_type", "T1w"): 2281, ("ICSPR", "lesion_type", "T2w"): 2342,
    ("ICSPR", "lesion_type", "T1w+FLAIR"): 2212,
    ("ICSPR", "los", "DWI"): 1892, ("ICSPR", "los", "FLAIR"): 1823, ("ICSPR", "los", "T1w"): 1655,
    ("ICSPR", "los", "T2w"): 1675, ("ICSPR", "los", "T1w+FLAIR"): 1620,
    ("MCSA", "cog", "T1w"): 2866, ("MCSA", "cog", "FLAIR"): 2866, ("MCSA", "cog", "T1w+FLAIR"): 2866,
    ("MCSA", "stroke", "T1w"): 2847, ("MCSA", "hypertension", "FLAIR"): 2847,
    ("MCSA", "dyslipidemia", "T1w+FLAIR"): 2847,
    ("ADNI", "amyloid", "FLAIR"): 317,  # 318 rows, one leaked subject's val row removed
    ("BIND-MGH", "findings", "T1w+T2w"): 22142,
    ("NACC", "ad", "T1w+T2w"): 3772, ("PPMI", "diagnosis", "T1w+T2w"): 1339, ("SOOP", "rankin", "T1w+FLAIR"): 647,
}  # fmt: skip

ALL_KEYS = sorted(COHORT_SPECS)


def _spec11_rows(key):
    cohort, task, modality = key
    for candidate in ((cohort, task, modality), (cohort, "*", modality), (cohort, "*")):
        if candidate in SPEC11_ROWS:
            return SPEC11_ROWS[candidate]
    raise AssertionError(f"no docs/method.md §11 row count for {key}")


def test_registry_covers_every_cohort_and_published_file(split_dir):
    assert {key[0] for key in COHORT_SPECS} == {
        "ABIDE", "ADHD-200", "ADNI", "BIND-MGH", "CNP", "ICSPR", "MCSA", "NACC", "OASIS3", "OpenBHB", "PPMI", "SOOP",
        "UCSF-PDGM",
    }  # fmt: skip
    used = {
        (split_dir / spec.split_pattern.format(split=split)).resolve()
        for spec in COHORT_SPECS.values()
        for split in ("train", "val", "test")
    }
    published = {path.resolve() for path in split_dir.glob("*/*/*.csv")}
    assert published == used  # all 147 files are reachable through some spec, and nothing else
    assert len(published) == 147


def test_lookup_is_forgiving_on_spelling_and_helpful_on_error():
    assert get_cohort_spec("ucsf_pdgm", "idh", "T1w").cohort == "UCSF-PDGM"
    assert len(list_cohort_specs("adni")) == 5
    with pytest.raises(KeyError, match="task='amyloid' modality='DWI'"):
        get_cohort_spec("ADNI", "amyloid", "DWI")
    with pytest.raises(KeyError, match="unknown cohort"):
        get_cohort_spec("UKBB", "age", "T1w")


@pytest.mark.parametrize("key", ALL_KEYS, ids=["/".join(key) for key in ALL_KEYS])
def test_every_spec_joins_its_published_splits(key, split_dir, make_scan_table):
    spec = COHORT_SPECS[key]
    scans = make_scan_table(spec, split_dir)
    ghost = pd.DataFrame(
        [("GHOST01", "1", m, f"/fake/GHOST01/{m}.nii.gz") for m in spec.modalities],
        columns=["subject_id", "session_id", "modality", "path"],
    )
    complete, report = build_cohort_manifest(
        spec, split_dir=split_dir, scan_table=pd.concat([scans, ghost]), check_files=False, allow_leakage=True
    )

    # Row counts of the published files are docs/method.md §11's.
    expected_rows = dict(zip(("train", "val", "test"), _spec11_rows(key)))
    assert report.rows_in_split_files == expected_rows

    # Every published row is either in the manifest or listed as dropped with a reason.
    dropped = report.dropped_counts()
    for split in ("train", "val", "test"):
        lost = sum(per_split.get(split, 0) for per_split in dropped.values())
        assert report.manifest_rows[split] + lost == expected_rows[split]
    assert "no_scan" not in dropped  # every row had its scan
    assert (report.dropped["reason"].str.len() > 0).all()

    # Known anomalies.
    duplicates = dict(zip(("train", "val", "test"), DUPLICATES.get(key, (0, 0, 0))))
    assert {s: n for s, n in duplicates.items() if n} == dropped.get("duplicate", {})
    assert {pair: len(ids) for pair, ids in report.leakage.items()} == LEAKAGE.get(key, {})
    assert len(report.ambiguous_subjects) == AMBIGUOUS.get(key, 0)
    if key in PAPER_TOTALS:
        assert sum(report.manifest_rows.values()) == PAPER_TOTALS[key]
    if key[:2] == ("ADNI", "amyloid") and key[2] == "FLAIR":
        assert any("'AMYLOID'" in note and "renamed" in note for note in report.column_notes)
        assert complete["AMYLPET"].notna().all()

    # The ghost subject's scans are reported unused, nothing else is (all rows had exactly their scans).
    ghost_rows = report.unused_scans[report.unused_scans["subject"] == "GHOST01"]
    assert len(ghost_rows) == len(spec.modalities)
    assert set(ghost_rows["reason"]) == {"subject not in the split files"}

    # The manifest is in the shared schema, patient-disjoint, labels only from the task's columns' kinds.
    if spec.is_multimodal:
        assert complete[[PATH_COLUMNS[m] for m in spec.modalities]].ne("").all().all()
    else:
        assert (complete["modality"] == spec.modality).all() and complete["path"].str.endswith(".nii.gz").all()
    assert complete["session_id"].ne("").all()
    assert complete.groupby("subject_id")["split"].nunique().max() == 1  # patient-disjoint
    for column in spec.task_labels:
        if spec.task_type != "multilabel":
            assert complete[column].notna().all()

    # Removing one surviving row's scan per split: exactly that row is reported as IDs-without-scans.
    first_per_split = complete.groupby("split", sort=False).head(1)
    removed_paths = set()
    for _, row in first_per_split.iterrows():
        paths = [row[PATH_COLUMNS[m]] for m in spec.modalities] if spec.is_multimodal else [row["path"]]
        removed_paths.add(paths[-1])
    if spec.join_level == "scan" and spec.is_multimodal:
        # A removed scan reused by another pair (PPMI pairs one T1w with several T2w) also loses that pair.
        expected_lost = complete[[PATH_COLUMNS[m] for m in spec.modalities]].isin(removed_paths).any(axis=1).sum()
    else:
        expected_lost = None
    partial, partial_report = build_cohort_manifest(
        spec,
        split_dir=split_dir,
        scan_table=scans[~scans["path"].isin(removed_paths)],
        check_files=False,
        allow_leakage=True,
    )
    no_scan = partial_report.ids_without_scans
    if expected_lost is None:
        # Per-visit joins give the remaining sessions to the first rows, so the subject's last row goes.
        assert sorted(no_scan["split"]) == sorted(first_per_split["split"])
        assert set(no_scan["subject_id"]) == set(first_per_split["subject_id"])
    else:
        assert len(no_scan) == expected_lost
    assert len(partial) == len(complete) - len(no_scan)


@pytest.mark.parametrize("key", sorted(LEAKAGE), ids=["/".join(key) for key in sorted(LEAKAGE)])
def test_leakage_is_an_error_unless_allowed(key, split_dir, make_scan_table):
    spec = COHORT_SPECS[key]
    scans = make_scan_table(spec, split_dir)
    with pytest.raises(CohortLeakageError, match="allow_leakage=True") as error:
        build_cohort_manifest(spec, split_dir=split_dir, scan_table=scans, check_files=False)
    assert error.value.report.leakage_action == "error"
    assert len(error.value.report.leaked_subjects) == sum(LEAKAGE[key].values())

    manifest, report = build_cohort_manifest(
        spec, split_dir=split_dir, scan_table=scans, check_files=False, allow_leakage=True
    )
    table, _, _ = read_split_files(spec, split_dir)
    leaked = set(report.leaked_subjects)
    in_later = table[table["subject_id"].isin(leaked) & table["split"].ne("train")]
    assert sorted(report.dropped_by("leakage")["source_row"]) == sorted(in_later["source_row"])
    kept = manifest[manifest["subject_id"].isin(leaked)]
    assert set(kept["split"]) == {"train"}  # each leaked subject stays in its earliest split
