"""Write one row per scan (pooled embedding, prediction, manifest metadata) during ``neurojepa predict``.

Format: a NumPy ``.npz`` archive (no extra dependency, exact float32 values) with

* ``embedding``: float32 ``[n, C]`` (mean of the backbone tokens, or the CNN feature layer);
* ``prediction``: float32 ``[n, ...]`` (probabilities, values in target units, or log-risk; see the module's
  ``prediction_tensor``), when the module returns it;
* one string array ``[n]`` per metadata column the batches carry (``subject_id``, ``session_id``, ``modality``,
  ``path``, ...).

Predictions from every rank are gathered and written once by rank 0; padded duplicates (same ``path``) are dropped.
Read it back with :func:`read_embeddings`.

``neurojepa predict`` adds this writer by itself when no prediction writer is configured, so with any downstream
experiment (``data.init_args.predict_split`` chooses the scans, default ``test``)::

    neurojepa predict --config experiments/finetune/synth_tumour_probe.yaml \
      --ckpt_path runs/finetune/synth_tumour_probe/version_0/checkpoints/best.ckpt

writes ``runs/finetune/synth_tumour_probe/version_0/embeddings_test.npz`` (the run folder of the checkpoint; see
:mod:`neurojepa_pl.cli`). Another file: ``--trainer.callbacks+=neurojepa_pl.callbacks.embedding_writer.EmbeddingWriter
--trainer.callbacks.output_path my/embeddings.npz``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from neurojepa_pl.metrics.prediction_store import PredictionStore

__all__ = ["EmbeddingWriter", "read_embeddings"]

ARRAY_KEYS = ("embedding", "prediction")


class EmbeddingWriter(BasePredictionWriter):
    """Collect ``predict_step`` outputs (dicts with ``embedding`` and metadata lists) and save them as ``.npz``.

    Args:
        output_path: the ``.npz`` file to write (parent folders are created); ``None`` = ``embeddings_<split>.npz``
            in the trainer's log folder (``<split>`` = the data module's ``predict_split``; see
            :meth:`resolve_output_path`).
        metadata_keys: metadata columns to keep when present in the outputs.
    """

    def __init__(
        self,
        output_path: str | None = None,
        metadata_keys: Sequence[str] = ("subject_id", "session_id", "modality", "path", "site", "sex"),
    ):
        super().__init__(write_interval="batch")
        if output_path is not None and not str(output_path).endswith(".npz"):
            raise ValueError(f"EmbeddingWriter writes a .npz archive; got output_path={output_path!r}.")
        self.output_path = Path(output_path) if output_path is not None else None
        self.metadata_keys = tuple(metadata_keys)
        self._store = PredictionStore(dedupe_key="path")
        self.written: Path | None = None

    def resolve_output_path(self, trainer: Trainer) -> Path:
        """``output_path``, else ``<trainer.log_dir or default_root_dir>/embeddings_<predict_split>.npz``."""
        if self.output_path is not None:
            return self.output_path
        datamodule = getattr(trainer, "datamodule", None)
        split = (getattr(datamodule, "hparams", None) or {}).get("predict_split")
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        return folder / (f"embeddings_{split}.npz" if split else "embeddings.npz")

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
        path = self.resolve_output_path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {k: v.astype(np.float32) for k, v in arrays.items()}
        payload.update({k: np.asarray(v, dtype=str) for k, v in metadata.items()})
        np.savez(path, **payload)
        self.written = path


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
