"""Fixtures for the preprocessing tests: SynthBrain scans (the shared ``synth_cohort``) and broken copies of one."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import scipy.ndimage as ndi
from scipy.spatial.transform import Rotation


def rigid(volume: np.ndarray, degrees: tuple[float, float, float], shift_vox: tuple[float, float, float]) -> np.ndarray:
    """Rotate about the volume centre and shift (voxels), trilinear, zeros outside."""
    matrix = Rotation.from_euler("xyz", degrees, degrees=True).as_matrix()
    centre = (np.array(volume.shape) - 1) / 2.0
    offset = centre - matrix @ centre - matrix @ np.asarray(shift_vox)
    return ndi.affine_transform(volume, matrix, offset=offset, order=1, mode="constant", cval=0.0)


def _write(path: Path, data: np.ndarray, affine: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(path))
    return str(path)


@pytest.fixture(scope="session")
def qc_cohort(tmp_path_factory, synth_cohort) -> dict[str, object]:
    """Good scans: the first session of 4 SynthBrain subjects (T1w, T2w, FLAIR). Broken: 4 copies of a 5th T1w.

    Returns the paths of ``good.csv`` (good only), ``all.csv`` (good + broken) and ``broken`` (name -> path).
    """
    from neurojepa_pl.data import load_manifest

    root = tmp_path_factory.mktemp("qc_cohort")
    synth = load_manifest(synth_cohort)
    first_sessions = synth.groupby("subject_id", sort=True)["session_id"].transform("min") == synth["session_id"]
    baseline = synth[first_sessions]
    subjects = sorted(baseline["subject_id"].unique())
    good = baseline[baseline["subject_id"].isin(subjects[:4])][["subject_id", "session_id", "modality", "path"]]
    source = baseline[(baseline["subject_id"] == subjects[4]) & (baseline["modality"] == "T1w")]["path"].iloc[0]
    image = nib.load(source)
    base = np.asarray(image.dataobj, dtype=np.float32)
    rng = np.random.default_rng(0)
    spacing = float(abs(image.affine[0, 0]))
    broken = {
        # 20 degrees about x and 10 mm off: a failed registration.
        "misregistered": rigid(base, (20.0, 0.0, 0.0), (0.0, 10.0 / spacing, 0.0)),
        # Noise with 40 % of the brain's maximum everywhere (background included).
        "noisy": base + rng.normal(0, 0.4 * base.max(), base.shape).astype(np.float32),
        # Data stored LPS (x and y reversed) while the header says RAS.
        "wrong_orientation": np.ascontiguousarray(base[::-1, ::-1, :]),
        "truncated": base,
    }
    broken_paths = {name: _write(root / f"sub-{name}_T1w.nii.gz", data, image.affine) for name, data in broken.items()}
    truncated = Path(broken_paths["truncated"])
    payload = truncated.read_bytes()
    truncated.write_bytes(payload[: len(payload) // 2])  # an interrupted copy
    broken_rows = pd.DataFrame(
        [
            {"subject_id": f"sub-{n}", "session_id": "ses-01", "modality": "T1w", "path": p}
            for n, p in broken_paths.items()
        ]  # fmt: skip
    )
    good.to_csv(root / "good.csv", index=False)
    pd.concat([good, broken_rows], ignore_index=True).to_csv(root / "all.csv", index=False)
    return {"root": root, "good": root / "good.csv", "all": root / "all.csv", "broken": broken_paths}
