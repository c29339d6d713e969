"""Byte-deterministic NIfTI-1 ``.nii.gz`` writing.

Volumes are stored as int16 with no intensity scaling (``scl_slope`` unset): the renderer produces "scanner units"
(signal x site gain x 1000, rounded), which halves file size and gzip time against float32 and looks like real scanner
output; pipelines rescale by percentiles anyway. A gzip header normally holds the write time (older nibabel
versions put it there; 5.x writes 0), so here the NIfTI bytes are compressed explicitly with
``gzip.compress(..., mtime=0)`` (no file name, fixed time): the same seed gives the same bytes whatever the nibabel
version.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np

INT16_MAX = np.iinfo(np.int16).max
# zlib level 1: 3-4x faster than the default level 6 for about 10 % larger files on noisy images.
COMPRESS_LEVEL = 1


def to_int16(volume: np.ndarray) -> np.ndarray:
    """Round and clip a non-negative float volume to int16 (values above 32767 saturate)."""
    return np.clip(np.rint(volume), 0, INT16_MAX).astype(np.int16)


def nifti_bytes(volume: np.ndarray, affine: np.ndarray) -> bytes:
    """Uncompressed single-file NIfTI-1 bytes of an int16 volume in MNI space (qform/sform code 4, mm units).

    Args:
        volume: ``[D, H, W]`` int16.
        affine: ``[4, 4]`` voxel->world (RAS mm).
    """
    if volume.dtype != np.int16 or volume.ndim != 3:
        raise ValueError(f"expected a 3D int16 volume; got {volume.ndim}D {volume.dtype} (use nifti.to_int16 first)")
    image = nib.Nifti1Image(volume, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=4)
    image.set_sform(affine, code=4)
    image.header["descrip"] = b"SynthBrain"
    return image.to_bytes()


def write_nifti_gz(path: str | Path, volume: np.ndarray, affine: np.ndarray) -> Path:
    """Write ``volume`` (int16) as a byte-deterministic ``.nii.gz``; creates parent folders. Returns the path."""
    path = Path(path)
    if not path.name.endswith(".nii.gz"):
        raise ValueError(f"expected a .nii.gz path; got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(nifti_bytes(volume, affine), compresslevel=COMPRESS_LEVEL, mtime=0))
    return path
