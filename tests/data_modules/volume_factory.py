"""Helpers for the data-module tests: tiny brain-like NIfTI volumes and manifests written with nibabel.

Volumes are 48x54x48 float32 ellipsoid "brains" (noisy tissue inside, exact zeros outside) saved with the FSL-style
LAS affine, so the loading chain's RAS reorientation is exercised. The tiny chain settings resize to 34x40x34 and crop
to 32x36x32, which with 4^3 patches gives the paper's 8x9x8 token grid.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

TINY_SHAPE = (48, 54, 48)
TINY_RESIZE = (34, 40, 34)
TINY_CROP = (32, 36, 32)
TINY_PATCH = 4


def las_affine(shape: Sequence[int]) -> np.ndarray:
    """FSL-style LAS affine (x flipped), 1 mm voxels, origin at the volume centre."""
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [shape[0] / 2, -shape[1] / 2, -shape[2] / 2]
    return affine


def blob_volume(shape: Sequence[int] = TINY_SHAPE, seed: int = 0, radius: float = 0.75) -> np.ndarray:
    """An ellipsoid of noisy positive intensities (a white-matter-like core brighter than the rim), zeros outside."""
    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1.0, 1.0, s) for s in shape]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"))
    centre = rng.uniform(-0.05, 0.05, size=3)[:, None, None, None]
    r = np.sqrt((((grid - centre) / radius) ** 2).sum(0))
    inside = r < 1.0
    tissue = np.where(r < 0.5, 300.0, 180.0) + 20.0 * rng.standard_normal(shape)
    return np.where(inside, np.clip(tissue, 1.0, None), 0.0).astype(np.float32)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, las_affine(data.shape[:3]) if affine is None else affine), str(path))
    return path


def truncate_file(path: Path) -> Path:
    """Cut a .nii.gz in half (a partial copy / interrupted download)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_manifest(path: Path, rows: list[dict[str, object]]) -> Path:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})
    return path


def make_cohort(
    root: Path,
    n_subjects: int = 10,
    modalities: Sequence[str] = ("T1w",),
    sessions: int = 1,
    with_split: bool = True,
    labels: Callable[[int], dict[str, object]] | None = None,
) -> Path:
    """Write a tiny cohort (relative paths) and its manifest; returns the manifest path.

    Subjects 0..n-1 get splits in order (when ``with_split``): the first 60 % train, the next 20 % val, the rest test
    (10 subjects: 0-5, 6-7, 8-9; 5 subjects: 0-2, 3, 4) and, by default, a binary label ``tumour`` = subject % 2,
    ``age`` = 40 + subject and ``sex`` alternating M/F.
    """
    rows = []
    for s in range(n_subjects):
        for ses in range(sessions):
            for m, modality in enumerate(modalities):
                rel = Path(f"sub-{s:03d}/ses-{ses}/anat/sub-{s:03d}_ses-{ses}_{modality}.nii.gz")
                write_nifti(root / rel, blob_volume(seed=1000 * s + 10 * ses + m))
                row: dict[str, object] = {
                    "subject_id": f"{s:03d}",
                    "session_id": f"ses-{ses}",
                    "modality": modality,
                    "path": str(rel),
                }
                if with_split:
                    row["split"] = "train" if s < 0.6 * n_subjects else ("val" if s < 0.8 * n_subjects else "test")
                row.update(labels(s) if labels is not None else {"tumour": s % 2, "age": 40 + s, "sex": "MF"[s % 2]})
                rows.append(row)
    return write_manifest(root / "manifest.csv", rows)
