"""EmbeddingWriter (.npz, one row per scan) and extract_features (frozen features from scan paths)."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "modules"))
from nifti_factory import TINY_SETTINGS, write_blob_cohort  # noqa: E402
from tiny_data import TinyFinetuneData  # noqa: E402

from neurojepa_pl.callbacks.embedding_writer import EmbeddingWriter, read_embeddings  # noqa: E402
from neurojepa_pl.data.transforms import TransformSettings  # noqa: E402
from neurojepa_pl.features import extract_features, load_eval_volumes  # noqa: E402
from neurojepa_pl.models import build_encoder  # noqa: E402
from neurojepa_pl.modules.downstream import ClassificationModule  # noqa: E402


def test_writer_saves_one_row_per_scan_with_metadata(tmp_path):
    model = ClassificationModule(
        task="binary", backbone="vit_tiny", head_heads=4, backbone_kwargs={"img_size": [16, 16, 16], "patch_size": 8}
    )
    writer = EmbeddingWriter(str(tmp_path / "out" / "embeddings.npz"))
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[writer]
    )
    data = TinyFinetuneData("binary", batch_size=5)
    trainer.predict(model, data, return_predictions=False)
    embedding, metadata, prediction = read_embeddings(tmp_path / "out" / "embeddings.npz")
    assert embedding.shape == (12, 64) and embedding.dtype == np.float32
    assert prediction.shape == (12, 2)
    expected_paths = [item["path"] for item in data.splits["test"].items]
    assert metadata["path"].tolist() == expected_paths
    assert set(metadata.columns) == {"subject_id", "session_id", "modality", "path"}
    # Row 7 is the mean token of scan 7 through the (frozen) backbone.
    with torch.no_grad():
        tokens = model.backbone.eval()(data.splits["test"][7]["image"][None])
    np.testing.assert_allclose(embedding[7], tokens.mean(1)[0].numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=".npz"):
        EmbeddingWriter(str(tmp_path / "x.parquet"))


def test_extract_features_follows_path_order_and_restores_mode(tmp_path):
    manifest = write_blob_cohort(tmp_path, {"train": 3, "val": 2})
    paths = pd.read_csv(manifest)["path"].tolist()
    settings = TransformSettings(**TINY_SETTINGS)
    torch.manual_seed(0)
    encoder = build_encoder("vit_tiny", img_size=(16, 16, 16), patch_size=8).train()
    features = extract_features(encoder, paths, settings, batch_size=2)
    assert features.shape == (5, 64) and encoder.training
    reverse = extract_features(encoder, paths[::-1], settings, batch_size=3)
    np.testing.assert_allclose(reverse, features[::-1], rtol=1e-5, atol=1e-6)
    volumes = load_eval_volumes(paths[:1], settings)
    assert volumes.shape == (1, 1, 16, 16, 16) and 0.0 <= float(volumes.min()) and float(volumes.max()) <= 1.0
    with torch.no_grad():
        np.testing.assert_allclose(features[0], encoder.eval()(volumes).mean(1)[0].numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        extract_features(encoder, [str(tmp_path / "missing.nii.gz")], settings)
