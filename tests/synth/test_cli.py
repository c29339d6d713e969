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
