"""Two-sided paired permutation test between two models scored on the same test samples (paper, "Statistical
analysis"; the permutation count is stripped, default 10,000).

Under the null hypothesis the two models are exchangeable on every sample, so each permutation swaps the two
models' predictions for a random subset of samples (a fair coin per sample) and recomputes the metric difference.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["paired_permutation_test"]


def paired_permutation_test(
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    y: np.ndarray,
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    n_perm: int = 10000,
    seed: int = 0,
) -> tuple[float, float]:
    """Test whether ``metric_fn(y, pred_a)`` and ``metric_fn(y, pred_b)`` differ.

    Args:
        metric_fn: ``metric_fn(y, pred) -> float`` (e.g. AUROC, MAE, C-index with ``y = [time, event]`` rows).
        y: targets with samples along dim 0.
        pred_a: model A's predictions ``[n, ...]``.
        pred_b: model B's predictions, same shape, same sample order.
        n_perm: number of random swaps.
        seed: seed of the numpy Generator drawing the swaps.

    Returns:
        ``(delta, p_value)`` with ``delta = metric(A) - metric(B)`` and the two-sided p-value
        ``(1 + #{|delta_perm| >= |delta|}) / (1 + n_perm)`` (the +1 counts the observed assignment, so p > 0).
    """
    y = np.asarray(y)
    pred_a = np.asarray(pred_a)
    pred_b = np.asarray(pred_b)
    if pred_a.shape != pred_b.shape:
        raise ValueError(f"pred_a and pred_b must have the same shape; got {pred_a.shape} and {pred_b.shape}.")
    if y.shape[0] != pred_a.shape[0]:
        raise ValueError(f"y has {y.shape[0]} samples but the predictions have {pred_a.shape[0]}.")
    if n_perm < 1:
        raise ValueError(f"n_perm must be >= 1; got {n_perm}.")
    delta = float(metric_fn(y, pred_a) - metric_fn(y, pred_b))
    if not np.isfinite(delta):
        raise ValueError(f"the metric difference is not finite ({delta}); check that the metric is defined on y.")
    rng = np.random.default_rng(seed)
    n = y.shape[0]
    # Small tolerance so exact ties of |delta_perm| and |delta| (common with rank metrics) count as "as extreme".
    threshold = abs(delta) - 1e-12
    extreme = 0
    swap_shape = (n,) + (1,) * (pred_a.ndim - 1)
    for _ in range(n_perm):
        swap = rng.random(n) < 0.5
        mask = swap.reshape(swap_shape)
        perm_a = np.where(mask, pred_b, pred_a)
        perm_b = np.where(mask, pred_a, pred_b)
        if abs(metric_fn(y, perm_a) - metric_fn(y, perm_b)) >= threshold:
            extreme += 1
    return delta, (1.0 + extreme) / (1.0 + n_perm)
