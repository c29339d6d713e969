"""Configs that describe the run (docs/method.md §9.4): presets expand to every argument when the config is parsed, the
saved config.yaml and the checkpoint hold the values, and a saved config still builds the old model after a preset
changes."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from jepa_tiny import TINY_CLI_GEOMETRY, write_tiny_cohort

import neurojepa_pl.masks.presets as mask_presets
import neurojepa_pl.models.registry as registry
from neurojepa_pl.config_specs import EncoderSpec, MaskingSpec, PredictorSpec
from neurojepa_pl.models import VisionTransformer3D, build_encoder, build_predictor
from neurojepa_pl.models.registry import encoder_spec, predictor_spec, split_spec

SYNTH_SMALL = str(Path(__file__).resolve().parents[1] / "experiments" / "pretrain" / "synth_small.yaml")


# ------------------------------------------------------------------------------------------------ the specs
def test_encoder_spec_holds_every_constructor_argument():
    spec = encoder_spec("vit_base_moe")
    assert spec["preset"] == "vit_base_moe"
    assert spec["moe"] == {"num_experts": 16, "top_k": 6, "expert_hidden": 384, "shared_hidden": 768,
                           "route_scale": 4.0}  # fmt: skip
    with torch.device("meta"):
        encoder = VisionTransformer3D(**split_spec(spec)[1])
    assert split_spec(spec)[1] == encoder.config  # every argument, as the network records itself
    assert sum(p.numel() for p in encoder.parameters()) == 122_054_544
    assert split_spec(predictor_spec("predictor_tiny"))[1] == build_predictor("predictor_tiny").config


def test_partial_and_complete_mappings():
    partial = encoder_spec({"preset": "vit_tiny_moe", "depth": 3, "moe": {"top_k": 1}})
    assert partial["depth"] == 3 and partial["moe"]["top_k"] == 1 and partial["moe"]["num_experts"] == 4
    complete = encoder_spec("vit_tiny_moe")
    complete["preset"] = "no_longer_registered"  # a complete spec needs no registry entry
    assert encoder_spec(complete) == complete
    assert encoder_spec({"embed_dim": 96, "num_heads": 4})["depth"] == 12  # no preset: the constructor defaults
    with pytest.raises(ValueError, match=r"Unknown encoder argument\(s\) \['width'\]"):
        encoder_spec({"preset": "vit_tiny", "width": 64})
    with pytest.raises(KeyError, match="vit_huge"):
        encoder_spec("vit_huge")


def test_spec_values_round_trip_and_compare():
    spec = EncoderSpec("vit_tiny_moe")
    assert EncoderSpec(spec.to_dict()) == spec == EncoderSpec(spec) and spec.preset == "vit_tiny_moe"
    assert PredictorSpec("predictor_tiny").kwargs == build_predictor("predictor_tiny").config
    assert MaskingSpec("multiscale").to_dict()["generators"][2]["num_blocks"] == 4
    assert EncoderSpec("vit_tiny") != EncoderSpec("vit_tiny_moe")


# ------------------------------------------------------------------------------------------------ through the CLI
@pytest.fixture(scope="module")
def saved_run_config(tmp_path_factory):
    """A real one-step `neurojepa fit` of synth_small.yaml at tiny size; returns its saved config.yaml, parsed."""
    from neurojepa_pl.cli import lightning_main

    tmp = tmp_path_factory.mktemp("run")
    manifest = write_tiny_cohort(tmp / "cohort", n_scans=4)
    args = ["fit", "--config", SYNTH_SMALL, "--data.init_args.manifest", manifest, *TINY_CLI_GEOMETRY,
            "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0", "--data.init_args.cache_dir",
            str(tmp / "cache"), "--trainer.max_steps", "1", "--trainer.accelerator", "cpu", "--trainer.precision",
            "32", "--trainer.logger.init_args.save_dir", str(tmp / "runs"), "--trainer.default_root_dir",
            str(tmp / "root")]  # fmt: skip
    cli = lightning_main(args)
    (saved,) = (tmp / "runs").rglob("config.yaml")
    return yaml.safe_load(saved.read_text()), cli.model, tmp


def test_saved_config_and_checkpoint_hold_the_values(saved_run_config):
    config, model, _ = saved_run_config
    encoder = config["model"]["init_args"]["encoder"]
    assert encoder == encoder_spec("vit_tiny_moe")
    assert config["model"]["init_args"]["predictor"] == predictor_spec("predictor_tiny")
    assert config["data"]["init_args"]["masking"] == mask_presets.masking_spec("multiscale")
    assert model.hparams["encoder"] == encoder and isinstance(model.hparams["encoder"], dict)
    assert model.trainer.datamodule.hparams["masking"]["generators"][0]["num_blocks"] == 32


def test_a_saved_config_builds_the_old_model_after_a_preset_changes(saved_run_config, monkeypatch, tmp_path):
    from neurojepa_pl.cli import lightning_main

    config, old_model, _ = saved_run_config
    changed = copy.deepcopy(registry.ENCODERS["vit_tiny_moe"])
    changed["moe"]["num_experts"], changed["depth"] = 8, 3
    monkeypatch.setitem(registry.ENCODERS, "vit_tiny_moe", changed)
    masks = copy.deepcopy(mask_presets.MASKING_PRESETS["multiscale"])
    masks[0]["num_blocks"] = 8
    monkeypatch.setitem(mask_presets.MASKING_PRESETS, "multiscale", masks)
    assert build_encoder("vit_tiny_moe").config["moe"]["num_experts"] == 8  # the preset did change

    saved = tmp_path / "config.yaml"
    # Without a subcommand (run=False) the parser takes no fit-only keys; the rest is the file as saved.
    saved.write_text(yaml.safe_dump({k: v for k, v in config.items() if k not in ("ckpt_path", "weights_only")}))
    rebuilt = lightning_main(["--config", str(saved)], run=False)
    assert rebuilt.model.context_encoder.config == old_model.context_encoder.config
    assert len(rebuilt.model.context_encoder.blocks) == 2
    assert rebuilt.model.context_encoder.moe_layers()[0].config.num_experts == 4
    assert [g.num_blocks for g in rebuilt.datamodule.mask_generators()] == [32, 16, 4]
    # A config that names the preset follows it: the preset is still a preset.
    renamed = copy.deepcopy(config)
    renamed["model"]["init_args"]["encoder"] = "vit_tiny_moe"
    renamed["data"]["init_args"]["masking"] = "multiscale"
    renamed["model"]["init_args"]["predictor"] = "predictor_tiny"
    saved.write_text(yaml.safe_dump({k: v for k, v in renamed.items() if k not in ("ckpt_path", "weights_only")}))
    current = lightning_main(["--config", str(saved)], run=False)
    assert current.model.context_encoder.moe_layers()[0].config.num_experts == 8
    assert [g.num_blocks for g in current.datamodule.mask_generators()] == [8, 16, 4]


def test_bad_preset_names_fail_when_the_config_is_parsed(capsys):
    from neurojepa_pl.cli import lightning_main

    with pytest.raises(SystemExit):
        lightning_main(["fit", "--config", SYNTH_SMALL, "--model.init_args.encoder", "vit_bse", "--print_config"])
    assert "Unknown encoder 'vit_bse'" in capsys.readouterr().err
