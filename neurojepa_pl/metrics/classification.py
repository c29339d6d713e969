"""Classification metrics on numpy arrays (so the bootstrap can resample them), computed with torchmetrics.

Tasks and array conventions:

* ``binary``: ``target`` ``[n]`` in {0, 1}; ``scores`` ``[n]`` = P(class 1) (the softmax of the 2 logits,
  docs/method.md §8.3).
* ``multiclass``: ``target`` ``[n]`` integer classes; ``scores`` ``[n, C]`` class probabilities.
* ``multilabel``: ``target`` ``[n, L]`` in {0, 1}; ``scores`` ``[n, L]`` sigmoid probabilities; ``label_mask``
  ``[n, L]`` bool (False = label missing for that scan, left out of that label's metrics).

Every task returns AUROC, average precision (AP) and balanced accuracy (mean per-class recall; threshold 0.5 or
argmax), macro-averaged over the classes/labels where they are defined, plus per-class values for multi-output
tasks and ``selection = 0.5 * AUROC + 0.5 * AP`` (the reference's model-selection score, docs/method.md §8.3).
A class (or label) whose targets hold only one value has undefined AUROC/AP: it is NaN and left out of the macro
average; when no class is defined the macro value is NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    multiclass_recall,
)

__all__ = ["classification_metrics", "CLASSIFICATION_TASKS"]

CLASSIFICATION_TASKS = ("binary", "multiclass", "multilabel")


def _binary_scores(target: np.ndarray, scores: np.ndarray) -> tuple[float, float, float]:
    """(AUROC, AP, balanced accuracy at 0.5) of one binary problem; NaN when one class is absent."""
    if target.size == 0 or target.min() == target.max():
        return float("nan"), float("nan"), float("nan")
    p = torch.as_tensor(scores, dtype=torch.float64)
    t = torch.as_tensor(target, dtype=torch.long)
    auroc = float(binary_auroc(p, t, validate_args=False))
    ap = float(binary_average_precision(p, t, validate_args=False))
    bacc = float(multiclass_recall((p > 0.5).long(), t, num_classes=2, average="macro", validate_args=False))
    return auroc, ap, bacc


def _nanmean(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr[np.isfinite(arr)].mean()) if np.isfinite(arr).any() else float("nan")


def _per_class(prefix_values: dict[str, list[float]], names: Sequence[str]) -> dict[str, float]:
    out = {}
    for metric, values in prefix_values.items():
        for name, value in zip(names, values):
            out[f"{metric}/{name}"] = float(value)
    return out


def classification_metrics(
    task: str,
    target: np.ndarray,
    scores: np.ndarray,
    label_mask: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """AUROC, AP, balanced accuracy (macro + per class) and the selection score.

    Args:
        task: "binary", "multiclass" or "multilabel".
        target: targets (see the module docstring for shapes).
        scores: probabilities (see the module docstring for shapes).
        label_mask: multilabel only, bool ``[n, L]`` of observed labels.
        class_names: names used for per-class keys (default ``"0"``, ``"1"``, ...).

    Returns:
        ``{"auroc", "ap", "balanced_accuracy", "selection", "auroc/<class>", "ap/<class>",
        "balanced_accuracy/<class>"}`` (per-class keys for multiclass and multilabel only).
    """
    target = np.asarray(target)
    scores = np.asarray(scores, dtype=np.float64)
    if task == "binary":
        if scores.ndim == 2 and scores.shape[1] == 2:
            scores = scores[:, 1]
        if scores.ndim != 1 or target.reshape(-1).shape != scores.shape:
            raise ValueError(
                f"binary metrics expect target [n] and scores [n] (P(class 1)); got {target.shape} and {scores.shape}."
            )
        auroc, ap, bacc = _binary_scores(target.reshape(-1).astype(np.int64), scores)
        return {"auroc": auroc, "ap": ap, "balanced_accuracy": bacc, "selection": 0.5 * auroc + 0.5 * ap}

    if task == "multiclass":
        if scores.ndim != 2 or target.shape != (scores.shape[0],):
            raise ValueError(
                f"multiclass metrics expect target [n] and scores [n, C]; got {target.shape} and {scores.shape}."
            )
        n_classes = scores.shape[1]
        target = target.astype(np.int64)
        aurocs, aps = [], []
        for c in range(n_classes):
            a, p, _ = _binary_scores((target == c).astype(np.int64), scores[:, c])
            aurocs.append(a)
            aps.append(p)
        predicted = scores.argmax(axis=1)
        # Per-class recall by hand: torchmetrics reports 0 for a class absent from the target, which would drag the
        # macro balanced accuracy down; NaN leaves such a class out, like the AUROC/AP macro averages.
        recalls = [
            float((predicted[target == c] == c).mean()) if (target == c).any() else float("nan")
            for c in range(n_classes)
        ]
        names = list(class_names) if class_names is not None else [str(c) for c in range(n_classes)]
        out = {"auroc": _nanmean(aurocs), "ap": _nanmean(aps), "balanced_accuracy": _nanmean(recalls)}
        out["selection"] = 0.5 * out["auroc"] + 0.5 * out["ap"]
        out.update(_per_class({"auroc": aurocs, "ap": aps, "balanced_accuracy": recalls}, names))
        return out

    if task == "multilabel":
        if scores.ndim != 2 or target.shape != scores.shape:
            raise ValueError(
                f"multilabel metrics expect target and scores [n, L]; got {target.shape} and {scores.shape}."
            )
        mask = np.ones(target.shape, dtype=bool) if label_mask is None else np.asarray(label_mask, dtype=bool)
        if mask.shape != target.shape:
            raise ValueError(f"label_mask must be [n, L] = {target.shape}; got {mask.shape}.")
        aurocs, aps, baccs = [], [], []
        for j in range(target.shape[1]):
            rows = mask[:, j]
            a, p, b = _binary_scores(target[rows, j].astype(np.int64), scores[rows, j])
            aurocs.append(a)
            aps.append(p)
            baccs.append(b)
        names = list(class_names) if class_names is not None else [str(j) for j in range(target.shape[1])]
        out = {"auroc": _nanmean(aurocs), "ap": _nanmean(aps), "balanced_accuracy": _nanmean(baccs)}
        out["selection"] = 0.5 * out["auroc"] + 0.5 * out["ap"]
        out.update(_per_class({"auroc": aurocs, "ap": aps, "balanced_accuracy": baccs}, names))
        return out

    raise ValueError(f"task must be one of {CLASSIFICATION_TASKS}; got {task!r}.")
