"""Exact resume: N steps straight == k steps, a dead process, resume to N.

What is guaranteed (and tested here): resuming from any checkpoint, at an epoch boundary or mid-epoch, continues with
bit-identical weights, EMA target, MoE balance biases and counts, AdamW state, schedules (``update_step``) and data:
the sample order is a pure function of (seed, epoch), the augmentation of (seed, epoch, position) and the masks of the
batch's sample keys; the epoch is restored by ``PretrainDataModule``'s state and the position within the epoch by the
training loader's own state (a ``StatefulDataLoader``, saved by Lightning's fit loop).
"""

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from jepa_tiny import TINY_CLI_GEOMETRY, TINY_DATA_ARGS, tiny_module, tiny_trainer, write_tiny_cohort
from lightning.pytorch.callbacks import ModelCheckpoint
from trainers import subprocess_env

from neurojepa_pl.data_modules.pretrain import PretrainDataModule

STEPS_PER_EPOCH = 4  # 8 scans, batch 2, drop_last


class _RecordData(pl.Callback):
    """What each optimizer step trained on: (global step, mask step, subjects, a checksum of masks and images)."""

    def __init__(self):
        self.seen = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        checksum = sum(int(ids.sum()) for ids in batch["context_idx"]) + float(batch["image"].double().sum())
        self.seen[trainer.global_step] = (batch["mask_step"], tuple(batch["subject_id"]), checksum)


def _run(tmp_path, manifest, max_steps, ckpt_path=None, checkpoint_dir=None):
    torch.manual_seed(1234)  # a different global RNG state must not matter: nothing may draw from it
    record = _RecordData()
    callbacks = [record]
    if checkpoint_dir is not None:
        callbacks.append(
            ModelCheckpoint(
                dirpath=checkpoint_dir, filename="{step}", every_n_train_steps=STEPS_PER_EPOCH, save_top_k=-1
            )
        )
    module = tiny_module(ema_momentum=0.9, moe_bias_rate=1e-2, warmup_steps=3, total_steps=8, cooldown_steps=2)
    data = PretrainDataModule(manifest=manifest, cache_dir=str(tmp_path / "cache"), seed=7, **TINY_DATA_ARGS)
    trainer = tiny_trainer(
        tmp_path, max_steps=max_steps, callbacks=callbacks, enable_checkpointing=checkpoint_dir is not None
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, trainer, record.seen


@pytest.mark.slow
def test_kill_and_resume_at_epoch_boundary_is_exact(tmp_path):
    manifest = write_tiny_cohort(tmp_path / "cohort", n_scans=8)
    straight, straight_trainer, straight_seen = _run(
        tmp_path, manifest, max_steps=2 * STEPS_PER_EPOCH, checkpoint_dir=tmp_path / "ckpt"
    )
    half = tmp_path / "ckpt" / f"step={STEPS_PER_EPOCH}.ckpt"
    assert half.exists(), sorted(p.name for p in (tmp_path / "ckpt").iterdir())

    torch.manual_seed(999)  # the "new process": a different global RNG state
    resumed, resumed_trainer, resumed_seen = _run(
        tmp_path, manifest, max_steps=2 * STEPS_PER_EPOCH, ckpt_path=str(half)
    )

    # the same data and masks at every resumed step
    assert sorted(resumed_seen) == list(range(STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH))
    for step, seen in resumed_seen.items():
        assert seen == straight_seen[step], f"step {step}: resumed run saw {seen}, straight run {straight_seen[step]}"
        assert seen[0] == step  # mask step == global batch index

    # the same weights, EMA target, MoE biases/counts, schedules and optimizer state, bit for bit
    assert resumed.update_step == straight.update_step == 2 * STEPS_PER_EPOCH
    want, got = straight.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), f"{key} differs after resume"
    assert any(key.startswith("target_encoder.") and "gate.bias" in key for key in want)
    want_opt, got_opt = straight_trainer.optimizers[0].state_dict(), resumed_trainer.optimizers[0].state_dict()
    assert want_opt["param_groups"] == got_opt["param_groups"]
    for pid, state in want_opt["state"].items():
        for name, value in state.items():
            assert torch.equal(value, got_opt["state"][pid][name]), f"optimizer state {pid}.{name} differs"


# ---------------------------------------------------------------------------------------------------- through the CLI
SYNTH_YAML = Path(__file__).resolve().parents[2] / "experiments" / "pretrain" / "synth_small.yaml"
CLI_STEPS = 6  # 1.5 epochs of 4 batches
KILL_STEP = 3  # mid-epoch


def _cli_config(tmp_path: Path, name: str, kill_at: int | None) -> Path:
    """synth_small.yaml with a checkpoint at every step (and, for the killed run, a SIGKILL at ``kill_at``)."""
    config = yaml.safe_load(SYNTH_YAML.read_text())
    config["trainer"].update(max_steps=CLI_STEPS, logger=False, check_val_every_n_epoch=1, enable_progress_bar=False)
    checkpoint = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {
            "dirpath": str(tmp_path / name / "ckpt"),
            "filename": "{step}",
            "every_n_train_steps": 1,
            "save_top_k": -1,
            "save_on_train_epoch_end": False,
        },
    }
    config["trainer"]["callbacks"] = [checkpoint]
    if kill_at is not None:
        config["trainer"]["callbacks"].append({"class_path": "resume_callbacks.KillAt", "init_args": {"step": kill_at}})
    config["model"]["init_args"].update(total_steps=CLI_STEPS, warmup_steps=2, cooldown_steps=2)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _fit(
    tmp_path: Path, manifest: str, config: Path, num_workers: int, ckpt_path: Path | None = None, extra: tuple = ()
):
    args = ["fit", "--config", str(config), "--data.init_args.manifest", manifest, *TINY_CLI_GEOMETRY,
            "--data.init_args.batch_size", "2", "--data.init_args.num_workers", str(num_workers),
            "--data.init_args.cache_dir", str(tmp_path / "cache"),
            "--trainer.default_root_dir", str(tmp_path / "root")]  # fmt: skip
    args += list(extra)
    if ckpt_path is not None:
        args += ["--ckpt_path", str(ckpt_path)]
    env = subprocess_env(PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    # `python -m neurojepa_pl` (= `neurojepa`): Lightning's DDP launcher starts the other ranks with the same command
    return subprocess.run(
        [sys.executable, "-m", "neurojepa_pl", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=240,
    )


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.slow
def test_sigkill_mid_epoch_and_resume_through_the_cli_is_bit_exact(tmp_path):
    manifest = write_tiny_cohort(tmp_path / "cohort", n_scans=8)
    straight = _fit(tmp_path, manifest, _cli_config(tmp_path, "straight", None), num_workers=0)
    assert straight.returncode == 0, straight.stderr[-3000:]
    want = _weights(tmp_path / "straight" / "ckpt" / f"step={CLI_STEPS}.ckpt")
    for num_workers in (0, 2):
        name = f"killed{num_workers}"
        killed = _fit(tmp_path, manifest, _cli_config(tmp_path, name, KILL_STEP), num_workers=num_workers)
        assert killed.returncode == -9, killed.stderr[-3000:]  # died by SIGKILL, not by finishing
        written = sorted(p.name for p in (tmp_path / name / "ckpt").iterdir())
        assert written == [f"step={s}.ckpt" for s in range(1, KILL_STEP + 1)], written
        resumed = _fit(
            tmp_path,
            manifest,
            _cli_config(tmp_path, name, None),
            num_workers=num_workers,
            ckpt_path=tmp_path / name / "ckpt" / f"step={KILL_STEP}.ckpt",
        )
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "not resumable" not in resumed.stderr
        got = _weights(tmp_path / name / "ckpt" / f"step={CLI_STEPS}.ckpt")
        assert want.keys() == got.keys()
        differ = [key for key in want if not torch.equal(want[key], got[key])]
        assert not differ, f"num_workers={num_workers}: {len(differ)} tensors differ after resume, e.g. {differ[:3]}"


@pytest.mark.slow
def test_sigkill_mid_epoch_and_resume_two_process_gloo(tmp_path):
    """The same with 2 CPU processes (DDP, gloo): rank 0's loader state is every rank's (same batch count)."""
    manifest = write_tiny_cohort(tmp_path / "cohort", n_scans=16)  # 4 batches per rank and epoch
    ddp = ("--trainer.devices", "2", "--trainer.strategy", "ddp")
    straight = _fit(tmp_path, manifest, _cli_config(tmp_path, "straight", None), num_workers=0, extra=ddp)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = _fit(tmp_path, manifest, _cli_config(tmp_path, "killed", KILL_STEP), num_workers=0, extra=ddp)
    assert killed.returncode == -9, killed.stderr[-3000:]  # rank 0 (this process) died by SIGKILL
    assert (tmp_path / "killed" / "ckpt" / f"step={KILL_STEP}.ckpt").exists()
    assert not (tmp_path / "killed" / "ckpt" / f"step={KILL_STEP + 1}.ckpt").exists()
    resumed = _fit(
        tmp_path,
        manifest,
        _cli_config(tmp_path, "killed", None),
        num_workers=0,
        ckpt_path=tmp_path / "killed" / "ckpt" / f"step={KILL_STEP}.ckpt",
        extra=ddp,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stderr
    want = _weights(tmp_path / "straight" / "ckpt" / f"step={CLI_STEPS}.ckpt")
    got = _weights(tmp_path / "killed" / "ckpt" / f"step={CLI_STEPS}.ckpt")
    differ = [key for key in want if not torch.equal(want[key], got[key])]
    assert want.keys() == got.keys() and not differ, f"{len(differ)} tensors differ after resume, e.g. {differ[:3]}"
