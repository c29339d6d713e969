"""Preprocessing orchestration with injected steps (ANTs is an optional extra), plus a real-ANTs check when present."""

from __future__ import annotations

import importlib.util
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from neurojepa_pl.preprocess.pipeline import (
    MissingDependencyError,
    PreprocessSteps,
    default_steps,
    output_path_for,
    preprocess_manifest,
    read_status,
    reorient_to_ras,
)


# Module-level steps: picklable for the worker-process test. `doubling` appends to a log file so calls can be counted.
def doubling(input_path: Path, output_path: Path, modality: str, log: str) -> None:
    with open(log, "a") as handle:
        handle.write(f"{Path(input_path).name}\n")
    image = nib.load(str(input_path))
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj) * 2.0, image.affine), str(output_path))


def failing_on_value(input_path: Path, output_path: Path, modality: str) -> None:
    image = nib.load(str(input_path))
    if float(np.asarray(image.dataobj).max()) > 1000:  # the "bad" scan carries a marker value
        raise RuntimeError("registration diverged")
    nib.save(image, str(output_path))


def _write_las(path: Path, data: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([-2.0, 2.0, 2.0, 1.0])  # LAS, 2 mm
    affine[:3, 3] = [20.0, -20.0, -20.0]
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(path))
    return str(path)


@pytest.fixture
def raw_cohort(tmp_path):
    rows = []
    rng = np.random.default_rng(0)
    for i in range(4):
        data = rng.uniform(1, 10, size=(6, 7, 8))
        if i == 2:
            data[0, 0, 0] = 5000.0  # makes failing_on_value fail on this scan only
        path = _write_las(tmp_path / "raw" / f"s{i}_T1w.nii.gz", data)
        rows.append({"subject_id": f"{i:02d}", "session_id": "1", "modality": "T1w", "path": path, "age": 50 + i})
    return pd.DataFrame(rows)


def test_reorientation_gives_ras_with_the_same_world_content(tmp_path, raw_cohort):
    source = raw_cohort["path"].iloc[0]
    reorient_to_ras(Path(source), tmp_path / "ras.nii.gz", "T1w")
    before, after = nib.load(source), nib.load(str(tmp_path / "ras.nii.gz"))
    assert "".join(nib.aff2axcodes(before.affine)) == "LAS"
    assert "".join(nib.aff2axcodes(after.affine)) == "RAS"
    # Same voxel at the same world position: voxel (0, 0, 0) of LAS is voxel (5, 0, 0) of RAS (x reversed).
    np.testing.assert_array_equal(np.asarray(after.dataobj), np.asarray(before.dataobj)[::-1])
    np.testing.assert_allclose(after.affine @ [5, 0, 0, 1], before.affine @ [0, 0, 0, 1])


def test_steps_run_in_order_failures_are_recorded_and_others_continue(tmp_path, raw_cohort):
    log = str(tmp_path / "calls.log")
    steps = PreprocessSteps(
        reorient=reorient_to_ras, bias_correct=partial(doubling, log=log), register=failing_on_value
    )
    out = tmp_path / "out"
    result = preprocess_manifest(raw_cohort, out, steps)

    status = read_status(out)
    assert status["status"].tolist() == ["ok", "ok", "failed", "ok"]
    assert status.loc[2, "reason"] == "register: RuntimeError: registration diverged"
    assert (status["seconds"] >= 0).all() and set(status["steps"]) == {"reorient+bias_correct+register"}
    assert result["subject_id"].tolist() == ["00", "01", "03"] and result["age"].tolist() == [50, 51, 53]
    output = out / result["path"].iloc[0]
    assert output == output_path_for(out, "00", "1", raw_cohort["path"].iloc[0])
    assert output.parts[-4:] == ("sub-00", "ses-1", "anat", "s0_T1w.nii.gz")
    image = nib.load(str(output))
    assert "".join(nib.aff2axcodes(image.affine)) == "RAS"
    expected = 2.0 * np.asarray(nib.load(raw_cohort["path"].iloc[0]).dataobj)[::-1]
    np.testing.assert_allclose(np.asarray(image.dataobj), expected, rtol=1e-6)
    assert not (out / "sub-02" / "ses-1" / "anat" / "s2_T1w.nii.gz").exists()  # no half-written output
    assert not list(out.rglob(".work-*"))  # scratch folders removed
    assert pd.read_csv(out / "manifest.csv")["path"].tolist() == result["path"].tolist()


def test_resume_skips_done_scans_retries_failures_and_redoes_deleted_outputs(tmp_path, raw_cohort):
    log = tmp_path / "calls.log"
    out = tmp_path / "out"
    failing = PreprocessSteps(reorient=reorient_to_ras, bias_correct=partial(doubling, log=str(log)),
                              register=failing_on_value)  # fmt: skip
    preprocess_manifest(raw_cohort, out, failing)
    assert len(log.read_text().splitlines()) == 4
    with pytest.raises(FileExistsError, match="resume"):
        preprocess_manifest(raw_cohort, out, failing)

    (out / "sub-01" / "ses-1" / "anat" / "s1_T1w.nii.gz").unlink()
    fixed = PreprocessSteps(reorient=reorient_to_ras, bias_correct=partial(doubling, log=str(log)))
    result = preprocess_manifest(raw_cohort, out, fixed, resume=True)

    assert len(log.read_text().splitlines()) == 4 + 2  # only s1 (output deleted) and s2 (failed) run again
    this_run = result.attrs["status"]
    assert sorted(this_run["subject_id"]) == ["01", "02"] and (this_run["status"] == "ok").all()
    assert result["subject_id"].tolist() == ["00", "01", "02", "03"]
    assert len(read_status(out)) == 6  # attempts are appended, never overwritten


def test_unreadable_input_fails_in_the_reorient_step(tmp_path, raw_cohort):
    broken = Path(raw_cohort["path"].iloc[1])
    broken.write_bytes(broken.read_bytes()[:100])
    result = preprocess_manifest(raw_cohort, tmp_path / "out", PreprocessSteps(reorient=reorient_to_ras))
    status = read_status(tmp_path / "out")
    assert status.loc[1, "status"] == "failed" and status.loc[1, "reason"].startswith("reorient: ")
    assert len(result) == 3


def test_worker_processes_give_the_same_outputs(tmp_path, raw_cohort):
    log = str(tmp_path / "calls.log")
    steps = PreprocessSteps(reorient=reorient_to_ras, bias_correct=partial(doubling, log=log))
    serial = preprocess_manifest(raw_cohort, tmp_path / "serial", steps, workers=1)
    parallel = preprocess_manifest(raw_cohort, tmp_path / "parallel", steps, workers=2)
    assert serial["path"].tolist() == parallel["path"].tolist()
    for relative in serial["path"]:
        a = np.asarray(nib.load(str(tmp_path / "serial" / relative)).dataobj)
        b = np.asarray(nib.load(str(tmp_path / "parallel" / relative)).dataobj)
        np.testing.assert_array_equal(a, b)


def test_output_clash_and_paired_manifest_are_rejected(tmp_path, raw_cohort):
    clash = raw_cohort.assign(subject_id="00", path=raw_cohort["path"].iloc[0])
    with pytest.raises(ValueError, match="same output"):
        preprocess_manifest(clash, tmp_path / "a", PreprocessSteps(reorient=reorient_to_ras))
    with pytest.raises(ValueError, match="per-scan manifest"):
        preprocess_manifest(
            pd.DataFrame({"t1w_path": ["x"]}), tmp_path / "b", PreprocessSteps(reorient=reorient_to_ras)
        )


@pytest.mark.skipif(importlib.util.find_spec("ants") is not None, reason="ANTsPy is installed here")
def test_missing_ants_is_a_clear_error_and_the_cli_runs_without_it(tmp_path, raw_cohort, capsys):
    with pytest.raises(MissingDependencyError, match=r"neurojepa_pl\[preprocess\]"):
        default_steps(bias_correction=True, registration="Affine", skull_strip="none")
    from neurojepa_pl.cli import main

    manifest = tmp_path / "manifest.csv"
    raw_cohort.to_csv(manifest, index=False)
    assert main(["preprocess", str(manifest), "--out", str(tmp_path / "x")]) == 2
    assert "neurojepa_pl[preprocess]" in capsys.readouterr().err
    argv = ["preprocess", str(manifest), "--out", str(tmp_path / "y"), "--registration", "none",
            "--no-bias-correction", "--skull-strip", "none"]  # fmt: skip
    assert main(argv) == 0
    assert len(pd.read_csv(tmp_path / "y" / "manifest.csv")) == 4


def test_resampling_step_matches_monai_spacing_through_the_cli(tmp_path, raw_cohort, capsys):
    import torch
    from monai.transforms import EnsureChannelFirstd, LoadImaged, Spacingd

    from neurojepa_pl.cli import main

    manifest = tmp_path / "manifest.csv"
    raw_cohort.to_csv(manifest, index=False)
    argv = ["preprocess", str(manifest), "--out", str(tmp_path / "out"), "--registration", "none",
            "--no-bias-correction", "--skull-strip", "none", "--target-spacing", "1", "1.5", "1", "--device", "cpu",
            "--workers", "2"]  # fmt: skip
    assert main(argv) == 0
    result = pd.read_csv(tmp_path / "out" / "manifest.csv")
    status = read_status(tmp_path / "out")
    assert len(result) == 4 and set(status["steps"]) == {"reorient+resample"}
    for raw, written in zip(raw_cohort["path"], result["path"]):
        image = nib.load(str(tmp_path / "out" / written))
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        np.testing.assert_allclose(image.header.get_zooms(), (1.0, 1.5, 1.0), atol=1e-6)
        assert image.shape == (11, 9, 15)  # 6x7x8 voxels of 2 mm: MONAI's grid spans the voxel centres
        # the same as MONAI's Spacingd (order 5, border) on the reoriented scan
        reoriented = tmp_path / "ras.nii.gz"
        reorient_to_ras(Path(raw), reoriented, "T1w")
        data = EnsureChannelFirstd("image")(LoadImaged("image", image_only=True)({"image": str(reoriented)}))
        expected = Spacingd("image", pixdim=(1.0, 1.5, 1.0), mode=5, padding_mode="border")(data)["image"]
        assert float(torch.as_tensor(image.get_fdata() - expected[0].numpy()).abs().max()) < 1e-4
    if not torch.cuda.is_available():
        capsys.readouterr()
        assert main([*argv[:3], str(tmp_path / "gpu"), *argv[4:-4], "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_real_ants_n4_and_affine_recover_a_moved_template(tmp_path):
    pytest.importorskip("ants")
    from scipy.spatial.transform import Rotation

    from neurojepa_pl.preprocess.pipeline import ants_affine_to_mni, ants_n4
    from neurojepa_pl.preprocess.templates import load_template

    template = load_template("T1w")
    data = np.asarray(template.dataobj, dtype=np.float32)
    moved_affine = template.affine.copy()
    moved_affine[:3, :3] = Rotation.from_euler("z", 8, degrees=True).as_matrix() @ np.diag([1.05, 1.0, 0.95])
    moved_affine[:3, 3] += (6.0, -4.0, 3.0)
    nib.save(nib.Nifti1Image(data, moved_affine), str(tmp_path / "moved.nii.gz"))
    ants_n4(tmp_path / "moved.nii.gz", tmp_path / "n4.nii.gz", "T1w")
    ants_affine_to_mni(tmp_path / "n4.nii.gz", tmp_path / "registered.nii.gz", "T1w", transform="AffineFast")
    registered = np.asarray(nib.load(str(tmp_path / "registered.nii.gz")).dataobj)
    assert np.corrcoef(registered.ravel(), data.ravel())[0, 1] > 0.9
