"""The demo's pretraining stage end to end at tiny size (the full `make demo` run is not a test)."""

import json
from pathlib import Path

import pytest
import torch
from jepa_tiny import TINY_CLI_GEOMETRY, write_tiny_cohort

from neurojepa_pl.demos import pretrain_probe as demo
from neurojepa_pl.models import load_backbone


@pytest.mark.slow
def test_pretrain_stage_writes_checkpoint_and_logs(tmp_path, capsys):
    manifest = Path(write_tiny_cohort(tmp_path / "synthbrain", n_scans=8))
    assert demo.ensure_cohort(tmp_path) == manifest  # an existing cohort is reused, not regenerated
    result = demo.pretrain(
        manifest,
        tmp_path,
        extra_args=[
            *TINY_CLI_GEOMETRY,
            "--data.init_args.batch_size",
            "2",
            "--data.init_args.num_workers",
            "0",
            "--trainer.max_steps",
            "4",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.enable_progress_bar",
            "false",
        ],
    )
    assert result.checkpoint.exists() and result.log_dir.is_relative_to(tmp_path)
    assert [step for step, _ in result.losses] == [0, 1, 2, 3]
    demo.report_pretraining(result)
    out = capsys.readouterr().out
    assert "tensorboard --logdir" in out and str(result.checkpoint) in out
    encoder = load_backbone(str(result.checkpoint))
    assert encoder.grid_size == (8, 9, 8)

    # The export stage: the EMA target encoder, under its registry name, read back identically from the folder.
    export_dir = demo.export_encoder(result.checkpoint, tmp_path / "export")
    assert json.loads((export_dir / "config.json").read_text())["name"] == "vit_tiny_moe"
    exported = load_backbone(export_dir)
    assert exported.grid_size == (8, 9, 8)
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in encoder.state_dict().items())


def test_export_stage_fails_loudly(tmp_path, capsys):
    grid = {"spatial_size": [48, 54, 48], "resize_to": [50, 60, 50], "pad_crop_size": None, "target_spacing": None}
    no_weights = tmp_path / "no_weights.ckpt"
    torch.save(
        {"state_dict": {}, "hyper_parameters": {"encoder": "vit_tiny_moe"}, "datamodule_hyper_parameters": grid},
        no_weights,
    )
    with pytest.raises(RuntimeError, match="neurojepa export of .*no_weights.ckpt failed"):
        demo.export_encoder(no_weights, tmp_path / "export")
    assert "neurojepa export: error:" in capsys.readouterr().err
    assert not (tmp_path / "export" / "model.safetensors").exists()


def test_closing_summary_says_where_everything_is(tmp_path):
    run = tmp_path / "pretrain" / "version_0"
    result = demo.PretrainResult(run / "checkpoints" / "final.ckpt", run, [(0, 0.7)], export_dir=tmp_path / "export")
    table = tmp_path / "probe" / "probe_table.csv"
    lines = demo.where_to_look(tmp_path, result, table).splitlines()
    assert f"  TensorBoard:  .venv/bin/tensorboard --logdir {tmp_path}" in "\n".join(lines)
    assert any(line.startswith(f"  checkpoints:  {run / 'checkpoints'}/") for line in lines)
    assert any(line.startswith(f"  encoder:      {tmp_path / 'export'}/") for line in lines)
    assert any(line.startswith(f"  probe table:  {table}") for line in lines)
    assert any(line.startswith("  reading it:") and "0.5 AUROC is chance" in line for line in lines)
    assert lines[-1] == (
        f"    neurojepa fit --config experiments/finetune/synth_tumour_probe.yaml --model.init_args.checkpoint "
        f"{tmp_path / 'export'}"
    )
    without_probe = demo.where_to_look(tmp_path, result)
    assert "probe table" not in without_probe and "reading it" not in without_probe
