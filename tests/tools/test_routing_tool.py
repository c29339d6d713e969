"""`neurojepa routing` end to end on the tiny SynthBrain cohort with a tiny MoE encoder (exported, random init)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from neurojepa_pl.analysis.routing import NIFTI_XFORM_MNI_152, token_grid_affine
from neurojepa_pl.data.schema import load_manifest
from neurojepa_pl.data.transforms import TransformSettings
from neurojepa_pl.errors import UserValueError
from neurojepa_pl.features import load_eval_volume
from neurojepa_pl.masks.foreground import foreground_token_map
from neurojepa_pl.models import build_encoder, export_backbone
from neurojepa_pl.tools.routing import main

GEOMETRY = ["--spatial-size", "48", "54", "48", "--resize-to", "50", "60", "50", "--pad-crop-size", "none"]
GEOMETRY += ["--target-spacing", "none"]
SETTINGS = TransformSettings(pad_crop_size=None, target_spacing=None, resize_to=(50, 60, 50), spatial_size=(48, 54, 48))


@pytest.fixture(scope="module")
def moe_export(tmp_path_factory):
    torch.manual_seed(3)
    return export_backbone(build_encoder("vit_tiny_moe"), tmp_path_factory.mktemp("moe") / "export", "vit_tiny_moe")


def _subset(synth_cohort, name: str, rows: pd.DataFrame):
    manifest = synth_cohort.parent / name
    rows.to_csv(manifest, index=False)
    return manifest


def test_routing_numbers_maps_and_figures(synth_cohort, moe_export, tmp_path, capsys):
    # Four sessions' T2w, T1w and FLAIR; --modalities keeps T1w and FLAIR (8 scans).
    table = pd.read_csv(synth_cohort)
    first_sessions = table[
        (table["session_id"] == "ses-01") & table["subject_id"].isin(table["subject_id"].unique()[:4])
    ]
    manifest = _subset(synth_cohort, "routing_subset.csv", first_sessions)
    out = tmp_path / "routing"
    args = ["--checkpoint", str(moe_export), "--manifest", str(manifest), "--out", str(out)]
    assert main([*args, "--modalities", "T1w", "FLAIR", "--batch-size", "3", "--tensorboard", *GEOMETRY]) == 0
    assert "block 1" in capsys.readouterr().out
    report = json.loads((out / "routing.json").read_text())
    rows = load_manifest(manifest)
    rows = rows[rows["modality"].isin(["T1w", "FLAIR"])]
    assert len(rows) == 8
    n, k, tokens = len(rows), 2, 8 * 9 * 8
    assert report["num_scans"] == n and report["scans_by_modality"] == rows["modality"].value_counts().to_dict()
    assert report["inputs"]["loading"]["spatial_size"] == [48, 54, 48] and report["skipped_scans"] == []

    # The foreground split is the training foreground map of the same model inputs, recomputed here.
    loaded = [load_eval_volume(p, SETTINGS) for p in rows["path"]]
    volumes = torch.stack([v for v, _ in loaded])
    foreground = foreground_token_map(volumes, 6)
    assert report["foreground_tokens"] == int(foreground.sum())
    assert report["background_tokens"] == n * tokens - int(foreground.sum())
    (layer,) = report["layers"]
    assert layer["block"] == 1
    assert sum(layer["selections"]["all"]) == n * tokens * k  # every token picks k experts
    assert sum(layer["selections"]["foreground"]) == report["foreground_tokens"] * k
    counts = np.asarray(layer["token_counts"])
    assert counts.shape == (tokens, 4) and counts.sum() == n * tokens * k
    assert set(layer["foreground_share_by_modality"]) == {"T1w", "FLAIR"}
    arrays = np.load(out / "routing_arrays.npz")
    np.testing.assert_array_equal(arrays["token_counts"][0], counts)
    np.testing.assert_array_equal(arrays["foreground_scans"], foreground.sum(0).numpy())

    # Maps: token grid, the mean token-grid affine of the scans (MNI152 coordinates), sform code MNI.
    affine = token_grid_affine(np.mean([a for _, a in loaded], axis=0), (6, 6, 6))
    np.testing.assert_allclose(report["placement"]["token_affine"], affine, atol=1e-9)
    share = nib.load(out / "maps" / "block01_expert_share.nii.gz")
    dominant = nib.load(out / "maps" / "block01_dominant_expert.nii.gz")
    assert share.shape == (8, 9, 8, 4) and dominant.shape == (8, 9, 8)
    for image in (share, dominant, nib.load(out / "maps" / "foreground_fraction.nii.gz")):
        np.testing.assert_allclose(image.affine, affine, atol=1e-5)
        assert int(image.header["sform_code"]) == NIFTI_XFORM_MNI_152
    np.testing.assert_allclose(np.asarray(share.dataobj).reshape(tokens, 4), counts / (n * k), rtol=1e-6)
    assert set(np.unique(np.asarray(dominant.dataobj))) <= {1, 2, 3, 4}
    # Token centres land inside the MNI152 brain box (x -90..90, y -126..90, z -72..108 mm).
    centre = affine @ np.array([3.5, 4.0, 3.5, 1.0])
    assert -40 < centre[0] < 40 and -60 < centre[1] < 40 and -40 < centre[2] < 60
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert "routing/block01/dominant_expert_mni" in events.Tags()["images"]
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert figures == [f"block01_{kind}.png" for kind in (
        "dominant_expert_mni", "expert_share_mni", "foreground_background", "modalities", "token_expert")]  # fmt: skip


def test_routing_skips_unreadable_scans_within_the_limit(synth_cohort, moe_export, tmp_path):
    rows = pd.read_csv(synth_cohort).query("modality == 'T2w'").head(4)
    rows.loc[rows.index[0], "path"] = "missing.nii.gz"
    manifest = _subset(synth_cohort, "routing_missing.csv", rows)
    args = ["--checkpoint", str(moe_export), "--manifest", str(manifest), "--no-figures", *GEOMETRY]
    with pytest.raises(UserValueError, match="1 of 4 scans failed"):
        main([*args, "--out", str(tmp_path / "strict")])
    assert main([*args, "--out", str(tmp_path / "lenient"), "--max-failed-fraction", "0.5"]) == 0
    report = json.loads((tmp_path / "lenient" / "routing.json").read_text())
    assert report["num_scans"] == 3 and "does not exist" in report["skipped_scans"][0]["reason"]
    assert (tmp_path / "lenient" / "skipped_scans.csv").is_file()


def test_routing_refuses_dense_encoders_and_wrong_input_sizes(synth_cohort, moe_export, tmp_path):
    dense = export_backbone(build_encoder("vit_tiny"), tmp_path / "dense", "vit_tiny")
    base = ["--manifest", str(synth_cohort), "--out", str(tmp_path / "x")]
    with pytest.raises(UserValueError, match="dense encoder"):
        main(["--checkpoint", str(dense), *base, *GEOMETRY])
    with pytest.raises(UserValueError, match="takes \\[48, 54, 48\\] inputs") as err:
        main(["--checkpoint", str(moe_export), *base])
    assert "--spatial-size 48 54 48" in str(err.value)
