"""The demo's probe table: run planning, table formatting, and the three runs end to end at tiny size."""

import json
import math
from pathlib import Path

import pytest
import torch
from jepa_tiny import TINY_CLI_GEOMETRY

from neurojepa_pl.demos import pretrain_probe as demo
from neurojepa_pl.demos import probe_table as demo_probe


def _row(run, auroc, low, high, ap=0.5, bacc=0.5, n=10):
    return {
        "run": run,
        "description": f"{run} model",
        "auroc": auroc,
        "auroc_ci_low": low,
        "auroc_ci_high": high,
        "ap": ap,
        "ap_ci_low": ap - 0.1,
        "ap_ci_high": ap + 0.1,
        "balanced_accuracy": bacc,
        "balanced_accuracy_ci_low": None,
        "balanced_accuracy_ci_high": None,
        "n_test": n,
        "fit_test_seconds": 12.34,
    }


def test_format_probe_table_rounds_and_marks_undefined_values():
    rows = [_row("a", 0.87654, 0.7, 0.99), _row("b", None, None, None, bacc=float("nan"))]
    table = demo_probe.format_probe_table(rows)
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].startswith("| run | test AUROC [95% CI] | AUPRC [95% CI]")
    assert lines[2] == "| a: a model | 0.877 [0.700, 0.990] | 0.500 [0.400, 0.600] | 0.500 | 10 | 12 |"
    assert lines[3] == "| b: b model | nan [nan, nan] | 0.500 [0.400, 0.600] | nan | 10 | 12 |"


def test_plan_runs_share_data_and_differ_only_in_model(tmp_path):
    setup = demo_probe.PretrainingSetup(
        "vit_tiny_moe",
        {"img_size": [48, 54, 48], "patch_size": 6},
        {"spatial_size": [48, 54, 48], "resize_to": [50, 60, 50], "pad_crop_size": None, "target_spacing": None},
    )
    runs = demo_probe.plan_runs(tmp_path, Path("m.csv"), Path("p.ckpt"), setup, epochs=3, cnn_epochs=4)
    assert [r.name for r in runs] == ["jepa_probe", "random_probe", "cnn_scratch"]
    assert [r.config for r in runs] == [demo_probe.PROBE_CONFIG, demo_probe.PROBE_CONFIG, demo_probe.CNN_CONFIG]

    def value(run, key):  # the last occurrence wins in LightningCLI, as here
        args = list(run.overrides)
        positions = [i for i, a in enumerate(args) if a == key]
        return args[positions[-1] + 1] if positions else None

    for key in (
        "--data.init_args.manifest",
        "--data.init_args.spatial_size",
        "--data.init_args.resize_to",
        "--data.init_args.pad_crop_size",
        "--data.init_args.label_columns",
        "--data.init_args.modality",
    ):
        assert len({value(r, key) for r in runs}) == 1, key
    assert json.loads(value(runs[0], "--data.init_args.spatial_size")) == [48, 54, 48]
    assert value(runs[0], "--data.init_args.pad_crop_size") == "null"
    assert value(runs[0], "--model.init_args.checkpoint") == "p.ckpt"
    assert value(runs[1], "--model.init_args.checkpoint") is None
    assert value(runs[2], "--model.init_args.checkpoint") is None
    assert value(runs[1], "--model.init_args.backbone") == "vit_tiny_moe"
    assert json.loads(value(runs[1], "--model.init_args.backbone_kwargs")) == setup.encoder_overrides
    assert [value(r, "--model.init_args.head_depth") for r in runs] == ["1", "1", None]
    assert json.loads(value(runs[2], "--model.init_args.backbone_kwargs")) == demo_probe.SMALL_CNN
    assert value(runs[2], "--model.init_args.backbone") is None  # the YAML's backbone: cnn stays
    assert [value(r, "--trainer.max_epochs") for r in runs] == ["3", "3", "4"]
    assert value(runs[2], "--model.init_args.output_dir") == str(tmp_path / "probe" / "cnn_scratch")


def test_read_pretraining_setup_rejects_a_checkpoint_without_the_grid(tmp_path):
    bare = tmp_path / "bare.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"encoder": "vit_tiny_moe"}}, bare)
    with pytest.raises(ValueError, match="spatial_size"):
        demo_probe.read_pretraining_setup(bare)


@pytest.mark.slow
def test_probe_table_end_to_end(synth_cohort, tmp_path, capsys):
    pretrained = demo.pretrain(
        synth_cohort,
        tmp_path,
        extra_args=[
            *TINY_CLI_GEOMETRY,
            "--data.init_args.batch_size",
            "2",
            "--data.init_args.num_workers",
            "0",
            "--trainer.max_steps",
            "2",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_model_summary",
            "false",
        ],
    )
    setup = demo_probe.read_pretraining_setup(pretrained.checkpoint)
    assert setup.preset == "vit_tiny_moe" and setup.data_settings["spatial_size"] == [32, 36, 32]

    rows = demo_probe.run_probe_table(
        tmp_path,
        synth_cohort,
        pretrained.checkpoint,
        epochs=1,
        cnn_epochs=1,
        extra_args=[
            "--data.init_args.num_workers",
            "0",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_model_summary",
            "false",
            "--model.init_args.warmup_epochs",
            "0",
            "--model.init_args.n_bootstrap",
            "200",
        ],
    )
    assert [r["run"] for r in rows] == ["jepa_probe", "random_probe", "cnn_scratch"]
    for row in rows:
        assert math.isfinite(row["auroc"]) and 0.0 <= row["auroc"] <= 1.0
        assert row["auroc_ci_low"] <= row["auroc"] <= row["auroc_ci_high"]
        assert row["ap_ci_low"] <= row["ap"] <= row["ap_ci_high"]
    assert len({r["n_test"] for r in rows}) == 1 and rows[0]["n_test"] >= 2
    reports = {r["run"]: json.loads((tmp_path / "probe" / r["run"] / "metrics.json").read_text()) for r in rows}
    assert reports["jepa_probe"]["pretrained_checkpoint"] == str(pretrained.checkpoint)
    assert reports["random_probe"]["pretrained_checkpoint"] is None
    assert reports["cnn_scratch"]["backbone"] == "cnn"
    assert all(Path(rep["evaluated_checkpoint"]).name == "best.ckpt" for rep in reports.values())
    assert (tmp_path / "probe" / "probe_table.csv").is_file()
    assert demo_probe.format_probe_table(rows).count("\n") == 4
