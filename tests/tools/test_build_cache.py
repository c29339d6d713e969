"""`neurojepa build-cache --format memmap`: build, reuse after the cheap check, `--verify` finds an overwritten row and
rebuilds it."""

from __future__ import annotations

import json

import numpy as np
from jepa_tiny import write_tiny_cohort

from neurojepa_pl.cli import main

TINY = ["--format", "memmap", "--pad-crop-size", "none", "--target-spacing", "none", "--resize-to", "34", "40", "34"]
TINY += ["--spatial-size", "32", "36", "32"]


def test_build_reuse_and_verify(tmp_path, capsys):
    manifest = write_tiny_cohort(tmp_path / "cohort", n_scans=3)
    argv = ["build-cache", manifest, "--out", str(tmp_path / "cache"), *TINY]
    assert main(argv) == 0
    assert "3 scans cached, 0 quarantined, built," in capsys.readouterr().out
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    built = np.load(folder / "volumes.npy")

    assert main(argv) == 0
    assert "3 scans cached, 0 quarantined, reused (size and header checked)," in capsys.readouterr().out

    meta = json.loads((folder / "meta.json").read_text())
    with open(folder / "volumes.npy", "r+b") as handle:  # zero the middle of row 2: same size, wrong bytes
        handle.seek(meta["header_bytes"] + 2 * meta["row_bytes"] + meta["row_bytes"] // 2)
        handle.write(bytes(1000))
    assert main([*argv, "--verify"]) == 0
    out = capsys.readouterr().out
    assert "reused (every row's CRC-32 checked; 1 damaged rows rebuilt)," in out
    np.testing.assert_array_equal(np.load(folder / "volumes.npy"), built)


def test_help_describes_the_checks(capsys):
    try:
        main(["build-cache", "--help"])
    except SystemExit as stopped:
        assert stopped.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--verify" in text and "CRC-32" in text and "a killed run leaves no folder that looks finished" in text
