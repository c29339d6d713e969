"""End-to-end checks of rendered SynthBrain subjects and the written cohort (tiny 48x54x48 grid)."""

from __future__ import annotations

import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from neurojepa_pl.synth import generate_cohort, generate_subject, load_atlas, sample_subject_labels
from neurojepa_pl.synth.cohort import MANIFEST_COLUMNS

TINY_GRID = (48, 54, 48)
ORDERINGS = {"T1w": ("wm", "gm", "csf"), "T2w": ("csf", "gm", "wm"), "FLAIR": ("gm", "wm", "csf")}
HEALTHY = {"wmh": 0.0, "tumour": 0.0, "haemorrhage": 0.0, "infarct": 0.0}


def _sessions(subjects):
    return [(subject, session) for subject in subjects for session in subject.sessions]


def test_manifest_schema_and_files(synth_cohort):
    manifest = pd.read_csv(synth_cohort, dtype={"subject_id": str, "session_id": str})
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    assert "split" not in manifest.columns
    assert set(manifest["modality"]) == {"T1w", "T2w", "FLAIR"}
    assert manifest["subject_id"].nunique() == 12
    assert (manifest["survival_time"] > 0).all()
    assert set(manifest["sex"]) <= {"M", "F"}
    atlas = load_atlas(TINY_GRID)
    for path in manifest["path"]:
        image = nib.load(synth_cohort.parent / path)
        assert image.shape == TINY_GRID
        assert image.get_data_dtype() == np.int16
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        assert np.allclose(image.affine, atlas.affine, atol=1e-4)
    assert (synth_cohort.parent / "participants.tsv").exists()
    assert (synth_cohort.parent / "dataset_description.json").exists()


def test_manifest_passes_the_data_validator(synth_cohort):
    from neurojepa_pl.data import validate_manifest

    report = validate_manifest(synth_cohort, check_readable="header")
    assert not report.errors, report


def test_written_scans_equal_the_in_memory_subjects(synth_cohort, tiny_subjects):
    manifest = pd.read_csv(synth_cohort, dtype={"subject_id": str, "session_id": str})
    for subject, session in _sessions(tiny_subjects[:4]):
        rows = manifest[(manifest.subject_id == subject.subject_id) & (manifest.session_id == session.session_id)]
        assert len(rows) == 3
        for _, row in rows.iterrows():
            data = np.asarray(nib.load(synth_cohort.parent / row["path"]).dataobj)
            assert np.array_equal(data, session.images[row["modality"]])
            for key, value in session.labels.items():
                assert row[key] == pytest.approx(value) if isinstance(value, float) else row[key] == value


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(synth_cohort, tmp_path):
    again = generate_cohort(tmp_path / "again", n_subjects=2, seed=0, grid=TINY_GRID)
    other = generate_cohort(tmp_path / "other", n_subjects=2, seed=1, grid=TINY_GRID)
    for path in again["path"]:
        # A 2-subject cohort reproduces the first subjects of the 12-subject one byte for byte.
        assert (tmp_path / "again" / path).read_bytes() == (synth_cohort.parent / path).read_bytes()
    first = other["path"].iloc[0]
    assert (tmp_path / "other" / first).read_bytes() != (synth_cohort.parent / first).read_bytes()


def test_tissue_orderings_hold_for_every_session(tiny_subjects):
    for subject, session in _sessions(tiny_subjects):
        tissue = session.tissue
        lesion = sum(tissue[k] for k in ("wmh", "tumour", "oedema", "haemorrhage", "infarct", "gliosis"))
        # Voxels dominated by one tissue; GM also away from CSF, whose partial volume darkens FLAIR cortex.
        masks = {k: (tissue[k] > 0.5) & (lesion < 0.05) for k in ("gm", "wm", "csf")}
        masks["gm"] &= (tissue["gm"] > 0.6) & (tissue["csf"] < 0.15)
        for modality, order in ORDERINGS.items():
            image = session.images[modality]
            means = {k: float(image[m].mean()) for k, m in masks.items()}
            for higher, lower in itertools.pairwise(order):
                assert means[higher] > means[lower], (subject.subject_id, session.session_id, modality, means)


def test_skull_stripped_zero_outside_the_brain(tiny_subjects):
    for _subject, session in _sessions(tiny_subjects[:3]):
        inside = sum(session.tissue[k] for k in session.tissue) > 0
        for image in session.images.values():
            assert not image[~inside].any()
            assert (image[inside] > 0).mean() > 0.95


def test_lesion_labels_match_the_images(tiny_subjects):
    for subject, session in _sessions(tiny_subjects):
        labels, tissue = session.labels, session.tissue
        assert (labels["wmh_volume_ml"] > 0) == (labels["wmh"] == 1)
        assert (labels["tumour_volume_ml"] > 0) == (labels["tumour"] == 1)
        assert labels["any_lesion"] == int(any(labels[k] for k in ("wmh", "tumour", "haemorrhage", "infarct")))
        voxel_ml = load_atlas(TINY_GRID).voxel_ml
        assert labels["tumour_volume_ml"] == pytest.approx(tissue["tumour"].sum() * voxel_ml, rel=1e-3, abs=1e-3)
        if labels["tumour"]:
            # Measured volume close to the plan's nominal volume, and the core is bright on T2w.
            nominal = subject.plan.sessions[int(session.session_id[-2:]) - 1].tumour_volume_ml
            assert labels["tumour_volume_ml"] == pytest.approx(nominal, rel=0.1)
            t2 = session.images["T2w"]
            core = tissue["tumour"] > 0.5
            white = (tissue["wm"] > 0.8) & ~core
            assert t2[core].mean() > 1.5 * t2[white].mean()


def test_wmh_is_nearly_invisible_on_t1w_but_bright_on_flair():
    only_wmh = {**HEALTHY, "wmh": 1.0}
    index = next(i for i in range(100) if sample_subject_labels(0, i, prevalence=only_wmh).flags["wmh"])
    session = generate_subject(0, index, grid=TINY_GRID, prevalence=only_wmh, return_tissue=True).sessions[0]
    tissue = session.tissue
    assert session.labels["wmh_volume_ml"] > 1.0
    white = (tissue["wm"] > 0.8) & (tissue["wmh"] < 0.01)
    ratio = {}
    for modality in ("T1w", "T2w", "FLAIR"):
        image = session.images[modality]
        lesion_mean = (image * tissue["wmh"]).sum() / tissue["wmh"].sum()  # WMH-weighted mean
        ratio[modality] = lesion_mean / image[white].mean()
    assert 0.9 < ratio["T1w"] < 1.05, ratio
    assert ratio["FLAIR"] > 1.3 and ratio["T2w"] > 1.3, ratio


def test_wmh_scale_paints_proportionally_more_lesion():
    only_wmh = {**HEALTHY, "wmh": 1.0}
    index = next(i for i in range(100) if sample_subject_labels(0, i, prevalence=only_wmh).flags["wmh"])
    volumes = [
        generate_subject(0, index, grid=TINY_GRID, prevalence=only_wmh, wmh_scale=scale)
        .sessions[0]
        .labels["wmh_volume_ml"]
        for scale in (1.0, 3.0)
    ]
    assert volumes[0] > 1.0
    assert volumes[1] == pytest.approx(3.0 * volumes[0], rel=0.1)  # painted (measured) volume, not only the plan


def test_csf_fraction_grows_with_age():
    subjects = [generate_subject(0, i, grid=TINY_GRID, prevalence=HEALTHY, return_tissue=True) for i in range(10)]
    ages, fractions = [], []
    for _subject, session in _sessions(subjects):
        tissue = session.tissue
        ages.append(session.labels["age"])
        fractions.append(tissue["csf"].sum() / (tissue["gm"] + tissue["wm"] + tissue["csf"]).sum())
    rho, _ = spearmanr(ages, fractions)
    assert rho > 0.8, (ages, fractions)


def test_follow_up_sessions_keep_the_subject_anatomy(tiny_subjects):
    multi = [s for s in tiny_subjects if len(s.sessions) > 1]
    assert multi, "the 12-subject cohort should contain follow-up sessions"
    subject = multi[0]
    first, later = subject.sessions[0], subject.sessions[-1]
    assert later.labels["age"] > first.labels["age"]
    assert later.labels["survival_time"] < first.labels["survival_time"]
    same = np.corrcoef(first.tissue["wm"].ravel(), later.tissue["wm"].ravel())[0, 1]
    other = next(s for s in tiny_subjects if s.subject_id != subject.subject_id)
    different = np.corrcoef(first.tissue["wm"].ravel(), other.sessions[0].tissue["wm"].ravel())[0, 1]
    assert same > different
    assert later.tissue["csf"].sum() > first.tissue["csf"].sum()  # atrophy progresses


def test_a_contrast_does_not_depend_on_which_others_are_rendered():
    alone = generate_subject(2, 3, grid=TINY_GRID, modalities=("FLAIR",))
    together = generate_subject(2, 3, grid=TINY_GRID)
    assert np.array_equal(alone.sessions[0].images["FLAIR"], together.sessions[0].images["FLAIR"])
    assert set(alone.sessions[0].images) == {"FLAIR"}


def test_split_is_patient_level(tmp_path):
    manifest = generate_cohort(tmp_path, n_subjects=10, seed=4, grid=TINY_GRID, modalities=("T1w",), split=True)
    assert set(manifest["split"]) <= {"train", "val", "test"}
    assert (manifest.groupby("subject_id")["split"].nunique() == 1).all()
    assert pd.read_csv(tmp_path / "manifest.csv")["split"].tolist() == manifest["split"].tolist()


def test_workers_give_the_same_files(tmp_path):
    serial = generate_cohort(tmp_path / "serial", n_subjects=3, seed=5, grid=TINY_GRID, modalities=("T2w",))
    parallel = generate_cohort(
        tmp_path / "parallel", n_subjects=3, seed=5, grid=TINY_GRID, modalities=("T2w",), workers=2
    )
    assert serial.equals(parallel)
    for path in serial["path"]:
        assert (tmp_path / "serial" / path).read_bytes() == (tmp_path / "parallel" / path).read_bytes()


def test_mni_grid_subject(tmp_path):
    manifest = generate_cohort(tmp_path, n_subjects=1, seed=0, grid="mni", modalities=("T1w",))
    image = nib.load(tmp_path / manifest["path"].iloc[0])
    assert image.shape == (182, 218, 182)
    assert np.allclose(image.affine[:3, 3], (-90, -126, -72))
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    assert Path(tmp_path / "manifest.csv").exists()


def test_monai_orientation_sees_ras(synth_cohort):
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation

    manifest = pd.read_csv(synth_cohort)
    path = synth_cohort.parent / manifest["path"].iloc[0]
    loaded = Compose([LoadImage(image_only=True), EnsureChannelFirst()])(str(path))
    oriented = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(loaded)
    assert np.array_equal(np.asarray(oriented), np.asarray(loaded))
    assert np.allclose(oriented.affine.numpy(), load_atlas(TINY_GRID).affine, atol=1e-4)


def test_warp_guard_refuses_a_brain_leaving_the_synthesis_points(monkeypatch):
    import torch

    from neurojepa_pl.synth import anatomy

    atlas = load_atlas(TINY_GRID)
    monkeypatch.setattr(anatomy, "OUTSIDE_DISPLACEMENT_CAP_MM", 100.0)
    shift = anatomy.Jitter((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    warp = torch.zeros((3, *anatomy.lattice_shape(atlas)))
    warp[0] = 30.0  # every point samples the atlas 30 mm to the right: the brain moves left, off its points
    state = anatomy.session_state(atlas, warp, shift, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="outermost synthesis points"):
        anatomy.warp_atlas(atlas, state)


STROKE = {"acute_infarct": 1.0, "infarct": 1.0, "wmh": 1.0}


@pytest.fixture(scope="module")
def stroke_subjects():
    """Three subjects of a stroke cohort (every one with an acute and a chronic infarct and WMH), with DWI."""
    return [
        generate_subject(
            0, i, grid=TINY_GRID, modalities=("T1w", "FLAIR", "DWI"), prevalence=STROKE, return_tissue=True
        )
        for i in range(3)
    ]


def test_dwi_tissue_ordering_of_a_b1000_trace(stroke_subjects):
    for subject in stroke_subjects:
        session = subject.sessions[0]
        tissue, acute, dwi = session.tissue, session.acute, session.images["DWI"]
        lesion = sum(tissue[k] for k in ("wmh", "tumour", "oedema", "haemorrhage", "infarct", "gliosis"))
        clean = (lesion < 0.05) & (acute < 0.01)
        means = {k: float(dwi[(tissue[k] > 0.5) & clean].mean()) for k in ("gm", "wm", "csf")}
        means["acute"] = float((dwi * acute).sum() / acute.sum())  # acute-core-weighted mean
        means["chronic infarct"] = float(dwi[tissue["infarct"] > 0.5].mean())
        means["gliosis"] = float(dwi[tissue["gliosis"] > 0.5].mean())
        parenchyma = max(means["gm"], means["wm"])
        # GM ~ WM moderate, CSF very dark, the acute core very bright, chronic lesions not bright.
        assert 0.75 < means["gm"] / means["wm"] < 1.33, (subject.subject_id, means)
        assert means["csf"] < 0.5 * min(means["gm"], means["wm"]), (subject.subject_id, means)
        assert means["acute"] > 1.35 * parenchyma, (subject.subject_id, means)
        assert means["chronic infarct"] < 0.6 * means["wm"] and means["gliosis"] < 1.1 * parenchyma, means


def test_acute_infarct_is_invisible_on_flair_and_t1w(stroke_subjects):
    # The DWI-FLAIR mismatch of the first hours: the core is still GM/WM on the structural contrasts.
    for subject in stroke_subjects:
        session = subject.sessions[0]
        acute = session.acute
        for modality in ("T1w", "FLAIR"):
            image = session.images[modality]
            tissue = session.tissue
            healthy = tissue["gm"] + tissue["wm"]
            near = (acute < 0.01) & (healthy > 0.9)
            core = (image * acute).sum() / acute.sum()
            assert 0.75 < core / image[near].mean() < 1.3, (subject.subject_id, modality)


def test_acute_infarct_labels(stroke_subjects):
    for subject in stroke_subjects:
        assert len(subject.sessions) == 1  # scanned at admission only
        labels = subject.sessions[0].labels
        assert labels["acute_infarct"] == 1 and labels["any_lesion"] == 1
        nominal = subject.plan.acute_infarct.volume_ml[0]
        assert labels["acute_infarct_volume_ml"] == pytest.approx(nominal, rel=0.1)
        voxel_ml = load_atlas(TINY_GRID).voxel_ml
        session = subject.sessions[0]
        measured = (session.acute * (session.tissue["gm"] + session.tissue["wm"])).sum() * voxel_ml
        assert labels["acute_infarct_volume_ml"] == pytest.approx(measured, rel=1e-3)


def test_adding_dwi_leaves_the_structural_contrasts_bit_identical(stroke_subjects):
    for index, with_dwi in enumerate(stroke_subjects[:2]):
        without = generate_subject(0, index, grid=TINY_GRID, modalities=("T1w", "FLAIR"), prevalence=STROKE)
        for modality in ("T1w", "FLAIR"):
            assert np.array_equal(without.sessions[0].images[modality], with_dwi.sessions[0].images[modality])
    # The same without any acute infarct, for T2w.
    plain = generate_subject(2, 3, grid=TINY_GRID, modalities=("T2w",))
    dwi_too = generate_subject(2, 3, grid=TINY_GRID, modalities=("T2w", "DWI"))
    assert np.array_equal(plain.sessions[0].images["T2w"], dwi_too.sessions[0].images["T2w"])
    assert set(dwi_too.sessions[0].images) == {"T2w", "DWI"}


def test_cohort_writes_dwi_in_its_bids_folder(tmp_path):
    manifest = generate_cohort(tmp_path, n_subjects=2, seed=1, grid=TINY_GRID, modalities=("T1w", "DWI"))
    dwi = manifest[manifest["modality"] == "DWI"]
    assert len(dwi) == manifest["session_id"].groupby(manifest["subject_id"]).nunique().sum()
    assert all(p.endswith("_dwi.nii.gz") and "/dwi/" in p for p in dwi["path"])
    image = nib.load(tmp_path / dwi["path"].iloc[0])
    assert image.shape == TINY_GRID and image.get_data_dtype() == np.int16
    from neurojepa_pl.data import validate_manifest

    assert not validate_manifest(tmp_path / "manifest.csv", check_readable="header").errors
