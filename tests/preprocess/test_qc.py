"""QC: metric oracles, the paired chain equals the training chain, broken scans flagged exactly, calibration, CLI."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import mutual_info_score

from neurojepa_pl.data import load_manifest, validate_manifest
from neurojepa_pl.data.transforms import TransformSettings, loading_transforms
from neurojepa_pl.preprocess.qc import (
    TemplateResampler,
    apply_thresholds,
    calibrate_thresholds,
    file_conformance,
    load_pair,
    load_thresholds,
    mutual_information,
    pearson,
    psnr,
    run_qc,
)

SETTINGS = TransformSettings(pad_crop_size=None, target_spacing=None, resize_to=(34, 40, 34), spatial_size=(32, 36, 32))
TINY_CHAIN_ARGS = ["--pad-crop-size", "none", "--target-spacing", "none", "--resize-to", "34", "40", "34",
                   "--spatial-size", "32", "36", "32"]  # fmt: skip


def test_mutual_information_oracles():
    rng = np.random.default_rng(0)
    half = np.repeat([0.25, 0.75], 5000)
    assert mutual_information(half, half, bins=2) == pytest.approx(math.log(2))
    a, b = rng.uniform(size=200_000), rng.uniform(size=200_000)
    assert mutual_information(a, b) < 0.02  # independent: ~ (bins-1)^2 / 2N bias only
    joint = np.clip(a + 0.1 * b, 0, 1)
    expected = mutual_info_score((a * 64).astype(int).clip(0, 63), (joint * 64).astype(int).clip(0, 63))
    assert mutual_information(a, joint) == pytest.approx(expected, rel=1e-9)


def test_psnr_and_pearson_oracles():
    zeros = np.zeros((4, 5, 6))
    assert psnr(zeros, zeros + 0.1) == pytest.approx(20.0)
    assert psnr(zeros, zeros) == math.inf
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=500), rng.normal(size=500)
    assert pearson(x, 2 * x + 0.3 * y) == pytest.approx(np.corrcoef(x, 2 * x + 0.3 * y)[0, 1])
    mask = x > 0
    assert pearson(x, y, mask) == pytest.approx(np.corrcoef(x[mask], y[mask])[0, 1])
    assert math.isnan(pearson(np.ones(5), x[:5]))


def test_paired_chain_gives_the_scan_exactly_the_training_chain(qc_cohort):
    path = pd.read_csv(qc_cohort["good"])["path"].iloc[0]
    scan, template = load_pair(path, "T1w", SETTINGS, TemplateResampler())
    expected = loading_transforms(SETTINGS)({"image": path})["image"][0].numpy()
    np.testing.assert_array_equal(scan, expected)
    assert template.shape == scan.shape == SETTINGS.resize_to
    assert 0.0 <= template.min() and template.max() <= 1.0


def test_file_conformance_reports_orientation_spacing_and_unreadable(qc_cohort, tmp_path):
    import nibabel as nib

    good = file_conformance(pd.read_csv(qc_cohort["good"])["path"].iloc[0])
    assert good["readable"] and good["orientation"] == "RAS" and all(3.0 < s < 3.3 for s in good["spacing"])
    assert good["is_3d"] and good["nonfinite"] == 0 and 0.1 < good["foreground_fraction"] < 0.5
    data = np.zeros((6, 7, 8), dtype=np.float32)
    data[2, 3, 4] = np.nan
    data[1, 1, 1] = 5.0
    nib.save(nib.Nifti1Image(data, np.diag([-2.0, 2.0, 2.0, 1.0])), str(tmp_path / "las.nii.gz"))
    las = file_conformance(tmp_path / "las.nii.gz")
    assert las["orientation"] == "LAS" and las["nonfinite"] == 1 and las["intensity_max"] == 5.0
    broken = file_conformance(qc_cohort["broken"]["truncated"])
    assert not broken["readable"] and broken["read_error"]


def test_default_thresholds_flag_exactly_the_broken_scans(qc_cohort):
    thresholds = load_thresholds()
    results, used = run_qc(load_manifest(qc_cohort["all"]), thresholds, SETTINGS)
    failed = set(results.loc[~results["qc_pass"], "path"])
    assert failed == set(qc_cohort["broken"].values()), results[["path", "qc_reason"]].to_string()
    reasons = dict(zip(results["path"], results["qc_reason"]))
    assert reasons[qc_cohort["broken"]["truncated"]].startswith("unreadable")
    assert "pearson" in reasons[qc_cohort["broken"]["misregistered"]]
    assert "pearson" in reasons[qc_cohort["broken"]["wrong_orientation"]]
    assert "psnr" in reasons[qc_cohort["broken"]["noisy"]] or "mi" in reasons[qc_cohort["broken"]["noisy"]]
    assert used == thresholds
    # validate-manifest flags the unreadable file and nothing else (it reads files; image content is QC's job).
    report = validate_manifest(load_manifest(qc_cohort["all"]))
    assert {p.path for p in report.errors} == {qc_cohort["broken"]["truncated"]}
    from neurojepa_pl.cli import main

    assert main(["validate-manifest", str(qc_cohort["all"])]) == 1


def test_calibration_sets_minima_at_the_quantile():
    metrics = pd.DataFrame(
        {
            "modality": ["T1w"] * 5 + ["FLAIR"] * 2,
            "qc_mi": [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
            "qc_psnr": [20, 21, 22, 23, 24, 10, 12],
            "qc_pearson": [0.9, 0.8, 0.95, 0.85, 0.7, 0.4, 0.6],
        }
    )
    base = {"modalities": {"T1w": {"spacing_mm": [0.5, 4.0]}}}
    calibrated = calibrate_thresholds(metrics, 0.25, base=base)
    t1 = calibrated["modalities"]["T1w"]
    assert t1 == {"spacing_mm": [0.5, 4.0], "mi_min": 0.7, "psnr_min": 21.0, "pearson_min": 0.8}
    assert calibrated["modalities"]["FLAIR"]["pearson_min"] == pytest.approx(0.45)
    assert calibrated["calibration"] == {"quantile": 0.25, "margin": 0.0, "scans_per_modality": {"FLAIR": 2, "T1w": 5}}
    with_margin = calibrate_thresholds(metrics, 0.0, margin=0.1)["modalities"]["T1w"]
    assert with_margin["pearson_min"] == pytest.approx(0.63) and with_margin["psnr_min"] == pytest.approx(18.0)
    with pytest.raises(ValueError, match="quantile"):
        calibrate_thresholds(metrics, 1.5)


def test_rejected_scans_fail_with_the_chain_reason_only():
    row = {
        "modality": "T1w", "qc_readable": True, "qc_read_error": "", "qc_reject": "no voxel is > 0", "qc_nonfinite": 0,
        "qc_intensity_min": 0.0, "qc_intensity_max": 0.0, "qc_mi": math.nan, "qc_psnr": math.nan,
        "qc_pearson": math.nan, "qc_spacing": (1.0, 1.0, 1.0), "qc_foreground_fraction": 0.0,
    }  # fmt: skip
    out = apply_thresholds(pd.DataFrame([row]), load_thresholds())
    assert out["qc_reason"].iloc[0] == "constant image; rejected by the loading chain (no voxel is > 0)"


def test_apply_thresholds_lists_every_failed_check():
    row = {
        "modality": "T1w", "qc_readable": True, "qc_read_error": "", "qc_reject": "", "qc_nonfinite": 3,
        "qc_intensity_min": 0.0, "qc_intensity_max": 1.0, "qc_mi": 0.1, "qc_psnr": 30.0, "qc_pearson": 0.95,
        "qc_spacing": (1.0, 1.0, 9.0), "qc_foreground_fraction": 0.9,
    }  # fmt: skip
    thresholds = {"modalities": {"T1w": {"mi_min": 0.5, "psnr_min": 10, "pearson_min": 0.5, "spacing_mm": [0.5, 4],
                                          "foreground_fraction": [0.05, 0.6]}}}  # fmt: skip
    out = apply_thresholds(pd.DataFrame([row, {**row, "modality": "DWI"}]), thresholds)
    assert out["qc_reason"].iloc[0] == (
        "3 non-finite voxels; mi 0.100 < 0.5; spacing (1.0, 1.0, 9.0) outside [0.5, 4] mm; "
        "foreground fraction 0.900 outside [0.05, 0.6]"
    )
    assert "no thresholds for modality 'DWI'" in out["qc_reason"].iloc[1]
    assert not out["qc_pass"].any()


@pytest.mark.slow  # two full CLI runs (templates, 28 scans, thumbnails): ~15 s on an idle 2-core machine
def test_qc_cli_calibrate_then_apply(qc_cohort, tmp_path):
    from neurojepa_pl.cli import main

    calibration_dir = tmp_path / "calibration"
    assert (
        main(["qc", str(qc_cohort["good"]), "--out", str(calibration_dir), "--calibrate", "0", *TINY_CHAIN_ARGS]) == 0
    )
    calibrated = yaml.safe_load((calibration_dir / "qc_thresholds.yaml").read_text())
    assert calibrated["calibration"]["quantile"] == 0.0
    good = pd.read_csv(calibration_dir / "qc_manifest.csv")
    assert good["qc_pass"].all()  # quantile 0 = the lowest good scan's value: every reference scan passes
    assert good.loc[good["modality"] == "T1w", "qc_pearson"].min() == pytest.approx(
        calibrated["modalities"]["T1w"]["pearson_min"], abs=1e-4
    )

    out = tmp_path / "qc"
    code = main(["qc", str(qc_cohort["all"]), "--out", str(out), "--strict", "--worst", "3",
                 "--thresholds", str(calibration_dir / "qc_thresholds.yaml"), *TINY_CHAIN_ARGS])  # fmt: skip
    assert code == 1  # --strict: some scans failed
    results = pd.read_csv(out / "qc_manifest.csv")
    assert set(results.loc[~results["qc_pass"], "path"]) == set(qc_cohort["broken"].values())
    html = (out / "qc_report.html").read_text()
    assert "Failed scans" in html and html.count("<img") == 2  # 3 worst: 2 images + the unreadable one
    assert len(list((out / "thumbnails").glob("*.png"))) == 2
