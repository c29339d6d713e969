"""Geometry of frozen embeddings by age group: t-SNE projections and silhouette scores (the paper's Appendix H.4).

The paper groups patients as Young (0-24 years), Adult (35-44) and Senior (65+), projects the mean-pooled tokens of
each backbone with t-SNE per modality, and compares backbones by how well the groups separate (silhouette score).
Groups here are half-open age intervals ``[low, high)``, so "0-24 years" is ``[0, 25)``; ages in no group (25-34,
45-64 by default) are left out, as in the paper. t-SNE and the silhouette are scikit-learn's
(:class:`sklearn.manifold.TSNE`, :func:`sklearn.metrics.silhouette_score`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure

__all__ = [
    "AgeGroup",
    "PAPER_AGE_GROUPS",
    "parse_age_group",
    "assign_age_groups",
    "tsne_projection",
    "silhouette",
    "geometry_figure",
]


@dataclass(frozen=True)
class AgeGroup:
    """A named half-open age interval ``[low, high)`` in years (``high`` may be ``inf``)."""

    name: str
    low: float
    high: float

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("an age group needs a name.")
        if not (math.isfinite(self.low) and self.low < self.high):
            raise ValueError(f"age group {self.name!r}: expected a finite low < high; got [{self.low}, {self.high}).")

    def describe(self) -> str:
        """E.g. ``"Young [0, 25)"``."""
        high = "inf" if math.isinf(self.high) else f"{self.high:g}"
        return f"{self.name} [{self.low:g}, {high})"


PAPER_AGE_GROUPS: tuple[AgeGroup, ...] = (
    AgeGroup("Young", 0.0, 25.0),
    AgeGroup("Adult", 35.0, 45.0),
    AgeGroup("Senior", 65.0, math.inf),
)
"""The paper's groups: Young 0-24, Adult 35-44, Senior 65+ years."""


def parse_age_group(text: str) -> AgeGroup:
    """``"NAME:LOW:HIGH"`` (``HIGH`` may be ``inf``), e.g. ``"Young:0:25"``, as an :class:`AgeGroup`."""
    parts = text.split(":")
    if len(parts) != 3:
        raise ValueError(f"expected an age group as NAME:LOW:HIGH (e.g. Young:0:25 or Senior:65:inf); got {text!r}.")
    try:
        return AgeGroup(parts[0].strip(), float(parts[1]), float(parts[2]))
    except ValueError as err:
        raise ValueError(f"cannot read age group {text!r}: {err}") from err


def assign_age_groups(ages: Sequence[float] | np.ndarray, groups: Sequence[AgeGroup]) -> np.ndarray:
    """The group name of each age, ``None`` when it falls in no group (or is NaN).

    Args:
        ages: ``[n]`` ages in years.
        groups: non-overlapping groups.

    Returns:
        object array ``[n]`` of group names or ``None``.
    """
    ordered = sorted(groups, key=lambda g: g.low)
    for a, b in zip(ordered, ordered[1:]):
        if b.low < a.high:
            raise ValueError(f"age groups {a.describe()} and {b.describe()} overlap; make them disjoint.")
    if len({g.name for g in groups}) != len(groups):
        raise ValueError(f"age group names must be distinct; got {[g.name for g in groups]}.")
    ages = np.asarray(ages, dtype=np.float64)
    out = np.full(ages.shape, None, dtype=object)
    for group in groups:
        out[(ages >= group.low) & (ages < group.high)] = group.name
    return out


def tsne_projection(features: np.ndarray, seed: int = 0, perplexity: float = 30.0) -> tuple[np.ndarray, float]:
    """2-D t-SNE of ``features`` ``[n, C]`` (PCA initialisation, seeded).

    The perplexity must stay below the number of points; it is lowered to ``(n - 1) / 3`` for small sets (so that
    every point keeps about three effective neighbours per perplexity unit).

    Returns:
        ``(points [n, 2] float64, perplexity used)``.
    """
    from sklearn.manifold import TSNE

    features = np.asarray(features, dtype=np.float64)
    n = features.shape[0]
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 points; got {n}.")
    used = float(min(perplexity, (n - 1) / 3.0))
    tsne = TSNE(n_components=2, perplexity=used, init="pca", random_state=seed)
    return tsne.fit_transform(features), used


def silhouette(points: np.ndarray, labels: Sequence[str] | np.ndarray, metric: str = "euclidean") -> float:
    """scikit-learn's mean silhouette coefficient of ``points`` ``[n, d]`` under ``labels``; NaN when it is
    undefined (fewer than 2 groups, or as many groups as points)."""
    from sklearn.metrics import silhouette_score

    labels = np.asarray(labels)
    groups = np.unique(labels).size
    if groups < 2 or groups >= labels.size:
        return math.nan
    return float(silhouette_score(np.asarray(points, dtype=np.float64), labels, metric=metric))


def geometry_figure(panels: Mapping[str, Mapping[str, Mapping[str, object]]], groups: Sequence[AgeGroup]) -> Figure:
    """t-SNE panels, one row per modality and one column per backbone, points coloured by age group.

    Args:
        panels: ``{modality: {backbone: {"points": [n, 2], "labels": [n], "silhouette_tsne": float,
            "silhouette_features": float}}}``.
        groups: the age groups (legend order and colours).
    """
    modalities = list(panels)
    backbones = list(dict.fromkeys(b for m in modalities for b in panels[m]))
    fig = Figure(figsize=(3.4 * len(backbones) + 0.6, 3.2 * len(modalities) + 0.4), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(modalities), len(backbones), squeeze=False))
    colours = {g.name: f"C{i}" for i, g in enumerate(groups)}
    for r, modality in enumerate(modalities):
        for c, backbone in enumerate(backbones):
            ax = axes[r, c]
            panel = panels[modality].get(backbone)
            ax.set_xticks([])
            ax.set_yticks([])
            if panel is None:
                ax.set_axis_off()
                continue
            points = np.asarray(panel["points"])
            labels = np.asarray(panel["labels"])
            for group in groups:
                chosen = labels == group.name
                if chosen.any():
                    ax.scatter(points[chosen, 0], points[chosen, 1], s=12, c=colours[group.name],
                               label=group.describe(), alpha=0.8)  # fmt: skip
            s_tsne, s_feat = float(panel["silhouette_tsne"]), float(panel["silhouette_features"])  # type: ignore[arg-type]
            ax.set_title(f"{backbone} - {modality}\nsilhouette t-SNE {s_tsne:.3f}, features {s_feat:.3f}",
                         fontsize="small")  # fmt: skip
    legend: dict[str, object] = {}
    for ax in axes.flat:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(name, handle)
    fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncols=len(groups), frameon=False)
    return fig
