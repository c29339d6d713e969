"""ID normalisation rules and CohortSpec validation."""

from __future__ import annotations

import pytest

from neurojepa_pl.data_modules.cohorts import CohortSpec, LabelColumn, loni_image_key, normalise_id, oasis_session_key


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ("011_S_0003", "011s0003"),  # ADNI subject vs BIDS sub-011S0003
        ("sub-011S0003", "011s0003"),
        ("UCSF-PDGM-0005", "ucsfpdgm0005"),
        ("sub-UCSFPDGM0005", "ucsfpdgm0005"),
        ("sub-8a2a2a3d", "8a2a2a3d"),  # ICSPR IDs carry the BIDS prefix in the split file
        (" NACC770461 ", "nacc770461"),
        ("0010001", "0010001"),  # leading zeros are kept
        ("ses-01", "01"),
    ],
)
def test_normalise_id(raw, key):
    assert normalise_id(raw) == key


def test_loni_image_key_matches_with_and_without_the_I():
    assert loni_image_key("I32237") == loni_image_key("32237") == "32237"
    assert loni_image_key("ses-I10420796") == "10420796"
    assert loni_image_key("IMG7") == "img7"  # not an image ID: only normalised


def test_oasis_session_key_keeps_the_day_label():
    assert oasis_session_key("OAS30002_MR_d0653") == "d0653"
    assert oasis_session_key("OAS30002MRd0653") == "d0653"
    assert oasis_session_key("ses-d0653") == "d0653"
    assert oasis_session_key("OAS30002_MR_d0653") != oasis_session_key("OAS30002_MR_d1680")


def _spec(**overrides) -> CohortSpec:
    fields = dict(
        cohort="X",
        task="t",
        modality="T1w",
        split_pattern="x_{split}.csv",
        subject_column="id",
        task_type="binary",
        labels=(LabelColumn("y", "binary"),),
        task_labels=("y",),
    )
    fields.update(overrides)
    return CohortSpec(**fields)


def test_spec_properties():
    spec = _spec(modality="T1w+FLAIR", scan_columns={"T1w": "a", "FLAIR": "b"})
    assert spec.modalities == ("T1w", "FLAIR")
    assert spec.is_multimodal and spec.join_level == "scan"
    assert _spec().join_level == "subject"
    assert _spec(path_columns={"T1w": "img_path"}).join_level == "path"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"modality": "T1"}, "modality 'T1'"),
        ({"task_type": "ordinal"}, "task_type"),
        ({"split_pattern": "x.csv"}, "{split}"),
        ({"task_labels": ("z",)}, "task labels ['z']"),
        ({"modality": "T1w+FLAIR", "scan_columns": {"T1w": "a"}}, "scan_columns must name every modality"),
        ({"task_type": "survival"}, "time_column and event_column"),
        ({"scan_key_rule": "nope"}, "scan_key_rule"),
    ],
)
def test_spec_rejects_inconsistent_fields(overrides, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("{", r"\{")):
        _spec(**overrides)


def test_label_specs_use_the_manifest_vocabulary():
    spec = _spec(labels=(LabelColumn("y", "categorical", num_classes=3),), task_labels=("y",), task_type="multiclass")
    label_spec = spec.label_specs()["y"]
    assert (label_spec.kind, label_spec.num_classes, label_spec.allow_nan) == ("categorical", 3, True)
