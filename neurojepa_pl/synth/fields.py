"""Smooth random fields and blurs shared by anatomy, pathology and contrast synthesis.

Heavy smooth fields are drawn on a coarse lattice and upsampled trilinearly, because a field whose correlation length
is several voxels carries no information at full resolution; this keeps a 1 mm subject to a few elementwise passes.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F


def torch_generator(*entropy: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``numpy.random.SeedSequence(entropy)``.

    Seeding through ``SeedSequence`` gives independent, reproducible streams for tuples such as
    ``(seed, subject, session, purpose)`` without any global RNG state.
    """
    state = np.random.SeedSequence(list(entropy)).generate_state(2, dtype=np.uint64)
    generator = torch.Generator()
    generator.manual_seed(int(state[0] & np.uint64(2**63 - 1)))
    return generator


def gaussian_blur(volume: torch.Tensor, sigma_vox: tuple[float, float, float]) -> torch.Tensor:
    """Separable Gaussian blur of each channel, edges extended by reflection.

    scipy's recursive-free separable filter is about 8x faster on CPU than a grouped ``conv3d`` at these sizes, so
    the blur goes through ``scipy.ndimage.gaussian_filter`` on a float32 view.

    Args:
        volume: ``[C, D, H, W]`` or ``[D, H, W]`` float32 tensor.
        sigma_vox: standard deviation along each spatial axis in voxels; 0 leaves that axis untouched.

    Returns:
        A new tensor of the same shape and dtype.
    """
    array = volume.detach().contiguous().numpy()
    sigma = tuple(float(s) for s in sigma_vox)
    if array.ndim == 4:
        out = np.empty_like(array)
        for channel in range(array.shape[0]):
            ndi.gaussian_filter(array[channel], sigma=sigma, output=out[channel], mode="reflect", truncate=3.0)
    else:
        out = ndi.gaussian_filter(array, sigma=sigma, mode="reflect", truncate=3.0)
    return torch.from_numpy(out)


def linear_map(matrix: np.ndarray, translation: np.ndarray | None, points: torch.Tensor) -> torch.Tensor:
    """``matrix @ points + translation`` for points ``[3, ...]`` (torch), written out elementwise.

    See ``grids.apply_linear``: a fixed-order sum keeps results independent of BLAS threading.
    """
    out = (
        torch.zeros_like(points)
        if translation is None
        else (
            torch.tensor(translation, dtype=points.dtype)
            .reshape(3, *([1] * (points.dim() - 1)))
            .expand_as(points)
            .clone()
        )
    )
    for i in range(3):
        for j in range(3):
            out[i].add_(points[j], alpha=float(matrix[i, j]))
    return out


def norm3(vectors: torch.Tensor) -> torch.Tensor:
    """Euclidean norm over the first axis of ``[3, ...]``, in a fixed order (see ``linear_map``)."""
    return torch.sqrt(vectors[0] * vectors[0] + vectors[1] * vectors[1] + vectors[2] * vectors[2])


def standardise(noise: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit standard deviation per channel of ``[C, ...]``, in place.

    The statistics are computed by numpy in float64: torch's multi-threaded reductions round differently for
    different thread counts, and the generated images must not depend on the machine's number of cores.
    """
    array = noise.numpy().reshape(noise.shape[0], -1)
    mean = array.mean(axis=1, dtype=np.float64)
    std = np.maximum(array.std(axis=1, dtype=np.float64), 1e-8)
    for channel in range(noise.shape[0]):
        noise[channel].sub_(float(mean[channel])).div_(float(std[channel]))
    return noise


def coarse_lattice_shape(shape: tuple[int, int, int], step_vox: float) -> tuple[int, int, int]:
    """Points per axis of a lattice spaced about ``step_vox`` voxels over ``shape`` (both ends included)."""
    return tuple(max(2, int(math.ceil((s - 1) / max(step_vox, 1.0))) + 1) for s in shape)  # type: ignore[return-value]


def upsample(field: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Trilinear upsampling of a lattice field whose end points coincide with the first and last voxels.

    Args:
        field: ``[C, d, h, w]`` float32.
        shape: target ``(D, H, W)``.

    Returns:
        ``[C, D, H, W]`` float32.
    """
    if tuple(field.shape[1:]) == tuple(shape):
        return field
    return F.interpolate(field[None], size=tuple(shape), mode="trilinear", align_corners=True)[0]


def lattice_noise(
    shape: tuple[int, int, int],
    correlation_vox: float | tuple[float, float, float] | np.ndarray,
    generator: torch.Generator,
    channels: int = 1,
) -> torch.Tensor:
    """Zero-mean, unit-variance Gaussian random field on a coarse lattice spanning a volume of ``shape``.

    White noise is drawn on a lattice spaced at half the correlation length (at least one voxel) whose first and last
    samples sit on the first and last voxels, blurred there with a Gaussian of about two lattice steps and normalised
    per channel to unit standard deviation. Upsample it (``upsample``) or sample it at points (``sample_lattice``)
    with ``align_corners=True``.

    Args:
        shape: the volume ``(D, H, W)`` the lattice spans.
        correlation_vox: Gaussian smoothing scale in voxels of that volume (scalar or per axis).
        generator: torch generator for the white noise.
        channels: number of independent fields.

    Returns:
        ``[channels, d, h, w]`` float32 lattice (``(d, h, w) == shape`` when the correlation is under two voxels).
    """
    scales = np.broadcast_to(np.asarray(correlation_vox, dtype=float), (3,))
    steps = np.maximum(scales / 2.0, 1.0)
    coarse = tuple(max(2, int(math.ceil((s - 1) / st)) + 1) for s, st in zip(shape, steps))
    coarse = tuple(min(c, s) for c, s in zip(coarse, shape))
    noise = torch.randn((channels, *coarse), generator=generator, dtype=torch.float32)
    real_steps = [(s - 1) / max(c - 1, 1) for s, c in zip(shape, coarse)]
    sigma = tuple(float(max(sc / st, 0.5)) for sc, st in zip(scales, real_steps))
    return standardise(gaussian_blur(noise, sigma))


def smooth_noise(
    shape: tuple[int, int, int],
    correlation_vox: float | tuple[float, float, float] | np.ndarray,
    generator: torch.Generator,
    channels: int = 1,
) -> torch.Tensor:
    """``lattice_noise`` upsampled to the dense volume: ``[channels, D, H, W]`` float32."""
    return upsample(lattice_noise(shape, correlation_vox, generator, channels), shape)


def sample_lattice(field: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of a lattice field at normalised coordinates.

    Args:
        field: ``[C, d, h, w]`` float32 lattice.
        grid: ``[1, 1, 1, K, 3]`` float32 coordinates in ``[-1, 1]``, (w, h, d) order, ``align_corners=True``
            convention (the lattice's first/last samples sit at -1/+1); outside samples are zero.

    Returns:
        ``[C, K]`` float32.
    """
    sampled = F.grid_sample(field[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return sampled.reshape(field.shape[0], -1)


def noise_at_points(
    points_mm: torch.Tensor,
    lower_mm: np.ndarray,
    upper_mm: np.ndarray,
    correlation_mm: float,
    generator: torch.Generator,
    channels: int = 1,
    min_step_mm: float = 0.0,
) -> torch.Tensor:
    """Unit-variance smooth Gaussian noise defined on a world-mm lattice and sampled at arbitrary points.

    The lattice spans ``[lower_mm, upper_mm]`` with a step of ``max(correlation / 2, min_step_mm)``; because it is
    anchored in world coordinates, the same generator state gives the same field for every session of a subject as
    long as the bounds are the same.

    Args:
        points_mm: ``[K, 3]`` world points (inside the bounds).
        lower_mm, upper_mm: ``[3]`` lattice bounds (mm).
        correlation_mm: Gaussian smoothing scale (mm).
        generator: torch generator for the white noise.
        channels: independent fields.
        min_step_mm: lower bound on the lattice step (e.g. the voxel size, below which detail is invisible).

    Returns:
        ``[channels, K]`` float32.
    """
    lower = np.asarray(lower_mm, dtype=np.float64)
    upper = np.asarray(upper_mm, dtype=np.float64)
    step = max(correlation_mm / 2.0, min_step_mm, 1e-3)
    shape = tuple(int(n) for n in np.maximum(np.ceil((upper - lower) / step).astype(int) + 1, 2))
    noise = torch.randn((channels, *shape), generator=generator, dtype=torch.float32)
    sigma = max(correlation_mm / step, 0.5)
    noise = standardise(gaussian_blur(noise, (sigma, sigma, sigma)))
    extent = torch.tensor((np.array(shape) - 1) * step, dtype=torch.float32)
    normalised = 2.0 * (points_mm - torch.tensor(lower, dtype=torch.float32)) / extent - 1.0
    return sample_lattice(noise, normalised.flip(-1).reshape(1, 1, 1, -1, 3))
