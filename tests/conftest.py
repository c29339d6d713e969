"""Shared fixtures: small generated SynthBrain cohorts and test-tier handling.

Tests never download anything: every volume is generated here from nilearn's packaged MNI152 maps.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # 2-core CI machine: keep intra-op threads bounded so parallel-ish tests stay predictable.
    torch.set_num_threads(2)
    yield


@pytest.fixture(autouse=True)
def _restore_environment():
    # Lightning's launchers and the in-process process-group tests export LOCAL_RANK, NODE_RANK, WORLD_SIZE,
    # MASTER_PORT, ... into os.environ; left there, a later `neurojepa fit --trainer.devices 2` subprocess believes an
    # external launcher started it and waits forever for a rank 1 that nobody starts.
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


TINY_GRID = (48, 54, 48)


@pytest.fixture(scope="session")
def synth_cohort(tmp_path_factory) -> Path:
    """A 12-subject, 3-contrast SynthBrain cohort on a small grid; returns the manifest path."""
    from neurojepa_pl.synth import generate_cohort

    out = tmp_path_factory.mktemp("synthbrain")
    generate_cohort(out, n_subjects=12, seed=0, grid=TINY_GRID)
    return out / "manifest.csv"
