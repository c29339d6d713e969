"""Subject anatomy: one backward displacement field (registration jitter, smooth warp, ventricular expansion,
tumour mass effect) applied to every atlas map with a single ``grid_sample``, then cortical thinning.

Convention: the warped map at world point ``x`` is the atlas at ``x + u(x)`` (a backward map). A field ``u`` that
points towards a structure therefore enlarges it; ventricular expansion and mass effect are written that way.
The field is evaluated on a lattice about 3 mm apart spanning the atlas box and interpolated at the synthesis points,
because every component is smooth at that scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .atlas import CHANNELS, POINT_MARGIN_MM, Atlas
from .fields import coarse_lattice_shape, sample_lattice, smooth_noise
from .grids import apply_linear, voxel_to_world

LATTICE_STEP_MM = 3.0
WARP_CORRELATION_MM = 14.0
WARP_SD_MM = 1.2
# Outside the atlas ICV the displacement is capped below the point margin so that no warped brain tissue can land
# on a voxel that is not a synthesis point (the cap never binds for the stated jitter and warp sizes in practice).
OUTSIDE_DISPLACEMENT_CAP_MM = POINT_MARGIN_MM - 0.5
# Cortical thinning: fraction of a GM voxel turned into CSF = min(MAX_GM_LOSS, THINNING * age_factor * rate *
# atrophy susceptibility), where the susceptibility is the atlas CSF blurred by 1.5 mm (so thinning opens sulci
# and widens the cortical CSF rim, not deep GM).
CORTICAL_THINNING = 1.6
MAX_GM_LOSS = 0.7
# Ventricular expansion amplitude (mm at the ventricle wall) = BASE + SLOPE * age_factor * rate, capped by the
# atlas's no-folding limit.
VENTRICLE_BASE_MM = 0.3
VENTRICLE_SLOPE_MM = 3.5
# Fraction of the tumour core radius that displaces tissue (the rest infiltrates it).
MASS_EFFECT_FRACTION = 0.85


@dataclass(frozen=True)
class Jitter:
    """Residual registration error of one session: rotation (radians, about x/y/z), per-axis scale, shift (mm)."""

    angles: tuple[float, float, float]
    scales: tuple[float, float, float]
    shift_mm: tuple[float, float, float]

    @staticmethod
    def draw(generator: torch.Generator) -> Jitter:
        """Small residual misregistration as after a 12-DOF affine registration: rotations sd 1 deg (clipped to
        2 deg), scales sd 1 % (clipped to 2 %), shifts sd 0.7 mm (clipped to 1.5 mm)."""
        values = torch.randn(9, generator=generator, dtype=torch.float64)
        angles = (values[:3] * math.radians(1.0)).clamp(-math.radians(2.0), math.radians(2.0))
        scales = 1.0 + (values[3:6] * 0.01).clamp(-0.02, 0.02)
        shift = (values[6:] * 0.7).clamp(-1.5, 1.5)
        return Jitter(tuple(angles.tolist()), tuple(scales.tolist()), tuple(shift.tolist()))  # type: ignore[arg-type]

    def matrix(self) -> np.ndarray:
        """``[3, 3]`` rotation times scale."""
        ax, ay, az = self.angles
        rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
        ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
        rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
        return rz @ ry @ rx @ np.diag(self.scales)


@dataclass(frozen=True)
class AnatomyState:
    """Per-session anatomy inputs: the subject's smooth warp plus this session's age effects and mass effect.

    Attributes:
        warp_mm: ``[3, m1, m2, m3]`` smooth random displacement on the lattice (world mm), shared by sessions.
        jitter: this session's residual registration error.
        ventricle_mm: expansion amplitude at the ventricle wall.
        thinning: fraction of exposed GM turned into CSF (before the susceptibility factor).
        tumour_centre_mm / tumour_radius_mm: mass-effect source, or None.
    """

    warp_mm: torch.Tensor
    jitter: Jitter
    ventricle_mm: float
    thinning: float
    tumour_centre_mm: tuple[float, float, float] | None = None
    tumour_radius_mm: float = 0.0


def lattice_shape(atlas: Atlas) -> tuple[int, int, int]:
    """Lattice size over the atlas box for ``LATTICE_STEP_MM`` spacing."""
    step = LATTICE_STEP_MM / float(atlas.spacing_mm.min())
    return coarse_lattice_shape(atlas.box_shape, step)


def lattice_world_mm(atlas: Atlas, shape: tuple[int, int, int]) -> np.ndarray:
    """World coordinates ``[3, m1, m2, m3]`` (float64) of a lattice whose corners are the box corner voxels.

    Lattice-sized arithmetic (tens of thousands of points) runs in numpy: torch would split it over intra-op threads,
    whose synchronisation costs more than the work at this size.
    """
    axes = [np.linspace(0, n - 1, m) + s for n, m, s in zip(atlas.box_shape, shape, atlas.box_start)]
    voxels = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    return np.ascontiguousarray(np.moveaxis(voxel_to_world(atlas.affine, voxels), -1, 0))


def smooth_warp(atlas: Atlas, generator: torch.Generator, amplitude_mm: float = WARP_SD_MM) -> torch.Tensor:
    """Random smooth displacement (world mm) on the lattice: Gaussian field, correlation ~14 mm, sd ``amplitude``."""
    shape = lattice_shape(atlas)
    return smooth_noise(shape, WARP_CORRELATION_MM / LATTICE_STEP_MM, generator, channels=3) * amplitude_mm


def _map3(matrix: np.ndarray, translation: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``matrix @ points + translation`` for ``[3, ...]`` points (fixed-order sum, see ``grids.apply_linear``)."""
    return np.moveaxis(apply_linear(matrix, translation, np.moveaxis(points, 0, -1)), -1, 0)


def _sample_world(field: torch.Tensor, field_affine: np.ndarray, points_mm: np.ndarray) -> np.ndarray:
    """Trilinear sample of a ``[C, d, h, w]`` field with voxel->world ``field_affine`` at points ``[3, ...]`` (mm)."""
    inverse = np.linalg.inv(field_affine)
    voxels = _map3(inverse[:3, :3], inverse[:3, 3], points_mm.reshape(3, -1))
    size = np.array(field.shape[1:], dtype=np.float64)[:, None]
    normalised = (2.0 * voxels / (size - 1) - 1.0)[::-1].T.astype(np.float32)
    sampled = sample_lattice(field, torch.from_numpy(np.ascontiguousarray(normalised)).reshape(1, 1, 1, -1, 3))
    return sampled.numpy().astype(np.float64).reshape(field.shape[0], *points_mm.shape[1:])


def mass_effect_mm(points_mm: np.ndarray, centre_mm: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    """Backward displacement that opens a ball of ``radius_mm`` at ``centre_mm`` by pushing tissue outwards.

    Outside the ball the source radius is ``cbrt(r^3 - R^3)`` (volume-preserving), blended back to identity with a
    Gaussian taper of width ``2R`` beyond the ball so that distant tissue and the skull stay put; inside, every point
    samples the centre (the tumour is painted over it).

    Args:
        points_mm: ``[3, ...]`` world points.

    Returns:
        ``[3, ...]`` displacement (mm).
    """
    offset = points_mm - np.reshape(centre_mm, (3, *([1] * (points_mm.ndim - 1))))
    r = np.maximum(np.sqrt(offset[0] ** 2 + offset[1] ** 2 + offset[2] ** 2), 1e-6)
    source = np.cbrt(np.maximum(r**3 - radius_mm**3, 0.0))
    taper = np.exp(-((np.maximum(r - radius_mm, 0.0) / (2.0 * radius_mm)) ** 2))
    new_r = (1.0 - taper) * r + taper * source
    return offset * (new_r / r - 1.0)


def displacement_mm(atlas: Atlas, state: AnatomyState, points: np.ndarray) -> np.ndarray:
    """Total backward displacement at lattice ``points`` ``[3, m1, m2, m3]`` (world mm, float64)."""
    centre = atlas.brain_centre_mm
    rel = points - centre.reshape(3, 1, 1, 1)
    moved = _map3(state.jitter.matrix(), centre + np.array(state.jitter.shift_mm), rel)
    total = moved - points + state.warp_mm.numpy().astype(np.float64)
    push = atlas.ventricle_push
    total += state.ventricle_mm * _sample_world(push.field, push.affine, points)
    if state.tumour_centre_mm is not None and state.tumour_radius_mm > 0:
        total += mass_effect_mm(points, state.tumour_centre_mm, state.tumour_radius_mm)
    return total


def _cap_outside(atlas: Atlas, total: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Cap the displacement norm at lattice points outside the atlas ICV (see ``OUTSIDE_DISPLACEMENT_CAP_MM``)."""
    tissue = _sample_world(atlas.maps[:3], _box_affine(atlas), points)
    tissue = tissue[0] + tissue[1] + tissue[2]
    norm = np.sqrt(total[0] ** 2 + total[1] ** 2 + total[2] ** 2)
    scale = np.where(tissue < 0.5, np.minimum(OUTSIDE_DISPLACEMENT_CAP_MM / np.maximum(norm, 1e-9), 1.0), 1.0)
    return total * scale


def _box_affine(atlas: Atlas) -> np.ndarray:
    affine = atlas.affine.copy()
    affine[:3, 3] = voxel_to_world(atlas.affine, np.array(atlas.box_start, dtype=np.float64))
    return affine


def warp_atlas(atlas: Atlas, state: AnatomyState) -> dict[str, torch.Tensor]:
    """Warp every atlas map into the subject's space at the synthesis points and apply cortical thinning.

    Returns:
        ``{name: [K] float32}``: ``gm``, ``wm``, ``csf`` (after thinning), ``icv`` (their sum before thinning),
        ``t1_detail``, ``periventricular``.

    Raises:
        RuntimeError: if warped tissue reaches the outermost synthesis points (a broken displacement cap).
    """
    shape = tuple(state.warp_mm.shape[1:])
    points = lattice_world_mm(atlas, shape)  # type: ignore[arg-type]
    source = points + _cap_outside(atlas, displacement_mm(atlas, state, points), points)
    inverse = np.linalg.inv(atlas.affine)
    voxels = _map3(inverse[:3, :3], inverse[:3, 3], source)
    start = np.array(atlas.box_start, dtype=np.float64).reshape(3, 1, 1, 1)
    size = np.array(atlas.box_shape, dtype=np.float64).reshape(3, 1, 1, 1)
    normalised = torch.from_numpy(np.ascontiguousarray((2.0 * (voxels - start) / (size - 1) - 1.0)[::-1], np.float32))
    # Interpolating the normalised source coordinates is exact for the linear parts and smooth for the rest.
    grid = atlas.sample_box_lattice(normalised).T.reshape(1, 1, 1, -1, 3).contiguous()
    warped = sample_lattice(atlas.maps, grid)
    maps = {name: warped[i] for i, name in enumerate(CHANNELS)}
    maps["icv"] = maps["gm"] + maps["wm"] + maps["csf"]
    if bool(maps["icv"][atlas.point_shell].any()):
        raise RuntimeError(
            "the warped brain reached the outermost synthesis points; the displacement cap "
            f"({OUTSIDE_DISPLACEMENT_CAP_MM} mm) must stay below atlas.POINT_MARGIN_MM ({POINT_MARGIN_MM} mm)"
        )
    loss = maps["gm"] * (maps.pop("atrophy") * state.thinning).clamp_(max=MAX_GM_LOSS)
    maps["gm"] = maps["gm"] - loss
    maps["csf"] = maps["csf"] + loss
    return maps


def session_state(
    atlas: Atlas,
    warp_mm: torch.Tensor,
    jitter: Jitter,
    age_factor: float,
    atrophy_rate: float,
    tumour_centre_mm: tuple[float, float, float] | None = None,
    tumour_volume_ml: float = 0.0,
) -> AnatomyState:
    """Anatomy inputs of one session from the subject's warp, age factor (0..1) and tumour."""
    ventricle = min(
        VENTRICLE_BASE_MM + VENTRICLE_SLOPE_MM * age_factor * atrophy_rate, atlas.ventricle_push.max_safe_mm
    )
    radius = 0.0
    if tumour_centre_mm is not None and tumour_volume_ml > 0:
        radius = MASS_EFFECT_FRACTION * (3.0 * tumour_volume_ml * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
    return AnatomyState(
        warp_mm=warp_mm,
        jitter=jitter,
        ventricle_mm=ventricle,
        thinning=CORTICAL_THINNING * age_factor * atrophy_rate,
        tumour_centre_mm=tumour_centre_mm,
        tumour_radius_mm=radius,
    )
