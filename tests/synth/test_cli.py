import json

import pandas as pd
import pytest

from neurojepa_pl.tools.synth import main


def test_help_describes_the_tool(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "neurojepa synth" in out and "--grid" in out and "--split" in out


def test_cli_writes_a_cohort_and_prints_a_summary(tmp_path, capsys):
    code = main(
        [
            "--out",
            str(tmp_path),
            "--subjects",
            "3",
            "--seed",
            "2",
            "--grid",
            "48x54x48",
            "--modalities",
            "T1w",
            "FLAIR",
            "--sites",
            "2",
            "--split",
            "--prevalence",
            "tumour=1.0",
            "--wmh-scale",
            "2",
        ]
    )
    assert code == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("SynthBrain: 3 subjects") and "grid 48x54x48" in summary
    manifest = pd.read_csv(tmp_path / "manifest.csv")
    assert set(manifest["modality"]) == {"T1w", "FLAIR"}
    assert set(manifest["site"]) <= {"site-0", "site-1"}
    assert manifest["tumour"].all() and "split" in manifest.columns
    description = json.loads((tmp_path / "dataset_description.json").read_text())
    assert description["Synthesis"]["wmh_scale"] == 2.0


def test_cli_rejects_a_bad_grid(capsys):
    with pytest.raises(SystemExit):
        main(["--out", "unused", "--subjects", "1", "--grid", "huge"])
    assert "grid must be" in capsys.readouterr().err


def test_cli_reports_a_bad_prevalence(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--subjects", "1", "--grid", "48x54x48", "--prevalence", "glioma=0.2"]) == 2
    assert "unknown pathology" in capsys.readouterr().err


def test_cli_writes_dwi_and_a_site_shift_pair(tmp_path, capsys):
    code = main(
        [
            "--out",
            str(tmp_path),
            "--subjects",
            "6",
            "--seed",
            "1",
            "--grid",
            "48x54x48",
            "--modalities",
            "FLAIR",
            "DWI",
            "--sites",
            "2",
            "--prevalence",
            "acute_infarct=0.5",
            "--holdout-site",
            "site-1",
            "--workers",
            "1",
        ]
    )
    assert code == 0
    assert "site-shift pair" in capsys.readouterr().out
    manifest = pd.read_csv(tmp_path / "manifest.csv")
    assert set(manifest["modality"]) == {"FLAIR", "DWI"}
    assert manifest["acute_infarct"].isin([0, 1]).all() and "acute_infarct_volume_ml" in manifest.columns
    source = pd.read_csv(tmp_path / "manifest_source.csv")
    target = pd.read_csv(tmp_path / "manifest_holdout_site-1.csv")
    assert set(source["site"]) == {"site-0"} and set(target["site"]) == {"site-1"}
    assert set(target["split"]) == {"test"} and set(source["split"]) <= {"train", "val", "test"}
    assert len(source) + len(target) == len(manifest)
    description = json.loads((tmp_path / "dataset_description.json").read_text())
    assert description["Synthesis"]["dwi"]["b_value_s_per_mm2"] == 1000.0


def test_cli_refuses_stratify_without_a_holdout_site(capsys):
    with pytest.raises(SystemExit):
        main(["--out", "unused", "--subjects", "1", "--stratify", "tumour"])
    assert "--holdout-site" in capsys.readouterr().err
