"""`neurojepa sweep`: grids from the command line or a file, trials as `neurojepa fit` runs, the argmax on
validation, resume after a limit or a kill, parallel workers and the SLURM array template."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from trainers import subprocess_env

from neurojepa_pl.errors import UserValueError
from neurojepa_pl.tools.sweep import (
    SweepSpec,
    grid_points,
    load_study,
    main,
    parse_grid_item,
    read_grid_file,
    render_slurm_array,
)

HERE = Path(__file__).resolve().parent
GRID = ["--grid", "model.init_args.lr=[0.003,0.1]", "--grid", "model.init_args.weight_decay=[0.0,0.5]"]


@pytest.fixture
def toy_config(tmp_path) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 3,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 1,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"monitor": "val/score", "mode": "max", "save_top_k": 1, "filename": "best"},
                }
            ],
        },
        "model": {"class_path": "sweep_toy.ToyRegression", "init_args": {"lr": 0.01}},
        "data": {"class_path": "sweep_toy.ToyData"},
    }
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _sweep_args(config: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(config), *GRID, "--metric", "val/score", "--out", str(out), *extra]


def _best_score_in(checkpoint: str) -> float:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["callbacks"]
    (entry,) = [v for k, v in state.items() if k.startswith("ModelCheckpoint")]
    return float(entry["best_model_score"])


def test_grid_items_and_files(tmp_path):
    assert parse_grid_item("model.init_args.lr=[1e-4, 1e-3]") == ("model.init_args.lr", [1e-4, 1e-3])
    assert parse_grid_item("--data.init_args.batch_size=[8,16]") == ("data.init_args.batch_size", [8, 16])
    assert parse_grid_item("model.init_args.head=[attentive, linear]")[1] == ["attentive", "linear"]
    assert parse_grid_item("model.init_args.lr=float:1e-5:1e-3:log")[1] == {
        "range": "float", "low": 1e-5, "high": 1e-3, "log": True,
    }  # fmt: skip
    grid = tmp_path / "grid.yaml"
    grid.write_text("model.init_args.lr: [1.0e-4, 1e-3]\ntrainer.max_epochs: [5, 10]\n")
    space = read_grid_file(grid)
    assert space == {"model.init_args.lr": [1e-4, 1e-3], "trainer.max_epochs": [5, 10]}
    assert grid_points(space)[1] == {"model.init_args.lr": 1e-4, "trainer.max_epochs": 10}
    for bad, message in [
        ("lr=[1,2]", "not a LightningCLI option"),
        ("model.init_args.lr", "has no '='"),
        ("model.init_args.lr=[1,1]", "a value twice"),
        ("model.init_args.size=[[1,2]]", "must be numbers"),
        ("model.init_args.lr=float:3:1", "cannot read the range"),
    ]:
        with pytest.raises(UserValueError, match=message):
            parse_grid_item(bad)


def test_four_trial_grid_picks_the_argmax_of_the_validation_metric(toy_config, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sweep"
    assert main(_sweep_args(toy_config, out)) == 0
    table = pd.read_csv(out / "sweep_summary.csv")
    assert len(table) == 4 and (table["state"] == "COMPLETE").all()
    points = {(r["model.init_args.lr"], r["model.init_args.weight_decay"]) for _, r in table.iterrows()}
    assert points == {(0.003, 0.0), (0.003, 0.5), (0.1, 0.0), (0.1, 0.5)}
    for _, row in table.iterrows():
        # The trial's value is its own checkpoint's best validation score, and the trial ran in its own folder.
        assert row["value_source"] == "best_checkpoint"
        run_dir = out / "trials" / f"trial_{row['trial']:04d}"
        assert Path(row["checkpoint"]).parent.parent == Path(row["run_dir"]) == run_dir
        assert row["val/score"] == pytest.approx(_best_score_in(row["checkpoint"]))
        assert "--model.init_args.lr" in (Path(row["run_dir"]) / "command.txt").read_text()
    scores = table["val/score"]
    assert scores.nunique() == 4  # the values matter, so the choice is not a tie-break
    winner = table[table["winner"]]
    assert len(winner) == 1 and winner.index[0] == scores.idxmax()
    record = json.loads((out / "winner.json").read_text())
    assert record["value"] == pytest.approx(scores.max()) and record["trial"] == int(winner["trial"].iloc[0])
    assert "test/score" in record["test"]  # the winner's checkpoint was tested
    printed = capsys.readouterr().out
    assert "[sweep] winner: trial" in printed and "val/score" in printed


def test_a_limited_sweep_resumes_with_only_the_remaining_trials(toy_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sweep"
    assert main(_sweep_args(toy_config, out, "--max-trials", "2", "--no-test")) == 0
    first = sorted((out / "trials").iterdir())
    assert len(first) == 2
    stamps = {p.name: (p / "command.txt").stat().st_mtime_ns for p in first}
    assert main(["--out", str(out), "--no-test"]) == 0  # resume from the folder alone
    table = pd.read_csv(out / "sweep_summary.csv")
    assert len(table) == 4 and (table["state"] == "COMPLETE").all()
    assert len({(r["model.init_args.lr"], r["model.init_args.weight_decay"]) for _, r in table.iterrows()}) == 4
    trials = sorted((out / "trials").iterdir())
    assert [p.name for p in trials] == [f"trial_{k:04d}" for k in range(4)]
    assert {p.name: (p / "command.txt").stat().st_mtime_ns for p in trials[:2]} == stamps  # not rerun
    # Nothing left to run: a third start only summarises.
    assert main(["--out", str(out), "--no-test"]) == 0
    assert len(pd.read_csv(out / "sweep_summary.csv")) == 4


def test_a_changed_definition_is_not_resumed(toy_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sweep"
    assert main(_sweep_args(toy_config, out, "--max-trials", "1")) == 0
    changed = ["--config", str(toy_config), "--grid", "model.init_args.lr=[0.5]", "--metric", "val/score"]
    with pytest.raises(UserValueError, match="another definition \\(n_trials, space differ\\)"):
        main([*changed, "--out", str(out)])


def test_slurm_array_template_renders_and_its_worker_runs_a_trial(toy_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sweep"
    slurm = ["--slurm-array", "3", "--slurm-partition", "gpu", "--heartbeat", "10"]
    assert main(_sweep_args(toy_config, out, *slurm)) == 0
    script = (out / "sweep_array.sbatch").read_text()
    assert script.startswith("#!/bin/bash")
    for line in ("#SBATCH --array=0-2", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-task=1", f"cd {tmp_path}"):
        assert line in script
    assert f"-m neurojepa_pl sweep --worker --out {out.resolve()}" in script and "after 40 s" in script
    study = load_study(out, SweepSpec.load(out))
    assert [t.state.name for t in study.get_trials()] == ["WAITING"] * 4  # the grid is queued, nothing ran
    assert main(["--worker", "--out", str(out), "--max-trials", "1"]) == 0  # what one array task runs
    assert sorted(t.state.name for t in study.get_trials()) == ["COMPLETE", "WAITING", "WAITING", "WAITING"]
    assert render_slurm_array(out, 2, SweepSpec.load(out), gpus=0).count("--gpus") == 0


def _env() -> dict[str, str]:
    return subprocess_env(PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))


def _states(out: Path) -> list[str]:
    import sqlite3

    try:
        with sqlite3.connect(out / "sweep.db") as db:
            return [row[0] for row in db.execute("SELECT state FROM trials ORDER BY number")]
    except sqlite3.OperationalError:  # Optuna has not created its tables yet
        return []


@pytest.mark.slow
def test_a_killed_sweep_resumes_and_reruns_the_killed_trial(toy_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sweep"
    slow = ["--model.init_args.sleep_s", "0.5", "--heartbeat", "1", "--grace", "3", "--no-test"]
    command = [sys.executable, "-m", "neurojepa_pl", "sweep", *_sweep_args(toy_config, out), *slow]
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # kill it during its third trial's training
        states = _states(out) if (out / "sweep.db").is_file() else []
        if states.count("COMPLETE") == 2 and "RUNNING" in states and (out / "trials/trial_0002/command.txt").exists():
            time.sleep(1.0)
            break
        time.sleep(0.2)
    else:
        process.kill()
        pytest.fail(f"the sweep did not reach its third trial: {states}")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert _states(out).count("RUNNING") == 1  # left behind by the dead process

    assert main(["--out", str(out), "--heartbeat", "1", "--grace", "3", "--no-test"]) == 0
    table = pd.read_csv(out / "sweep_summary.csv")
    complete = table[table["state"] == "COMPLETE"]
    assert len(complete) == 4 and len(table[table["state"] == "FAIL"]) == 1  # the killed trial, rerun as another
    assert len({(r["model.init_args.lr"], r["model.init_args.weight_decay"]) for _, r in complete.iterrows()}) == 4


@pytest.mark.slow
def test_parallel_workers_share_the_study(toy_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", _env()["PYTHONPATH"])
    out = tmp_path / "sweep"
    assert main(_sweep_args(toy_config, out, "--jobs", "2", "--no-test")) == 0
    table = pd.read_csv(out / "sweep_summary.csv")
    assert len(table) == 4 and (table["state"] == "COMPLETE").all()
    assert len({(r["model.init_args.lr"], r["model.init_args.weight_decay"]) for _, r in table.iterrows()}) == 4
    assert (out / "worker_0.log").is_file() and (out / "worker_1.log").is_file()


def test_tpe_runs_the_requested_number_of_trials(toy_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sweep"
    args = ["--config", str(toy_config), "--grid", "model.init_args.lr=float:0.001:0.3:log", "--metric", "val/score"]
    assert main([*args, "--sampler", "tpe", "--n-trials", "3", "--out", str(out), "--no-test"]) == 0
    table = pd.read_csv(out / "sweep_summary.csv")
    assert len(table) == 3 and table["model.init_args.lr"].between(0.001, 0.3).all()
    assert table.loc[table["winner"], "val/score"].iloc[0] == table["val/score"].max()


def test_configuration_errors_stop_the_sweep(toy_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sweep"
    with pytest.raises(UserValueError, match="logged no 'val/nothing'"):
        main(["--config", str(toy_config), *GRID, "--metric", "val/nothing", "--out", str(out)])
    assert len(pd.read_csv(out / "sweep_summary.csv") if (out / "sweep_summary.csv").exists() else []) == 0
    with pytest.raises(UserValueError, match="keeps the max of val/score"):
        main(["--config", str(toy_config), *GRID, "--metric", "val/score", "--direction", "minimize",
              "--out", str(tmp_path / "other")])  # fmt: skip
    with pytest.raises(SystemExit):
        main(["--config", str(toy_config), *GRID, "--out", str(out), "--trainer.default_root_dir", "x"])


def test_a_trial_that_died_before_its_first_heartbeat_is_queued_again(toy_config, tmp_path, monkeypatch):
    from neurojepa_pl.tools.sweep import _fail_stale, open_sweep

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sweep"
    assert main(_sweep_args(toy_config, out, "--slurm-array", "1", "--heartbeat", "1", "--grace", "1")) == 0
    spec, study = open_sweep(out, None)
    taken = study.ask()  # RUNNING without a heartbeat: what a process killed right after taking a trial leaves
    params = dict(study.get_trials()[taken.number].system_attrs["fixed_params"])
    time.sleep(1.5)
    _fail_stale(study, spec, out)
    states = {t.number: t.state.name for t in study.get_trials()}
    assert states[taken.number] == "FAIL"
    requeued = [t for t in study.get_trials() if t.state.name == "WAITING" and t.number > 3]
    assert len(requeued) == 1 and requeued[0].system_attrs["fixed_params"] == params


@pytest.mark.slow
def test_sweep_of_a_downstream_yaml_tests_the_winner_in_its_folder(synth_cohort, tmp_path, monkeypatch):
    from downstream_tiny import tiny_overrides

    monkeypatch.chdir(tmp_path)
    config = HERE.parents[1] / "experiments" / "finetune" / "synth_tumour_probe.yaml"
    overrides = tiny_overrides(synth_cohort, config)
    index = overrides.index("--trainer.fast_dev_run")
    overrides = [*overrides[:index], *overrides[index + 2 :], "--trainer.max_epochs", "2"]
    out = tmp_path / "sweep"
    grid = ["--grid", "model.init_args.lr=[1e-4,3e-3]"]
    assert (
        main(["--config", str(config), *grid, "--out", str(out), *overrides, "--model.init_args.n_bootstrap", "20"])
        == 0
    )
    table = pd.read_csv(out / "sweep_summary.csv")
    assert len(table) == 2 and (table["value_source"] == "best_checkpoint").all()
    winner = json.loads((out / "winner.json").read_text())
    assert winner["metric"] == "val/selection" and winner["value"] == pytest.approx(table["val/selection"].max())
    # `neurojepa test` of the winner's best checkpoint wrote its report into the winner's trial folder.
    assert Path(winner["test"]["metrics_json"]) == Path(winner["run_dir"]) / "metrics.json"
    assert set(winner["test"]["metrics"]) >= {"auroc", "ap", "selection"}
    assert (Path(winner["run_dir"]) / "config_test.yaml").is_file()
