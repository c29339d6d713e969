"""Classification and regression metrics against sklearn oracles and hand values."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, balanced_accuracy_score, r2_score, roc_auc_score

from neurojepa_pl.metrics.classification import classification_metrics
from neurojepa_pl.metrics.regression import regression_metrics


def test_binary_matches_sklearn():
    rng = np.random.default_rng(0)
    y = (rng.random(100) < 0.3).astype(int)
    p = np.clip(0.4 * y + rng.random(100) * 0.7, 0, 1)
    m = classification_metrics("binary", y, p)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p))
    assert m["ap"] == pytest.approx(average_precision_score(y, p))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p > 0.5))
    assert m["selection"] == pytest.approx(0.5 * m["auroc"] + 0.5 * m["ap"])
    # Two-column probabilities use column 1 (softmax of the 2 logits).
    assert classification_metrics("binary", y, np.stack([1 - p, p], 1))["auroc"] == pytest.approx(m["auroc"])


def test_multiclass_macro_and_per_class():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 90)
    logits = rng.normal(size=(90, 3)) + 1.5 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = classification_metrics("multiclass", y, probs, class_names=["a", "b", "c"])
    per_class = [roc_auc_score(y == c, probs[:, c]) for c in range(3)]
    assert m["auroc/b"] == pytest.approx(per_class[1])
    assert m["auroc"] == pytest.approx(np.mean(per_class))
    assert m["ap"] == pytest.approx(average_precision_score(np.eye(3)[y], probs, average="macro"))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, probs.argmax(1)))


def test_multilabel_respects_label_mask_and_undefined_labels():
    y = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 1], [0, 0, 1]])
    s = np.array([[0.9, 0.2, 0.5], [0.1, 0.8, 0.5], [0.8, 0.3, 0.5], [0.2, 0.9, 0.5]])
    mask = np.ones_like(y, dtype=bool)
    mask[2, 1] = False  # the sample that would make label 1 imperfect is not observed
    m = classification_metrics("multilabel", y, s, label_mask=mask, class_names=["x", "y", "z"])
    assert m["auroc/x"] == 1.0
    assert m["auroc/y"] == pytest.approx(roc_auc_score([0, 1, 0], [0.2, 0.8, 0.9]))
    assert np.isnan(m["auroc/z"])  # label z is always positive: undefined, left out of the macro mean
    assert m["auroc"] == pytest.approx((1.0 + m["auroc/y"]) / 2)


def test_binary_with_one_class_is_nan():
    assert np.isnan(classification_metrics("binary", np.zeros(5), np.linspace(0, 1, 5))["auroc"])
    with pytest.raises(ValueError, match="task must be"):
        classification_metrics("ordinal", np.zeros(5), np.zeros(5))


def test_regression_hand_values():
    m = regression_metrics(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 3.0, 2.0]))
    assert m["mae"] == pytest.approx(0.75)
    assert m["rmse"] == pytest.approx(np.sqrt(5 / 4))
    assert m["r2"] == pytest.approx(r2_score([1, 2, 3, 4], [1, 3, 3, 2]))
    assert m["selection"] == -0.75
