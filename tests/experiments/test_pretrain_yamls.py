"""Every pretraining YAML (experiments/pretrain/*.yaml, and each experiments/ablations/*.yaml stacked on the base)
runs one training step end to end through `neurojepa fit` at tiny size; the base also prints its config."""

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import yaml
from jepa_tiny import TINY_CLI_GEOMETRY, TinyJEPAData, tiny_module, write_tiny_cohort

from neurojepa_pl.cli import lightning_main

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
BASE = EXPERIMENTS / "pretrain" / "neurojepa_base.yaml"
CONFIG_STACKS = [[path] for path in sorted((EXPERIMENTS / "pretrain").glob("*.yaml"))] + [
    [BASE, path] for path in sorted((EXPERIMENTS / "ablations").glob("*.yaml"))
]


def tiny_args(manifest: str, tmp_path: Path, encoder: str = "vit_tiny_moe") -> list[str]:
    """The convention every pretraining YAML accepts (tests/README of the experiments)."""
    return [
        "--model.init_args.encoder",
        encoder,
        "--model.init_args.predictor",
        "predictor_tiny",
        "--data.init_args.manifest",
        manifest,
        *TINY_CLI_GEOMETRY,
        "--data.init_args.pad_crop_size",
        "null",
        "--data.init_args.target_spacing",
        "null",
        "--data.init_args.batch_size",
        "2",
        "--data.init_args.num_workers",
        "0",
        "--trainer.fast_dev_run",
        "1",
        "--trainer.accelerator",
        "cpu",
        "--trainer.precision",
        "32",
        # keep every file the run writes inside tmp_path
        "--data.init_args.cache_dir",
        str(tmp_path / "cache"),
        "--trainer.default_root_dir",
        str(tmp_path / "root"),
    ]


def _model_init_args(configs, section: str = "model") -> dict:
    merged = {}
    for config in configs:
        merged.update(((yaml.safe_load(config.read_text()) or {}).get(section) or {}).get("init_args") or {})
    return merged


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    return write_tiny_cohort(tmp_path_factory.mktemp("cohort"), n_scans=8)


SUBSET_COHORT_SCANS = 20
"""The data-fraction ablations keep ceil(f x 20) patients: even 10% fills a batch of 2."""


@pytest.fixture(scope="module")
def subset_manifest(tmp_path_factory) -> str:
    return write_tiny_cohort(tmp_path_factory.mktemp("cohort20"), n_scans=SUBSET_COHORT_SCANS)


@pytest.fixture(scope="module")
def phase1_checkpoint(tmp_path_factory) -> str:
    """A tiny phase-1 checkpoint with the convention's model, for YAMLs that start from one (the cool-down)."""
    out = tmp_path_factory.mktemp("phase1")
    overrides = {"img_size": [32, 36, 32], "patch_size": 4}
    module = tiny_module(encoder_overrides=overrides, predictor_overrides=overrides)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(module, datamodule=TinyJEPAData(n=4, batch_size=2))
    path = out / "phase1.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


@pytest.mark.parametrize("configs", CONFIG_STACKS, ids=lambda stack: "+".join(p.stem for p in stack))
def test_pretraining_yaml_runs_at_tiny_size(configs, manifest, subset_manifest, phase1_checkpoint, tmp_path):
    init_args = _model_init_args(configs)
    data_args = _model_init_args(configs, "data")
    fraction = data_args.get("subset_fraction", 1.0)
    cohort = subset_manifest if fraction < 1.0 else manifest
    encoder = "vit_tiny" if "moe" not in init_args.get("encoder", "vit_base_moe") else "vit_tiny_moe"
    args = ["fit", *[a for c in configs for a in ("--config", str(c))], *tiny_args(cohort, tmp_path, encoder)]
    if init_args.get("init_from"):
        args += ["--model.init_args.init_from", phase1_checkpoint]

    cli = lightning_main(args)

    module = cli.model
    assert module.update_step == 1
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    for key in ("target", "bg_weight", "phase"):  # the YAML's method choices survived the tiny overrides
        if key in init_args:
            assert module.hparams[key] == init_args[key]
    assert bool(module.context_encoder.moe_layers()) == (encoder == "vit_tiny_moe")
    moe = (init_args.get("encoder_overrides") or {}).get("moe")
    if moe:  # the experts / top-k ablations reach every MoE layer of the tiny encoder
        for layer in module.context_encoder.moe_layers():
            assert (layer.config.num_experts, layer.config.top_k) == (moe["num_experts"], moe["top_k"])
    if fraction < 1.0:  # the data-fraction ablations pretrain on ceil(f x patients) patients
        train = cli.datamodule.datasets["train"]
        assert len(train) == math.ceil(fraction * SUBSET_COHORT_SCANS)
    if init_args.get("init_from"):  # the cool-down started from phase 1: step counter restarted, lr decaying
        assert module.schedule.at(1).lr < init_args["lr_peak"]


def test_base_yaml_prints_its_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        lightning_main(["fit", "--config", str(BASE), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "neurojepa_pl.modules.pretrain.JEPAPretrainModule"
    # The presets are printed expanded (docs/method.md §9.4): the config describes the run by itself.
    encoder = printed["model"]["init_args"]["encoder"]
    assert encoder["preset"] == "vit_base_moe"
    assert encoder["moe"] == {"num_experts": 16, "top_k": 6, "expert_hidden": 384, "shared_hidden": 768,
                              "route_scale": 4.0}  # fmt: skip
    assert (encoder["embed_dim"], encoder["depth"], encoder["num_heads"]) == (768, 12, 12)
    assert encoder["moe_block_indices"] == [1, 3, 5, 7, 9, 11]
    assert printed["model"]["init_args"]["predictor"]["embed_dim"] == 384
    masking = printed["data"]["init_args"]["masking"]
    assert masking["preset"] == "multiscale"
    assert [(g["kind"], g["num_blocks"], g["spatial_scale"]) for g in masking["generators"]] == [
        ("multiscale", 32, [0.0, 0.2]), ("multiscale", 16, [0.2, 0.5]), ("multiscale", 4, [0.5, 0.7])
    ]  # fmt: skip
    assert printed["data"]["init_args"]["batch_size"] == 48
    assert printed["trainer"]["limit_train_batches"] == 1600


@pytest.mark.parametrize("fragment", sorted((EXPERIMENTS / "trainer").glob("*.yaml")), ids=lambda p: f"{p.stem}.yaml")
def test_trainer_fragments_stack_on_the_base(fragment, capsys):
    """Every trainer fragment is valid for LightningCLI (strategy and plugin arguments included)."""
    with pytest.raises(SystemExit) as exit_info:
        lightning_main(["fit", "--config", str(BASE), "--config", str(fragment), "--print_config"])
    assert exit_info.value.code in (0, None)
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    wanted = yaml.safe_load(fragment.read_text())["trainer"]
    for key in ("accelerator", "num_nodes", "precision"):
        if key in wanted:
            assert str(trainer[key]) == str(wanted[key]), key
    if isinstance(wanted.get("strategy"), dict):
        assert trainer["strategy"]["class_path"] == wanted["strategy"]["class_path"]


def test_cpu_fragment_trains(manifest, tmp_path):
    args = [
        "fit",
        "--config",
        str(BASE),
        "--config",
        str(EXPERIMENTS / "trainer" / "cpu.yaml"),
        *tiny_args(manifest, tmp_path),
    ]
    assert lightning_main(args).model.update_step == 1
