"""Shared SynthBrain test data: the tiny-grid subjects of the session cohort, rendered in memory once."""

from __future__ import annotations

import pytest

TINY_GRID = (48, 54, 48)
N_TINY = 12


@pytest.fixture(scope="session")
def tiny_subjects():
    """The 12 subjects of the ``synth_cohort`` fixture (seed 0, grid 48x54x48), in memory with tissue maps."""
    from neurojepa_pl.synth import generate_subject

    return [generate_subject(0, i, grid=TINY_GRID, return_tissue=True) for i in range(N_TINY)]
