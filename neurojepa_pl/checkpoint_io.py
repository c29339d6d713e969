"""Checkpoint saves that a kill cannot leave half-done: write beside the target, fsync, rename (write-then-rename).

Why not Lightning's own ``TorchCheckpointIO`` (Lightning 2.6, ``lightning.fabric.utilities.cloud_io._atomic_save``):
it writes through an fsspec transaction whose temporary file comes from ``tempfile.mkstemp()`` in ``$TMPDIR`` and is
then moved with ``shutil.move``. When ``$TMPDIR`` is on another filesystem than the checkpoint folder (node-local
``/tmp`` and a shared ``/scratch``, the usual cluster layout), that move is a *copy into the final path*: a kill during
the copy leaves a truncated ``last.ckpt`` (or ``hpc_ckpt_<n>.ckpt``, which a requeued job then fails to load), a kill
before it leaves a multi-GB orphan in ``/tmp``, and nothing is fsynced. :func:`neurojepa_pl.atomic_io.atomic_write`
puts the temporary file in the target's own folder, so the final path holds the previous complete checkpoint or the
new complete one, never a part of one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem  # type: ignore[import-untyped]
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from neurojepa_pl.atomic_io import atomic_write

__all__ = ["AtomicCheckpointIO", "atomic_torch_save"]


def atomic_torch_save(obj: Any, path: str | Path, fsync: bool = True) -> Path:
    """``torch.save(obj, path)`` through :func:`neurojepa_pl.atomic_io.atomic_write`; returns ``path``.

    The object is streamed into the temporary file (no second in-memory copy of a multi-GB checkpoint, unlike
    Lightning's ``BytesIO`` round trip). On any error ``path`` is left as it was.
    """
    with atomic_write(path, fsync=fsync) as handle:
        torch.save(obj, handle)
    return Path(path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic (:func:`atomic_torch_save`); loading is Lightning's.

    A Trainer plugin (``trainer.plugins`` in the experiment YAMLs). Every strategy that saves through its
    ``checkpoint_io`` uses it: single device, DDP, FSDP with ``state_dict_type: full``. FSDP's sharded format writes a
    folder through ``torch.distributed.checkpoint`` and does not come here. Paths on object stores (``s3://``, ...)
    go to Lightning's implementation, whose single upload is atomic there.

    Args:
        fsync: flush every checkpoint and its folder entry to disk before the save returns (a node crash right after
            a save then still finds it; costs the time the storage needs to persist the file).
    """

    def __init__(self, fsync: bool = True) -> None:
        super().__init__()
        self.fsync = fsync

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                f"Trainer.save_checkpoint(..., storage_options=...) is not supported by {type(self).__name__}; "
                "remove storage_options, or configure a CheckpointIO plugin that takes them."
            )
        if not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, path, fsync=self.fsync)
