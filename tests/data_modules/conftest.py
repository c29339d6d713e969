"""Fixtures for the data-module tests (volumes and manifests come from volume_factory.py)."""

from __future__ import annotations

import pytest
from volume_factory import TINY_CROP, TINY_RESIZE


@pytest.fixture
def tiny_settings():
    from neurojepa_pl.data.transforms import TransformSettings

    return TransformSettings(pad_crop_size=None, target_spacing=None, resize_to=TINY_RESIZE, spatial_size=TINY_CROP)


@pytest.fixture
def tiny_dm_kwargs(tmp_path, tmp_path_factory) -> dict[str, object]:
    """Data-module arguments for the tiny grid (no pad/crop, no resampling).

    The cache is shared by all tests of the session: entries are keyed by settings digest, path, size and mtime, so
    sharing is safe, and module-scoped cohorts are then loaded once.
    """
    return {
        "cache_dir": str(tmp_path_factory.getbasetemp() / "shared_cache"),
        "batch_size": 2,
        "num_workers": 0,
        "spatial_size": TINY_CROP,
        "resize_to": TINY_RESIZE,
        "pad_crop_size": None,
        "target_spacing": None,
        "seed": 0,
        "quarantine_path": str(tmp_path / "logs" / "quarantine.csv"),
    }
