"""`neurojepa` when the input is wrong: every unusable scan in one table, and the user's mistakes as two plain lines
(`neurojepa: error: ...`, `fix: ...`) with exit status 2, found before any model is built."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from jepa_tiny import write_tiny_cohort

sys.path.insert(0, str(Path(__file__).parent / "data_modules"))
from volume_factory import blob_volume, make_cohort, truncate_file, write_nifti  # noqa: E402

from neurojepa_pl.cli import main  # noqa: E402
from neurojepa_pl.errors import UserError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PRETRAIN_YAML = REPO / "experiments" / "pretrain" / "synth_small.yaml"
PROBE_YAML = REPO / "experiments" / "finetune" / "synth_tumour_probe.yaml"


def write_bad_scan_zoo(folder: Path) -> dict[str, Path]:
    """The seven ways a scan breaks that the issue measured, one file each (the missing one is not written)."""
    folder.mkdir(parents=True, exist_ok=True)
    nan = blob_volume(seed=2)
    nan[20:22, 20:22, 20:22] = np.nan
    zoo = {
        "truncated": truncate_file(write_nifti(folder / "truncated.nii.gz", blob_volume(seed=1))),
        "non_finite": write_nifti(folder / "nan.nii.gz", nan),
        "empty_file": folder / "empty.nii.gz",
        "text_file": folder / "text.nii.gz",
        "four_d": write_nifti(folder / "four_d.nii.gz", np.stack([blob_volume(seed=3)] * 2, axis=-1)),
        "missing": folder / "missing.nii.gz",
        "all_zero": write_nifti(folder / "all_zero.nii.gz", np.zeros((48, 54, 48), dtype=np.float32)),
    }
    zoo["empty_file"].write_bytes(b"")
    zoo["text_file"].write_text("subject_id,age\n001,40\n")
    return zoo


EXPECTED_KIND = {
    "truncated": "truncated: the compressed data ends early (EOFError",
    "non_finite": "non_finite: 8 of 124416 voxels are NaN or Inf",
    "empty_file": "unreadable: cannot read the image: ImageFileError: Empty file",
    "text_file": "unreadable: cannot read the image: ImageFileError: File",
    "four_d": "bad_shape: expected one 3D volume, found image shape (48, 54, 48, 2)",
    "missing": "missing_file: the file does not exist",
    "all_zero": "empty_brain: the volume is constant (every voxel = 0)",
}


@pytest.fixture
def zoo_manifest(tmp_path) -> tuple[Path, dict[str, Path]]:
    """8 good tiny scans plus the seven broken ones appended to the same manifest (all in the train split)."""
    manifest = Path(write_tiny_cohort(tmp_path / "cohort", n_scans=8))
    zoo = write_bad_scan_zoo(tmp_path / "cohort" / "bad")
    with manifest.open("a", newline="") as fh:
        writer = csv.writer(fh)
        for i, path in enumerate(zoo.values()):
            writer.writerow([f"bad-{i}", "ses-1", "T1w", str(path), "train"])
    return manifest, zoo


def _fit_words(manifest: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(PRETRAIN_YAML),
        "--data.init_args.manifest",
        str(manifest),
        "--data.init_args.cache_dir",
        str(tmp_path / "cache"),
        "--data.init_args.quarantine_path",
        str(tmp_path / "quarantine.csv"),
        "--data.init_args.batch_size",
        "2",
        "--data.init_args.num_workers",
        "0",
        "--trainer.fast_dev_run",
        "1",
        "--trainer.default_root_dir",
        str(tmp_path / "root"),
        *extra,
    ]


def _table_rows(text: str) -> dict[str, str]:
    """path -> the reason cell of its first line, from a `problem_table` inside ``text``."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) == 3 and cells[0].startswith("/"):
            rows[cells[0]] = cells[1]
    return rows


# ---------------------------------------------------------------------------------------------------- item 1
def test_fit_names_every_broken_scan_in_one_report(zoo_manifest, tmp_path, monkeypatch, capsys):
    manifest, zoo = zoo_manifest
    monkeypatch.chdir(tmp_path)
    assert main(_fit_words(manifest, tmp_path)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    report = err[err.index("neurojepa: error: ") :]
    assert report.startswith(
        "neurojepa: error: 7 of 15 scans cannot be used (46.7%), more than max_failed_fraction=0.01:\npath "
    )
    rows = _table_rows(report)
    assert set(rows) == {str(p) for p in zoo.values()}  # all seven, the missing one included
    for name, path in zoo.items():
        assert rows[str(path)].startswith(EXPECTED_KIND[name][:48]), (name, rows[str(path)])
    assert report.rstrip().splitlines()[-1].startswith("  ") or "fix: fix or remove these scans in" in report
    assert f"fix: fix or remove these scans in {manifest}" in report
    assert report.rstrip().endswith("or set data.init_args.max_failed_fraction: 0.467 to skip them.")
    quarantined = [r["path"] for r in csv.DictReader((tmp_path / "quarantine.csv").open())]
    assert sorted(quarantined) == sorted(str(p) for p in zoo.values())


def test_fit_quarantines_the_broken_scans_within_the_limit_and_trains(zoo_manifest, tmp_path, monkeypatch, caplog):
    manifest, zoo = zoo_manifest
    monkeypatch.chdir(tmp_path)
    assert main(_fit_words(manifest, tmp_path, "--data.init_args.max_failed_fraction", "0.5")) == 0
    warning = next(r.getMessage() for r in caplog.records if "cannot be used and are skipped" in r.getMessage())
    assert warning.startswith("7 of 15 scan(s) cannot be used and are skipped (max_failed_fraction=0.5)")
    assert set(_table_rows(warning)) == {str(p) for p in zoo.values()}
    quarantined = [r["path"] for r in csv.DictReader((tmp_path / "quarantine.csv").open())]
    assert sorted(quarantined) == sorted(str(p) for p in zoo.values())


# ---------------------------------------------------------------------------------------------------- item 3
def test_wrong_manifest_path_fails_before_lightning_is_imported(tmp_path):
    """A subprocess, so that "not imported" means something: the refusal comes before the Lightning import."""
    code = (
        "import sys\n"
        "from neurojepa_pl.cli import main\n"
        f"rc = main(['fit', '--config', {str(PRETRAIN_YAML)!r}, '--data.init_args.manifest', '/nonexistent.csv'])\n"
        "print('rc', rc, 'lightning imported', 'lightning' in sys.modules, 'torch imported', 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert done.stdout.strip() == "rc 2 lightning imported False torch imported False"
    assert done.stderr == (
        "neurojepa: error: manifest /nonexistent.csv (data.init_args.manifest) does not exist.\n"
        "fix: pass the manifest CSV: --data.init_args.manifest PATH (`neurojepa synth --out DIR` writes one in DIR).\n"
    )


@pytest.fixture
def labelled_manifest(tmp_path) -> Path:
    return make_cohort(tmp_path / "cohort", n_subjects=10, modalities=("FLAIR",))


def _probe_words(manifest: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(PROBE_YAML),
        "--data.init_args.manifest",
        str(manifest),
        "--model.init_args.backbone",
        "vit_tiny",
        "--model.init_args.backbone_kwargs",
        "{img_size: [32,36,32], patch_size: 4}",
        "--data.init_args.spatial_size",
        "[32,36,32]",
        "--data.init_args.resize_to",
        "[34,40,34]",
        "--data.init_args.cache_dir",
        str(tmp_path / "cache"),
        "--trainer.default_root_dir",
        str(tmp_path / "root"),
        *extra,
    ]


@pytest.fixture
def no_model_build(monkeypatch):
    """Any model build fails the test: the checks under test must come first."""
    import functools

    from neurojepa_pl.models.vit3d import VisionTransformer3D

    @functools.wraps(VisionTransformer3D.__init__)  # keeps the signature, for anything that reads it
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the input was checked")

    monkeypatch.setattr(VisionTransformer3D, "__init__", refuse)


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err[err.index("neurojepa: error: ") :]


def test_what_the_first_reading_cannot_see_the_parsed_config_catches(
    labelled_manifest, tmp_path, capsys, no_model_build
):
    """An inline config string is beyond the pre-import reading (it gives up); the check on the parsed config, before
    any class is built, gives the same answer."""
    words = _probe_words(labelled_manifest, tmp_path, "--config", "{data: {init_args: {manifest: /nonexistent.csv}}}")
    assert main(words) == 2
    assert _error(capsys).startswith(
        "neurojepa: error: manifest /nonexistent.csv (data.init_args.manifest) does not exist.\nfix: pass the manifest"
    )


def test_best_or_last_checkpoint_of_another_process(labelled_manifest, tmp_path, monkeypatch, capsys, no_model_build):
    monkeypatch.chdir(tmp_path)  # the hint names the newest best*.ckpt under the logger's (relative) save_dir
    words = ["test", *_probe_words(labelled_manifest, tmp_path)[1:], "--ckpt_path", "best"]
    assert main(words) == 2
    assert _error(capsys) == (
        "neurojepa: error: --ckpt_path best names the best checkpoint of a fit run in the same process only (Lightning "
        "keeps it in that fit's ModelCheckpoint); `neurojepa test` is a new process.\n"
        "fix: pass the path of a checkpoint file (a fit prints its best and last checkpoints when it ends).\n"
    )


def test_misspelled_label_column(labelled_manifest, tmp_path, capsys, no_model_build):
    words = _probe_words(labelled_manifest, tmp_path, "--data.init_args.label_columns", "[tumor]")
    assert main(words) == 2
    assert _error(capsys) == (
        f"neurojepa: error: label column 'tumor' (data.init_args.label_columns) is not in the manifest "
        f"{labelled_manifest}; its columns are ['subject_id', 'session_id', 'modality', 'path', 'split', 'tumour', "
        "'age', 'sex'].\n"
        "fix: name one of those columns in data.init_args.label_columns (did you mean 'tumour'?), or add the column.\n"
    )


def test_label_out_of_range_is_found_before_the_model_is_built(labelled_manifest, tmp_path, capsys, no_model_build):
    text = labelled_manifest.read_text().splitlines()
    text[3] = text[3].replace(",train,0,", ",train,3,")  # subject 002: tumour = 3 for a binary task
    labelled_manifest.write_text("\n".join(text) + "\n")
    assert main(_probe_words(labelled_manifest, tmp_path)) == 2
    err = _error(capsys)
    assert err.startswith(f"neurojepa: error: {labelled_manifest}: 10 rows (per_scan), 1 error(s), 0 warning(s)\n")
    assert "[error] label_out_of_range: row 2 (line 4 of manifest.csv)" in err
    assert "label 'tumour' = 3; expected 0 or 1" in err
    assert err.rstrip().splitlines()[-1].startswith(f"fix: correct the rows above in {labelled_manifest}")


def test_model_and_data_geometry_must_agree(labelled_manifest, tmp_path, capsys, no_model_build):
    words = _probe_words(labelled_manifest, tmp_path, "--data.init_args.spatial_size", "[48,54,48]")
    assert main([*words, "--data.init_args.resize_to", "[50,60,50]"]) == 2
    assert _error(capsys) == (
        "neurojepa: error: model.init_args.backbone_kwargs.img_size = [32, 36, 32] but the data module crops volumes "
        "to data.init_args.spatial_size = [48, 54, 48]; the model would reject every batch.\n"
        "fix: state the size once: set data.init_args.spatial_size to the model's input size (and resize_to at least "
        "as large), or the model's size to the data's.\n"
    )


def test_model_and_data_class_counts_must_agree(labelled_manifest, tmp_path, capsys, no_model_build):
    words = _probe_words(labelled_manifest, tmp_path, "--model.init_args.task", "multiclass")
    words += ["--model.init_args.num_classes", "3", "--data.init_args.task", "multiclass"]
    assert main([*words, "--data.init_args.num_classes", "4"]) == 2
    assert _error(capsys) == (
        "neurojepa: error: model.init_args.num_classes = 3 but the data module serves 4 output(s) for task "
        "'multiclass'.\n"
        "fix: set model.init_args.num_classes: 4 (and data.init_args.num_classes to match for multiclass).\n"
    )


def test_missing_and_empty_checkpoints(labelled_manifest, tmp_path, capsys, no_model_build):
    runs = tmp_path / "runs" / "checkpoints"
    runs.mkdir(parents=True)
    (runs / "last.ckpt").write_bytes(b"PK")
    missing = runs / "best.ckpt"
    assert main([*_probe_words(labelled_manifest, tmp_path), "--ckpt_path", str(missing)]) == 2
    assert _error(capsys) == (
        f"neurojepa: error: --ckpt_path {missing} does not exist; that folder holds last.ckpt.\n"
        "fix: pass a checkpoint file of a fit run (`neurojepa fit` prints its checkpoints when it ends; they are in "
        "<save_dir>/<name>/version_<k>/checkpoints/), or drop --ckpt_path to start afresh.\n"
    )
    empty = runs / "empty.ckpt"
    empty.write_bytes(b"")
    assert main([*_probe_words(labelled_manifest, tmp_path), "--model.init_args.checkpoint", str(empty)]) == 2
    assert _error(capsys).startswith(
        f"neurojepa: error: model.init_args.checkpoint {empty} (the backbone checkpoint) is empty (0 bytes: an "
        "interrupted copy or save); that folder holds empty.ckpt, last.ckpt.\n"
    )


def test_a_checkpoint_that_is_not_a_complete_archive(labelled_manifest, tmp_path, capsys, no_model_build):
    """Stage 1 sees a non-empty file; Lightning's own read of its hyper-parameters then fails, and says so plainly."""
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"not a checkpoint at all")
    assert main([*_probe_words(labelled_manifest, tmp_path), "--ckpt_path", str(broken)]) == 2
    err = _error(capsys)
    assert err.startswith(f"neurojepa: error: --ckpt_path {broken} cannot be read (UnpicklingError: ")
    assert (
        "it is not a complete checkpoint (a truncated copy, or a save that was interrupted).\nfix: pass another" in err
    )


def test_debug_shows_the_traceback(labelled_manifest, tmp_path):
    words = _probe_words(labelled_manifest, tmp_path, "--data.init_args.label_columns", "[tumor]")
    with pytest.raises(UserError, match="label column 'tumor'"):
        main([*words, "--debug"])
    with pytest.raises(UserError, match="does not exist"):
        main(["--debug", "fit", "--config", str(PROBE_YAML), "--data.init_args.manifest", str(tmp_path / "no.csv")])


def test_a_bug_of_ours_keeps_its_traceback(monkeypatch):
    import neurojepa_pl.cli as cli

    def broken(argv):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "lightning_main", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["fit", "--trainer.max_steps", "1"])
