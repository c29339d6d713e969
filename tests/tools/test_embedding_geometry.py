"""`neurojepa embedding-geometry` end to end on the tiny SynthBrain cohort: two backbones (an export and a random init
of its architecture), age groups from the manifest, silhouette scores recomputed with scikit-learn."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import silhouette_score

from neurojepa_pl.analysis.embedding import AgeGroup, assign_age_groups
from neurojepa_pl.data.schema import load_manifest
from neurojepa_pl.data.transforms import TransformSettings
from neurojepa_pl.errors import UserValueError
from neurojepa_pl.features import extract_features
from neurojepa_pl.models import build_encoder, export_backbone, load_backbone
from neurojepa_pl.models.vit3d import VisionTransformer3D
from neurojepa_pl.tools.embedding_geometry import main, parse_backbone

GEOMETRY = ["--spatial-size", "48", "54", "48", "--resize-to", "50", "60", "50", "--pad-crop-size", "none"]
GEOMETRY += ["--target-spacing", "none"]
SETTINGS = TransformSettings(pad_crop_size=None, target_spacing=None, resize_to=(50, 60, 50), spatial_size=(48, 54, 48))
GROUPS = [AgeGroup("young", 0, 45), AgeGroup("old", 55, float("inf"))]


def test_backbone_arguments():
    assert parse_backbone("jepa=runs/demo/export") == ("jepa", "runs/demo/export")
    assert parse_backbone("random") == ("random", "random")
    assert parse_backbone("init=random:vit_tiny") == ("init", "random:vit_tiny")
    with pytest.raises(argparse.ArgumentTypeError, match="NAME=SRC"):
        parse_backbone("runs/demo/export")


def test_geometry_scores_are_scikit_learns_on_the_pooled_features(synth_cohort, tmp_path, capsys):
    torch.manual_seed(5)
    export = export_backbone(build_encoder("vit_tiny_moe"), tmp_path / "export", "vit_tiny_moe")
    manifest = synth_cohort.parent / "geometry_subset.csv"
    pd.read_csv(synth_cohort).query("modality != 'T2w'").head(20).to_csv(manifest, index=False)  # 10 T1w, 10 FLAIR
    out = tmp_path / "geometry"
    code = main([
        "--backbone", f"trained={export}", "--backbone", "init=random", "--manifest", str(manifest),
        "--out", str(out), "--modalities", "T1w", "--age-groups", "young:0:45", "old:55:inf", "--seed", "2",
        "--batch-size", "6", *GEOMETRY,
    ])  # fmt: skip
    assert code == 0 and "silhouette" in capsys.readouterr().out
    report = json.loads((out / "embedding_geometry.json").read_text())
    rows = load_manifest(manifest).query("modality == 'T1w'")
    rows = rows.assign(group=assign_age_groups(rows["age"].to_numpy(float), GROUPS)).dropna(subset=["group"])
    result = report["modalities"]["T1w"]
    assert set(report["modalities"]) == {"T1w"} and set(rows["group"]) == {"young", "old"}
    assert result["n"] == len(rows) and result["groups"] == rows["group"].value_counts().to_dict()
    assert set(result["backbones"]) == {"trained", "init"}

    # Feature-space silhouette: the mean-pooled tokens of the same chain, scored by scikit-learn.
    labels = rows["group"].to_numpy(str)
    encoder = load_backbone(export)
    features = extract_features(encoder, rows["path"].tolist(), SETTINGS)
    trained = result["backbones"]["trained"]
    assert trained["silhouette_features"] == pytest.approx(silhouette_score(features, labels), abs=1e-5)
    torch.manual_seed(2)
    random_init = VisionTransformer3D(**encoder.config)
    init_features = extract_features(random_init, rows["path"].tolist(), SETTINGS)
    assert result["backbones"]["init"]["silhouette_features"] == pytest.approx(
        silhouette_score(init_features, labels), abs=1e-5
    )
    assert not np.allclose(features, init_features)

    # t-SNE silhouette: scikit-learn on the written coordinates.
    points = pd.read_csv(out / "points.csv", dtype={"subject_id": str, "session_id": str})
    assert len(points) == 2 * len(rows) and set(points["backbone"]) == {"trained", "init"}
    mine = points[points["backbone"] == "trained"]
    assert mine["path"].tolist() == rows["path"].tolist()
    assert trained["silhouette_tsne"] == pytest.approx(
        silhouette_score(mine[["tsne_x", "tsne_y"]].to_numpy(), mine["age_group"].to_numpy(str)), abs=1e-6
    )
    assert (out / "embedding_geometry.png").stat().st_size > 10_000


def test_geometry_refuses_random_without_an_architecture_and_empty_groups(synth_cohort, tmp_path):
    base = ["--manifest", str(synth_cohort), "--out", str(tmp_path / "x"), *GEOMETRY]
    with pytest.raises(UserValueError, match="copies the architecture"):
        main(["--backbone", "random", *base])
    with pytest.raises(UserValueError, match="no scan"):
        main(["--backbone", "random:vit_tiny", "--age-groups", "babies:0:1", *base])


def test_per_group_sampling_is_seeded_and_capped(synth_cohort):
    from neurojepa_pl.tools.embedding_geometry import _groups, _rows, build_parser

    args = build_parser().parse_args(
        ["--backbone", "random:vit_tiny", "--manifest", str(synth_cohort), "--out", "unused", "--per-group", "2",
         "--age-groups", "young:0:45", "old:55:inf"]
    )  # fmt: skip
    rows = _rows(args, _groups(args))
    cells = rows.groupby(["modality", "age_group"]).size()
    assert cells.max() == 2 and len(cells) == 6  # 3 modalities x 2 groups, each capped at 2 scans
    assert rows["path"].tolist() == _rows(args, _groups(args))["path"].tolist()  # the same seed, the same scans
