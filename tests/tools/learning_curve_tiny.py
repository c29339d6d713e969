"""A tiny labelled two-contrast NIfTI cohort and fabricated pretraining checkpoints for the learning-curve tests.

The checkpoints have the layout ``neurojepa fit`` writes (``state_dict`` of a ``JEPAPretrainModule``, its
``hyper_parameters``, the data module's, ``global_step``) without running a fit: each later step's weights are the
init's plus noise, which is all a learning-curve tool can tell apart anyway.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from neurojepa_pl.modules.pretrain import JEPAPretrainModule

SHAPE = (28, 28, 28)
IMG = [24, 24, 24]
PATCH = 8
GRID = {"spatial_size": IMG, "resize_to": [26, 26, 26], "pad_crop_size": None, "target_spacing": None}


def write_cohort(root: Path, n_subjects: int = 16, seed: int = 0) -> Path:
    """Two sessions per subject, T1w and FLAIR; labels ``blob`` (a bright cube, per subject), ``contrast``
    (continuous: the cube's brightness, 0 without a cube, per session) and ``noise`` (random, per subject).

    Returns:
        The manifest path.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_subjects):
        subject = f"sub-{s:02d}"
        blob, noise = s % 2, int(rng.integers(0, 2))
        for session in ("ses-1", "ses-2"):
            contrast = float(rng.uniform(0.8, 2.0)) * blob
            for modality, scale in (("T1w", 1.0), ("FLAIR", 0.7)):
                volume = np.zeros(SHAPE, dtype=np.float32)
                volume[3:25, 3:25, 3:25] = scale * (1.0 + 0.05 * rng.standard_normal((22, 22, 22)))
                volume[6:13, 6:13, 6:13] += contrast
                path = root / f"{subject}_{session}_{modality}.nii.gz"
                nib.save(nib.Nifti1Image(volume, np.eye(4)), str(path))
                rows.append(
                    {
                        "subject_id": subject,
                        "session_id": session,
                        "modality": modality,
                        "path": path.name,
                        "blob": blob,
                        "contrast": round(contrast, 4),
                        "noise": noise,
                    }
                )
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def tiny_pretrain_module(seed: int = 0) -> JEPAPretrainModule:
    """The tiny dense JEPA module on the 24^3 grid (3x3x3 tokens), initialised from ``seed`` (global RNG kept)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return JEPAPretrainModule(
            encoder="vit_tiny",
            predictor="predictor_tiny",
            img_size=IMG,
            patch_size=PATCH,
            warmup_steps=1,
            total_steps=10,
            mask_figure_every_n_steps=0,
        )


def write_checkpoints(folder: Path, steps=(0, 2, 4), seed: int = 0) -> list[Path]:
    """``step=<n>.ckpt`` for each step plus ``last.ckpt`` repeating the last step; returns the step files."""
    folder.mkdir(parents=True, exist_ok=True)
    module = tiny_pretrain_module(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    paths = []
    for step in steps:
        if step:
            with torch.no_grad():
                for p in module.target_encoder.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=generator))
        content = {
            "state_dict": {k: v.clone() for k, v in module.state_dict().items()},
            "hyper_parameters": dict(module.hparams),
            "datamodule_hyper_parameters": {**GRID, "patch_size": PATCH},
            "global_step": step,
        }
        path = folder / f"step={step}.ckpt"
        torch.save(content, path)
        paths.append(path)
    torch.save(content, folder / "last.ckpt")
    return paths
