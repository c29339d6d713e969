"""Label signatures of fine-tuning data modules and the cross-cohort label check."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest

from neurojepa_pl.data.label_mapping import LabelSignature, check_label_mapping, label_signature
from neurojepa_pl.data_modules.cohorts import get_cohort_spec
from neurojepa_pl.errors import UserValueError


def _manifest_dm(task="binary", columns=("tumour",), num_classes=2, manifest="/data/a/manifest.csv", sites=None):
    frame = None
    if sites is not None:
        frame = pd.DataFrame([{"split": split, "site": site} for split, names in sites.items() for site in names])
    return SimpleNamespace(
        task=task,
        label_columns=list(columns),
        num_classes=num_classes,
        hparams={"manifest": manifest, "modality": "FLAIR", "time_column": None, "event_column": None},
        frame=frame,
    )


def _cohort_dm(cohort, task, modality, label_columns, num_classes=2):
    dm = _manifest_dm(columns=label_columns, num_classes=num_classes, manifest="/work/x_manifest.csv")
    dm.spec = get_cohort_spec(cohort, task, modality)
    dm.task = dm.spec.task_type
    return dm


def test_cohort_signatures_share_the_endpoint_whatever_the_column_spelling():
    nacc = label_signature(_cohort_dm("NACC", "amyloid", "FLAIR", ["AMYLOID"]))
    adni = label_signature(_cohort_dm("ADNI", "amyloid", "FLAIR", ["AMYLPET"]))
    assert (nacc.endpoint, adni.endpoint) == ("amyloid_positivity", "amyloid_positivity")
    assert nacc.classes == adni.classes == ("negative", "positive")
    assert (nacc.cohort, adni.cohort, nacc.columns, adni.columns) == ("NACC", "ADNI", ("AMYLOID",), ("AMYLPET",))
    # A cohort task without a shared endpoint is its own.
    ppmi = label_signature(_cohort_dm("PPMI", "diagnosis", "T1w", ["Diagnosis"], num_classes=3))
    assert ppmi.endpoint == "PPMI/diagnosis" and ppmi.classes == ("class 0", "class 1", "class 2")


def test_matching_labels_return_both_sides_for_the_report():
    source = label_signature(_cohort_dm("NACC", "ad", "T1w", ["AD"])).to_dict()
    result = check_label_mapping(source, _cohort_dm("ADNI", "ad", "T1w", ["AD"]), "best.ckpt")
    assert result["cross_cohort"] is True
    assert (result["source"]["cohort"], result["target"]["cohort"]) == ("NACC", "ADNI")
    assert LabelSignature.from_dict(result["source"]) == LabelSignature.from_dict(source)


def test_same_manifest_is_in_cohort_and_a_held_out_site_is_cross_cohort():
    train_sites = {"train": ["site-0", "site-1"], "test": ["site-0", "site-1"]}
    source = label_signature(_manifest_dm(sites=train_sites)).to_dict()
    same = check_label_mapping(source, _manifest_dm(sites=train_sites))
    assert same["cross_cohort"] is False and same["target"]["sites"] == ["site-0", "site-1"]
    held_out = _manifest_dm(manifest="/data/a/manifest.csv", sites={"test": ["site-2"]})
    assert check_label_mapping(source, held_out)["cross_cohort"] is True


@pytest.mark.parametrize(
    "target, differing",
    [
        (_cohort_dm("ADNI", "amyloid", "T1w", ["AMYLPET"]), "endpoint"),
        (_manifest_dm(task="multiclass", columns=("grade",), num_classes=3), "task, num_outputs, endpoint, classes"),
        (_manifest_dm(columns=("infarct",)), "endpoint"),
    ],
)
def test_mismatched_labels_name_both_sides_and_the_fix(target, differing):
    source = label_signature(_cohort_dm("NACC", "ad", "T1w", ["AD"])).to_dict()
    with pytest.raises(UserValueError) as info:
        check_label_mapping(source, target, "runs/x/best.ckpt")
    message = str(info.value)
    assert f"({differing} differ)" in message
    assert "source (checkpoint): NACC (T1w): binary alzheimers_disease" in message
    assert "target (test data):" in message and "runs/x/best.ckpt" in message
    assert "fix:" in message and "same endpoint" in message


def test_checkpoint_without_a_signature_is_reported_not_checked(caplog):
    with caplog.at_level("WARNING"):
        assert check_label_mapping(None, _manifest_dm(), "old.ckpt") is None
    assert "stores no label signature" in caplog.text and "old.ckpt" in caplog.text


def test_survival_and_multilabel_signatures():
    survival = _manifest_dm(task="survival", columns=(), num_classes=1)
    survival.hparams.update(time_column="survival_time", event_column="survival_event")
    signature = label_signature(survival)
    assert signature.columns == ("survival_time", "survival_event") and signature.classes == ()
    multilabel = label_signature(_manifest_dm(task="multilabel", columns=("wmh", "tumour"), num_classes=2))
    assert multilabel.classes == ("wmh", "tumour")
    # Multilabel heads are matched output by output: the same labels in another order do not match.
    reordered = _manifest_dm(task="multilabel", columns=("tumour", "wmh"), num_classes=2)
    with pytest.raises(UserValueError, match="endpoint, classes"):
        check_label_mapping(multilabel.to_dict(), reordered)
