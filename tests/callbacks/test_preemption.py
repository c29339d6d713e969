"""Preemption: SIGTERM saves the run at a step boundary and exits 0, the saved file resumes it; SLURM requeue resumes
from Lightning's ``hpc_ckpt_*.ckpt`` (the sbatch example, run by bash with a fake ``srun`` / ``scontrol``)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from jepa_tiny import TINY_CLI_GEOMETRY, TinyJEPAData, tiny_module, tiny_trainer, write_tiny_cohort
from lightning.pytorch.callbacks import ModelCheckpoint
from trainers import subprocess_env

from neurojepa_pl.callbacks.preemption import PreemptionCheckpoint, find_resume_checkpoint, resume_command
from neurojepa_pl.checkpoint_io import AtomicCheckpointIO

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = ROOT / "experiments"


class _SigtermAt(pl.Callback):
    """Sends SIGTERM to this process at the start of the batch that makes optimizer step ``step + 1``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class _Record(pl.Callback):
    """The global step of every batch a fit trains on, and the weights it started from."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.start_weights: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module):
        self.start_weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append(trainer.global_step)


def test_sigterm_saves_at_the_step_boundary_exits_zero_and_resumes(tmp_path, capsys):
    preemption = PreemptionCheckpoint()
    trainer = tiny_trainer(tmp_path, max_steps=8, callbacks=[_SigtermAt(step=2), preemption])
    handler_before = signal.getsignal(signal.SIGTERM)
    # Lightning's SIGTERMException is a SystemExit with no code: the process exits with status 0.
    with pytest.raises(SystemExit) as stopped:
        trainer.fit(tiny_module(), datamodule=TinyJEPAData(n=8, batch_size=2))
    assert stopped.value.code is None
    assert trainer.state.status == "interrupted"
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the process's own handling is back

    path = tmp_path / "checkpoints" / "preempted.ckpt"  # no logger, no ModelCheckpoint: <default_root_dir>/checkpoints
    assert preemption.saved_path == path
    saved = torch.load(path, weights_only=False)
    assert saved["global_step"] == 3  # the batch that was running when the signal came was finished, not cut
    out = capsys.readouterr().out
    assert f"[neurojepa] SIGTERM: saved step 3 (epoch 0) to {path}" in out
    assert f"resume: Trainer.fit(..., ckpt_path='{path}')" in out

    record = _Record()
    resumed = tiny_trainer(tmp_path / "resumed", max_steps=8, callbacks=[record, PreemptionCheckpoint()])
    resumed.fit(tiny_module(), datamodule=TinyJEPAData(n=8, batch_size=2), ckpt_path=str(path))
    assert record.steps == [3, 4, 5, 6, 7] and resumed.global_step == 8
    for key, value in saved["state_dict"].items():
        torch.testing.assert_close(record.start_weights[key], value, rtol=0, atol=0)


def test_only_sigterm_saves(tmp_path):
    class _Boom(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 1:
                raise RuntimeError("a bug, not a preemption")

    preemption = PreemptionCheckpoint()
    with pytest.raises(RuntimeError, match="a bug"):
        tiny_trainer(tmp_path, max_steps=4, callbacks=[_Boom(), preemption]).fit(
            tiny_module(), datamodule=TinyJEPAData(n=8, batch_size=2)
        )
    assert preemption.saved_path is None and not (tmp_path / "checkpoints").exists()


def test_preempted_checkpoint_goes_beside_the_model_checkpoints(tmp_path):
    preemption = PreemptionCheckpoint()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=100)
    trainer = tiny_trainer(
        tmp_path,
        max_steps=8,
        enable_checkpointing=True,
        callbacks=[_SigtermAt(step=1), preemption, checkpoints],
        plugins=[AtomicCheckpointIO()],
    )
    with pytest.raises(SystemExit):
        trainer.fit(tiny_module(), datamodule=TinyJEPAData(n=8, batch_size=2))
    assert preemption.saved_path == tmp_path / "ckpts" / "preempted.ckpt"
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == ["preempted.ckpt"]  # no unfinished write left
    assert torch.load(preemption.saved_path, weights_only=False)["global_step"] == 2


def test_resume_command_replaces_ckpt_path():
    argv = ["neurojepa", "fit", "--config", "a b.yaml", "--ckpt_path", "old.ckpt", "--trainer.max_steps", "9"]
    assert resume_command("runs/x/preempted.ckpt", argv) == (
        "neurojepa fit --config 'a b.yaml' --trainer.max_steps 9 --ckpt_path runs/x/preempted.ckpt"
    )
    argv = ["/venv/bin/neurojepa", "fit", "--ckpt_path=old.ckpt", "--config", "c.yaml"]
    assert resume_command("new.ckpt", argv) == "neurojepa fit --config c.yaml --ckpt_path new.ckpt"
    assert resume_command("x.ckpt", ["train.py", "fit"]) is None  # a script, not the CLI
    assert resume_command("x.ckpt", ["neurojepa", "test"]) is None


def test_find_resume_checkpoint_takes_the_newest_resumable_file(tmp_path):
    def touch(relative: str, mtime: int) -> Path:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, ns=(mtime, mtime))
        return path

    assert find_resume_checkpoint(tmp_path) is None
    touch("version_0/checkpoints/last.ckpt", 10**18)
    preempted = touch("version_1/checkpoints/preempted.ckpt", 2 * 10**18)
    touch("version_1/checkpoints/best.ckpt", 3 * 10**18)  # not a resume point
    touch("version_1/checkpoints/.partial-123-abcd1234.tmp", 4 * 10**18)  # an unfinished write
    assert find_resume_checkpoint(tmp_path) == preempted
    hpc = touch("version_4242/hpc_ckpt_2.ckpt", 5 * 10**18)
    assert find_resume_checkpoint(tmp_path) == hpc
    last = touch("version_2/checkpoints/last-v1.ckpt", 6 * 10**18)
    assert find_resume_checkpoint(tmp_path) == last


def test_the_cli_gives_every_fit_the_preemption_callback_and_the_atomic_writer(manifest, tmp_path, monkeypatch):
    # Added by the CLI (neurojepa_pl/cli.py instantiate_trainer), so no experiment YAML can forget them; a YAML that
    # names its own CheckpointIO keeps it.
    from neurojepa_pl.cli import lightning_main

    monkeypatch.chdir(tmp_path)
    config = str(EXPERIMENTS / "pretrain" / "synth_small.yaml")
    words = ["--config", config, *TINY_FIT, "--data.init_args.manifest", manifest]  # run=False: no subcommand
    cli = lightning_main([*words, "--data.init_args.cache_dir", str(tmp_path / "cache")], run=False)
    assert sum(isinstance(cb, PreemptionCheckpoint) for cb in cli.trainer.callbacks) == 1
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    slurm = yaml.safe_load((EXPERIMENTS / "trainer" / "slurm.yaml").read_text())["trainer"]["plugins"]
    assert [p["class_path"].rsplit(".", 1)[-1] for p in slurm] == ["SLURMEnvironment"]


def test_sbatch_example_agrees_with_slurm_yaml():
    text = (EXPERIMENTS / "trainer" / "slurm_example.sbatch").read_text()
    environment = yaml.safe_load((EXPERIMENTS / "trainer" / "slurm.yaml").read_text())["trainer"]["plugins"][0]
    assert environment["init_args"] == {"auto_requeue": True, "requeue_signal": "SIGUSR1"}
    warning = re.search(r"^#SBATCH --signal=(\w+)@(\d+)", text, re.M)
    assert warning and warning.group(1) == "SIGUSR1" and int(warning.group(2)) >= 90
    assert re.search(r"^#SBATCH --requeue\b", text, re.M)
    command = text[text.index("srun neurojepa fit") :]
    # any --ckpt_path would replace Lightning's hpc_ckpt lookup on requeue
    assert "--ckpt_path" not in command
    assert '--trainer.default_root_dir "${RUN_DIR}"' in command
    assert '--trainer.logger.init_args.version "${SLURM_JOB_ID}"' in command
    assert 'RUN_DIR="runs/${RUN_NAME}/version_${SLURM_JOB_ID}"' in text


# ----------------------------------------------------------------------------------------------------------------------
# Through the command line, in subprocesses that really receive the signals
# ----------------------------------------------------------------------------------------------------------------------
TINY_FIT = [
    "--model.init_args.encoder",
    "vit_tiny_moe",
    "--model.init_args.predictor",
    "predictor_tiny",
    *TINY_CLI_GEOMETRY,
    "--data.init_args.pad_crop_size",
    "null",
    "--data.init_args.target_spacing",
    "null",
    "--data.init_args.batch_size",
    "2",
    "--data.init_args.num_workers",
    "0",
    "--model.init_args.mask_figure_every_n_steps",
    "0",
    "--trainer.accelerator",
    "cpu",
    "--trainer.precision",
    "32",
    "--trainer.max_steps",
    "8",
]


def _env(**extra: str) -> dict[str, str]:
    return subprocess_env(PYTHONUNBUFFERED="1", **extra)


def _run(command: list[str], cwd: Path, env: dict[str, str], signal_to_send=None, pid_file: Path | None = None):
    """Run ``command``; with ``signal_to_send``, send it after the first training step's progress line.

    Returns ``(returncode, output)``. The signal goes to the Python process: the one started here, or the pid that
    ``pid_file`` names (the fake ``srun`` writes it before it execs the fit).
    """
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if signal_to_send is not None and line.startswith("[progress] step "):
                target = int(pid_file.read_text()) if pid_file is not None else process.pid
                os.kill(target, signal_to_send)
                signal_to_send = None
        returncode = process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    return returncode, "".join(lines)


def _progress_steps(output: str) -> list[int]:
    return [int(m) for m in re.findall(r"^\[progress\] step (\d+)/", output, re.M)]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    return write_tiny_cohort(tmp_path_factory.mktemp("cohort"), n_scans=8)


@pytest.mark.slow
def test_cli_fit_sigterm_saves_exits_zero_and_the_printed_command_resumes(manifest, tmp_path):
    config = str(EXPERIMENTS / "pretrain" / "synth_small.yaml")
    words = ["fit", "--config", config, *TINY_FIT, "--data.init_args.manifest", manifest]
    words += ["--data.init_args.cache_dir", str(tmp_path / "cache")]
    python = [sys.executable, "-m", "neurojepa_pl"]

    code, output = _run([*python, *words], tmp_path, _env(), signal_to_send=signal.SIGTERM)
    assert code == 0, output
    saved = re.search(r"^\[neurojepa\] SIGTERM: saved step (\d+) \(epoch \d+\) to (\S+)$", output, re.M)
    assert saved, output
    step, path = int(saved.group(1)), tmp_path / saved.group(2)
    assert path == tmp_path / "runs/demo/pretrain/version_0/checkpoints/preempted.ckpt"
    assert 1 <= step < 8 and torch.load(path, weights_only=False)["global_step"] == step
    assert "fit done" not in output  # an interrupted fit does not claim to be done

    resume = re.search(r"^\[neurojepa\] resume: (neurojepa fit .*)$", output, re.M)
    assert resume, output
    resume_words = shlex.split(resume.group(1))
    assert resume_words[-2:] == ["--ckpt_path", saved.group(2)]
    code, output = _run([*python, *resume_words[1:]], tmp_path, _env())
    assert code == 0, output
    assert f"Restored all states from the checkpoint at {saved.group(2)}" in output
    assert _progress_steps(output)[0] == step + 1  # continues, does not restart at step 1
    assert "[progress] training ended at step 8" in output


@pytest.mark.slow
def test_slurm_requeue_resumes_from_the_hpc_checkpoint(manifest, tmp_path):
    """The sbatch example, run twice by bash as SLURM would run it (the first run gets the time-limit signal)."""
    bin_dir = tmp_path / "fake_bin"
    bin_dir.mkdir()
    scripts = {
        # `srun` runs the task in place (exec keeps the pid the test signals) with the tiny overrides appended
        "srun": 'echo $$ > "$SRUN_PID_FILE"\nexec "$@" $TINY_OVERRIDES',
        # `scontrol requeue` records its call; SLURM then ends the job with SIGTERM, which the fake does itself
        "scontrol": 'echo "$@" >> "$SCONTROL_LOG"\nkill -TERM "$PPID"',
        "neurojepa": f'exec {shlex.quote(sys.executable)} -m neurojepa_pl "$@"',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)  # what the sbatch sources
    (tmp_path / ".venv" / "bin" / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    (tmp_path / "experiments").symlink_to(EXPERIMENTS)
    with socket.socket() as free:  # DDP's rendezvous port, not the job-id-derived default other runs may hold
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    overrides = [*TINY_FIT, "--data.init_args.cache_dir", str(tmp_path / "cache")]
    env = _env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        TINY_OVERRIDES=" ".join(overrides),
        SRUN_PID_FILE=str(tmp_path / "srun.pid"),
        SCONTROL_LOG=str(tmp_path / "scontrol.log"),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="neurojepa-pretrain",
        SLURM_NTASKS="1",
        SLURM_NTASKS_PER_NODE="1",
        SLURM_NNODES="1",
        SLURM_NODELIST="127.0.0.1",
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
        SLURM_NODEID="0",
        SLURM_CPUS_PER_TASK="1",
    )
    sbatch = ["bash", str(EXPERIMENTS / "trainer" / "slurm_example.sbatch"), manifest]
    run_dir = tmp_path / "runs" / "neurojepa_base" / "version_4242"

    code, output = _run(sbatch, tmp_path, env, signal_to_send=signal.SIGUSR1, pid_file=tmp_path / "srun.pid")
    assert code == 0, output
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    # SIGUSR1: Lightning saved hpc_ckpt_1 from its signal handler; the SIGTERM that followed: ours, at a step boundary
    saved = re.search(r"^\[neurojepa\] SIGTERM: saved step (\d+) \(epoch \d+\) to (\S+)$", output, re.M)
    assert saved and tmp_path / saved.group(2) == run_dir / "hpc_ckpt_2.ckpt", output
    assert (run_dir / "hpc_ckpt_1.ckpt").is_file()
    step = int(saved.group(1))
    assert torch.load(run_dir / "hpc_ckpt_2.ckpt", weights_only=False)["global_step"] == step

    env["SLURM_RESTART_COUNT"] = "1"
    code, output = _run(sbatch, tmp_path, env)  # the requeued job: same job id, same command, no --ckpt_path
    assert code == 0, output
    assert "run 1 of job 4242" in output
    assert "Restored all states from the checkpoint at runs/neurojepa_base/version_4242/hpc_ckpt_2.ckpt" in output
    assert _progress_steps(output)[0] == step + 1
    assert "[progress] training ended at step 8" in output
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["version_4242"]  # one run folder for the whole job
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 2


@pytest.mark.slow
def test_cli_fit_ckpt_path_last_resumes_in_a_new_process(manifest, tmp_path, monkeypatch):
    from neurojepa_pl.cli import lightning_main

    monkeypatch.chdir(tmp_path)
    config = str(EXPERIMENTS / "pretrain" / "synth_small.yaml")
    words = ["fit", "--config", config, *TINY_FIT, "--data.init_args.manifest", manifest]
    words += ["--data.init_args.cache_dir", str(tmp_path / "cache")]
    first = lightning_main([*words, "--trainer.max_steps", "3"])  # a fit that ends at step 3 with its last.ckpt
    last = tmp_path / "runs/demo/pretrain/version_0/checkpoints/last.ckpt"
    assert first.trainer.global_step == 3 and last.is_file()
    again = lightning_main([*words, "--trainer.max_steps", "5", "--ckpt_path", "last"])  # a later process
    assert again.trainer.ckpt_path is not None and Path(again.trainer.ckpt_path).resolve() == last
    assert again.trainer.global_step == 5
