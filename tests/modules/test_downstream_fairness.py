"""``fairness_columns`` of the downstream modules: ``neurojepa test`` adds the subgroup analysis to metrics.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from trainers import tiny_trainer

sys.path.insert(0, str(Path(__file__).parent))
from tiny_data import TinyFinetuneData  # noqa: E402

from neurojepa_pl.modules.downstream import ClassificationModule  # noqa: E402

TINY = dict(
    backbone="vit_tiny",
    backbone_kwargs={"img_size": [16, 16, 16], "patch_size": 8},
    head="linear",
    finetune="frozen",
    lr=1e-3,
    warmup_epochs=0,
    n_bootstrap=30,
)


def test_test_run_adds_fairness_from_the_data_modules_manifest(tmp_path):
    data = TinyFinetuneData("binary", n_eval=24)
    items = data.splits["test"].items
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(
        {"subject_id": [it["subject_id"] for it in items], "session_id": "ses-01", "modality": "T1w",
         "path": [it["path"] for it in items], "site": np.repeat(["s1", "s2"], 12)}
    ).to_csv(manifest, index=False)  # fmt: skip
    data.save_hyperparameters({"manifest": str(manifest)})  # what the manifest data modules record
    torch.manual_seed(0)
    model = ClassificationModule(task="binary", output_dir=str(tmp_path / "out"), fairness_columns=["site"], **TINY)
    trainer = tiny_trainer(max_epochs=1)
    trainer.fit(model, data)
    trainer.test(model, data)
    payload = json.loads((tmp_path / "out" / "metrics.json").read_text())
    fairness = payload["fairness"]
    assert payload["metrics"]["auroc"]["value"] is not None  # the report itself is untouched
    assert fairness["manifest"] == str(manifest) and fairness["n_bootstrap"] == 30
    site = fairness["columns"]["site"]
    assert [g["group"] for g in site["groups"]] == ["s1", "s2"] and [g["n"] for g in site["groups"]] == [12, 12]
    assert site["gap_groups"] == ["s1", "s2"]
    values = [g["metrics"]["auroc"]["value"] for g in site["groups"]]
    assert site["gap"]["auroc"]["value"] == pytest.approx(max(values) - min(values))
    assert (tmp_path / "out" / "figures" / "fairness.png").is_file()


def test_fairness_columns_are_checked_at_construction():
    with pytest.raises(ValueError, match="increasing"):
        ClassificationModule(task="binary", fairness_columns=["age:60:40"], **TINY)
    assert ClassificationModule(task="binary", fairness_columns=["age", "site"], **TINY).fairness_columns == [
        "age:0:45:65:inf",
        "site",
    ]
