"""Tiny labelled NIfTI cohorts for callback tests (written with nibabel in milliseconds)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

SHAPE = (20, 20, 20)


def write_blob_cohort(root: Path, n_per_split: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Cubes of 'brain' with a bright blob in scans whose label ``blob`` is 1; ``noise_label`` is random.

    Returns the manifest path (columns subject_id, session_id, modality, path, split, blob, noise_label).
    """
    n_per_split = n_per_split or {"train": 16, "val": 8, "test": 8}
    rng = np.random.default_rng(seed)
    rows = []
    for split, n in n_per_split.items():
        for i in range(n):
            subject = f"sub-{split}{i:02d}"
            blob = i % 2
            volume = np.zeros(SHAPE, dtype=np.float32)
            volume[3:17, 3:17, 3:17] = 1.0 + 0.05 * rng.standard_normal((14, 14, 14))
            if blob:
                volume[5:10, 5:10, 5:10] += 1.5
            path = root / f"{subject}.nii.gz"
            nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
            rows.append(
                {
                    "subject_id": subject,
                    "session_id": "ses-01",
                    "modality": "T1w",
                    "path": str(path),
                    "split": split,
                    "blob": blob,
                    "noise_label": int(rng.integers(0, 2)),
                }
            )
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


TINY_SETTINGS = dict(spatial_size=[16, 16, 16], resize_to=[18, 18, 18], pad_crop_size=None, target_spacing=None)
