"""Fine-tuning data module: one modality, task-shaped labels, class-balanced sampling, few-shot.

Class-balanced sampling is docs/method.md §8.3, few-shot §8.8.

Batches (dicts):

============  =====================================================================================
task          label fields
============  =====================================================================================
binary        ``label`` [B] int64 (label > 0.5, docs/method.md §8.3)
multiclass    ``label`` [B] int64
multilabel    ``label`` [B, L] float32 (NaN replaced by 0) and ``label_mask`` [B, L] bool (False = missing)
regression    ``label`` [B] float32 (raw units, e.g. years)
survival      ``time`` [B] float32 and ``event`` [B] int64
============  =====================================================================================

plus ``image`` [B, 1, D, H, W] float32 and metadata lists (``subject_id``, ``session_id``, ``modality``, ``path``, and
``site``/``sex``/``age`` when the manifest has them) for prediction writers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from monai.transforms import Compose
from torch.utils.data import DataLoader

from neurojepa_pl.data import LabelSpec, is_blank
from neurojepa_pl.data.transforms import finetune_augmentations
from neurojepa_pl.data_modules.base import EpochSampler, MRIDataModule
from neurojepa_pl.errors import UserValueError

log = logging.getLogger(__name__)

TASKS = ("binary", "multiclass", "multilabel", "regression", "survival")
SINGLE_LABEL_TASKS = ("binary", "multiclass", "regression")
CLASS_BALANCED_TASKS = ("binary", "multiclass", "multilabel")
FEW_SHOT_TASKS = ("binary", "multiclass", "regression")
NEGATIVE_ROW_WEIGHT = 0.1  # docs/method.md §8.7: all-negative rows get 0.1 x the median positive weight


# ----------------------------------------------------------------------------------------------------------------------
# Pure functions: few-shot draws and sampler weights
# ----------------------------------------------------------------------------------------------------------------------
def few_shot_subset(df: pd.DataFrame, task: str, label_column: str, k: int, seed: int) -> pd.DataFrame:
    """Draw a few-shot training subset (docs/method.md §8.8); call it on the training split only.

    Classification: k rows per class without replacement (all rows of a class with fewer), then shuffled.
    Regression: 4 bins at the quartiles of the labels (``nanpercentile`` edges, last bin closed), k rows per bin.

    Args:
        df: training rows (labels without NaN).
        task: ``binary``, ``multiclass`` or ``regression``.
        label_column: the label.
        k: rows per class (or per quartile), >= 1.
        seed: draw seed (vary it for repetitions).

    Returns:
        The selected rows of ``df`` (original index), in shuffled order.
    """
    if task not in FEW_SHOT_TASKS:
        raise ValueError(
            f"few-shot sampling is defined for {FEW_SHOT_TASKS} (docs/method.md §8.8); found task {task!r}."
        )
    if k < 1:
        raise ValueError(f"k must be >= 1; found {k}.")
    values = pd.to_numeric(df[label_column], errors="coerce").to_numpy(dtype=float)
    if np.isnan(values).any():
        raise ValueError(f"{int(np.isnan(values).sum())} row(s) have no {label_column!r}; drop them before few-shot.")
    if task == "regression":
        edges = np.nanpercentile(values, [0, 25, 50, 75, 100])
        groups = np.searchsorted(edges[1:-1], values, side="right")  # 0..3, the top edge falls in the last bin
    else:
        groups = (values > 0.5).astype(int) if task == "binary" else values.astype(int)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for group in np.unique(groups):
        members = np.flatnonzero(groups == group)
        chosen.extend(rng.choice(members, size=min(k, len(members)), replace=False).tolist())
    order = rng.permutation(np.asarray(chosen, dtype=int))
    return df.iloc[order]


def class_balanced_weights(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    """Inverse-frequency sample weights ``N / count(class)`` normalised to mean 1 (docs/method.md §8.3).

    Args:
        labels: integer class per sample, ``[N]``.

    Returns:
        float64 weights ``[N]``.
    """
    labels = np.asarray(labels)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    weights = len(labels) / counts[inverse].astype(float)
    return weights / weights.mean()


def multilabel_balanced_weights(labels: np.ndarray, mask: np.ndarray | None = None, eps: float = 1e-6) -> np.ndarray:
    """Multilabel sample weights of docs/method.md §8.7.

    Class weight ``N / (positives + eps)``; a sample's weight is the mean class weight over its positive labels;
    all-negative samples get ``0.1 x`` the median positive-sample weight; normalised to mean 1.

    Args:
        labels: ``[N, L]`` 0/1 labels.
        mask: ``[N, L]`` bool, False where a label is missing (treated as not positive).

    Returns:
        float64 weights ``[N]``.
    """
    labels = np.asarray(labels, dtype=float)
    positive = (labels > 0.5) & (np.ones_like(labels, dtype=bool) if mask is None else np.asarray(mask, dtype=bool))
    class_weight = len(labels) / (positive.sum(axis=0) + eps)
    n_pos = positive.sum(axis=1)
    weights = np.where(n_pos > 0, (positive * class_weight).sum(axis=1) / np.maximum(n_pos, 1), 0.0)
    if (n_pos > 0).any():
        weights[n_pos == 0] = NEGATIVE_ROW_WEIGHT * np.median(weights[n_pos > 0])
    else:
        weights[:] = 1.0
    return weights / weights.mean()


# ----------------------------------------------------------------------------------------------------------------------
# Data module
# ----------------------------------------------------------------------------------------------------------------------
class FinetuneDataModule(MRIDataModule):
    """Unimodal fine-tuning / evaluation data for the five downstream tasks.

    Args (in addition to :class:`neurojepa_pl.data_modules.base.MRIDataModule`'s):
        task: ``binary``, ``multiclass``, ``multilabel``, ``regression`` or ``survival``.
        label_columns: the label column (one for binary/multiclass/regression, one or more for multilabel; unused for
            survival).
        num_classes: number of classes for multiclass (binary uses 2 logits, docs/method.md §8.3).
        time_column: survival time (> 0; rows with time <= 0 are dropped and reported, docs/method.md §8.5).
        event_column: survival event indicator (1 = event observed).
        modality: the modality to train on; may be omitted when the manifest has only one.
        class_balanced: inverse-frequency weighted sampling with replacement for classification tasks.
        samples_per_epoch: draws per epoch over all ranks for class-balanced sampling (``None`` = training size).
        k_shot: few-shot: keep k training rows per class (per age quartile for regression); val/test untouched.
        few_shot_seed: seed of the few-shot draw.
        stratify_split: stratify the automatic patient split (manifests without ``split``) by the class label
            (binary/multiclass); needs at least two subjects per class and split.
    """

    def __init__(
        self,
        manifest: str,
        task: str = "binary",
        label_columns: list[str] | None = None,
        num_classes: int | None = None,
        time_column: str | None = None,
        event_column: str | None = None,
        modality: str | None = None,
        class_balanced: bool = True,
        samples_per_epoch: int | None = None,
        k_shot: int | None = None,
        few_shot_seed: int = 0,
        stratify_split: bool = True,
        **kwargs: Any,
    ):
        # The base class's save_hyperparameters() also records these arguments (see PretrainDataModule).
        super().__init__(manifest=manifest, **kwargs)
        if task not in TASKS:
            raise UserValueError(f"task must be one of {TASKS}; found {task!r}.", "set data.init_args.task to one.")
        self.label_columns = list(label_columns or [])
        if task in SINGLE_LABEL_TASKS and len(self.label_columns) != 1:
            raise UserValueError(
                f"task {task!r} needs exactly one label column; found label_columns={label_columns}.",
                "set data.init_args.label_columns to a list of one manifest column, e.g. [tumour].",
            )
        if task == "multilabel" and not self.label_columns:
            raise UserValueError(
                "task 'multilabel' needs label_columns.", "list one 0/1 manifest column per label in label_columns."
            )
        if task == "multiclass" and (num_classes is None or num_classes < 2):
            raise UserValueError(
                f"task 'multiclass' needs num_classes >= 2; found {num_classes}.",
                "set data.init_args.num_classes to the number of classes (labels 0..num_classes-1).",
            )
        if task == "survival" and (not time_column or not event_column):
            raise UserValueError(
                "task 'survival' needs time_column and event_column.",
                "name the manifest's follow-up time and event columns in data.init_args.",
            )
        if k_shot is not None and task not in FEW_SHOT_TASKS:
            raise UserValueError(
                f"k_shot is defined for {FEW_SHOT_TASKS} (docs/method.md §8.8: not multilabel, not survival).",
                "drop k_shot for this task.",
            )
        if samples_per_epoch is not None and not (class_balanced and task in CLASS_BALANCED_TASKS):
            raise UserValueError(
                "samples_per_epoch sets the number of weighted draws; it needs class_balanced=True and a "
                f"classification task ({CLASS_BALANCED_TASKS}).",
                "drop samples_per_epoch or set class_balanced: true.",
            )
        self.task = task
        self.dropped_rows: pd.DataFrame = pd.DataFrame()
        self.train_sampler: EpochSampler | None = None

    @property
    def num_classes(self) -> int:
        """Model outputs: 2 for binary (two logits + CE), C for multiclass, L for multilabel, 1 otherwise."""
        if self.task == "binary":
            return 2
        if self.task == "multiclass":
            return int(self.hparams.num_classes)
        if self.task == "multilabel":
            return len(self.label_columns)
        return 1

    # ------------------------------------------------------------------ choices of the base module
    def label_specs(self) -> dict[str, LabelSpec]:
        # NaN is allowed at validation; single-label rows without a label are dropped (and reported) below.
        if self.task == "binary":
            return {self.label_columns[0]: LabelSpec("binary", allow_nan=True)}
        if self.task == "multiclass":
            return {self.label_columns[0]: LabelSpec("categorical", self.hparams.num_classes, allow_nan=True)}
        if self.task == "multilabel":
            return {c: LabelSpec("binary", allow_nan=True) for c in self.label_columns}
        if self.task == "regression":
            return {self.label_columns[0]: LabelSpec("continuous", allow_nan=True)}
        return {
            self.hparams.time_column: LabelSpec("continuous", allow_nan=True),
            self.hparams.event_column: LabelSpec("event", allow_nan=True),
        }

    def stratify_column(self) -> str | None:
        if self.hparams.stratify_split and self.task in ("binary", "multiclass"):
            return self.label_columns[0]
        return None

    def prepare_frame(self, df: pd.DataFrame) -> pd.DataFrame:
        df = super().prepare_frame(df)
        present = sorted(df["modality"].unique())
        modality = self.hparams.modality
        if modality is None:
            if len(present) != 1:
                raise UserValueError(
                    f"the manifest has modalities {present}; unimodal fine-tuning needs one.",
                    "set data.init_args.modality to one of them.",
                )
        else:
            df = df[df["modality"] == modality]
            if df.empty:
                raise UserValueError(
                    f"no row has modality {modality!r}; the manifest has {present}.",
                    "set data.init_args.modality to one of those (exact spelling).",
                )
        drop, reason = self._unusable_rows(df)
        if drop.any():
            self.dropped_rows = df[drop].assign(drop_reason=reason[drop])
            examples = [
                f"row {i} ({r['subject_id']}/{r['session_id']}): {r['drop_reason']}"
                for i, r in self.dropped_rows.head(5).iterrows()
            ]
            log.warning(
                "dropping %d of %d row(s) without a usable label for task %r, e.g. %s",
                int(drop.sum()),
                len(df),
                self.task,
                "; ".join(examples),
            )
            df = df[~drop]
        if df.empty:
            raise UserValueError(
                f"no row of {self.hparams.manifest} has a usable label for task {self.task!r}.",
                f"fill in the label column(s) {self.label_columns or [self.hparams.time_column]} or check the task.",
            )
        return df

    def _unusable_rows(self, df: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
        """Rows that cannot be used (True) and why."""
        reason = pd.Series("", index=df.index, dtype=object)
        if self.task in SINGLE_LABEL_TASKS:
            col = self.label_columns[0]
            missing = pd.to_numeric(df[col], errors="coerce").isna()
            reason[missing] = f"{col} is empty"
        elif self.task == "multilabel":
            values = df[self.label_columns].apply(pd.to_numeric, errors="coerce")
            missing = values.isna().all(axis=1)
            reason[missing] = f"all of {self.label_columns} are empty"
        else:
            time = pd.to_numeric(df[self.hparams.time_column], errors="coerce")
            event = pd.to_numeric(df[self.hparams.event_column], errors="coerce")
            no_time, bad_time = time.isna(), time <= 0
            missing = no_time | bad_time | event.isna()
            reason[no_time] = f"{self.hparams.time_column} is empty"
            reason[bad_time] = f"{self.hparams.time_column} <= 0"
            reason[event.isna() & ~no_time & ~bad_time] = f"{self.hparams.event_column} is empty"
        return missing, reason

    def split_frame(self, df: pd.DataFrame, split: str) -> pd.DataFrame:
        rows = super().split_frame(df, split)
        if split == "train" and self.hparams.k_shot is not None and not rows.empty:
            full = len(rows)
            rows = few_shot_subset(
                rows, self.task, self.label_columns[0], self.hparams.k_shot, self.hparams.few_shot_seed
            )
            log.info(
                "few-shot: k=%d (seed %d) keeps %d of %d training rows",
                self.hparams.k_shot,
                self.hparams.few_shot_seed,
                len(rows),
                full,
            )
        return rows

    def record(self, row: Mapping[str, object], split: str) -> dict[str, object]:
        rec = super().record(row, split)
        if self.task == "binary":
            rec["label"] = np.int64(float(row[self.label_columns[0]]) > 0.5)
        elif self.task == "multiclass":
            rec["label"] = np.int64(float(row[self.label_columns[0]]))
        elif self.task == "regression":
            rec["label"] = np.float32(row[self.label_columns[0]])
        elif self.task == "multilabel":
            values = np.array(
                [np.nan if is_blank(row[c]) else float(row[c]) for c in self.label_columns], dtype=np.float32
            )
            rec["label_mask"] = ~np.isnan(values)
            rec["label"] = np.nan_to_num(values, nan=0.0)
        else:
            rec["time"] = np.float32(row[self.hparams.time_column])
            rec["event"] = np.int64(float(row[self.hparams.event_column]))
        return rec

    def augmentation(self, split: str) -> Compose:
        return finetune_augmentations(self.settings, train=split == "train")

    # ------------------------------------------------------------------ loaders
    def sampling_weights(self) -> np.ndarray | None:
        """Weights of the training records for class-balanced sampling, or ``None`` for plain shuffling."""
        if not self.hparams.class_balanced:
            return None
        if self.task not in CLASS_BALANCED_TASKS:
            log.info(
                "class_balanced has no effect for task %r (all sample weights 1, docs/method.md §8.4/8.5)", self.task
            )
            return None
        records = self._require("train").records
        if self.task == "multilabel":
            labels = np.stack([r["label"] for r in records])
            mask = np.stack([r["label_mask"] for r in records])
            return multilabel_balanced_weights(labels, mask)
        return class_balanced_weights([int(r["label"]) for r in records])

    def train_dataloader(self) -> DataLoader:
        dataset = self._require("train")
        world, rank = self._world()
        weights = self.sampling_weights()
        self.train_sampler = EpochSampler(
            len(dataset),
            seed=self.hparams.seed,
            shuffle=True,
            weights=weights,
            num_draws=self.hparams.samples_per_epoch if weights is not None else None,
            num_replicas=world,
            rank=rank,
        )
        return self.make_loader(dataset, self.train_sampler)
