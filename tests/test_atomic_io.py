"""Write-then-rename: the final path holds the old file or the whole new one, whatever interrupts the writer."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from neurojepa_pl.atomic_io import PARTIAL_PATTERN, atomic_write, partial_path, remove_stale_partials


def _dead_pid() -> int:
    """The pid of a process that has exited (ours is alive, so a stale file needs another one)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_complete_write_replaces_and_interrupted_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "sub" / "meta.json"
    with atomic_write(target) as handle:
        handle.write(b"old")
    assert target.read_bytes() == b"old"

    with pytest.raises(KeyboardInterrupt), atomic_write(target) as handle:
        handle.write(b"new but not fin")
        raise KeyboardInterrupt  # a kill from inside the writer: Ctrl-C, SystemExit, any exception
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["meta.json"]  # the partial file is gone too

    with atomic_write(target, fsync=False) as handle:
        handle.write(b"new")
    assert target.read_bytes() == b"new"


def test_partial_names_match_no_checkpoint_or_cache_pattern(tmp_path):
    name = partial_path(tmp_path).name
    assert PARTIAL_PATTERN.fullmatch(name) and int(PARTIAL_PATTERN.fullmatch(name).group(1)) == os.getpid()
    # Lightning reads SLURM checkpoint numbers from any name containing "ckpt_"; "last" resolution takes last*.ckpt;
    # MONAI's entries end in .pt
    assert "ckpt" not in name and not name.startswith("last") and not name.endswith((".ckpt", ".pt"))
    assert partial_path(tmp_path) != partial_path(tmp_path)


def test_stale_partials_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    stale = tmp_path / f".partial-{_dead_pid()}-0a1b2c3d.tmp"
    mine = partial_path(tmp_path)
    unrelated = tmp_path / ".partial-notapid.tmp"
    for path in (stale, mine, unrelated):
        path.write_bytes(b"x")
    assert remove_stale_partials(tmp_path) == [stale]
    assert mine.exists() and unrelated.exists() and not stale.exists()

    stale.write_bytes(b"x")
    with atomic_write(tmp_path / "f.bin") as handle:  # every write cleans its folder first
        handle.write(b"y")
    assert not stale.exists()
    stale.write_bytes(b"x")
    with atomic_write(tmp_path / "g.bin", clean=False) as handle:  # ... unless told not to (huge cache folders)
        handle.write(b"y")
    assert stale.exists()
