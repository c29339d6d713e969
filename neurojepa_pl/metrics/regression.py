"""Regression metrics on numpy arrays (MAE, RMSE, R²) computed with torchmetrics, in the target's units (years for
brain age). Selection score: ``-MAE`` so that "higher is better" holds for every task (docs/method.md §8.4 selects the
lowest val MAE)."""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional import mean_absolute_error, mean_squared_error, r2_score

__all__ = ["regression_metrics"]


def regression_metrics(target: np.ndarray, prediction: np.ndarray) -> dict[str, float]:
    """MAE, RMSE, R² and the selection score ``-MAE``.

    Args:
        target: true values ``[n]``.
        prediction: predicted values ``[n]``.

    Returns:
        ``{"mae", "rmse", "r2", "selection"}``; R² is NaN with fewer than 2 samples or a constant target.
    """
    t = torch.as_tensor(np.asarray(target, dtype=np.float64).reshape(-1))
    p = torch.as_tensor(np.asarray(prediction, dtype=np.float64).reshape(-1))
    if t.shape != p.shape:
        raise ValueError(f"target and prediction must have the same length; got {t.numel()} and {p.numel()}.")
    if t.numel() == 0:
        raise ValueError("regression metrics need at least one sample.")
    mae = float(mean_absolute_error(p, t))
    rmse = float(mean_squared_error(p, t, squared=False))
    r2 = float(r2_score(p, t)) if t.numel() >= 2 and float(t.var()) > 0 else float("nan")
    return {"mae": mae, "rmse": rmse, "r2": r2, "selection": -mae}
