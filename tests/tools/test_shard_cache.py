"""`neurojepa build-cache` (shards, the default) then `neurojepa fit --data.init_args.cache shards` from them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from jepa_tiny import TINY_CLI_GEOMETRY, write_tiny_cohort
from trainers import subprocess_env

from neurojepa_pl.cli import lightning_main, main

BASE = Path(__file__).resolve().parents[2] / "experiments" / "pretrain" / "neurojepa_base.yaml"
CHAIN = ["--pad-crop-size", "none", "--target-spacing", "none", "--resize-to", "34", "40", "34",
         "--spatial-size", "32", "36", "32"]  # fmt: skip


def fit_words(manifest: str, cache: Path, root: Path) -> list[str]:
    return [
        "fit", "--config", str(BASE), "--model.init_args.encoder", "vit_tiny_moe",
        "--model.init_args.predictor", "predictor_tiny", "--data.init_args.manifest", manifest, *TINY_CLI_GEOMETRY,
        "--data.init_args.pad_crop_size", "null", "--data.init_args.target_spacing", "null",
        "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0", "--data.init_args.pin_memory",
        "false", "--data.init_args.cache", "shards", "--data.init_args.cache_dir", str(cache),
        "--trainer.accelerator", "cpu", "--trainer.precision", "32", "--trainer.default_root_dir", str(root),
        "--trainer.logger.init_args.save_dir", str(root),
    ]  # fmt: skip


def _folder(cache: Path) -> Path:
    (folder,) = cache.glob("shards-*")
    return folder


def test_build_cache_then_fit_from_the_shards(tmp_path, capsys):
    manifest = write_tiny_cohort(tmp_path / "cohort", n_scans=8)
    cache = tmp_path / "cache"
    argv = ["build-cache", manifest, "--out", str(cache), *CHAIN, "--device", "cpu", "--workers", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "8 scans in shards, 0 quarantined, 0.09 MB per scan (uint16), built" in out
    assert f"--data.init_args.cache shards --data.init_args.cache_dir {cache}" in out
    folder = _folder(cache)
    finished = (folder / "shards.json").stat().st_mtime_ns
    assert main(argv) == 0
    assert "reused (complete for this manifest)" in capsys.readouterr().out

    cli = lightning_main([*fit_words(manifest, cache, tmp_path / "run"), "--trainer.fast_dev_run", "1"])

    assert cli.model.update_step == 1 and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert type(cli.datamodule.datasets["train"]).__name__ == "ShardScanDataset"
    assert _folder(cache) == folder and (folder / "shards.json").stat().st_mtime_ns == finished  # read, not rebuilt


def test_fit_builds_the_shards_itself_when_none_exist(tmp_path):
    manifest = write_tiny_cohort(tmp_path / "cohort", n_scans=4)
    cli = lightning_main([*fit_words(manifest, tmp_path / "cache", tmp_path / "run"), "--trainer.fast_dev_run", "1"])
    assert cli.model.update_step == 1
    assert (_folder(tmp_path / "cache") / "shards.json").is_file()


def test_bad_dtype_and_device_are_refused(tmp_path):
    manifest = write_tiny_cohort(tmp_path / "cohort", n_scans=2)
    with pytest.raises(SystemExit, match="--dtype uint16 is not available for --format memmap"):
        main(["build-cache", manifest, "--out", str(tmp_path), "--format", "memmap", "--dtype", "uint16", *CHAIN])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            main(["build-cache", manifest, "--out", str(tmp_path), "--device", "cuda", *CHAIN])


@pytest.mark.slow
def test_fit_from_shards_on_two_gloo_processes(tmp_path):
    manifest = write_tiny_cohort(tmp_path / "cohort", n_scans=8)
    cache = tmp_path / "cache"
    assert main(["build-cache", manifest, "--out", str(cache), *CHAIN, "--device", "cpu"]) == 0
    finished = (_folder(cache) / "shards.json").stat().st_mtime_ns
    # `neurojepa fit` as a user runs it: Lightning's launcher starts rank 1 by running the same command again.
    words = [
        *fit_words(manifest, cache, tmp_path / "run"),
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.max_steps",
        "2",
        "--trainer.callbacks",
        "[]",
        "--trainer.enable_checkpointing",
        "false",
    ]
    env = subprocess_env(PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    run = subprocess.run([sys.executable, "-m", "neurojepa_pl", *words], capture_output=True, text=True,
                         timeout=240, env=env, cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "fit done" in run.stdout and "`Trainer.fit` stopped: `max_steps=2` reached" in run.stderr
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in run.stderr
    assert (_folder(cache) / "shards.json").stat().st_mtime_ns == finished  # both ranks read the prebuilt shards
