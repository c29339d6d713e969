"""Lesions painted into warped tissue fractions, each to a target volume.

Every lesion is a score field (high in the lesion's centre, rough at its edge thanks to smooth noise) thresholded so
that the painted volume equals the nominal volume of the subject plan: the threshold is where the capacity-weighted
score histogram, summed from the top, reaches the target ("capacity" = how much tissue of the right kind a voxel can
give), and a linear ramp of width ``softness`` around it gives partial-volume edges. Lesion fractions replace healthy
fractions in proportion, so every voxel's fractions still sum to its intracranial fraction. Lesion noise lives on
world-mm lattices fixed per subject, so a follow-up session grows the same lesion outwards.

Classes and where they come from:

- ``wmh``: periventricular-weighted WM, patchy (caps and rims near the ventricles, scattered deep foci);
- ``tumour`` (core) in any intracranial tissue, ``oedema`` around it in WM (and a little GM), after mass effect;
- ``haemorrhage`` in GM/WM with a thin ``oedema`` rim;
- ``infarct`` (cystic core) at the cortex/WM junction with a ``gliosis`` rim.

The hyperacute ischaemic core (``LesionPainter.acute_core``) is no class: in the first hours an infarct is still GM/WM
on T1w, T2w and FLAIR (the DWI-FLAIR mismatch), and only its diffusion is restricted. It is painted by the same rule
into a separate map (the fraction of each voxel's GM/WM that is acute core) which only the DWI contrast reads, so
rendering it changes no class fraction.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .atlas import Atlas
from .fields import linear_map, noise_at_points, norm3
from .grids import world_to_voxel
from .labels import Lesion

TISSUES: tuple[str, ...] = ("gm", "wm", "csf")
LESIONS: tuple[str, ...] = ("wmh", "tumour", "oedema", "haemorrhage", "infarct", "gliosis")
CLASSES: tuple[str, ...] = TISSUES + LESIONS
HISTOGRAM_BINS = 4096
WMH_NOISE_CORRELATION_MM = 3.0
HALO_WM_PREFERENCE = 0.6


def class_index(name: str) -> int:
    """Row of class ``name`` in a ``[len(CLASSES), K]`` fraction tensor."""
    return CLASSES.index(name)


def volume_threshold(score: torch.Tensor, capacity: torch.Tensor, target: float) -> float:
    """The score threshold above which the summed capacity reaches ``target``.

    A capacity-weighted histogram (4096 bins) replaces a full sort: O(K) instead of O(K log K) on millions of voxels,
    and the threshold is interpolated inside its bin.

    Args:
        score: ``[N]`` lesion score per candidate voxel.
        capacity: ``[N]`` tissue fraction each voxel can give (0..1).
        target: lesion volume in voxel units.

    Returns:
        The threshold (a score value).

    Raises:
        ValueError: when all candidates together cannot hold the target.
    """
    # numpy, single-threaded: a threaded weighted histogram sums in an order that depends on the thread count.
    score_np = score.numpy().astype(np.float64)
    capacity_np = capacity.numpy().astype(np.float64)
    available = float(capacity_np.sum())
    if available < target:
        raise ValueError(
            f"lesion of {target:.1f} voxels does not fit: only {available:.1f} voxels of suitable tissue around its "
            "centre; reduce the nominal volume or move the lesion site (labels.py *_SITES_MM)"
        )
    low, high = float(score_np.min()), float(score_np.max())
    if high <= low:
        return low
    histogram, edges = np.histogram(score_np, bins=HISTOGRAM_BINS, range=(low, high), weights=capacity_np)
    from_top = np.cumsum(histogram[::-1])
    k = min(int(np.searchsorted(from_top, target)), HISTOGRAM_BINS - 1)
    bin_index = HISTOGRAM_BINS - 1 - k
    above = float(from_top[k - 1]) if k > 0 else 0.0
    inside = float(histogram[bin_index])
    fraction = (target - above) / inside if inside > 0 else 1.0
    upper = float(edges[bin_index + 1])
    return upper - fraction * (upper - float(edges[bin_index]))


def paint(score: torch.Tensor, capacity: torch.Tensor, target: float, softness: float) -> torch.Tensor:
    """Fraction map (0..1) whose capacity-weighted sum is about ``target`` (voxels).

    Args:
        score: ``[N]`` lesion score.
        capacity: ``[N]`` available tissue fraction.
        target: lesion volume in voxels.
        softness: width of the partial-volume ramp in score units.

    Returns:
        ``[N]`` float32 fraction of the available tissue that becomes lesion.
    """
    if target <= 0:
        return torch.zeros_like(score)
    threshold = volume_threshold(score, capacity, target)
    return ((score - threshold) / softness + 0.5).clamp_(0.0, 1.0)


def take(fractions: torch.Tensor, lesion: str, amount: torch.Tensor, sources: dict[str, float]) -> None:
    """Move ``amount * weight`` of each source class into class ``lesion`` (in place on ``[len(CLASSES), N]``)."""
    target = fractions[class_index(lesion)]
    for name, weight in sources.items():
        row = fractions[class_index(name)]
        moved = row * amount if weight == 1.0 else row * amount * weight
        row.sub_(moved)
        target.add_(moved)


def ellipsoid_distance(points_mm: torch.Tensor, lesion: Lesion) -> torch.Tensor:
    """Ellipsoid distance ``|diag(1/axes) R^T (x - c)|`` (mm) of points ``[N, 3]``, returns ``[N]``."""
    offset = (points_mm - torch.tensor(lesion.centre_mm, dtype=torch.float32)).T
    local = linear_map(np.array(lesion.rotation).T, None, offset.contiguous())
    local /= torch.tensor(lesion.axes, dtype=torch.float32)[:, None]
    return norm3(local)


def radius_mm(volume_ml: float) -> float:
    """Radius (mm) of a ball of ``volume_ml``."""
    return (3.0 * volume_ml * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)


class LesionPainter:
    """Paints the lesions of one session into the tissue fractions at the atlas points.

    Args:
        atlas: the grid's atlas (points, affine).
        fractions: ``[len(CLASSES), K]`` float32 class fractions, modified in place (lesion rows start at zero).
    """

    def __init__(self, atlas: Atlas, fractions: torch.Tensor):
        if fractions.shape != (len(CLASSES), atlas.n_points):
            raise ValueError(f"fractions must be [{len(CLASSES)}, {atlas.n_points}]; got {list(fractions.shape)}")
        self.atlas = atlas
        self.fractions = fractions

    def wmh(self, periventricular: torch.Tensor, noise: torch.Tensor, volume_ml: float) -> None:
        """Periventricular-weighted patchy WMH of ``volume_ml`` in WM: score ``log(pv + 0.02) + 1.2 * noise``.

        Args:
            periventricular: ``[K]`` warped periventricular weight.
            noise: ``[K]`` the subject's WMH noise (``wmh_noise``), the same for every session.
            volume_ml: target volume.
        """
        if volume_ml <= 0:
            return
        score = torch.log(periventricular + 0.02).add_(noise, alpha=1.2)
        amount = paint(score, self.fractions[class_index("wm")], volume_ml / self.atlas.voxel_ml, softness=0.4)
        take(self.fractions, "wmh", amount, {"wm": 1.0})

    def _local_points(self, centre_mm: tuple[float, float, float], reach_mm: float) -> torch.Tensor:
        """Ids of the points within a cube of half-side ``reach_mm`` around ``centre_mm``."""
        atlas = self.atlas
        centre = world_to_voxel(atlas.affine, np.array(centre_mm)) - np.array(atlas.box_start)
        half = reach_mm / atlas.spacing_mm
        low = np.maximum(np.floor(centre - half), 0).astype(int)
        high = np.minimum(np.ceil(centre + half) + 1, atlas.box_shape).astype(int)
        if np.any(high <= low):
            raise ValueError(f"lesion centre {centre_mm} mm lies outside the synthesis box of this grid")
        region = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
        ids = atlas.point_of_voxel[region].reshape(-1)
        return ids[ids >= 0]

    def _core(
        self,
        lesion: Lesion,
        volume_ml: float,
        core_sources: tuple[str, ...],
        roughness: float,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The core of a focal lesion (score: rough ellipsoid), not yet applied to the fractions.

        Returns:
            ``(ids [n], local fractions [len(CLASSES), n], amount [n], noise [2, n], distance [n])``: the points near
            the lesion, their fractions, the share of the ``core_sources`` tissue that becomes core, the two
            lesion noise channels and the normalised ellipsoid distance.
        """
        radius = radius_mm(volume_ml)
        # Bounds from the largest session volume, so every session samples the same noise lattice.
        largest = radius_mm(max(lesion.volume_ml)) * (1.0 + max(lesion.halo_ratio, 0.0)) ** (1.0 / 3.0)
        reach = 1.7 * largest * max(lesion.axes) + 6.0
        ids = self._local_points(lesion.centre_mm, reach)
        points = self.atlas.point_world[ids]
        centre = np.array(lesion.centre_mm)
        noise = noise_at_points(points, centre - reach, centre + reach, 0.35 * largest, generator, channels=2)
        distance = ellipsoid_distance(points, lesion) / radius
        local = self.fractions[:, ids]
        capacity = sum(local[class_index(name)] for name in core_sources)
        voxels = volume_ml / self.atlas.voxel_ml
        amount = paint(roughness * noise[0] - distance, capacity, voxels, softness=0.12)  # type: ignore[arg-type]
        return ids, local, amount, noise, distance

    def _focal(
        self,
        lesion: Lesion,
        volume_ml: float,
        core: str,
        core_sources: tuple[str, ...],
        halo: str,
        roughness: float,
        generator: torch.Generator,
    ) -> None:
        """Paint a core of ``volume_ml`` (score: rough ellipsoid) and its halo of ``halo_ratio`` x the core volume.

        The halo score favours WM (``+ HALO_WM_PREFERENCE * wm``), so oedema and gliosis spread along white matter
        in finger-like extensions instead of forming a uniform ring."""
        if volume_ml <= 0:
            return
        ids, local, amount, noise, distance = self._core(lesion, volume_ml, core_sources, roughness, generator)
        voxels = volume_ml / self.atlas.voxel_ml
        take(local, core, amount, dict.fromkeys(core_sources, 1.0))
        halo_voxels = lesion.halo_ratio * voxels
        if halo_voxels > 0:
            weights = {"wm": 1.0, "gm": 0.3}
            capacity = local[class_index("wm")] + 0.3 * local[class_index("gm")]
            score = 2.5 * roughness * noise[1] - distance + HALO_WM_PREFERENCE * local[class_index("wm")]
            amount = paint(score, capacity, halo_voxels, softness=0.15)
            take(local, halo, amount, weights)
        self.fractions[:, ids] = local

    def tumour(self, lesion: Lesion, volume_ml: float, generator: torch.Generator) -> None:
        """Tumour core of ``volume_ml`` in any intracranial tissue, oedema (``halo_ratio`` x core) through WM."""
        self._focal(lesion, volume_ml, "tumour", TISSUES, "oedema", 0.3, generator)

    def haemorrhage(self, lesion: Lesion, volume_ml: float, generator: torch.Generator) -> None:
        """Intraparenchymal haematoma in GM/WM with a thin oedema rim."""
        self._focal(lesion, volume_ml, "haemorrhage", ("gm", "wm"), "oedema", 0.12, generator)

    def infarct(self, lesion: Lesion, volume_ml: float, generator: torch.Generator) -> None:
        """Chronic infarct: cystic core in GM/WM with a gliotic rim."""
        self._focal(lesion, volume_ml, "infarct", ("gm", "wm"), "gliosis", 0.35, generator)

    def acute_core(self, lesion: Lesion, volume_ml: float, generator: torch.Generator) -> torch.Tensor:
        """Hyperacute ischaemic core of ``volume_ml`` in GM/WM (infarct-like shape), leaving the fractions unchanged.

        Call it after every class lesion is painted, so that the core only takes tissue that is still GM/WM.

        Returns:
            ``[K]`` float32: the fraction of each point's GM + WM that is acute core (0..1); its capacity-weighted sum
            is ``volume_ml`` in voxels.
        """
        acute = torch.zeros(self.atlas.n_points, dtype=torch.float32)
        if volume_ml <= 0:
            return acute
        ids, _, amount, _, _ = self._core(lesion, volume_ml, ("gm", "wm"), 0.35, generator)
        acute[ids] = amount
        return acute

    def volume_ml(self, name: str) -> float:
        """Painted volume of one class in ml."""
        return float(self.fractions[class_index(name)].numpy().sum(dtype=np.float64)) * self.atlas.voxel_ml


def wmh_noise(atlas: Atlas, generator: torch.Generator) -> torch.Tensor:
    """The subject's WMH pattern noise ``[K]`` (correlation 3 mm)."""
    return atlas.box_noise(WMH_NOISE_CORRELATION_MM, generator)[0]
