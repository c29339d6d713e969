"""SynthBrain atlas: nilearn's MNI ICBM152 2009a maps and the maps derived from them, on each output grid.

The only real 1 mm brain anatomy available offline ships inside nilearn (T1, GM and WM probability maps, 2009a
symmetric, 197x233x189). Everything else is derived here (docs/data_notes.md §1):

- intracranial volume (ICV): ``(T1 > 0) | (GM + WM > 0.3)``, closed, holes filled, dilated by 2 voxels (an
  extra-axial CSF rim); CSF = ``clip(ICV - GM - WM, 0, 1)``;
- the lateral ventricles: the two large off-midline components of ``0 < T1 < 0.35`` deeper than 15 mm;
- a periventricular weight ``exp(-d / 6 mm)`` (d = distance to the lateral ventricles) that places WMH;
- an atrophy susceptibility (CSF blurred by 1.5 mm): how exposed a GM voxel is to CSF, i.e. where thinning opens
  sulci;
- ``t1_detail``: the T1 template minus its least-squares prediction from the GM/WM/CSF fractions, in units of the
  WM-GM contrast. It carries deep-GM and cortical detail that the probability maps lack and is added to every
  contrast (scaled by that contrast's WM-GM difference), so T1w is partly the warped real template;
- a ventricle "push" field (normalised gradient of the blurred ventricle mask, on a 2 mm world lattice) that drives
  age-related ventricular expansion centred on the lateral ventricles, not the third ventricle.

Atlases are memoised per grid (``load_atlas``) because building the 1 mm atlas takes about 2 s and every subject of a
cohort reuses it; the cache holds only results of pure functions of the packaged template files.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi
import torch

from .grids import (
    MNI2009A_TO_FSL_CROP,
    MODEL_SHAPE,
    REFERENCE_PAD_SHAPE,
    RESIZED_SHAPE,
    GridSpec,
    mni_affine,
    normalize_grid,
    voxel_to_world,
)

# The intracranial fraction is gm + wm + csf (csf is defined as the remainder), so it needs no channel of its own.
CHANNELS: tuple[str, ...] = ("gm", "wm", "csf", "t1_detail", "atrophy", "periventricular")
# Subjects are synthesised only at "points": voxels within POINT_MARGIN_MM + 2.5 voxels of the atlas ICV. anatomy.py
# caps the backward displacement outside the ICV below POINT_MARGIN_MM, so no warped brain reaches a voxel that is not
# a point (checked on every session: the outermost points must stay empty).
POINT_MARGIN_MM = 8.0
VENTRICLE_T1_MAX = 0.35
VENTRICLE_MIN_DEPTH_MM = 15.0
PERIVENTRICULAR_SCALE_MM = 6.0
ATROPHY_BLUR_MM = 1.5
VENTRICLE_PUSH_SIGMA_MM = 6.0
# Smallest Jacobian determinant allowed for the expansion map at its largest amplitude (no folding).
VENTRICLE_PUSH_MIN_JACOBIAN = 0.1


@dataclass(frozen=True)
class VentriclePush:
    """Normalised gradient of the blurred lateral-ventricle mask on a coarse world lattice.

    Attributes:
        field: ``[3, d, h, w]`` float32, world-axis components (x, y, z), max norm 1.
        affine: ``[4, 4]`` voxel->world of the lattice.
        max_safe_mm: the largest amplitude ``a`` (mm) for which ``x -> x + a * field(x)`` keeps a Jacobian
            determinant of at least ``VENTRICLE_PUSH_MIN_JACOBIAN`` everywhere (no folding).
    """

    field: torch.Tensor
    affine: np.ndarray
    max_safe_mm: float


@dataclass(frozen=True)
class Atlas:
    """Atlas maps on one output grid, plus the synthesis points (voxels near the ICV).

    Synthesis touches only the points (about 40 % of the 1 mm grid), so per-voxel work is done on ``[C, K]`` tensors;
    ``maps`` keeps the dense box for ``grid_sample`` and blurs.

    Attributes:
        shape: full grid ``(D, H, W)``.
        affine: ``[4, 4]`` voxel->world (RAS mm) of the full grid.
        box_start: voxel index of the box corner (the points' bounding box) in the full grid.
        maps: ``[C, d, h, w]`` float32 maps inside the box, channels named by ``CHANNELS``.
        point_box_index: ``[K]`` int64 flat (C-order) indices of the points in the box.
        point_full_index: ``[K]`` int64 flat indices of the points in the full grid.
        point_world: ``[K, 3]`` float32 world coordinates (mm).
        point_of_voxel: ``[d, h, w]`` int64 point id of each box voxel, -1 where the voxel is not a point.
        point_shell: ``[S]`` int64 ids of the outermost points, which a warped brain must never reach.
        ventricle_centres_mm: ``[2, 3]`` centroids of the left and right lateral ventricles (world mm).
        brain_centre_mm: ``[3]`` ICV centroid (world mm).
        ventricle_push: the expansion field (world lattice, shared by all grids).
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    box_start: tuple[int, int, int]
    maps: torch.Tensor
    point_box_index: torch.Tensor
    point_full_index: torch.Tensor
    point_world: torch.Tensor
    point_of_voxel: torch.Tensor
    point_shell: torch.Tensor
    ventricle_centres_mm: np.ndarray
    brain_centre_mm: np.ndarray
    ventricle_push: VentriclePush

    @property
    def box_shape(self) -> tuple[int, int, int]:
        return tuple(self.maps.shape[1:])  # type: ignore[return-value]

    @property
    def box_slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(s, s + n) for s, n in zip(self.box_start, self.box_shape))  # type: ignore[return-value]

    @property
    def n_points(self) -> int:
        return int(self.point_box_index.numel())

    @property
    def spacing_mm(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def voxel_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    def channel(self, name: str) -> torch.Tensor:
        """One map ``[d, h, w]`` inside the box."""
        return self.maps[CHANNELS.index(name)]

    def full(self, name: str) -> np.ndarray:
        """One map on the full grid ``[D, H, W]`` (zeros outside the box), as float32 numpy; ``"icv"`` is the sum
        of the tissue fractions."""
        out = np.zeros(self.shape, dtype=np.float32)
        if name == "icv":
            out[self.box_slices] = (self.channel("gm") + self.channel("wm") + self.channel("csf")).numpy()
        else:
            out[self.box_slices] = self.channel(name).numpy()
        return out

    def to_full(self, values: torch.Tensor) -> np.ndarray:
        """Scatter point values ``[K]`` into a full-grid float32 array ``[D, H, W]`` (zeros elsewhere)."""
        out = np.zeros(int(np.prod(self.shape)), dtype=np.float32)
        out[self.point_full_index.numpy()] = values.numpy()
        return out.reshape(self.shape)

    def to_box(self, values: torch.Tensor) -> torch.Tensor:
        """Scatter point values ``[K]`` into the dense box ``[d, h, w]`` (zeros elsewhere)."""
        out = torch.zeros(int(np.prod(self.box_shape)), dtype=values.dtype)
        out[self.point_box_index] = values
        return out.reshape(self.box_shape)

    def from_box(self, volume: torch.Tensor) -> torch.Tensor:
        """Gather a dense box volume ``[d, h, w]`` at the points, ``[K]``."""
        return volume.reshape(-1)[self.point_box_index]

    def sample_box_lattice(self, lattice: torch.Tensor) -> torch.Tensor:
        """Values at the points ``[C, K]`` of a field on a lattice ``[C, m1, m2, m3]`` whose corner samples sit on the
        box corner voxels (trilinear).

        Upsampling to the dense box and gathering is about 4x faster on CPU than ``grid_sample`` at the points.
        """
        if tuple(lattice.shape[1:]) != self.box_shape:
            lattice = torch.nn.functional.interpolate(
                lattice[None], size=self.box_shape, mode="trilinear", align_corners=True
            )[0]
        return lattice.reshape(lattice.shape[0], -1)[:, self.point_box_index]

    def box_noise(self, correlation_mm: float, generator: torch.Generator, channels: int = 1) -> torch.Tensor:
        """Unit-variance smooth Gaussian noise at the points, ``[channels, K]`` (see ``fields.lattice_noise``)."""
        from .fields import lattice_noise

        lattice = lattice_noise(self.box_shape, correlation_mm / self.spacing_mm, generator, channels)
        return self.sample_box_lattice(lattice)


def load_mni_templates() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """nilearn's packaged ICBM152 2009a T1, GM and WM (1 mm), cropped to the FSL 182x218x182 grid.

    ``load_mni152_*_template(resolution=1)`` read files inside the nilearn wheel; they never touch the network.

    Returns:
        ``(t1, gm, wm)``, each ``[182, 218, 182]`` float32 in [0, 1], RAS, affine ``grids.mni_affine()``.
    """
    from nilearn import datasets

    images = (
        datasets.load_mni152_template(resolution=1),
        datasets.load_mni152_gm_template(resolution=1),
        datasets.load_mni152_wm_template(resolution=1),
    )
    out = []
    for image in images:
        expected = np.eye(4)
        expected[:3, 3] = (-98.0, -134.0, -72.0)
        if image.shape != (197, 233, 189) or not np.allclose(image.affine, expected):
            raise RuntimeError(
                "nilearn's MNI152 template changed: expected shape (197, 233, 189) with origin (-98, -134, -72), "
                f"found {image.shape} with affine {image.affine.tolist()}; update grids.MNI2009A_TO_FSL_CROP."
            )
        out.append(np.ascontiguousarray(image.get_fdata(dtype=np.float32)[MNI2009A_TO_FSL_CROP]))
    return out[0], out[1], out[2]


def _block_mean2(volume: np.ndarray) -> np.ndarray:
    """2x2x2 block mean of an even-shaped volume (the FSL grid 182x218x182 halves exactly)."""
    d, h, w = volume.shape
    return volume.reshape(d // 2, 2, h // 2, 2, w // 2, 2).mean(axis=(1, 3, 5), dtype=np.float32)


def _upsample2(volume: np.ndarray) -> np.ndarray:
    """Trilinear upsampling of a 2 mm block-mean volume back to the 1 mm grid (block centres at half voxels)."""
    tensor = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    size = tuple(2 * s for s in volume.shape)
    return torch.nn.functional.interpolate(tensor, size=size, mode="trilinear", align_corners=False)[0, 0].numpy()


def intracranial_mask(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """ICV: brain or tissue, closed, holes filled, dilated by 2 voxels for the extra-axial CSF rim. ``[D,H,W]`` bool."""
    structure = ndi.generate_binary_structure(3, 1)
    raw = (t1 > 0) | (gm + wm > 0.3)
    closed = ndi.binary_closing(raw, structure=structure, iterations=2)
    filled = ndi.binary_fill_holes(closed)
    return ndi.binary_dilation(filled, structure=structure, iterations=2)


def lateral_ventricles(t1: np.ndarray, icv: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Mask of the two lateral ventricles on the 1 mm grid.

    Candidates are dark (``0 < T1 < 0.35``) voxels deeper than 15 mm inside the ICV (depth from a 2 mm distance
    transform); the lateral ventricles are the largest component whose centroid lies left of the midline and the
    largest right of it (the midline blend of the third ventricle is excluded on purpose).

    Raises:
        RuntimeError: when no such pair exists (the template is not the expected one).
    """
    depth2 = ndi.distance_transform_edt(_block_mean2(icv.astype(np.float32)) > 0.5) * 2.0
    depth = np.repeat(np.repeat(np.repeat(depth2, 2, 0), 2, 1), 2, 2)
    candidates = (t1 > 0) & (t1 < VENTRICLE_T1_MAX) & (depth > VENTRICLE_MIN_DEPTH_MM)
    labels, count = ndi.label(candidates)
    # bincount over the 7 M labels is ~10x faster than ndi.sum_labels / center_of_mass at this size.
    flat = labels.ravel()
    sizes = np.bincount(flat, minlength=count + 1)[1:]
    x_index = np.broadcast_to(np.arange(labels.shape[0], dtype=np.float64)[:, None, None], labels.shape).ravel()
    mean_x_vox = np.bincount(flat, weights=x_index, minlength=count + 1)[1:] / np.maximum(sizes, 1)
    x_mm = mean_x_vox * affine[0, 0] + affine[0, 3]
    index = np.arange(1, count + 1)
    chosen = []
    for side in (x_mm < -5.0, x_mm > 5.0):
        if not side.any():
            raise RuntimeError("no lateral-ventricle candidate found on one side of the MNI template's midline")
        chosen.append(index[side][np.argmax(sizes[side])])
    return np.isin(labels, chosen)


def _ventricle_centres(ventricles: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Centroids ``[2, 3]`` (world mm) of the left (x < 0) and right lateral ventricle."""
    points = voxel_to_world(affine, np.argwhere(ventricles).astype(np.float64))
    return np.stack([points[points[:, 0] < 0].mean(axis=0), points[points[:, 0] > 0].mean(axis=0)])


def _min_determinant(jacobian: np.ndarray, amplitude: float) -> float:
    """Smallest ``det(I + amplitude * J)`` over the lattice, ``J`` given as ``[3, 3, ...]``."""
    m = np.eye(3).reshape(3, 3, *([1] * (jacobian.ndim - 2))) + amplitude * jacobian
    det = (
        m[0, 0] * (m[1, 1] * m[2, 2] - m[1, 2] * m[2, 1])
        - m[0, 1] * (m[1, 0] * m[2, 2] - m[1, 2] * m[2, 0])
        + m[0, 2] * (m[1, 0] * m[2, 1] - m[1, 1] * m[2, 0])
    )
    return float(det.min())


def _ventricle_push(ventricles: np.ndarray) -> VentriclePush:
    """Build the expansion field on the 2 mm lattice from the 1 mm ventricle mask."""
    ventricles2 = _block_mean2(ventricles.astype(np.float32))
    potential = ndi.gaussian_filter(ventricles2, VENTRICLE_PUSH_SIGMA_MM / 2.0)
    gradient = np.stack(np.gradient(potential, 2.0))  # per mm, world axes == voxel axes (RAS, no rotation)
    scale = float(np.linalg.norm(gradient, axis=0).max())
    gradient /= scale
    jacobian = np.stack([np.stack(np.gradient(gradient[a], 2.0)) for a in range(3)])  # [a, b] = d g_a / d x_b
    low, high = 0.0, 20.0
    for _ in range(12):  # bisection on the amplitude where min det(I + a J) reaches the floor
        amplitude = 0.5 * (low + high)
        if _min_determinant(jacobian, amplitude) >= VENTRICLE_PUSH_MIN_JACOBIAN:
            low = amplitude
        else:
            high = amplitude
    lattice = mni_affine().copy()
    lattice[:3, :3] *= 2.0
    lattice[:3, 3] += 0.5  # centre of the first 2x2x2 block
    return VentriclePush(
        field=torch.from_numpy(gradient.astype(np.float32)),
        affine=lattice,
        max_safe_mm=low,
    )


def _fit_t1_detail(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, csf: np.ndarray, icv: np.ndarray) -> np.ndarray:
    """Template T1 minus its least-squares prediction from tissue fractions, in units of (WM - GM) T1 contrast."""
    inside = icv & ((gm + wm + csf) > 0.5)
    design = np.stack([gm[inside], wm[inside], csf[inside]], axis=1)[::4]
    coefficients, *_ = np.linalg.lstsq(design, t1[inside][::4], rcond=None)
    a_gm, a_wm, _ = coefficients
    if not a_wm > a_gm:
        raise RuntimeError(f"T1 template fit gave WM {a_wm:.3f} <= GM {a_gm:.3f}; the template is not a T1")
    prediction = coefficients[0] * gm + coefficients[1] * wm + coefficients[2] * csf
    return ((t1 - prediction) / (a_wm - a_gm) * icv).astype(np.float32)


def _points(icv: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxels within ``POINT_MARGIN_MM`` + 2.5 voxels of ``icv > 0`` (bool ``[D, H, W]``).

    The extra voxels cover the support of trilinear sampling (1 voxel) and the outermost points lying up to a voxel
    inside the nominal distance, so a source displaced by less than ``POINT_MARGIN_MM`` from any outermost point
    samples exactly zero tissue."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    reach = POINT_MARGIN_MM + 2.5 * float(spacing.max())
    inside = icv > 0
    margin = np.ceil(reach / spacing).astype(int) + 1
    nonzero = np.nonzero(inside)
    start = np.maximum([int(n.min()) for n in nonzero] - margin, 0)
    stop = np.minimum([int(n.max()) + 1 for n in nonzero] + margin, icv.shape)
    region = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
    # The distance transform runs only on the bounding box grown by the margin (about 75 % of the 1 mm grid).
    distance = ndi.distance_transform_edt(~inside[region], sampling=spacing)
    points = np.zeros(icv.shape, dtype=bool)
    points[region] = distance <= reach
    return points


def _make_atlas(full_maps: np.ndarray, affine: np.ndarray, centres: np.ndarray, push: VentriclePush) -> Atlas:
    tissue = full_maps[CHANNELS.index("gm")] + full_maps[CHANNELS.index("wm")] + full_maps[CHANNELS.index("csf")]
    points = _points(tissue, affine)
    nonzero = np.nonzero(points)
    start = tuple(int(n.min()) for n in nonzero)
    stop = tuple(int(n.max()) + 1 for n in nonzero)
    box = tuple(slice(a, b) for a, b in zip(start, stop))
    box_points = points[box]
    box_shape = box_points.shape
    box_voxels = np.argwhere(box_points)  # C-order, so ids follow the flat box index
    box_index = np.ravel_multi_index(box_voxels.T, box_shape)
    full_index = np.ravel_multi_index((box_voxels + np.array(start)).T, points.shape)
    point_of_voxel = np.full(box_shape, -1, dtype=np.int64)
    point_of_voxel[box_points] = np.arange(len(box_voxels))
    # Outermost points: a face neighbour inside the grid is not a point. Beyond the grid there is nothing to reach
    # (the model grid cuts the brain laterally), so the grid border counts as points.
    padded = np.pad(points, 1, constant_values=True)
    eroded = ndi.binary_erosion(padded, structure=ndi.generate_binary_structure(3, 1), border_value=1)
    shell = point_of_voxel[box_points & ~eroded[1:-1, 1:-1, 1:-1][box]]
    inside = np.argwhere(tissue > 0.5)
    return Atlas(
        shape=tuple(int(s) for s in points.shape),  # type: ignore[arg-type]
        affine=affine,
        box_start=start,  # type: ignore[arg-type]
        maps=torch.from_numpy(np.ascontiguousarray(full_maps[(slice(None), *box)], dtype=np.float32)),
        point_box_index=torch.from_numpy(box_index.astype(np.int64)),
        point_full_index=torch.from_numpy(full_index.astype(np.int64)),
        point_world=torch.from_numpy(
            voxel_to_world(affine, (box_voxels + np.array(start)).astype(np.float64)).astype(np.float32)
        ),
        point_of_voxel=torch.from_numpy(point_of_voxel),
        point_shell=torch.from_numpy(np.sort(shell)),
        ventricle_centres_mm=centres,
        brain_centre_mm=voxel_to_world(affine, inside.mean(axis=0)),
        ventricle_push=push,
    )


def build_mni_maps() -> tuple[np.ndarray, np.ndarray, VentriclePush]:
    """Atlas maps on the FSL MNI152 1 mm grid (182x218x182, RAS, origin (-90, -126, -72)).

    Returns:
        ``(maps [C, 182, 218, 182] float32 in CHANNELS order, ventricle centres [2, 3] mm, ventricle push field)``.
    """
    affine = mni_affine()
    t1, gm, wm = load_mni_templates()
    icv_mask = intracranial_mask(t1, gm, wm)
    icv = icv_mask.astype(np.float32)
    gm *= icv
    wm *= icv
    csf = np.clip(icv - gm - wm, 0.0, 1.0)
    ventricles = lateral_ventricles(t1, icv_mask, affine)
    centres = _ventricle_centres(ventricles, affine)
    distance2 = ndi.distance_transform_edt(_block_mean2(ventricles.astype(np.float32)) < 0.25) * 2.0
    periventricular = _upsample2(np.exp(-distance2 / PERIVENTRICULAR_SCALE_MM).astype(np.float32)) * icv
    atrophy = _upsample2(ndi.gaussian_filter(_block_mean2(csf), ATROPHY_BLUR_MM / 2.0)) * icv
    detail = _fit_t1_detail(t1, gm, wm, csf, icv_mask)
    maps = np.stack([gm, wm, csf, detail, atrophy, periventricular]).astype(np.float32)
    return maps, centres, _ventricle_push(ventricles)


def _model_maps(mni_maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Push the 1 mm maps through the reference chain once: pad/crop 180x216x180 -> CropForeground(>0, margin 4)
    -> Resize 100x120x100 (area) -> CenterSpatialCrop 96x108x96, with MONAI so the affine follows MONAI's own
    bookkeeping of every step. Returns ``(maps [C, 96, 108, 96], affine [4, 4])``."""
    from monai.data import MetaTensor
    from monai.transforms import CenterSpatialCrop, CropForeground, Resize, ResizeWithPadOrCrop

    image = MetaTensor(torch.from_numpy(mni_maps), affine=torch.as_tensor(mni_affine(), dtype=torch.float64))
    image = ResizeWithPadOrCrop(REFERENCE_PAD_SHAPE, mode="edge")(image)
    image = CropForeground(select_fn=lambda x: x > 0, margin=4, allow_smaller=True)(image)
    image = Resize(RESIZED_SHAPE, mode="area")(image)
    image = CenterSpatialCrop(MODEL_SHAPE)(image)
    return image.as_tensor().numpy(), image.affine.numpy().astype(np.float64)


def _resampled_maps(maps: np.ndarray, affine: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Resample model-grid maps to an explicit shape (area when shrinking every axis, else trilinear)."""
    from monai.data import MetaTensor
    from monai.transforms import Resize

    image = MetaTensor(torch.from_numpy(maps), affine=torch.as_tensor(affine, dtype=torch.float64))
    shrinking = all(s <= m for s, m in zip(shape, maps.shape[1:]))
    image = Resize(shape, mode="area" if shrinking else "trilinear")(image)
    return image.as_tensor().numpy().clip(min=0.0), image.affine.numpy().astype(np.float64)


@functools.lru_cache(maxsize=1)
def _mni_maps_cached() -> tuple[np.ndarray, np.ndarray, VentriclePush]:
    return build_mni_maps()


@functools.lru_cache(maxsize=1)
def _model_maps_cached() -> tuple[np.ndarray, np.ndarray]:
    return _model_maps(_mni_maps_cached()[0])


@functools.lru_cache(maxsize=4)
def _load_atlas_cached(grid: GridSpec) -> Atlas:
    _, centres, push = _mni_maps_cached()
    if grid == "mni":
        return _make_atlas(_mni_maps_cached()[0], mni_affine(), centres, push)
    maps, affine = _model_maps_cached()
    if grid != "model":
        maps, affine = _resampled_maps(maps, affine, grid)  # type: ignore[arg-type]
    return _make_atlas(maps, affine, centres, push)


def load_atlas(grid: GridSpec = "mni") -> Atlas:
    """The SynthBrain atlas on a grid, built once per process and memoised.

    Args:
        grid: ``"mni"``, ``"model"``, ``"DxHxW"`` or a ``(D, H, W)`` tuple (see ``grids.normalize_grid``).

    Returns:
        The ``Atlas`` (shared, treat as read-only).
    """
    return _load_atlas_cached(normalize_grid(grid))
