"""The demo's pretraining stage end to end at tiny size (the full `make demo` run is not a test)."""

from pathlib import Path

import pytest
from jepa_tiny import write_tiny_cohort

from neurojepa_pl.demos import pretrain_probe as demo
from neurojepa_pl.models import load_backbone

TINY = "{img_size: [32,36,32], patch_size: 4}"


@pytest.mark.slow
def test_pretrain_stage_writes_checkpoint_and_logs(tmp_path, capsys):
    manifest = Path(write_tiny_cohort(tmp_path / "synthbrain", n_scans=8))
    assert demo.ensure_cohort(tmp_path) == manifest  # an existing cohort is reused, not regenerated
    result = demo.pretrain(
        manifest,
        tmp_path,
        extra_args=[
            "--model.init_args.encoder_overrides",
            TINY,
            "--model.init_args.predictor_overrides",
            TINY,
            "--data.init_args.spatial_size",
            "[32,36,32]",
            "--data.init_args.resize_to",
            "[34,40,34]",
            "--data.init_args.patch_size",
            "4",
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
