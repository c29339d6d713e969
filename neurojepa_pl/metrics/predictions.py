"""``predictions.csv``: one row per test scan with metadata, targets and predictions, written by the downstream
modules and read back by ``neurojepa compare``.

Columns: the metadata columns present (``subject_id``, ``session_id``, ``modality``, ``path``, ...), then

* binary / multiclass: ``target`` and ``prob_<class>`` for every class;
* multilabel: ``target_<label>`` (empty when the label is missing for that scan) and ``prob_<label>``;
* regression: ``target`` and ``prediction``;
* survival: ``time``, ``event`` and ``risk``.

The task needs no extra column: the column set identifies it (``risk`` -> survival, ``prediction``
-> regression, ``target_*`` -> multilabel, exactly ``prob_0``/``prob_1`` or two ``prob_*`` -> binary, more ->
multiclass), and ``read_predictions`` accepts an explicit task to override the inference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from neurojepa_pl.metrics.tasks import TASK_ARRAYS

__all__ = ["predictions_frame", "write_predictions", "read_predictions", "infer_task"]

PREDICTIONS_FILENAME = "predictions.csv"


def _names(count: int, class_names: Sequence[str] | None) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(count)]
    if len(class_names) != count:
        raise ValueError(f"expected {count} class names; got {len(class_names)}: {list(class_names)}.")
    return [str(c) for c in class_names]


def predictions_frame(
    task: str,
    arrays: Mapping[str, np.ndarray],
    metadata: Mapping[str, Sequence] | None = None,
    class_names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Build the predictions table of one evaluation.

    Args:
        task: one of the downstream tasks.
        arrays: canonical arrays of the task (see :mod:`neurojepa_pl.metrics.tasks`).
        metadata: per-row lists (``subject_id``, ``path``, ...), written first.
        class_names: class / label names for the ``prob_*`` / ``target_*`` columns (binary always uses 0/1).
    """
    if task not in TASK_ARRAYS:
        raise ValueError(f"task must be one of {tuple(TASK_ARRAYS)}; got {task!r}.")
    columns: dict[str, object] = {k: list(v) for k, v in (metadata or {}).items()}
    if task == "binary":
        score = np.asarray(arrays["score"], dtype=float)
        columns.update(target=np.asarray(arrays["target"]).astype(int), prob_0=1.0 - score, prob_1=score)
    elif task == "multiclass":
        score = np.asarray(arrays["score"], dtype=float)
        columns["target"] = np.asarray(arrays["target"]).astype(int)
        for j, name in enumerate(_names(score.shape[1], class_names)):
            columns[f"prob_{name}"] = score[:, j]
    elif task == "multilabel":
        target = np.asarray(arrays["target"], dtype=float)
        mask = np.asarray(arrays["mask"], dtype=bool)
        score = np.asarray(arrays["score"], dtype=float)
        names = _names(score.shape[1], class_names)
        for j, name in enumerate(names):
            columns[f"target_{name}"] = np.where(mask[:, j], target[:, j], np.nan)
        for j, name in enumerate(names):
            columns[f"prob_{name}"] = score[:, j]
    elif task == "regression":
        columns.update(
            target=np.asarray(arrays["target"], dtype=float), prediction=np.asarray(arrays["prediction"], dtype=float)
        )
    else:
        columns.update(
            time=np.asarray(arrays["time"], dtype=float),
            event=np.asarray(arrays["event"]).astype(int),
            risk=np.asarray(arrays["risk"], dtype=float),
        )
    lengths = {k: len(v) for k, v in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"predictions columns have different lengths: {lengths}.")
    return pd.DataFrame(columns)


def write_predictions(
    path: str | Path,
    task: str,
    arrays: Mapping[str, np.ndarray],
    metadata: Mapping[str, Sequence] | None = None,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Write ``predictions.csv`` (see :func:`predictions_frame`); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    predictions_frame(task, arrays, metadata, class_names).to_csv(path, index=False)
    return path


def infer_task(columns: Sequence[str]) -> str:
    """Task of a predictions table from its column names (see the module docstring)."""
    cols = set(columns)
    probs = [c for c in columns if c.startswith("prob_")]
    if {"time", "event", "risk"} <= cols:
        return "survival"
    if {"target", "prediction"} <= cols:
        return "regression"
    if any(c.startswith("target_") for c in columns) and probs:
        return "multilabel"
    if "target" in cols and len(probs) == 2:
        return "binary"
    if "target" in cols and len(probs) > 2:
        return "multiclass"
    raise ValueError(f"cannot tell the task of a predictions table with columns {list(columns)}; pass the task.")


def read_predictions(
    path: str | Path, task: str | None = None
) -> tuple[str, dict[str, np.ndarray], pd.DataFrame, list[str] | None]:
    """Read ``predictions.csv`` back into canonical arrays.

    Args:
        path: the CSV, or a run folder containing ``predictions.csv``.
        task: override the task inferred from the columns.

    Returns:
        ``(task, arrays, frame, class_names)``; ``frame`` is the full table (metadata included).
    """
    path = Path(path)
    if path.is_dir():
        path = path / PREDICTIONS_FILENAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no predictions table at {path}; `neurojepa test` writes one into the run's output_dir."
        )
    frame = pd.read_csv(path, dtype={"subject_id": str, "session_id": str, "path": str})
    task = task or infer_task(list(frame.columns))
    probs = [c for c in frame.columns if c.startswith("prob_")]
    names = [c[len("prob_") :] for c in probs]
    if task == "binary":
        return task, {"target": frame["target"].to_numpy(int), "score": frame[probs[-1]].to_numpy(float)}, frame, None
    if task == "multiclass":
        return task, {"target": frame["target"].to_numpy(int), "score": frame[probs].to_numpy(float)}, frame, names
    if task == "multilabel":
        target = frame[[f"target_{n}" for n in names]].to_numpy(float)
        mask = ~np.isnan(target)
        arrays = {
            "target": np.nan_to_num(target, nan=0.0).astype(int),
            "score": frame[probs].to_numpy(float),
            "mask": mask,
        }
        return task, arrays, frame, names
    if task == "regression":
        return (
            task,
            {"target": frame["target"].to_numpy(float), "prediction": frame["prediction"].to_numpy(float)},
            frame,
            None,
        )
    if task == "survival":
        arrays = {
            "time": frame["time"].to_numpy(float),
            "event": frame["event"].to_numpy(int),
            "risk": frame["risk"].to_numpy(float),
        }
        return task, arrays, frame, None
    raise ValueError(f"task must be one of {tuple(TASK_ARRAYS)}; got {task!r}.")
