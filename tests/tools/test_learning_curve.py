"""``neurojepa learning-curve`` on a tiny two-contrast cohort and fabricated step checkpoints (one real fit: slow)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from learning_curve_tiny import write_checkpoints, write_cohort  # noqa: E402

from neurojepa_pl.tools.learning_curve import (  # noqa: E402
    LabelTask,
    LearningCurveSettings,
    main,
    parse_label,
    run_learning_curve,
)

FAST = LearningCurveSettings(poolings=("mean",), folds=3, repeats=1, inner_folds=2, seed=0)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning_curve")
    manifest = write_cohort(root / "cohort")
    run = root / "pretrain" / "version_0"
    write_checkpoints(run / "checkpoints", steps=(0, 2))
    out = root / "out"
    report = run_learning_curve([run], manifest, ["blob", "noise"], ["T1w", "FLAIR"], out, FAST)
    return root, manifest, run, out, report


def test_report_covers_every_label_modality_pooling_and_step(tiny_run):
    _, manifest, run, out, report = tiny_run
    assert json.loads((out / "learning_curve.json").read_text()) == report
    assert [c["step"] for c in report["run"]["checkpoints"]] == [0, 2]  # last.ckpt repeats step 2: dropped
    assert report["run"]["init"]["path"].endswith("step=0.ckpt")
    assert [(r["label"], r["modality"]) for r in report["results"]] == [
        ("blob", "T1w"),
        ("noise", "T1w"),
        ("blob", "FLAIR"),
        ("noise", "FLAIR"),
    ]
    for result in report["results"]:
        assert (result["task"], result["metric"]) == ("binary", "auroc")
        assert (result["n_scans"], result["n_subjects"], result["n_folds"]) == (32, 16, 3)
        assert set(result["baselines"]) == {"histogram", "avgpool"}
        curve = result["poolings"]["mean"]["curve"]
        assert [p["step"] for p in curve] == [0, 2]
        for point in curve:
            assert len(point["folds"]) == 3 and point["mean"] == pytest.approx(np.mean(point["folds"]))
            diff = point["vs_best_random"]
            assert diff["ci_low"] <= diff["mean"] <= diff["ci_high"] and diff["n_folds"] == 3
        assert curve[0]["vs_init"] is None and curve[1]["vs_init"] is not None


def test_noise_band_has_three_members_and_lies_where_expected(tiny_run):
    report = tiny_run[-1]
    for result in report["results"]:
        random = result["poolings"]["mean"]["random"]
        members = [m["mean"] for m in random["members"]]
        assert [m["seed"] for m in random["members"]] == [1, 2, 3]
        band = random["band"]
        assert (band["low"], band["high"]) == (min(members), max(members))
        assert band["mean"] == pytest.approx(np.mean(members))
        assert band["best_seed"] == random["members"][int(np.argmax(members))]["seed"]
        if result["label"] == "blob":  # a bright cube: every random encoder and raw baseline sees it
            assert band["low"] > 0.9 and result["baselines"]["avgpool"]["mean"] > 0.9
        else:  # a coin flip per subject: random features sit around chance, and the seeds differ
            assert 0.2 < band["mean"] < 0.8 and len(set(members)) == 3
    # Best random init vs itself on the same folds would be a zero difference: the pairing uses the same folds.
    blob = report["results"][0]["poolings"]["mean"]
    best = next(m for m in blob["random"]["members"] if m["seed"] == blob["random"]["band"]["best_seed"])
    point = blob["curve"][0]
    assert point["vs_best_random"]["mean"] == pytest.approx(point["mean"] - best["mean"])


def test_outputs_plot_csv_and_tensorboard(tiny_run):
    out = tiny_run[3]
    for label in ("blob", "noise"):
        figure = out / "figures" / f"{label}.png"
        assert figure.is_file() and figure.stat().st_size > 10_000
    import pandas as pd

    rows = pd.read_csv(out / "learning_curve.csv")
    assert set(rows["source"]) == {"checkpoint", "random", "baseline:histogram", "baseline:avgpool"}
    assert len(rows) == 4 * (2 + 3 + 2)  # per label x modality: 2 steps, 3 random inits, 2 baselines
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"blob/T1w/mean/pretrained", "blob/T1w/mean/random_high", "noise/FLAIR/baseline_histogram"} <= tags
    assert [e.step for e in events.Scalars("blob/FLAIR/mean/pretrained")] == [0, 2]


def test_same_seed_same_json_with_or_without_the_feature_cache(tiny_run, tmp_path):
    root, manifest, run, out, report = tiny_run
    fresh = run_learning_curve([run], manifest, ["blob"], ["FLAIR"], tmp_path / "a", FAST, cache_dir=None)
    run_learning_curve([run], manifest, ["blob"], ["FLAIR"], tmp_path / "b", FAST, cache_dir=out / "features")
    assert (tmp_path / "a" / "learning_curve.json").read_bytes() == (
        tmp_path / "b" / "learning_curve.json"
    ).read_bytes()
    assert fresh["results"][0] == report["results"][2]  # blob on FLAIR, as in the two-label run
    assert fresh["settings"]["random_seeds"] == [1, 2, 3]
    other = LearningCurveSettings(**{**vars(FAST), "seed": 4, "baselines": ()})
    moved = run_learning_curve([run], manifest, ["noise"], ["FLAIR"], tmp_path / "c", other, cache_dir=None)
    assert moved["settings"]["random_seeds"] == [4001, 4002, 4003]
    assert moved["results"][0]["poolings"]["mean"] != report["results"][3]["poolings"]["mean"]


def test_features_are_cached_per_checkpoint(tiny_run, tmp_path, capsys):
    root, manifest, run, out, _ = tiny_run
    cached = tmp_path / "out"
    shutil.copytree(out / "features", cached / "features")
    report = run_learning_curve([run], manifest, ["noise"], ["T1w"], cached, FAST)
    log = capsys.readouterr().out
    assert "features computed 0, reused 6" in log and "loaded" not in log  # 2 steps + 3 inits + raw, no scan read
    assert report["results"][0] == tiny_run[-1]["results"][1]  # noise on T1w, as in the first run


def test_labels_and_errors(tiny_run, tmp_path, capsys):
    _, manifest, run, _, _ = tiny_run
    assert parse_label("age:continuous") == LabelTask("age", "continuous")
    assert parse_label("wmh") == LabelTask("wmh", None)
    with pytest.raises(ValueError, match="kind must be"):
        parse_label("wmh:survival")
    common = [str(run), "--manifest", str(manifest), "--out", str(tmp_path / "o"), "--folds", "3", "--repeats", "1"]
    with pytest.raises(SystemExit) as exit_info:
        main([*common, "--labels", "missing_column", "--modalities", "T1w"])
    assert exit_info.value.code == 2 and "missing column(s) ['missing_column']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*common, "--labels", "contrast:binary", "--modalities", "T1w"])
    assert "use contrast:continuous" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*common, "--labels", "blob", "--modalities", "T2w"])
    assert "no rows of modality 'T2w'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*common, "--labels", "blob", "--modalities", "T1w", "--random-inits", "2"])
    assert "needs >= 3 random inits" in capsys.readouterr().err


def test_cli_continuous_label_and_table(tiny_run, tmp_path, capsys):
    _, manifest, run, _, _ = tiny_run
    args = [str(run / "checkpoints" / "step=2.ckpt"), "--manifest", str(manifest), "--out", str(tmp_path / "o")]
    args += ["--labels", "contrast", "--modalities", "FLAIR", "--folds", "3", "--repeats", "1", "--inner-folds", "2"]
    assert main([*args, "--poolings", "fg_mean", "--baselines", "histogram"]) == 0
    printed = capsys.readouterr().out
    assert "init: no step-0 checkpoint in the run" in printed
    assert "| contrast | FLAIR | fg_mean | r2 | n/a | 2 |" in printed
    report = json.loads((tmp_path / "o" / "learning_curve.json").read_text())
    result = report["results"][0]
    assert report["run"]["init"] is None and result["task"] == "continuous" and result["n_positive"] is None
    assert result["poolings"]["fg_mean"]["curve"][0]["mean"] > 0.8  # the cube's brightness is visible


@pytest.mark.slow
def test_real_pretraining_run_with_step_checkpoints(synth_cohort, tmp_path):
    from jepa_tiny import TINY_CLI_GEOMETRY

    from neurojepa_pl.cli import lightning_main

    lightning_main(
        [
            "fit",
            "--config",
            str(Path(__file__).parents[2] / "experiments" / "pretrain" / "synth_small.yaml"),
            "--data.init_args.manifest",
            str(synth_cohort),
            "--data.init_args.cache_dir",
            str(tmp_path / "cache"),
            *TINY_CLI_GEOMETRY,
            "--data.init_args.batch_size",
            "2",
            "--data.init_args.num_workers",
            "0",
            "--trainer.max_steps",
            "4",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--trainer.callbacks.init_args.every_n_train_steps",
            "2",
            "--trainer.callbacks.init_args.save_top_k",
            "-1",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    run = tmp_path / "pretrain" / "version_0"
    settings = LearningCurveSettings(poolings=("mean", "fg_mean"), folds=3, repeats=1, inner_folds=2)
    report = run_learning_curve([run], synth_cohort, ["age"], ["T1w"], tmp_path / "lc", settings)
    assert [c["step"] for c in report["run"]["checkpoints"]] == [2, 4]
    result = report["results"][0]
    assert result["task"] == "continuous" and result["n_subjects"] == 12
    assert all(np.isfinite(p["mean"]) for block in result["poolings"].values() for p in block["curve"])
    assert (tmp_path / "lc" / "figures" / "age.png").is_file()
