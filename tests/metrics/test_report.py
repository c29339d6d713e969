"""metrics.json layout and figures (PNG files, TensorBoard)."""

import json

import numpy as np
import pytest

from neurojepa_pl.metrics.report import (
    kaplan_meier_figure,
    log_figures,
    read_metrics_json,
    regression_scatter_figure,
    roc_pr_figures,
    save_figures,
    write_metrics_json,
)
from neurojepa_pl.metrics.survival import kaplan_meier_by_risk_group


def test_metrics_json_layout_and_nan_as_null(tmp_path):
    path = tmp_path / "out" / "metrics.json"
    write_metrics_json(
        path,
        {"auroc": (0.9, 0.8, 0.95), "auroc/x": (float("nan"),) * 3},
        n=42,
        task="binary",
        n_bootstrap=100,
        ci_level=0.95,
        extra={"k_shot": 4},
    )
    data = json.loads(path.read_text())
    assert data["metrics"]["auroc"] == {"value": 0.9, "ci_low": 0.8, "ci_high": 0.95, "warnings": []}
    undefined = data["metrics"]["auroc/x"]
    assert {k: undefined[k] for k in ("value", "ci_low", "ci_high")} == {"value": None, "ci_low": None, "ci_high": None}
    assert [w["code"] for w in undefined["warnings"]] == ["undefined"]
    assert (data["n"], data["task"], data["k_shot"], data["n_bootstrap"]) == (42, "binary", 4, 100)
    assert read_metrics_json(path) == data
    with pytest.raises(ValueError, match="collide"):
        write_metrics_json(path, {}, n=1, task="binary", extra={"n": 3})


def test_figures_are_written_and_logged(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 40)
    figs = roc_pr_figures("binary", y, rng.random(40))
    time, event, risk = rng.exponential(5, 40), rng.random(40) < 0.7, rng.normal(size=40)
    figs["km"] = kaplan_meier_figure(kaplan_meier_by_risk_group(time, event, risk), "months")
    figs["scatter"] = regression_scatter_figure(rng.normal(size=20), rng.normal(size=20), "years")
    paths = save_figures(figs, tmp_path / "figures")
    assert sorted(p.name for p in paths) == ["km.png", "pr.png", "roc.png", "scatter.png"]
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    logger = TensorBoardLogger(save_dir=tmp_path, name="tb")
    assert log_figures([logger], figs) == 4
    logger.experiment.flush()
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    multilabel = roc_pr_figures(
        "multilabel", np.eye(3)[rng.integers(0, 3, 30)], rng.random((30, 3)), class_names=["a", "b", "c"]
    )
    assert len(multilabel["roc"].axes[0].get_lines()) == 4  # 3 labels + the chance diagonal
