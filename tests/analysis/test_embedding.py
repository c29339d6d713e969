"""Age groups, t-SNE and silhouette scores of the embedding-geometry analysis."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import silhouette_score

from neurojepa_pl.analysis.embedding import (
    PAPER_AGE_GROUPS,
    AgeGroup,
    assign_age_groups,
    geometry_figure,
    parse_age_group,
    silhouette,
    tsne_projection,
)


def test_paper_groups_are_half_open_intervals():
    ages = [0.0, 24.9, 25.0, 34.99, 35.0, 44.99, 45.0, 64.9, 65.0, 97.0, math.nan]
    expected = ["Young", "Young", None, None, "Adult", "Adult", None, None, "Senior", "Senior", None]
    assert assign_age_groups(ages, PAPER_AGE_GROUPS).tolist() == expected
    assert parse_age_group("Senior:65:inf") == AgeGroup("Senior", 65.0, math.inf)
    assert PAPER_AGE_GROUPS[0].describe() == "Young [0, 25)"


def test_bad_groups_are_refused():
    with pytest.raises(ValueError, match="overlap"):
        assign_age_groups([30.0], [AgeGroup("a", 0, 40), AgeGroup("b", 35, 50)])
    with pytest.raises(ValueError, match="NAME:LOW:HIGH"):
        parse_age_group("Young-0-25")
    with pytest.raises(ValueError, match="low < high"):
        AgeGroup("x", 40, 20)


def test_silhouette_is_scikit_learns_on_a_known_clustering():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0]])
    labels = np.repeat(["a", "b", "c"], 20)
    points = centres[np.repeat(np.arange(3), 20)] + rng.standard_normal((60, 3))
    score = silhouette(points, labels)
    assert score == pytest.approx(silhouette_score(points, labels), rel=1e-12)
    assert score > 0.7  # well separated (centre distance 10, unit noise)
    # Labels that ignore the clusters score near zero; cosine distance is passed through.
    shuffled = rng.permutation(labels)
    assert abs(silhouette(points, shuffled)) < 0.1
    assert silhouette(points, labels, "cosine") == pytest.approx(silhouette_score(points, labels, metric="cosine"))
    assert math.isnan(silhouette(points, np.repeat("a", 60)))  # one group: undefined


def test_tsne_keeps_separated_groups_apart_and_caps_the_perplexity():
    rng = np.random.default_rng(1)
    labels = np.repeat(["young", "senior"], 6)
    features = np.concatenate([rng.normal(0, 1, (6, 16)), rng.normal(8, 1, (6, 16))])
    points, perplexity = tsne_projection(features, seed=0, perplexity=30.0)
    assert points.shape == (12, 2) and perplexity == pytest.approx(11 / 3)
    again, _ = tsne_projection(features, seed=0, perplexity=30.0)
    np.testing.assert_allclose(points, again)  # seeded
    assert silhouette(points, labels) > 0.5
    fig = geometry_figure(
        {"T1w": {"jepa": {"points": points, "labels": labels, "silhouette_tsne": 0.6, "silhouette_features": 0.7}}},
        [AgeGroup("young", 0, 40), AgeGroup("senior", 60, math.inf)],
    )
    assert len(fig.axes) == 1 and "silhouette t-SNE 0.600" in fig.axes[0].get_title()
    with pytest.raises(ValueError, match="at least 4"):
        tsne_projection(features[:3])
