"""Save the run when the process is told to stop (SIGTERM: preemption, ``scancel``, a spot instance being reclaimed,
``kill``), then exit with status 0; the saved checkpoint resumes the run.

How it works with Lightning 2.6 (``lightning.pytorch.trainer.connectors.signal_connector``): every ``Trainer.fit``
installs a SIGTERM handler that only records the signal (``trainer.received_sigterm``; it also forwards the signal to
the processes Lightning launched itself, and under DDP rank 0's flag is broadcast before each batch). The training
loop then raises ``SIGTERMException`` (a ``SystemExit`` without a code: exit status 0) at its next safe point: after
the current batch has finished (``on_train_batch_end`` has run, the optimizer step and the per-step callbacks are
done), at an epoch end, or between validation batches. Lightning calls every callback's ``on_exception`` before it
re-raises; this callback writes the checkpoint there, so the state it saves is always a whole number of steps (the
same kind of mid-epoch state a ``ModelCheckpoint(every_n_train_steps=...)`` save has). Installing a second signal
handler would add nothing and would displace Lightning's forwarding to the DDP ranks.

Where it writes:

* under SLURM with Lightning's auto-requeue (``experiments/trainer/slurm.yaml``): as the next
  ``hpc_ckpt_<n>.ckpt`` of ``trainer.default_root_dir``, the file a requeued job resumes from by itself (Lightning
  loads the newest ``hpc_ckpt_*.ckpt`` there when ``--ckpt_path`` is not given). A job preempted by the scheduler gets
  only SIGTERM, and this save is then its only checkpoint;
* otherwise: ``preempted.ckpt`` in the folder of the first ``ModelCheckpoint`` (``<run>/version_<k>/checkpoints/``),
  or ``<log_dir>/checkpoints/`` without one. It prints the exact ``neurojepa fit ... --ckpt_path <file>`` that resumes.

The write itself is atomic when the trainer uses :class:`neurojepa_pl.checkpoint_io.AtomicCheckpointIO` (the
experiment YAMLs do): a second signal or a SIGKILL after the grace period during the save leaves the previous files,
never a half checkpoint.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["PreemptionCheckpoint", "find_resume_checkpoint", "resume_command"]

PROG = "neurojepa"
RESUMABLE_IN_CHECKPOINTS = re.compile(r"last.*\.ckpt|preempted\.ckpt")
"""Names in ``version_<k>/checkpoints/``: ``ModelCheckpoint(save_last=True)``'s and this callback's."""
RESUMABLE_IN_RUN = re.compile(r"hpc_ckpt_\d+\.ckpt")
"""Names in ``version_<k>/``: Lightning's SLURM checkpoints (with ``default_root_dir`` = the run folder)."""


def find_resume_checkpoint(run_root: str | Path) -> Path | None:
    """The newest checkpoint (by modification time) a new ``fit`` of a run name can resume from.

    Looks in every ``<run_root>/version_<k>/``: ``checkpoints/last*.ckpt`` (``ModelCheckpoint(save_last=True)``),
    ``checkpoints/preempted.ckpt`` (:class:`PreemptionCheckpoint`) and ``hpc_ckpt_<n>.ckpt`` (SLURM requeue). Unfinished
    writes (``.partial-*.tmp``, :mod:`neurojepa_pl.atomic_io`) never match.

    Args:
        run_root: ``<logger save_dir>/<logger name>``, e.g. ``runs/demo/pretrain``.

    Returns:
        The newest such file, ``None`` if there is none.
    """
    root = Path(run_root)
    found = [p for p in root.glob("version_*/checkpoints/*.ckpt") if RESUMABLE_IN_CHECKPOINTS.fullmatch(p.name)]
    found += [p for p in root.glob("version_*/hpc_ckpt_*.ckpt") if RESUMABLE_IN_RUN.fullmatch(p.name)]
    return max(found, key=lambda p: p.stat().st_mtime_ns, default=None)


def resume_command(ckpt_path: str | Path, argv: list[str] | None = None) -> str | None:
    """The ``neurojepa fit`` command line that resumes from ``ckpt_path``: this process's own words with ``--ckpt_path``
    replaced; ``None`` when this process is not ``neurojepa fit`` (a Python script calling ``Trainer.fit``).

    Args:
        ckpt_path: the checkpoint to resume from.
        argv: the command line (default ``sys.argv``; ``neurojepa`` sets ``sys.argv[0]`` to ``neurojepa`` while it
            runs a subcommand).
    """
    argv = list(sys.argv if argv is None else argv)
    if not argv or Path(argv[0]).name != PROG or argv[1:2] != ["fit"]:
        return None
    words, skip = [], False
    for word in argv[1:]:
        if skip:
            skip = False
            continue
        if word == "--ckpt_path":
            skip = True
            continue
        if word.startswith("--ckpt_path="):
            continue
        words.append(word)
    return shlex.join([PROG, *words, "--ckpt_path", str(ckpt_path)])


class PreemptionCheckpoint(Callback):
    """On SIGTERM during ``fit``: save a checkpoint at the next step boundary, print how to resume, exit with status 0.

    Args:
        dirpath: folder of ``preempted.ckpt``; ``None`` = the first ``ModelCheckpoint``'s folder (or
            ``<log_dir>/checkpoints``). Ignored under SLURM auto-requeue, where the file is Lightning's next
            ``hpc_ckpt_<n>.ckpt``.
        filename: file name without ``.ckpt``.

    Attributes:
        saved_path: the checkpoint written by the last SIGTERM, ``None`` before one.
    """

    def __init__(self, dirpath: str | Path | None = None, filename: str = "preempted") -> None:
        if not filename or "/" in filename:
            raise ValueError(f"PreemptionCheckpoint filename must be a plain file name, got {filename!r}.")
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.filename = filename
        self.saved_path: Path | None = None

    @staticmethod
    def slurm_requeue(trainer: Trainer) -> bool:
        """Whether Lightning's SLURM auto-requeue is on for this trainer (the environment its signal handling uses)."""
        environment = trainer._accelerator_connector.cluster_environment
        return isinstance(environment, SLURMEnvironment) and environment.auto_requeue

    def checkpoint_path(self, trainer: Trainer) -> Path:
        """Where a SIGTERM now would write (see the module docstring)."""
        if self.slurm_requeue(trainer):
            # Lightning's own numbering (the path its SIGUSR1 handler saves to), so that a requeued job picks it.
            return Path(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir))
        folder = self.dirpath
        if folder is None:
            checkpoints = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
            if checkpoints and checkpoints[0].dirpath:
                folder = Path(checkpoints[0].dirpath)
            else:
                folder = Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
        return folder / f"{self.filename}.ckpt"

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        if trainer.sanity_checking:  # no training step yet: nothing worth resuming from
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(
            path, weights_only=False
        )  # on every rank: sharded strategies gather the state collectively
        self.saved_path = path
        if trainer.is_global_zero:
            self._report(trainer, path)

    def _report(self, trainer: Trainer, path: Path) -> None:
        lines = [f"[{PROG}] SIGTERM: saved step {trainer.global_step} (epoch {trainer.current_epoch}) to {path}"]
        if self.slurm_requeue(trainer):
            lines.append(
                f"[{PROG}] a requeued SLURM job resumes from it by itself (the newest hpc_ckpt_*.ckpt of "
                f"trainer.default_root_dir = {trainer.default_root_dir}, when --ckpt_path is not given)"
            )
        command = resume_command(path) or f"Trainer.fit(..., ckpt_path={str(path)!r})"
        by_hand = " by hand (outside this job)" if self.slurm_requeue(trainer) else ""
        lines.append(f"[{PROG}] resume{by_hand}: {command}")
        print("\n".join(lines), flush=True)
