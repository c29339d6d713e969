"""The pre-build checks of a `neurojepa` configuration: reading the command line without jsonargparse, and each check
on a plain configuration dict (the CLI end to end is in tests/test_cli_errors.py)."""

from __future__ import annotations

import pytest

from neurojepa_pl.errors import UserError, UserFileNotFoundError, UserKeyError, UserValueError
from neurojepa_pl.preflight import (
    check_checkpoints,
    check_geometry,
    check_manifest_header,
    check_task,
    config_from_words,
)


# ---------------------------------------------------------------------------------------------------- the reader
def test_configs_merge_in_order_and_overrides_win(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("data:\n  class_path: a.B\n  init_args:\n    manifest: one.csv\n    batch_size: 4\n")
    top = tmp_path / "top.yaml"
    top.write_text("data:\n  init_args:\n    manifest: two.csv\n")
    words = ["--config", str(base), f"--config={top}", "--trainer.max_steps", "3", "--ckpt_path", "x.ckpt"]
    assert config_from_words(words) == {
        "data": {"class_path": "a.B", "init_args": {"manifest": "two.csv", "batch_size": 4}},
        "ckpt_path": "x.ckpt",
    }
    later = config_from_words([*words, "--data.manifest", "three.csv", "--model.init_args.backbone_kwargs", "{a: 1}"])
    assert later["data"]["init_args"]["manifest"] == "three.csv"  # `--data.X` is short for `--data.init_args.X`
    assert later["model"] == {"init_args": {"backbone_kwargs": {"a": 1}}}  # values are YAML, like jsonargparse's
    assert config_from_words(["--data.init_args.manifest=null"]) == {"data": {"init_args": {"manifest": None}}}
    # keys outside data / model / ckpt_path are skipped, whatever their form
    assert config_from_words(["--trainer.callbacks+=X", "--seed_everything", "1"]) == {}


@pytest.mark.parametrize(
    "words",
    [
        ["--print_config"],
        ["--help"],
        ["--data", "other.yaml"],  # a whole section: jsonargparse resolves it
        ["--config", "{data: {init_args: {manifest: x}}}"],  # an inline config, not a file
        ["--config", "missing.yaml"],
        ["--trainer.fast_dev_run"],  # a flag without a value
        ["positional"],
        ["--data.init_args.label_columns+=tumour"],
    ],
)
def test_the_reader_gives_up_on_what_it_cannot_read_for_certain(words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config_from_words(words) is None


def test_the_reader_gives_up_when_a_section_changes_class(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("data:\n  class_path: a.B\n  init_args:\n    manifest: one.csv\n")
    assert config_from_words(["--config", str(base), "--data.class_path", "a.B"]) is not None
    assert config_from_words(["--config", str(base), "--data.class_path", "c.D"]) is None
    other = tmp_path / "other.yaml"
    other.write_text("data:\n  class_path: c.D\n")
    assert config_from_words(["--config", str(base), "--config", str(other)]) is None


def test_the_reader_gives_up_on_an_unreadable_or_odd_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    assert config_from_words(["--config", str(bad)]) is None
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("data: somewhere.yaml\n")
    assert config_from_words(["--config", str(scalar)]) is None


# ---------------------------------------------------------------------------------------------------- the checks
def test_manifest_header_checks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check_manifest_header({})  # unset: jsonargparse's to report
    with pytest.raises(UserFileNotFoundError) as info:
        check_manifest_header({"manifest": "runs/m.csv"})
    assert info.value.message == (
        f"manifest runs/m.csv (data.init_args.manifest) does not exist (relative paths are taken from the current "
        f"folder, {tmp_path})."
    )
    with pytest.raises(UserFileNotFoundError, match="is a directory, not a CSV file"):
        check_manifest_header({"manifest": str(tmp_path)})
    manifest = tmp_path / "m.csv"
    manifest.write_text("")
    with pytest.raises(UserValueError, match=r"manifest .*m\.csv is empty\."):
        check_manifest_header({"manifest": str(manifest)})
    manifest.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(UserValueError, match="cannot be read as a CSV file"):
        check_manifest_header({"manifest": str(manifest)})
    manifest.write_text("subject_id, session_id, path\n")  # spaces after commas are allowed, like load_manifest
    with pytest.raises(UserKeyError) as info:
        check_manifest_header({"manifest": str(manifest)})
    assert info.value.message == (
        f"manifest {manifest}: required column 'modality' is missing (per_scan form needs ['subject_id', "
        "'session_id', 'modality', 'path']); found ['subject_id', 'session_id', 'path']"
    )
    manifest.write_text("subject_id,session_id,modality,path,os_days,death\n")
    check_manifest_header({"manifest": str(manifest), "time_column": "os_days", "event_column": "death"})
    with pytest.raises(UserKeyError, match=r"label column 'event' \(data.init_args.event_column\)"):
        check_manifest_header({"manifest": str(manifest), "time_column": "os_days", "event_column": "event"})


def test_checkpoint_checks(tmp_path):
    for keyword in ("best", "last", "hpc", "registry:model:v1", "s3://bucket/x.ckpt", None):
        check_checkpoints("fit", {"ckpt_path": keyword})  # Lightning resolves these itself
    with pytest.raises(UserFileNotFoundError) as info:
        check_checkpoints("test", {"ckpt_path": str(tmp_path / "nope" / "x.ckpt")})
    assert info.value.message == f"--ckpt_path {tmp_path / 'nope' / 'x.ckpt'} does not exist; the folder " + (
        f"{tmp_path / 'nope'} does not exist either."
    )
    assert "drop --ckpt_path" not in info.value.fix  # only a fit can start without one
    with pytest.raises(UserFileNotFoundError, match="is a directory, not a checkpoint file"):
        check_checkpoints("fit", {"ckpt_path": str(tmp_path)})
    exported = tmp_path / "export"
    exported.mkdir()
    check_checkpoints("fit", {"model": {"init_args": {"checkpoint": str(exported)}}})  # an exported folder is fine
    with pytest.raises(UserFileNotFoundError, match="is a directory"):
        check_checkpoints("fit", {"model": {"init_args": {"init_from": str(exported)}}})
    with pytest.raises(UserFileNotFoundError) as info:
        check_checkpoints("fit", {"model": {"init_args": {"init_from": str(tmp_path / "phase1.ckpt")}}})
    assert info.value.fix == "pass a .ckpt as model.init_args.init_from, or set it to null."


def _config(data: dict, model: dict) -> dict:
    return {"data": {"init_args": data}, "model": {"init_args": model}}


def _encoder_config(name: str) -> dict:
    if name != "vit_base":
        raise KeyError(name)
    return {"img_size": [96, 108, 96], "patch_size": 12}


def test_geometry_checks():
    same = {"spatial_size": [32, 36, 32], "patch_size": 4}
    check_geometry(_config(same, {"img_size": [32, 36, 32], "patch_size": 4}))
    with pytest.raises(UserValueError, match=r"model.init_args.img_size = \[48, 54, 48\] but the data module crops"):
        check_geometry(_config(same, {"img_size": [48, 54, 48]}))
    with pytest.raises(UserValueError, match=r"model.init_args.patch_size = 6 but data.init_args.patch_size = 4"):
        check_geometry(_config(same, {"patch_size": 6}))
    data = {"spatial_size": [32, 36, 32]}
    # A registry backbone without a stated size and without a checkpoint takes the registry's size ...
    with pytest.raises(UserValueError, match=r"the registry default of backbone 'vit_base' = \[96, 108, 96\]"):
        check_geometry(_config(data, {"backbone": "vit_base", "checkpoint": None}), _encoder_config)
    # ... a checkpoint stores its own, the CNN takes any size, and unknown names are the model's to report.
    check_geometry(_config(data, {"backbone": "vit_base", "checkpoint": "x.ckpt"}), _encoder_config)
    check_geometry(_config(data, {"backbone": "cnn", "checkpoint": None}), _encoder_config)
    check_geometry(_config(data, {"backbone": "vit_huge", "checkpoint": None}), _encoder_config)
    check_geometry(_config(data, {"backbone": "vit_base", "backbone_kwargs": {"img_size": [32, 36, 32]}}))


def test_task_checks():
    class Data:
        task, num_classes = "multiclass", 4

    check_task(_config({"task": "multiclass"}, {"task": "multiclass", "num_classes": 4}), Data())
    with pytest.raises(UserValueError, match="model.init_args.task = 'binary' but data.init_args.task = 'multiclass'"):
        check_task(_config({"task": "multiclass"}, {"task": "binary"}))
    with pytest.raises(UserValueError, match="fix: set model.init_args.num_classes: 4"):
        check_task(_config({"task": "multiclass"}, {"task": "multiclass", "num_classes": 3}), Data())


def test_every_failure_is_a_user_error_of_the_matching_builtin_kind():
    assert issubclass(UserFileNotFoundError, FileNotFoundError) and issubclass(UserFileNotFoundError, UserError)
    assert issubclass(UserKeyError, KeyError) and issubclass(UserValueError, ValueError)
