"""Separable spline resampling against MONAI's Spacingd (SciPy), and the loading chain on a device."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Spacingd

from neurojepa_pl.data.resample import (
    SeparableSpacingd,
    axis_operator,
    device_loading_transforms,
    resolve_device,
    separable_resample,
)
from neurojepa_pl.data.transforms import TransformSettings, loading_transforms


def _volume(shape=(30, 34, 28), seed=0) -> np.ndarray:
    """A smooth positive ellipsoid with noise inside, zeros outside, in [0, 1] (like the chain after scaling)."""
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = np.sqrt(sum(a**2 for a in axes) / 0.7)
    inside = r < 1
    return (
        np.where(inside, 0.6 + 0.3 * np.cos(4 * r) + 0.05 * rng.standard_normal(shape), 0.0)
        .clip(0, 1)
        .astype(np.float32)
    )


def _image(affine: np.ndarray, seed=0) -> MetaTensor:
    return MetaTensor(torch.from_numpy(_volume(seed=seed))[None], affine=torch.as_tensor(affine, dtype=torch.float64))


@pytest.mark.parametrize("pixdim", [(1.0, 1.0, 1.0), (2.0, 1.5, 2.5)])
def test_separable_spacing_matches_monai_spacingd(pixdim):
    affine = np.diag([3.2, 3.0, 3.4, 1.0])
    affine[:3, 3] = [-40.0, 12.5, -7.0]
    spacing = Spacingd(keys="image", pixdim=pixdim, mode=5, padding_mode="border")
    reference = spacing({"image": _image(affine)})["image"]
    separable = SeparableSpacingd(spacing, device="cpu")
    out = separable({"image": _image(affine)})["image"]
    assert out.shape == reference.shape and out.dtype == torch.float32
    assert float((out - reference).abs().max()) < 1e-5
    assert torch.allclose(out.affine, reference.affine)
    assert separable.oblique_scans == 0


def test_flipped_axes_and_other_spline_orders_match_too():
    affine = np.diag([-2.0, 2.5, 3.0, 1.0])  # LAS-like: a negative axis
    for order in (1, 3):
        spacing = Spacingd(keys="image", pixdim=(1.7, 1.7, 1.7), mode=order, padding_mode="border")
        reference = spacing({"image": _image(affine, seed=1)})["image"]
        out = SeparableSpacingd(spacing, device="cpu")({"image": _image(affine, seed=1)})["image"]
        assert float((out - reference).abs().max()) < 1e-5, order


def test_nothing_to_do_returns_the_image_unchanged():
    image = _image(np.diag([1.0, 1.0, 1.0, 1.0]))
    out = SeparableSpacingd.from_pixdim("image", (1.0, 1.0, 1.0), device="cpu")({"image": image})["image"]
    assert out is image


def _rotated_affine() -> np.ndarray:
    angle = np.deg2rad(10)
    affine = np.eye(4)
    affine[:2, :2] = 2.0 * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    affine[2, 2] = 2.0
    return affine


def test_a_rotated_scan_keeps_its_axes_and_is_separable():
    # Spacing changes the voxel size along the scan's own axes (diagonal=False, the chain's setting), so even a
    # rotated scan maps onto its output grid axis by axis.
    spacing = Spacingd(keys="image", pixdim=(1.5, 1.5, 1.5), mode=5, padding_mode="border")
    reference = spacing({"image": _image(_rotated_affine())})["image"]
    separable = SeparableSpacingd(spacing, device="cpu")
    out = separable({"image": _image(_rotated_affine())})["image"]
    assert separable.oblique_scans == 0 and float((out - reference).abs().max()) < 1e-5


def test_an_oblique_resampling_runs_monais_spacingd_and_says_so(caplog):
    # diagonal=True resamples onto world-aligned axes: a rotation between the grids, not separable.
    spacing = Spacingd(keys="image", pixdim=(1.5, 1.5, 1.5), mode=5, padding_mode="border", diagonal=True)
    reference = spacing({"image": _image(_rotated_affine())})["image"]
    separable = SeparableSpacingd(spacing, device="cpu")
    with caplog.at_level(logging.WARNING, logger="neurojepa_pl.data.resample"):
        out = separable({"image": _image(_rotated_affine())})["image"]
    assert separable.oblique_scans == 1 and any("oblique" in r.getMessage() for r in caplog.records)
    assert torch.equal(out.as_tensor(), reference.as_tensor())


def test_axis_operator_interpolates_constants_and_samples_exactly():
    operator = axis_operator(20, 0.5, 0.0, 39, 5, "nearest")
    assert operator.shape == (39, 20)
    np.testing.assert_allclose(operator.sum(axis=1), 1.0, atol=1e-12)  # a constant stays constant
    np.testing.assert_allclose(operator[::2], np.eye(20), atol=1e-12)  # the knots are reproduced exactly
    signal = np.sin(np.linspace(0, 3, 20))
    volume = torch.from_numpy(np.broadcast_to(signal[:, None, None], (20, 2, 3)).copy())[None]
    eye = [operator, np.eye(2), np.eye(3)]
    out = separable_resample(volume, eye)
    assert out.shape == (1, 39, 2, 3)
    np.testing.assert_allclose(out[0, :, 0, 0].numpy(), operator @ signal, atol=1e-12)


def test_torch_interpolation_modes_are_refused():
    with pytest.raises(ValueError, match="spline orders"):
        SeparableSpacingd(Spacingd(keys="image", pixdim=(1, 1, 1), mode="bilinear"))


def test_device_chain_equals_the_loading_chain_on_cpu(tmp_path):
    affine = np.diag([-3.2, 3.0, 3.4, 1.0])  # LAS, anisotropic: reorientation and a real resampling
    paths = []
    for seed in range(2):
        path = tmp_path / f"scan{seed}.nii.gz"
        nib.save(nib.Nifti1Image(_volume(seed=seed) * 500, affine), str(path))
        paths.append(str(path))
    settings = TransformSettings(pad_crop_size=None, target_spacing=(2.0, 2.0, 2.0), resize_to=(34, 40, 34),
                                 spatial_size=(32, 36, 32))  # fmt: skip
    reference_chain, device_chain = loading_transforms(settings), device_loading_transforms(settings, "cpu")
    assert any(isinstance(t, SeparableSpacingd) for t in device_chain.transforms)
    for path in paths:
        reference = reference_chain({"image": path})["image"]
        out = device_chain({"image": path})["image"]
        assert out.shape == reference.shape == (1, 34, 40, 34) and out.device.type == "cpu"
        assert float((out - reference).abs().max()) < 1e-5
    scipy_chain = device_loading_transforms(settings, "cpu", resampler="scipy").transforms
    assert any(isinstance(t, Spacingd) for t in scipy_chain)
    assert not any(isinstance(t, SeparableSpacingd) for t in scipy_chain)
    with pytest.raises(ValueError, match="resampler must be one of"):
        device_loading_transforms(settings, "cpu", resampler="linear")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


@pytest.mark.gpu
def test_separable_spacing_on_cuda_matches_cpu():
    affine = np.diag([3.2, 3.0, 3.4, 1.0])
    spacing = Spacingd(keys="image", pixdim=(1.0, 1.0, 1.0), mode=5, padding_mode="border")
    cpu = SeparableSpacingd(spacing, device="cpu")({"image": _image(affine)})["image"]
    cuda = SeparableSpacingd(spacing, device="cuda")({"image": _image(affine)})["image"]
    assert cuda.device.type == "cuda"
    assert float((cuda.cpu() - cpu).abs().max()) < 1e-6
