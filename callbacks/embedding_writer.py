"""Write one row per scan (pooled embedding, prediction, manifest metadata) during ``neurojepa predict``.

Format: a NumPy ``.npz`` archive (no extra dependency, exact float32 values) with

* ``embedding``: float32 ``[n, C]`` (mean of the backbone tokens, or the CNN feature layer);
* ``prediction``: float32 ``[n, ...]`` (probabilities, values in target units, or log-risk; see the module's
  ``prediction_tensor``), when the module returns it;
* one string array ``[n]`` per metadata column the batches carry (``subject_id``, ``session_id``, ``modality``,
  ``path``, ...).

Predictions from every rank are gathered and written once by rank 0; padded duplicates (same ``path``) are dropped.
Read it back with :func:`read_embeddings`. Usage with any downstream experiment (``predict_split`` chooses the scans)::

    neurojepa predict --config experiments/finetune/synth_tumour_probe.yaml --ckpt_path best \
      --trainer.callbacks+=neurojepa_pl.callbacks.embedding_writer.EmbeddingWriter \
      --trainer.callbacks.output_path runs/embeddings/tumour_test.npz --data.init_args.predict_split test
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from neurojepa_pl.modules.prediction_store import PredictionStore

__all__ = ["EmbeddingWriter", "read_embeddings"]

ARRAY_KEYS = ("embedding", "prediction")


class EmbeddingWriter(BasePredictionWriter):
    """Collect ``predict_step`` outputs (dicts with ``embedding`` and metadata lists) and save them as ``.npz``.

    Args:
        output_path: the ``.npz`` file to write (parent folders are created).
        metadata_keys: metadata columns to keep when present in the outputs.
    """

    def __init__(
        self,
        output_path: str,
        metadata_keys: Sequence[str] = ("subject_id", "session_id", "modality", "path", "site", "sex"),
    ):
        super().__init__(write_interval="batch")
        if not str(output_path).endswith(".npz"):
            raise ValueError(f"EmbeddingWriter writes a .npz archive; got output_path={output_path!r}.")
        self.output_path = Path(output_path)
        self.metadata_keys = tuple(metadata_keys)
        self._store = PredictionStore(dedupe_key="path")
        self.written: Path | None = None

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._store.reset()

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if not isinstance(prediction, dict) or "embedding" not in prediction:
            raise TypeError(
                "EmbeddingWriter needs predict_step to return a dict with an 'embedding' tensor [B, C] "
                f"(the downstream modules do); got {type(prediction).__name__}."
            )
        arrays = {k: prediction[k] for k in ARRAY_KEYS if k in prediction}
        metadata = {k: [str(v) for v in prediction[k]] for k in self.metadata_keys if k in prediction}
        self._store.add(arrays, metadata)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_predict_epoch_end(trainer, pl_module)
        arrays, metadata = self._store.gather()
        self._store.reset()
        if not trainer.is_global_zero:
            return
        if not arrays:
            raise RuntimeError("the predict loop produced no batch; nothing to write.")
        self.output_path.parent.mkdir(parents=True, exist_ok=True)
        payload = {k: v.astype(np.float32) for k, v in arrays.items()}
        payload.update({k: np.asarray(v, dtype=str) for k, v in metadata.items()})
        np.savez(self.output_path, **payload)
        self.written = self.output_path


def read_embeddings(path: str | Path) -> tuple[np.ndarray, pd.DataFrame, np.ndarray | None]:
    """Read an archive written by :class:`EmbeddingWriter`.

    Returns:
        ``(embedding [n, C], metadata DataFrame [n rows], prediction or None)``.
    """
    with np.load(path, allow_pickle=False) as archive:
        embedding = archive["embedding"]
        prediction = archive["prediction"] if "prediction" in archive.files else None
        metadata = pd.DataFrame({k: archive[k] for k in archive.files if k not in ARRAY_KEYS})
    return embedding, metadata, prediction
