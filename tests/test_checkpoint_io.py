"""AtomicCheckpointIO: a checkpoint write that is killed or fails midway never leaves a loadable half-file at the final
path (the previous checkpoint stays), in-process and with SIGKILL; Lightning uses it and its SLURM numbering is safe."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from jepa_tiny import TinyJEPAData, tiny_module, tiny_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from neurojepa_pl.atomic_io import partial_path
from neurojepa_pl.checkpoint_io import AtomicCheckpointIO, atomic_torch_save


def _checkpoint(value: float, mib: int = 1) -> dict:
    return {"state_dict": {"w": torch.full((mib * 2**18,), value)}, "global_step": int(value)}


def test_save_then_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(_checkpoint(1.0), path)
    assert io.load_checkpoint(path)["global_step"] == 1

    real_save = torch.save

    def dies_halfway(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)  # half the bytes are on disk when the writer dies
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint(_checkpoint(2.0), path)
    monkeypatch.setattr(torch, "save", real_save)
    loaded = io.load_checkpoint(path)
    assert loaded["global_step"] == 1 and float(loaded["state_dict"]["w"][0]) == 1.0
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


SIGKILLED_WRITER = """
import sys, time, torch
from pathlib import Path
from neurojepa_pl.checkpoint_io import AtomicCheckpointIO

real_save = torch.save
def save_then_hang(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    f.truncate(f.tell() // 2)
    f.flush()
    Path(sys.argv[2]).write_text("half written")  # the parent kills us now, mid-write
    time.sleep(600)
torch.save = save_then_hang
AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.full((2**20,), 2.0)}, "global_step": 2}, sys.argv[1])
"""


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "hpc_ckpt_1.ckpt"
    atomic_torch_save(_checkpoint(1.0), path)
    marker = tmp_path / "marker"
    child = subprocess.Popen([sys.executable, "-c", SIGKILLED_WRITER, str(path), str(marker)])
    deadline = time.monotonic() + 120
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), "the writer never got halfway"
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL

    assert torch.load(path, weights_only=True)["global_step"] == 1  # the final path still holds the old checkpoint
    (partial,) = [p for p in tmp_path.iterdir() if p.name.startswith(".partial-")]
    with pytest.raises(RuntimeError, match="zip archive"):  # what was cut short is not loadable, and not at `path`
        torch.load(partial, weights_only=True)
    atomic_torch_save(_checkpoint(3.0), path)  # the next save removes the dead writer's leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hpc_ckpt_1.ckpt", "marker"]
    assert torch.load(path, weights_only=True)["global_step"] == 3


def test_trainer_saves_through_it_and_slurm_numbering_ignores_partial_files(tmp_path):
    io = AtomicCheckpointIO(fsync=False)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=2, save_top_k=-1, save_last=True)
    trainer = tiny_trainer(tmp_path, max_steps=4, enable_checkpointing=True, callbacks=[checkpoints], plugins=[io])
    assert trainer.strategy.checkpoint_io is io
    trainer.fit(tiny_module(), datamodule=TinyJEPAData(n=8, batch_size=2))
    names = sorted(p.name for p in (tmp_path / "ckpts").iterdir())
    assert names == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"]
    assert torch.load(tmp_path / "ckpts" / "last.ckpt", weights_only=False)["global_step"] == 4

    # Lightning numbers SLURM checkpoints from the digits of every name containing "ckpt_" in default_root_dir: a
    # partial file named after its target (hpc_ckpt_2.ckpt.tmp-123) would read as hpc_ckpt_2123 and be "resumed"
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"")
    partial_path(tmp_path).write_bytes(b"")
    assert trainer._checkpoint_connector.hpc_save_path(tmp_path) == str(tmp_path / "hpc_ckpt_2.ckpt")
