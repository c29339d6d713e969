"""Evaluation statistics: bootstrap CIs, paired permutation test, classification / regression / survival metrics on
numpy arrays (wrapping torchmetrics and scikit-survival), and result writers (metrics.json, figures)."""

from neurojepa_pl.metrics.bootstrap import bootstrap_ci, bootstrap_indices, bootstrap_metrics
from neurojepa_pl.metrics.classification import classification_metrics
from neurojepa_pl.metrics.permutation import paired_permutation_test
from neurojepa_pl.metrics.regression import regression_metrics
from neurojepa_pl.metrics.survival import (
    KaplanMeierSplit,
    concordance_index,
    kaplan_meier_by_risk_group,
    survival_metrics,
)

__all__ = [
    "bootstrap_ci",
    "bootstrap_indices",
    "bootstrap_metrics",
    "classification_metrics",
    "paired_permutation_test",
    "regression_metrics",
    "concordance_index",
    "kaplan_meier_by_risk_group",
    "KaplanMeierSplit",
    "survival_metrics",
]
