"""MNI152 reference templates for registration and QC, built offline from nilearn's packaged ICBM152 2009a maps.

* T1w -> the MNI152 T1 template (nilearn's skull-stripped 2009a T1), cropped exactly to the FSL 182x218x182 1 mm grid.
* T2w and FLAIR -> a **T2-like template**. The reference registers both to ``mni_icbm152_t2_tal_nlin_asym_09c``
  (docs/method.md §1.1), but nilearn ships no T2 map and nothing may download. We synthesise one from the tissue maps
  with T2 ordering CSF > GM > WM: ``T2 = 1.0 * CSF + 0.55 * GM + 0.35 * WM`` inside the intracranial volume
  (CSF = ICV - GM - WM as in docs/data_notes.md §1), zero outside (skull-stripped like the scans). FLAIR shares it as in
  the reference; its QC thresholds are separate because FLAIR's dark CSF correlates less with a T2 template.
* DWI (fine-tuning only, never registered by the reference) -> the T2-like template as well (b=1000 trace images
  are T2-weighted in their contrast ordering), documented so that DWI QC numbers are read with care.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np

T2_LIKE_WEIGHTS = {"csf": 1.0, "gm": 0.55, "wm": 0.35}
TEMPLATE_OF_MODALITY = {"T1w": "T1", "T2w": "T2-like", "FLAIR": "T2-like", "DWI": "T2-like"}


def t2_like_volume(gm: np.ndarray, wm: np.ndarray, csf: np.ndarray) -> np.ndarray:
    """The T2-like contrast from tissue fractions (see module docstring). All inputs ``[D, H, W]`` in [0, 1]."""
    weights = T2_LIKE_WEIGHTS
    return (weights["csf"] * csf + weights["gm"] * gm + weights["wm"] * wm).astype(np.float32)


def load_template(modality: str) -> nib.Nifti1Image:
    """The QC/registration template of ``modality`` on the FSL MNI152 1 mm grid (182x218x182, RAS, values in [0, 1]).

    Args:
        modality: ``T1w``, ``T2w``, ``FLAIR`` or ``DWI``.

    Returns:
        A float32 NIfTI image (affine: RAS, origin (-90, -126, -72)).
    """
    # The MNI maps and the ICV recipe live with SynthBrain's atlas (one implementation of docs/data_notes.md §1).
    from neurojepa_pl.synth.atlas import intracranial_mask, load_mni_templates
    from neurojepa_pl.synth.grids import mni_affine

    if modality not in TEMPLATE_OF_MODALITY:
        raise ValueError(f"no template for modality {modality!r}; expected one of {sorted(TEMPLATE_OF_MODALITY)}.")
    t1, gm, wm = load_mni_templates()
    if TEMPLATE_OF_MODALITY[modality] == "T1":
        data = t1
    else:
        icv = intracranial_mask(t1, gm, wm).astype(np.float32)
        csf = np.clip(icv - gm - wm, 0.0, 1.0)
        data = t2_like_volume(gm * icv, wm * icv, csf)
    image = nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.float32), mni_affine())
    image.header.set_xyzt_units("mm")
    return image
