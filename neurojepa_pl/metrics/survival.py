"""Survival metrics on numpy arrays, wrapping scikit-survival.

* :func:`concordance_index`: Harrell's C via ``sksurv.metrics.concordance_index_censored`` (comparable pairs need
  an event at the earlier time; equal risks count 1/2).
* :func:`kaplan_meier_by_risk_group`: a median split of predicted risk into low/high groups, a Kaplan-Meier curve
  per group (``sksurv.nonparametric.kaplan_meier_estimator``) and the log-rank test
  (``sksurv.compare.compare_survival``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sksurv.compare import compare_survival
from sksurv.metrics import concordance_index_censored
from sksurv.nonparametric import kaplan_meier_estimator
from sksurv.util import Surv

__all__ = ["concordance_index", "kaplan_meier_by_risk_group", "KaplanMeierSplit", "survival_metrics"]


def _survival_arrays(time, event, risk=None):
    time = np.asarray(time, dtype=np.float64).reshape(-1)
    event = np.asarray(event).reshape(-1).astype(bool)
    if time.shape != event.shape:
        raise ValueError(f"time and event must have the same length; got {time.shape[0]} and {event.shape[0]}.")
    if risk is None:
        return time, event, None
    risk = np.asarray(risk, dtype=np.float64).reshape(-1)
    if risk.shape != time.shape:
        raise ValueError(f"risk must have one value per sample ({time.shape[0]}); got {risk.shape[0]}.")
    return time, event, risk


def concordance_index(time, event, risk) -> float:
    """Harrell's concordance index of predicted risks (higher risk = earlier event).

    Args:
        time: observed times ``[n]``.
        event: event indicators ``[n]`` (1/True = event observed).
        risk: predicted risk scores ``[n]`` (e.g. Cox log-risk).

    Returns:
        The C-index in [0, 1]; NaN when it is undefined (no event, or no comparable pair), where the reference
        returned 0.5 (docs/method.md §8.5) and sksurv would raise or divide by zero.
    """
    time, event, risk = _survival_arrays(time, event, risk)
    if not event.any():
        return float("nan")
    # sksurv divides by the number of comparable pairs without checking it; we check it just below.
    with np.errstate(invalid="ignore", divide="ignore"):
        cindex, concordant, discordant, tied_risk, _ = concordance_index_censored(event, time, risk)
    if concordant + discordant + tied_risk == 0:
        return float("nan")
    return float(cindex)


def survival_metrics(time, event, risk) -> dict[str, float]:
    """``{"cindex": C}``, the metric dict used for bootstrapping and logging."""
    return {"cindex": concordance_index(time, event, risk)}


@dataclass(frozen=True)
class KaplanMeierSplit:
    """Kaplan-Meier curves of a median risk split.

    Attributes:
        threshold: the median risk; samples with risk > threshold form the high-risk group.
        low_time / low_survival: KM step curve of the low-risk group.
        high_time / high_survival: KM step curve of the high-risk group.
        n_low / n_high: group sizes.
        logrank_chi2 / logrank_p: log-rank statistic and p-value (NaN when a group is empty or has no event).
    """

    threshold: float
    low_time: np.ndarray
    low_survival: np.ndarray
    high_time: np.ndarray
    high_survival: np.ndarray
    n_low: int
    n_high: int
    logrank_chi2: float
    logrank_p: float


def kaplan_meier_by_risk_group(time, event, risk) -> KaplanMeierSplit:
    """Split samples at the median predicted risk and estimate one Kaplan-Meier curve per group.

    Args:
        time: observed times ``[n]``.
        event: event indicators ``[n]``.
        risk: predicted risk ``[n]``.

    Returns:
        A :class:`KaplanMeierSplit`.

    Raises:
        ValueError: when the split leaves a group empty (e.g. all risks equal).
    """
    time, event, risk = _survival_arrays(time, event, risk)
    threshold = float(np.median(risk))
    high = risk > threshold
    if high.all() or not high.any():
        raise ValueError(
            f"median split of {risk.size} risks at {threshold:.4g} leaves a group empty "
            "(are all predicted risks equal?)."
        )
    t_low, s_low = kaplan_meier_estimator(event[~high], time[~high])
    t_high, s_high = kaplan_meier_estimator(event[high], time[high])
    chi2, p = float("nan"), float("nan")
    if event.any():
        chi2, p = compare_survival(Surv.from_arrays(event=event, time=time), high.astype(int))
    return KaplanMeierSplit(
        threshold, t_low, s_low, t_high, s_high, int((~high).sum()), int(high.sum()), float(chi2), float(p)
    )
