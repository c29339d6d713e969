"""The published split CSVs ship with the package, unchanged, with the authors' licence."""

from __future__ import annotations

import hashlib

from neurojepa_pl.data_modules.cohorts import default_split_dir


def test_every_shipped_split_file_matches_its_checksum():
    root = default_split_dir()
    listed = {}
    for line in (root / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        listed[name] = digest
    shipped = {str(p.relative_to(root)) for p in root.rglob("*.csv")}
    assert len(listed) == 147
    assert shipped == set(listed)
    for name, digest in listed.items():
        assert hashlib.sha256((root / name).read_bytes()).hexdigest() == digest, name


def test_the_licence_notice_travels_with_the_files():
    text = (default_split_dir() / "LICENSE").read_text()
    assert "MIT License" in text and "Copyright (c) 2026 The NeuroJEPA Authors" in text
