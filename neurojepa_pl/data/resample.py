"""The loading chain's spline resampling (docs/method.md §1.2) as three matrix products, on any torch device.

MONAI's ``Spacingd`` with a spline order (the chain uses order 5) resamples with ``scipy.ndimage.map_coordinates``
on the CPU: 8-10 s for one SynthBrain scan resampled to 1 mm (150x174x153 voxels) on one core, nearly all of the
loading chain's time; and no torch device can run it (MONAI hands CUDA tensors to CuPy, which the project does not
depend on).

For an axis-aligned resampling (the output grid's axes are the input's, scaled and shifted: what ``Spacing`` does with
its default ``diagonal=False``, the chain's setting, for any scan, rotated or not, since it only changes the voxel size
along the scan's own axes) a tensor-product B-spline interpolation is separable: the prefilter runs along each axis in
turn and the output voxel ``(i, j, k)`` only depends on its three axis coordinates. So the whole step is ``out = Mx ·
(My · (Mz · vol))`` with one ``[n_out, n_in]`` matrix per axis. Each matrix is built by running SciPy's own 1D
``map_coordinates`` (same order, same boundary mode as MONAI's call) on the unit vectors, so it is SciPy's operator, not
a re-derivation; the products run in float64 on the device (a few hundred MFLOP per scan). Agreement with MONAI's
``Spacingd`` on the CPU: below 1e-5 on [0, 1]-scaled volumes in the tests (tests/data/test_resample.py), 6e-8 on a
SynthBrain scan resampled to 1 mm.

The output grid (size, affine) and the "nothing to do" test are MONAI's: :class:`SeparableSpacingd` first runs
``Spacingd`` lazily, which computes them without resampling. An oblique resampling (a rotation or shear between the
grids, e.g. ``diagonal=True`` on a rotated scan) is not separable; it is run by MONAI's ``Spacingd`` on the CPU and
counted in :attr:`SeparableSpacingd.oblique_scans` with a warning naming the scan, never silently.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from copy import deepcopy
from functools import lru_cache

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform, Spacingd
from monai.transforms.utils import resolves_modes
from monai.utils import LazyAttr, TransformBackends
from scipy import ndimage

log = logging.getLogger(__name__)

AXIS_ALIGNED_TOL = 1e-6
"""Largest off-diagonal entry of the voxel-to-voxel map that still counts as axis-aligned (MONAI's AFFINE_TOL)."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` / ``None`` -> CUDA when available, else CPU; anything else as given (checked to exist).

    Raises:
        ValueError: CUDA was asked for but is not available.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here; use --device cpu (or auto).")
    return resolved


@lru_cache(maxsize=256)
def axis_operator(n_in: int, scale: float, offset: float, n_out: int, order: int, mode: str) -> np.ndarray:
    """The 1D spline-interpolation operator of one axis: ``out[j] = sum_i M[j, i] * in[i]`` at ``x_j = scale*j+offset``.

    Args:
        n_in: input samples along the axis.
        scale: input voxels per output voxel.
        offset: input coordinate of output voxel 0.
        n_out: output samples.
        order: spline order (0-5).
        mode: SciPy boundary mode (what MONAI passes for the padding mode, e.g. ``"nearest"`` for ``"border"``).

    Returns:
        ``[n_out, n_in]`` float64; column ``i`` is SciPy's interpolation of the unit vector ``e_i``.
    """
    coords = (scale * np.arange(n_out, dtype=np.float64) + offset)[None]
    eye = np.eye(n_in, dtype=np.float64)
    return np.stack([ndimage.map_coordinates(eye[i], coords, order=order, mode=mode) for i in range(n_in)], axis=1)


def separable_resample(
    volume: torch.Tensor,
    operators: Sequence[np.ndarray | torch.Tensor],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Apply one operator per spatial axis: ``[C, X, Y, Z] -> [C, X', Y', Z']`` (float64 products, input's dtype out).

    Args:
        volume: ``[C, X, Y, Z]`` tensor (any device; moved to ``device`` when given).
        operators: ``[X', X]``, ``[Y', Y]``, ``[Z', Z]`` matrices (:func:`axis_operator`).
        device: where the products run (default: the volume's device).

    Returns:
        ``[C, X', Y', Z']`` on ``device``, in ``volume``'s dtype.
    """
    device = volume.device if device is None else torch.device(device)
    mx, my, mz = (torch.as_tensor(m, dtype=torch.float64, device=device) for m in operators)
    x = volume.to(device=device, dtype=torch.float64)
    # Contract the largest reduction first is not worth choosing: each product is a plain GEMM of a few 100 MFLOP.
    x = torch.einsum("zk,cijk->cijz", mz, x)
    x = torch.einsum("yj,cijz->ciyz", my, x)
    x = torch.einsum("xi,ciyz->cxyz", mx, x)
    return x.to(volume.dtype)


class SeparableSpacingd(MapTransform):
    """A MONAI ``Spacingd`` with a spline order, computed as three matrix products on ``device`` (same output grid).

    Args:
        spacing: the ``Spacingd`` to reproduce (e.g. the loading chain's); its keys, pixdim, mode, padding mode and
            grid options are used as they are.
        device: where the products run (``"cuda"``, ``"cpu"``, ``"auto"``); the output stays there.

    Output: ``MetaTensor`` ``[C, *MONAI's output shape]`` with MONAI's output affine, on ``device``.
    """

    def __init__(self, spacing: Spacingd, device: str | torch.device | None = "auto"):
        super().__init__(spacing.keys, allow_missing_keys=spacing.allow_missing_keys)
        modes = {(m, p) for m, p in zip(spacing.mode, spacing.padding_mode)}
        if len(modes) != 1:
            raise ValueError(f"SeparableSpacingd needs one mode and padding mode for all keys; found {sorted(modes)}.")
        mode, padding_mode = modes.pop()
        backend, order, scipy_mode, _ = resolves_modes(mode, padding_mode, backend=None)
        if backend != TransformBackends.NUMPY:
            raise ValueError(f"SeparableSpacingd resamples with spline orders (int 0-5); found mode={mode!r}.")
        self.order, self.scipy_mode = int(order), str(scipy_mode)
        self.device = resolve_device(device)
        self._exact = spacing
        # MONAI computes the output grid; with lazy=True it does not resample.
        self._plan = deepcopy(spacing)
        self._plan.lazy = True
        self.oblique_scans = 0

    @classmethod
    def from_pixdim(
        cls, keys, pixdim: Sequence[float], mode: int = 5, padding_mode: str = "border", device="auto"
    ) -> SeparableSpacingd:
        """``SeparableSpacingd(Spacingd(keys, pixdim, mode, padding_mode), device)``."""
        return cls(Spacingd(keys=keys, pixdim=pixdim, mode=mode, padding_mode=padding_mode), device)

    def _operators(self, xform: np.ndarray, in_shape: Sequence[int], out_shape: Sequence[int]) -> list[np.ndarray]:
        return [
            axis_operator(
                int(in_shape[a]), float(xform[a, a]), float(xform[a, 3]), int(out_shape[a]), self.order, self.scipy_mode
            )  # fmt: skip
            for a in range(3)
        ]

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        planned = self._plan({k: _as_meta(d[k]) for k in keys})
        operation = planned[keys[0]].pending_operations[-1]
        xform = np.asarray(operation[LazyAttr.AFFINE], dtype=np.float64)
        out_shape = [int(s) for s in operation[LazyAttr.SHAPE]]
        in_shape = list(d[keys[0]].shape[1:])
        if np.allclose(xform, np.eye(4), atol=AXIS_ALIGNED_TOL) and out_shape == in_shape:
            return d  # MONAI's "no significant change": the image is returned as is
        linear = xform[:3, :3]
        if np.abs(linear - np.diag(np.diag(linear))).max() > AXIS_ALIGNED_TOL:
            self.oblique_scans += 1
            log.warning(
                "resampling of %s is oblique (rotation/shear between the grids), not separable: MONAI's Spacingd "
                "runs it on the CPU",
                getattr(d[keys[0]], "meta", {}).get("filename_or_obj", "a scan"),
            )
            cpu = {k: _as_meta(d[k]).to("cpu") for k in keys}
            return {**d, **{k: v.to(self.device) for k, v in self._exact(cpu).items() if k in keys}}
        operators = self._operators(xform, in_shape, out_shape)
        for key in keys:
            image = _as_meta(d[key])
            values = separable_resample(image.as_tensor(), operators, self.device).to(torch.float32)
            out = MetaTensor(values, meta=dict(image.meta))
            out.affine = torch.as_tensor(image.affine, dtype=torch.float64) @ torch.as_tensor(xform)
            d[key] = out
        return d


def _as_meta(image: torch.Tensor) -> MetaTensor:
    return image if isinstance(image, MetaTensor) else MetaTensor(torch.as_tensor(image))


RESAMPLERS = ("separable", "scipy")
"""``separable``: :class:`SeparableSpacingd` on a device; ``scipy``: MONAI's ``Spacingd`` as the chain writes it."""


def device_loading_transforms(settings, device: str | torch.device | None = "auto", resampler: str = "separable"):
    """The deterministic loading chain of :func:`neurojepa_pl.data.transforms.loading_transforms`, on a device.

    The same steps in the same order; reading and decoding the file, the NaN check and the reorientation stay on
    the CPU, then the volume moves to ``device`` and the percentile scaling, pad/crop, the spacing step (as
    :class:`SeparableSpacingd`), the foreground crop and the resize run there. The output is moved back to the CPU.

    Args:
        settings: :class:`neurojepa_pl.data.transforms.TransformSettings`.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        resampler: ``"separable"`` (this module) or ``"scipy"`` (the chain unchanged, on the CPU: the reference).

    Returns:
        A MONAI ``Compose`` mapping ``{"image": path}`` to ``{"image": Tensor[1, *resize_to] float32}`` on the CPU.
    """
    from monai.transforms import Compose, EnsureTyped, Orientationd, ToDeviced

    from neurojepa_pl.data.transforms import IMAGE_KEY, loading_transforms

    if resampler not in RESAMPLERS:
        raise ValueError(f"resampler must be one of {RESAMPLERS}; found {resampler!r}.")
    chain = loading_transforms(settings)
    if resampler == "scipy":
        return chain
    target = resolve_device(device)
    steps = []
    for step in chain.transforms:
        if isinstance(step, Spacingd):
            steps.append(SeparableSpacingd(step, device=target))
            continue
        steps.append(step)
        if isinstance(step, Orientationd) and target.type != "cpu":
            steps.append(ToDeviced(keys=IMAGE_KEY, device=target))
    steps.append(EnsureTyped(keys=IMAGE_KEY, data_type="tensor", dtype=torch.float32, device="cpu", track_meta=False))
    return Compose(steps)
