"""Analyses of trained models on a cohort: MoE routing (statistics and maps in MNI152 space) and the geometry of
frozen embeddings (t-SNE, silhouette scores). Pure PyTorch / numpy / scikit-learn / nibabel / nilearn: no Lightning.

Subgroup fairness of a test run's predictions lives with the other metrics, in :mod:`neurojepa_pl.metrics.fairness`.
"""
