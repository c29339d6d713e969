"""Output grids of SynthBrain: the FSL MNI152 1 mm grid, the model grid, and explicit small grids.

A grid is named by a ``GridSpec``: ``"mni"`` (182x218x182 at 1 mm, the FSL MNI152 box written RAS), ``"model"``
(96x108x96, the MNI atlas pushed once through the reference foreground-crop -> resize -> centre-crop chain) or an
explicit ``(D, H, W)`` tuple (the model-grid atlas resampled, for tests). Every grid carries a voxel->world affine in
RAS millimetres, so nibabel and MONAI ``Orientation`` see RAS without any flip.
"""

from __future__ import annotations

import re

import numpy as np

GridSpec = str | tuple[int, int, int]

MNI_SHAPE: tuple[int, int, int] = (182, 218, 182)
# World position (mm) of voxel (0, 0, 0) of the FSL 1 mm grid: the 2009a grid (origin (-98, -134, -72)) cropped by
# [8:190, 8:226, 0:182].
MNI_ORIGIN_MM: tuple[float, float, float] = (-90.0, -126.0, -72.0)
# Crop of nilearn's 197x233x189 ICBM152 2009a grid that gives the FSL grid exactly (no interpolation).
MNI2009A_TO_FSL_CROP: tuple[slice, slice, slice] = (slice(8, 190), slice(8, 226), slice(0, 182))
MODEL_SHAPE: tuple[int, int, int] = (96, 108, 96)
# The reference loading chain (docs/method.md §1.2): pad/crop to this, crop foreground (margin 4), resize to
# RESIZED_SHAPE, then centre-crop to MODEL_SHAPE.
REFERENCE_PAD_SHAPE: tuple[int, int, int] = (180, 216, 180)
RESIZED_SHAPE: tuple[int, int, int] = (100, 120, 100)


def mni_affine() -> np.ndarray:
    """Voxel -> world (RAS mm) affine of the FSL MNI152 1 mm grid, written RAS (x not flipped).

    Returns:
        ``[4, 4]`` float64 array ``diag(1, 1, 1, 1)`` with translation ``(-90, -126, -72)``.
    """
    affine = np.eye(4)
    affine[:3, 3] = MNI_ORIGIN_MM
    return affine


def normalize_grid(grid: GridSpec | list[int]) -> GridSpec:
    """Return the canonical, hashable form of a grid specification.

    Args:
        grid: ``"mni"``, ``"model"``, a ``"DxHxW"`` string, or a sequence of three positive ints.

    Returns:
        ``"mni"``, ``"model"`` or a ``(D, H, W)`` tuple of ints.

    Raises:
        ValueError: if the specification is none of these.
    """
    if isinstance(grid, str):
        text = grid.strip().lower()
        if text in ("mni", "model"):
            return text
        match = re.fullmatch(r"(\d+)x(\d+)x(\d+)", text)
        if match is None:
            raise ValueError(f"grid must be 'mni', 'model' or 'DxHxW' (e.g. '48x54x48'); got {grid!r}")
        grid = tuple(int(g) for g in match.groups())
    shape = tuple(int(g) for g in grid)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"an explicit grid must be three sizes of at least 8 voxels, e.g. (48, 54, 48); got {grid!r}")
    return shape  # type: ignore[return-value]


def grid_name(grid: GridSpec) -> str:
    """Human-readable grid name for logs and dataset descriptions (``"mni"``, ``"model"``, ``"48x54x48"``)."""
    grid = normalize_grid(grid)
    return grid if isinstance(grid, str) else "x".join(str(g) for g in grid)


def voxel_volume_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in millilitres for a voxel->world affine in mm."""
    return float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0


def apply_linear(matrix: np.ndarray, translation: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``points @ matrix.T + translation`` for points ``[..., 3]``, written out elementwise.

    BLAS may round a matrix product differently for different thread counts or block sizes; synthesis results must
    not depend on the machine's core count, so every coordinate transform goes through this fixed-order sum.
    """
    points = np.asarray(points, dtype=np.float64)
    out = np.broadcast_to(np.asarray(translation, dtype=np.float64), points.shape).copy()
    for j in range(3):
        out += points[..., j : j + 1] * matrix[:, j]
    return out


def voxel_to_world(affine: np.ndarray, voxels: np.ndarray) -> np.ndarray:
    """Map voxel indices ``[..., 3]`` to world millimetres ``[..., 3]``."""
    return apply_linear(affine[:3, :3], affine[:3, 3], voxels)


def world_to_voxel(affine: np.ndarray, points_mm: np.ndarray) -> np.ndarray:
    """Map world millimetres ``[..., 3]`` to (fractional) voxel indices ``[..., 3]``."""
    inverse = np.linalg.inv(affine)
    return apply_linear(inverse[:3, :3], inverse[:3, 3], points_mm)
