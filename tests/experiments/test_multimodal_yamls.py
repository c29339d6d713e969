"""Every experiments/multimodal YAML runs `neurojepa fit` and `neurojepa test` end to end at tiny size on SynthBrain."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from downstream_tiny import tiny_overrides

from neurojepa_pl.cli import lightning_main

YAML_DIR = Path(__file__).resolve().parents[2] / "experiments" / "multimodal"
YAMLS = sorted(YAML_DIR.glob("*.yaml"))
FUSIONS = ("avg", "late", "mil", "poe", "poe_joint")


def test_one_yaml_per_fusion_method_and_a_unimodal_baseline():
    assert {p.stem for p in YAMLS} == {f"synth_wmh_{f}" for f in FUSIONS} | {"synth_wmh_t1w_only"}


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mm_yaml_cache")


@pytest.mark.parametrize("config", YAMLS, ids=lambda p: p.stem)
def test_yaml_fits_and_tests_at_tiny_size(config, synth_cohort, shared_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the YAMLs log under ./runs
    out = tmp_path / "report"
    args = [
        "--config",
        str(config),
        *tiny_overrides(synth_cohort),
        "--data.init_args.cache_dir",
        str(shared_cache),
        "--model.init_args.output_dir",
        str(out),
        "--model.init_args.n_bootstrap",
        "20",
    ]
    lightning_main(["fit", *args])
    lightning_main(["test", *args])
    report = json.loads((out / "metrics.json").read_text())
    table = pd.read_csv(out / "predictions.csv")
    assert report["task"] == "binary" and report["n"] == len(table) > 0
    if config.stem == "synth_wmh_t1w_only":
        assert "fusion" not in report and set(table["modality"]) == {"T1w"}
    else:
        assert report["fusion"] == config.stem.removeprefix("synth_wmh_")
        assert report["modalities"] == ["T1w", "FLAIR"] and set(table["modality"]) == {"T1w+FLAIR"}
