"""Write-then-rename: a file either appears whole at its final path or not at all, whatever kills the writer.

The bytes go to a temporary file in the target's own folder (same filesystem, so ``os.replace`` is one atomic rename),
optionally fsynced, then renamed over the target. Readers see the previous file or the new one, never a part of one;
two writers of the same path each rename a complete file (the last one wins). Used by checkpoint saves
(:mod:`neurojepa_pl.checkpoint_io`) and cache entries (``data_modules/datasets.py``, ``data_modules/fast_cache.py``).

Temporary names are ``.partial-<pid>-<token>.tmp``. They carry neither the target's name nor ``ckpt``: Lightning finds
SLURM checkpoints by scanning a folder for names containing ``ckpt_`` and reading their digits, ``--ckpt_path last``
takes names starting with ``last`` and ending in ``.ckpt``, and MONAI's cache entries end in ``.pt``; an unfinished
write must match none of them. The pid lets a later writer remove files whose writer was killed.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

__all__ = ["PARTIAL_PATTERN", "atomic_write", "fsync_folder", "partial_path", "remove_stale_partials"]

PARTIAL_PATTERN = re.compile(r"\.partial-(\d+)-[0-9a-f]+\.tmp")
"""Name of an unfinished write: ``.partial-<pid>-<token>.tmp``."""


def partial_path(folder: str | Path) -> Path:
    """A fresh temporary name in ``folder`` for this process (unique across processes and calls)."""
    return Path(folder) / f".partial-{os.getpid()}-{secrets.token_hex(4)}.tmp"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def remove_stale_partials(folder: str | Path) -> list[Path]:
    """Delete the unfinished writes in ``folder`` whose writing process no longer runs (it was killed mid-write).

    A pid is checked on this machine only; a file left by a process of another node that reused the same pid stays
    until a later call (harmless: no reader ever opens these names).

    Returns:
        The removed files.
    """
    removed = []
    for path in Path(folder).glob(".partial-*.tmp"):
        match = PARTIAL_PATTERN.fullmatch(path.name)
        if match is None or int(match.group(1)) == os.getpid() or _pid_alive(int(match.group(1))):
            continue
        try:
            path.unlink()
        except FileNotFoundError:  # another process removed it first
            continue
        removed.append(path)
        log.info("removed %s, left by a write that was killed", path)
    return removed


def fsync_folder(folder: str | Path) -> None:
    """Flush ``folder``'s entries (a rename is durable across a node crash only after this)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as error:  # some network filesystems refuse fsync on a directory
        if error.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | Path, fsync: bool = True, clean: bool = True) -> Iterator[BinaryIO]:
    """Open a binary handle whose bytes replace ``path`` atomically when the block ends without an exception.

    Args:
        path: the final file; its folder is created if needed.
        fsync: flush the data and the folder entry to disk (needed to survive a node crash, not a process kill).
        clean: first remove stale unfinished writes in the folder (:func:`remove_stale_partials`); pass ``False`` in
            folders with very many files (a cache), and clean those once instead.

    Yields:
        A binary file handle on the temporary file.

    Raises:
        Whatever the block or the filesystem raises; the temporary file is then removed and ``path`` is untouched.

    Example::

        with atomic_write("out/meta.json", fsync=False) as handle:
            handle.write(json.dumps(meta).encode())
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    if clean:
        remove_stale_partials(final.parent)
    partial = partial_path(final.parent)
    try:
        with open(partial, "wb") as handle:
            yield handle
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(partial, final)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_folder(final.parent)
