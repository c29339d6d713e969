"""The multimodal demo: run planning (one frozen encoder, one split, seven runs) and the gain table's formatting."""

import json
from pathlib import Path

import pandas as pd

from neurojepa_pl.demos import multimodal as demo_multimodal


def _value(args, key):  # the last occurrence wins in LightningCLI, as here
    positions = [i for i, a in enumerate(args) if a == key]
    return args[positions[-1] + 1] if positions else None


def test_plan_runs_share_encoder_data_and_split(tmp_path):
    setup = demo_multimodal.RANDOM_INIT_SETUP
    runs = demo_multimodal.plan_runs(tmp_path, Path("m.csv"), setup, Path("p.ckpt"), epochs=3, lr=2e-3)
    names = [name for name, _, _ in runs]
    assert names == ["t1w_only", "flair_only", "avg", "late", "mil", "poe", "poe_joint"]
    for name, config, args in runs:
        assert config.is_file(), config
        expected = "synth_wmh_t1w_only.yaml" if name in ("t1w_only", "flair_only") else f"synth_wmh_{name}.yaml"
        assert config.name == expected
        assert _value(args, "--model.init_args.finetune") == "probe"
        assert _value(args, "--model.init_args.checkpoint") == "p.ckpt"
        assert _value(args, "--model.init_args.backbone") == "vit_tiny_moe"
        assert json.loads(_value(args, "--model.init_args.backbone_kwargs")) == setup["encoder_overrides"]
        assert json.loads(_value(args, "--data.init_args.spatial_size")) == [48, 54, 48]
        assert _value(args, "--data.init_args.manifest") == "m.csv"
        assert _value(args, "--trainer.max_epochs") == "3" and _value(args, "--model.init_args.lr") == "0.002"
        assert _value(args, "--model.init_args.output_dir") == str(tmp_path / "runs" / name)
        assert args[:2] == ["--config", str(demo_multimodal.REPO_ROOT / "experiments" / "trainer" / "cpu.yaml")]
    modality = {name: _value(args, "--data.init_args.modality") for name, _, args in runs}
    assert modality["t1w_only"] == "T1w" and modality["flair_only"] == "FLAIR" and modality["avg"] is None
    without = demo_multimodal.plan_runs(tmp_path, Path("m.csv"), setup, None)
    assert all(_value(args, "--model.init_args.checkpoint") is None for _, _, args in without)


def test_format_tables_lists_runs_then_both_gains():
    runs = pd.DataFrame(
        [
            {
                "run": "t1w_only",
                "modalities": "T1w",
                "auroc": 0.61,
                "auroc_ci_low": 0.45,
                "auroc_ci_high": 0.76,
                "ap": 0.6,
                "ap_ci_low": 0.4,
                "ap_ci_high": 0.8,
                "n_test": 50,
                "fit_test_seconds": 100.4,
            },
            {
                "run": "poe",
                "modalities": "T1w+FLAIR",
                "auroc": 0.9,
                "auroc_ci_low": 0.8,
                "auroc_ci_high": 0.97,
                "ap": 0.88,
                "ap_ci_low": 0.75,
                "ap_ci_high": 0.96,
                "n_test": 50,
                "fit_test_seconds": 200.0,
            },
        ]
    )
    gain = pd.DataFrame(
        [
            {
                "metric": "auroc",
                "best_unimodal": "/w/runs/t1w_only",
                "unimodal_value": 0.61,
                "best_multimodal": "/w/runs/poe",
                "multimodal_value": 0.9,
                "n_shared": 50,
                "gain": 0.29,
                "gain_ci_low": 0.12,
                "gain_ci_high": 0.45,
                "p_value": 0.002,
            }
        ]
    )
    lines = demo_multimodal.format_tables(runs, gain, gain).splitlines()
    assert lines[2] == "| t1w_only | T1w | 0.610 [0.450, 0.760] | 0.600 [0.400, 0.800] | 50 | 100 |"
    assert lines[3] == "| poe | T1w+FLAIR | 0.900 [0.800, 0.970] | 0.880 [0.750, 0.960] | 50 | 200 |"
    assert lines[7] == "| vs T1w alone | auroc | poe | t1w_only | 0.290 [0.120, 0.450] | 0.002 | 50 |"
    assert lines[8].startswith("| vs best unimodal (paper) | auroc | poe |")


def test_random_init_setup_is_the_demo_pretraining_setup():
    import yaml

    config = yaml.safe_load((demo_multimodal.REPO_ROOT / "experiments/pretrain/synth_small.yaml").read_text())
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    setup = demo_multimodal.RANDOM_INIT_SETUP
    # The encoder's geometry is the data module's (the CLI gives the model data.init_args.spatial_size / patch_size).
    geometry = {"img_size": data["spatial_size"], "patch_size": data["patch_size"]}
    assert setup["encoder"] == model["encoder"]
    assert setup["encoder_overrides"] == {**(model.get("encoder_overrides") or {}), **geometry}
    assert setup["data_settings"] == {key: data[key] for key in setup["data_settings"]}
