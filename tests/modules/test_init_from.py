"""init_from a reference-format pretraining checkpoint (docs/method.md §7.1): the three networks and the AdamW moments
arrive intact, the cool-down YAML runs from it, and what cannot be mapped is refused (or warned about) by name.

The reference checkpoint is built here as the reference engine writes one: its networks' state dicts under
``module.backbone.`` in the reference key layout and order, and ``opt`` the ``state_dict()`` of a real
``torch.optim.AdamW`` over the reference's four parameter groups (written out below from the reference rule, not
taken from the package), stepped twice with random gradients.
"""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from jepa_tiny import TINY_CLI_GEOMETRY, TinyJEPAData, tiny_module, tiny_trainer, write_tiny_cohort

from neurojepa_pl.models import load_backbone, load_predictor
from neurojepa_pl.models.checkpoint import native_to_reference, reference_to_native
from neurojepa_pl.modules.init_from import InitFrom

PREFIX = "module.backbone."
COOLDOWN_YAML = Path(__file__).resolve().parents[2] / "experiments" / "pretrain" / "neurojepa_cooldown.yaml"
COOLDOWN = dict(phase="cooldown", warmup_steps=0, total_steps=10, lr_final=0.0)


def _source_module() -> torch.nn.Module:
    """A tiny JEPA module whose context and target encoders differ and whose MoE biases are non-zero."""
    torch.manual_seed(11)
    module = tiny_module()
    with torch.no_grad():
        for p in module.target_encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
        module.context_encoder.moe_layers()[0].gate.bias.copy_(torch.tensor([0.2, -0.1, 0.05, -0.15]))
        module.target_encoder.moe_layers()[0].gate.bias.copy_(torch.tensor([0.1, -0.05, 0.0, -0.05]))
    return module


def _reference_adamw(module, skip_expert_steps: dict[int, int] | None = None):
    """The reference's optimizer over its own (per-expert) parameters: returns (optimizer, {ref name: parameter})."""
    named = {}
    for network, attribute in (("encoder", "context_encoder"), ("predictor", "predictor")):
        params = {n: p.detach() for n, p in getattr(module, attribute).named_parameters()}
        for name, value in native_to_reference(params).items():
            named[f"{network}.{name}"] = torch.nn.Parameter(value.clone())
    # init_opt: encoder decayed, predictor decayed, encoder no-decay, predictor no-decay; "bias" in the name or 1-D.
    groups = []
    for network, decayed in (("encoder", True), ("predictor", True), ("encoder", False), ("predictor", False)):
        params = [
            p for n, p in named.items() if n.startswith(network + ".") and ("bias" not in n and p.dim() != 1) == decayed
        ]
        groups.append({"params": params, "weight_decay": 0.04 if decayed else 0.0})
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    gen = torch.Generator().manual_seed(3)
    for step in range(2):
        for name, p in named.items():
            unused = name.startswith("predictor.mask_tokens.") and not name.endswith(".0")  # never get a gradient
            skipped = skip_expert_steps is not None and any(
                f"experts.{e}." in name and step < s for e, s in skip_expert_steps.items()
            )
            p.grad = None if unused or skipped else torch.randn(p.shape, generator=gen)
        optimizer.step()
    return optimizer, named


def _write_reference(path: Path, module, opt=..., scaler=None, skip_expert_steps=None) -> tuple[Path, dict]:
    optimizer, named = _reference_adamw(module, skip_expert_steps)
    networks = {
        "encoder": native_to_reference(module.context_encoder.state_dict()),
        "target_encoder": native_to_reference(module.target_encoder.state_dict()),
        "predictor": native_to_reference(module.predictor.state_dict()),
    }
    checkpoint = {key: {PREFIX + k: v for k, v in sd.items()} for key, sd in networks.items()}
    checkpoint.update(
        opt=optimizer.state_dict() if opt is ... else opt, scaler=scaler, epoch=199, global_step=320_000, loss=0.4
    )
    torch.save(checkpoint, path)
    return path, {name: optimizer.state[p] for name, p in named.items() if p in optimizer.state}


def _expected_moments(ref_state: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Reference per-expert moments stacked under our names (written out independently of the package)."""
    out: dict[str, dict[str, list]] = {}
    for name, state in ref_state.items():
        network, key = name.split(".", 1)
        ours = ("context_encoder." if network == "encoder" else "predictor.") + key
        parts = key.split(".")
        if "experts" in parts and parts[parts.index("experts") + 1].isdigit():
            i = parts.index("experts")
            ours = ("context_encoder." if network == "encoder" else "predictor.") + ".".join(
                parts[:i] + [f"experts.{parts[i + 2]}_{parts[i + 3]}"]
            )
            out.setdefault(ours, {}).setdefault("_experts", []).append((int(parts[i + 1]), state))
        else:
            out[ours] = {k: v for k, v in state.items()}
    for entry in out.values():
        if "_experts" in entry:
            experts = [s for _, s in sorted(entry.pop("_experts"), key=lambda item: item[0])]
            entry.update({k: torch.stack([s[k] for s in experts]) for k in ("exp_avg", "exp_avg_sq")})
            entry["step"] = experts[0]["step"]
    return out


class _StateAtStart(pl.Callback):
    """Records weights and optimizer state (by parameter name) when training starts, after on_fit_start."""

    def on_train_start(self, trainer, pl_module):
        names = {id(p): n for n, p in pl_module.named_parameters()}
        optimizer = trainer.optimizers[0]
        self.optimizer = {names[id(p)]: copy.deepcopy(optimizer.state[p]) for p in optimizer.state if id(p) in names}
        self.weights = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.update_step = pl_module.update_step


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    module = _source_module()
    path, ref_state = _write_reference(tmp_path_factory.mktemp("ref") / "e200.pt", module)
    return path, module, ref_state


# ------------------------------------------------------------------------------------------------ the three networks
def test_reference_weights_arrive_intact_and_match_the_existing_loaders(reference):
    path, source, _ = reference
    module = tiny_module(**COOLDOWN)
    init = InitFrom.read(path, module)
    assert init.kind == "reference" and init.notes == [] and init.step == 320_000
    for attribute in ("context_encoder", "target_encoder", "predictor"):
        expected, loaded = getattr(source, attribute).state_dict(), getattr(module, attribute).state_dict()
        assert loaded.keys() == expected.keys()
        for key in expected:
            assert torch.equal(loaded[key], expected[key]), (attribute, key)
    assert torch.equal(module.context_encoder.moe_layers()[0].gate.bias, torch.tensor([0.2, -0.1, 0.05, -0.15]))
    assert not torch.equal(
        module.context_encoder.blocks[0].attn.qkv.weight, module.target_encoder.blocks[0].attn.qkv.weight
    )

    # The same weights loaded the existing way give the same outputs.
    x = torch.rand(2, 1, 32, 36, 32, generator=torch.Generator().manual_seed(0))
    overrides = {"img_size": [32, 36, 32], "patch_size": 4}
    with torch.no_grad():
        for which, ours in (("target", module.target_encoder), ("context", module.context_encoder)):
            other = load_backbone(path, which=which, overrides=overrides).eval()
            assert torch.equal(ours.eval()(x), other(x)), which
        tokens = module.context_encoder(x)
        perm = torch.randperm(576, generator=torch.Generator().manual_seed(1)).expand(2, -1)
        context, target = perm[:, :144], perm[:, 144:300]
        predictor = load_predictor(path, overrides=overrides).eval()
        z = tokens.gather(1, context.unsqueeze(-1).expand(-1, -1, 64))
        assert torch.equal(module.predictor.eval()(z, context, target), predictor(z, context, target))


# ------------------------------------------------------------------------------------------------ the AdamW moments
def test_reference_adamw_moments_arrive_by_parameter_name(reference, tmp_path):
    path, source, ref_state = reference
    start = _StateAtStart()
    module = tiny_module(init_from=str(path), **COOLDOWN)
    tiny_trainer(tmp_path, max_steps=1, callbacks=[start]).fit(module, datamodule=TinyJEPAData(n=4, batch_size=2))
    assert start.update_step == 0 and module.update_step == 1

    expected = _expected_moments(ref_state)
    assert "context_encoder.blocks.1.mlp.experts.fc1_weight" in expected  # stacked from 4 per-expert tensors
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(start.optimizer) == set(expected) == trainable  # every trained parameter got its moments
    for name, state in expected.items():
        got = start.optimizer[name]
        assert torch.equal(got["exp_avg"], state["exp_avg"]), name
        assert torch.equal(got["exp_avg_sq"], state["exp_avg_sq"]), name
        assert float(got["step"]) == float(state["step"]) == 2.0, name
    for key, value in source.state_dict().items():  # the weights at the first step are the reference's
        assert torch.equal(start.weights[key], value), key


def test_cooldown_yaml_runs_from_a_reference_checkpoint(reference, tmp_path):
    from neurojepa_pl.cli import lightning_main

    path, _, _ = reference
    manifest = write_tiny_cohort(tmp_path / "cohort", n_scans=4)
    args = ["fit", "--config", str(COOLDOWN_YAML), "--model.init_args.encoder", "vit_tiny_moe",
            "--model.init_args.predictor", "predictor_tiny", "--model.init_args.init_from", str(path),
            "--data.init_args.manifest", manifest, *TINY_CLI_GEOMETRY, "--data.init_args.pad_crop_size", "null",
            "--data.init_args.target_spacing", "null", "--data.init_args.batch_size", "2",
            "--data.init_args.num_workers", "0", "--data.init_args.cache_dir", str(tmp_path / "cache"),
            "--trainer.fast_dev_run", "1", "--trainer.accelerator", "cpu", "--trainer.precision", "32",
            "--trainer.default_root_dir", str(tmp_path / "root")]  # fmt: skip
    module = lightning_main(args).model
    assert module.update_step == 1 and module.hparams.phase == "cooldown"
    assert module.schedule.at(1).lr < 5.25e-4  # decaying from the reference's peak, step counter restarted


# ------------------------------------------------------------------------------------------------ what cannot be mapped
def test_missing_optimizer_state_is_refused_by_name_or_warned(tmp_path):
    path, _ = _write_reference(tmp_path / "weights_only.pt", _source_module(), opt=None)
    with pytest.raises(ValueError) as err:
        InitFrom.read(path, tiny_module(**COOLDOWN))
    assert str(err.value) == (
        f"init_from {path}: part of the optimizer state cannot be carried over: no optimizer state ('opt' is absent "
        "or None).\nfix: fix the checkpoint, or set model.init_args.init_from_mismatch: warn to start with what maps "
        "(AdamW starts afresh for the rest)."
    )
    with pytest.warns(UserWarning, match=r"no optimizer state \('opt' is absent or None\)\. init_from_mismatch=warn"):
        init = InitFrom.read(path, tiny_module(**COOLDOWN), mismatch="warn")
    assert init.restore is None


def test_unmappable_items_are_each_named(tmp_path):
    # Expert 2 of block 1 got no tokens in the first step (so its step count is 1, the others 2), and the run used
    # an fp16 GradScaler.
    path, ref_state = _write_reference(
        tmp_path / "fp16.pt", _source_module(), scaler={"scale": 65536.0}, skip_expert_steps={2: 1}
    )
    with pytest.raises(ValueError) as err:
        InitFrom.read(path, tiny_module(**COOLDOWN))
    # Listed in the reference's group order: the decayed weights first, then the biases.
    stacked = [
        f"context_encoder.blocks.1.mlp.experts.{n}" for n in ("fc1_weight", "fc2_weight", "fc1_bias", "fc2_bias")
    ]
    differ = "; ".join(
        f"{name}: per-expert AdamW 'step' values differ ([1.0, 2.0]); stacked into one parameter, it takes 2.0"
        for name in stacked
    )
    assert str(err.value).splitlines()[0] == (
        f"init_from {path}: part of the optimizer state cannot be carried over: scaler: a GradScaler state (fp16 "
        f"training) is not carried over; Lightning's starts afresh; {differ}."
    )
    module = tiny_module(init_from=str(path), init_from_mismatch="warn", **COOLDOWN)
    start = _StateAtStart()
    with pytest.warns(UserWarning, match="init_from_mismatch=warn"):
        tiny_trainer(tmp_path, max_steps=1, callbacks=[start]).fit(module, datamodule=TinyJEPAData(n=4, batch_size=2))
    fc1 = start.optimizer["context_encoder.blocks.1.mlp.experts.fc1_weight"]
    assert float(fc1["step"]) == 2.0
    assert torch.equal(fc1["exp_avg"][2], ref_state["encoder.blocks.1.mlp.experts.2.fc1.weight"]["exp_avg"])


def test_group_sizes_that_do_not_fit_are_refused(tmp_path):
    module = _source_module()
    optimizer, _ = _reference_adamw(module)
    packed = optimizer.state_dict()
    n = len(packed["param_groups"][1]["params"])
    packed["param_groups"][1]["params"] = packed["param_groups"][1]["params"][:-1]  # one predictor weight short
    path, _ = _write_reference(tmp_path / "odd.pt", module, opt=packed)
    with pytest.raises(ValueError) as err:
        InitFrom.read(path, tiny_module(**COOLDOWN))
    assert str(err.value).splitlines()[0] == (
        f"init_from {path}: part of the optimizer state cannot be carried over: optimizer group 1 (predictor, "
        f"decayed) holds {n - 1} parameters, but the checkpoint's predictor has {n} of that kind."
    )


def test_reference_weights_of_another_architecture_name_the_key(tmp_path):
    module = _source_module()
    path, _ = _write_reference(tmp_path / "ref.pt", module)
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["encoder"][PREFIX + "blocks.1.mlp.gate.bias"]
    checkpoint["predictor"][PREFIX + "predictor_embed.weight"] = torch.zeros(32, 48)
    torch.save(checkpoint, path)
    with pytest.raises(ValueError) as err:
        InitFrom.read(path, tiny_module(**COOLDOWN))
    assert str(err.value).splitlines()[0] == (
        f"init_from {path} (context_encoder): the weights do not match the VisionTransformer3D: 1 missing key(s): "
        "['blocks.1.mlp.gate.bias']."
    )
    del checkpoint["encoder"]
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"must hold encoder, target_encoder and predictor; \['encoder'\] missing"):
        InitFrom.read(path, tiny_module(**COOLDOWN))


def test_reference_native_round_trip_helper_is_consistent(reference):
    # The test's reference file uses the package's key conversion; check it against a literal expectation.
    path, source, _ = reference
    saved = torch.load(path, weights_only=True)["encoder"]
    keys = [k.removeprefix(PREFIX) for k in saved]
    mlp = [k for k in keys if k.startswith("blocks.1.mlp.")]
    assert mlp[:7] == [
        "blocks.1.mlp.counts", "blocks.1.mlp.gate.bias", "blocks.1.mlp.gate.gate.weight",
        "blocks.1.mlp.experts.0.fc1.weight", "blocks.1.mlp.experts.0.fc1.bias", "blocks.1.mlp.experts.0.fc2.weight",
        "blocks.1.mlp.experts.0.fc2.bias",
    ]  # fmt: skip
    native = reference_to_native({k.removeprefix(PREFIX): v for k, v in saved.items()})
    assert all(torch.equal(native[k], v) for k, v in source.context_encoder.state_dict().items())
