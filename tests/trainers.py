"""The one tiny Trainer the module and data tests share: CPU, one device, no logger, no checkpoints, no bars."""

from __future__ import annotations

import os
import socket
from typing import Any

import lightning.pytorch as pl


def tiny_trainer(**overrides: Any) -> pl.Trainer:
    """A quiet single-device CPU ``Trainer``; ``overrides`` are any Trainer arguments (``max_epochs``, ...)."""
    args: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    args.update(overrides)
    return pl.Trainer(**args)


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1, for a test's own process group (never one inherited from another test:
    Lightning's launcher exports MASTER_PORT into this process's environment, and subprocesses would reuse it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What a launcher (Lightning's, torchrun, SLURM) tells a process about its place in a process group.
_LAUNCHER_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                       "MASTER_ADDR", "MASTER_PORT")  # fmt: skip


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment for a fresh ``neurojepa`` subprocess: without launcher variables (a fresh
    ``MASTER_PORT`` instead) or SLURM/torchelastic ones, ``OMP_NUM_THREADS=1``, plus ``extra``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _LAUNCHER_VARIABLES and not key.startswith(("SLURM_", "TORCHELASTIC_", "PL_"))
    }
    env.update(OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
    env.update(extra)
    return env
