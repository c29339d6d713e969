"""Every downstream experiment YAML (finetune/, fewshot/, survival/) runs fit + test end to end on a tiny SynthBrain
cohort, with the shared size overrides, and writes a complete report."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from downstream_tiny import tiny_overrides

from neurojepa_pl.cli import lightning_main

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
DOWNSTREAM_YAMLS = sorted(
    p for folder in ("finetune", "fewshot", "survival") for p in (EXPERIMENTS / folder).glob("*.yaml")
)


def test_all_downstream_yamls_are_collected():
    names = {p.name for p in DOWNSTREAM_YAMLS}
    assert {
        "synth_tumour_probe.yaml",
        "synth_findings_multilabel.yaml",
        "synth_age_regression.yaml",
        "synth_tumour_cnn.yaml",
        "neurojepa_finetune.yaml",
        "synth_tumour_fewshot.yaml",
        "synth_survival.yaml",
        "neurojepa_tte.yaml",
        "synth_infarct_dwi.yaml",
    } <= names


def _data_modality(config: Path) -> str | None:
    return ((yaml.safe_load(config.read_text()).get("data") or {}).get("init_args") or {}).get("modality")


@pytest.fixture(scope="module")
def dwi_cohort(tmp_path_factory) -> Path:
    """A 12-subject stroke cohort with DWI (half with an acute infarct) for the YAMLs that train on DWI."""
    from neurojepa_pl.synth import generate_cohort

    out = tmp_path_factory.mktemp("synthbrain_dwi")
    generate_cohort(out, n_subjects=12, seed=0, grid=(48, 54, 48), modalities=("FLAIR", "DWI"),
                    prevalence={"acute_infarct": 0.5})  # fmt: skip
    return out / "manifest.csv"


@pytest.mark.slow
@pytest.mark.parametrize("config", DOWNSTREAM_YAMLS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_yaml_fits_and_tests_on_tiny_cohort(config, synth_cohort, request, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative runs/ and cache/ folders of the YAML land in the test's folder
    if _data_modality(config) == "DWI":  # the session cohort has no DWI (it is not a pretraining contrast)
        synth_cohort = request.getfixturevalue("dwi_cohort")
    out = tmp_path / "report"
    cli = lightning_main(
        [
            "fit",
            "--config",
            str(config),
            *tiny_overrides(synth_cohort, config),
            "--model.init_args.output_dir",
            str(out),
            "--model.init_args.n_bootstrap",
            "20",
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
    )
    assert cli.trainer.state.finished
    cli.trainer.test(cli.model, datamodule=cli.datamodule)
    report = json.loads((out / "metrics.json").read_text())
    assert report["task"] == cli.model.task
    assert report["n"] >= 1
    assert "selection" in report["metrics"]
    for entry in report["metrics"].values():
        assert set(entry) == {"value", "ci_low", "ci_high", "warnings"}
    table = pd.read_csv(out / "predictions.csv")
    assert len(table) == report["n"] and table["path"].is_unique
