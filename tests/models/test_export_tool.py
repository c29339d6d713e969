"""`neurojepa export`: help, the chosen encoder, the full self-supervised state, the model card, the Hub round trip
through a local cache laid out as huggingface_hub's (never the network), and clear failures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from neurojepa_pl.cli import main as neurojepa
from neurojepa_pl.models import build_encoder, build_predictor, load_backbone, load_predictor
from neurojepa_pl.models.checkpoint import native_to_reference
from neurojepa_pl.tools.export import main

PREFIX = "module.backbone."
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def _prefixed(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {PREFIX + k: v for k, v in native_to_reference(module.state_dict()).items()}


@pytest.fixture(scope="module")
def networks():
    torch.manual_seed(0)
    target, context, predictor = (
        build_encoder("vit_tiny_moe"),
        build_encoder("vit_tiny_moe"),
        build_predictor("predictor_tiny"),
    )
    with torch.no_grad():
        target.blocks[1].mlp.gate.bias.copy_(torch.tensor([0.1, -0.1, 0.05, -0.05]))
    return target, context, predictor


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory, networks) -> Path:
    target, context, predictor = networks
    path = tmp_path_factory.mktemp("ref") / "latest.pt"
    torch.save(
        {"encoder": _prefixed(context), "target_encoder": _prefixed(target), "predictor": _prefixed(predictor),
         "opt": None, "scaler": None, "epoch": 2, "global_step": 4800, "loss": 0.3},
        path,
    )  # fmt: skip
    return path


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "neurojepa export" in out and "--full" in out and "--license" in out


@pytest.mark.parametrize("which", ["target", "context"])
def test_exports_the_chosen_encoder_with_its_inferred_name(tmp_path, reference_file, networks, which):
    out = tmp_path / "exported"
    assert main(["--checkpoint", str(reference_file), "--out", str(out), "--which", which]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["name"] == "vit_tiny_moe"  # inferred from the weights, not null
    assert config["config"] == build_encoder("vit_tiny_moe").config and config["overrides"] == {}
    assert config["contents"] == ["encoder"] and config["source"]["step"] == 4800
    expected = networks[0] if which == "target" else networks[1]
    assert _same_weights(load_backbone(out), expected)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_full_export_holds_the_self_supervised_state_bit_equal(tmp_path, reference_file, networks):
    target, context, predictor = networks
    out = tmp_path / "full"
    assert main(["--checkpoint", str(reference_file), "--out", str(out), "--full"]) == 0
    keys = load_file(out / "model.safetensors").keys()
    assert {k.split(".")[0] for k in keys} == {"target_encoder", "context_encoder", "predictor"}
    assert "context_encoder.blocks.1.mlp.experts.3.fc2.bias" in keys  # reference layout under the prefix
    config = json.loads((out / "config.json").read_text())
    assert config["contents"] == ["target_encoder", "context_encoder", "predictor"]
    assert config["predictor"] == {"name": "predictor_tiny", "config": predictor.config}
    assert _same_weights(load_backbone(out), target)
    assert _same_weights(load_backbone(out, which="context"), context)
    assert _same_weights(load_predictor(out), predictor)
    x = torch.rand(1, 1, 48, 54, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(load_backbone(out).eval()(x), target.eval()(x))


def test_model_card_describes_the_run(tmp_path, networks):
    """A Lightning-style run folder: checkpoint in <run>/checkpoints/, config.yaml naming a manifest, metrics.json."""
    target, context, _ = networks
    run = tmp_path / "runs" / "tiny" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text('subject_id,path,note\ns1,a.nii.gz,"two\nlines"\ns2,b.nii.gz,x\ns3,c.nii.gz,y\n')
    config = {"model": {"init_args": {"encoder": "vit_tiny_moe"}}, "data": {"init_args": {"manifest": str(manifest)}}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    metrics = {"task": "binary", "n": 55, "n_bootstrap": 1000, "ci_level": 0.95,
               "metrics": {"auroc": {"value": 0.871, "ci_low": 0.754, "ci_high": 0.966, "warnings": []},
                           "auroc/class_1": {"value": 0.5, "ci_low": 0.4, "ci_high": 0.6, "warnings": []},
                           "ap": {"value": None, "ci_low": None, "ci_high": None,
                                  "warnings": [{"code": "few_positives", "message": "..."}]}}}  # fmt: skip
    (run / "metrics.json").write_text(json.dumps(metrics))
    state = {f"target_encoder.{k}": v for k, v in target.state_dict().items()}
    state.update({f"context_encoder.{k}": v for k, v in context.state_dict().items()})
    ckpt = run / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"encoder": "vit_tiny_moe"}, "global_step": 1600,
                "update_step": 1598}, ckpt)  # fmt: skip
    out = tmp_path / "card"
    argv = ["--checkpoint", str(ckpt), "--out", str(out), "--license", "cc-by-nc-nd-4.0", "--repo-id", "org/tiny"]
    assert main(argv) == 0
    card = (out / "README.md").read_text()
    import hashlib

    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
    for line in (
        "license: cc-by-nc-nd-4.0",
        "library_name: neurojepa_pl",
        "# org/tiny",
        "| registry name | `vit_tiny_moe` |",
        "| input -> output | `[B, 1, 48, 54, 48]` -> tokens `[B, 576, 64]` (patch 6) |",
        "| Mixture of Experts | blocks [1]: 4 routed experts (width 32), top-2, route scale 4.0, shared expert "
        "width 64 |",
        "| parameters (encoder) | 106,760 parameters, 98,376 active per token |",
        "- optimizer step of the checkpoint: 1,600",
        f"- data: manifest `{manifest}`, 3 rows, SHA-256 `{digest}`",
        "Test split of the run: task binary, n = 55, 95% CI from 1000 bootstrap resamples (`metrics.json`).",
        "| auroc | 0.871 | [0.754, 0.966] |",
        "| ap | n/a | [n/a, n/a] (flagged: few_positives) |",
        "`cc-by-nc-nd-4.0` (the `license` field above).",
        'encoder = load_backbone("org/tiny")  # strict: any key mismatch is an error',
        "tokens = encoder(volume)  # [B, 1, 48, 54, 48] -> [B, N, 64]",
    ):
        assert line in card.splitlines(), line
    assert "auroc/class_1" not in card  # per-class rows stay in metrics.json
    assert yaml.safe_load(card.split("```yaml\n")[1].split("```")[0]) == config  # the run's config, verbatim
    # 106,760 - (4 - 2) experts x (64*32 + 32 + 32*64 + 64) = 98,376
    assert 106_760 - 2 * (64 * 32 + 32 + 32 * 64 + 64) == 98_376
    assert json.loads((out / "config.json").read_text())["source"]["update_step"] == 1598


def test_card_says_what_is_unknown(tmp_path, reference_file):
    out = tmp_path / "plain"
    assert main(["--checkpoint", str(reference_file), "--out", str(out)]) == 0
    lines = (out / "README.md").read_text().splitlines()
    assert "- data: the run folder names no manifest (no `config.yaml` beside the checkpoint)" in lines
    assert "No `metrics.json` in the run folder: no test metrics." in lines
    assert "Not stated (export with `--license ID`)." in lines
    assert not any(line.startswith("license:") for line in lines)


def test_paper_encoder_card_counts():
    from neurojepa_pl.model_card import parameter_counts

    with torch.device("meta"):
        counts = parameter_counts(build_encoder("vit_base_moe"))
    assert (counts.total, counts.active) == (122_054_544, 86_595_984)  # docs/method.md §2.6


# ------------------------------------------------------------------------------------------------ the Hub, offline
def _hub_cache(root: Path, repo: str, snapshots: dict[str, Path], refs: dict[str, str]) -> Path:
    """huggingface_hub's cache layout: models--org--name/{snapshots/<commit>/<files>, refs/<branch or tag>}."""
    storage = root / f"models--{repo.replace('/', '--')}"
    for commit, folder in snapshots.items():
        shutil.copytree(folder, storage / "snapshots" / commit)
    (storage / "refs").mkdir(parents=True)
    for ref, commit in refs.items():
        (storage / "refs" / ref).write_text(commit)
    return root


@pytest.fixture()
def offline_hub(tmp_path, monkeypatch):
    cache = tmp_path / "hf_home" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return cache


def test_load_backbone_by_hub_id_from_the_local_cache(tmp_path, offline_hub, reference_file, networks):
    target, context, _ = networks
    old, new = tmp_path / "old", tmp_path / "new"
    assert main(["--checkpoint", str(reference_file), "--out", str(old), "--which", "context"]) == 0
    assert main(["--checkpoint", str(reference_file), "--out", str(new), "--repo-id", "org/tiny"]) == 0
    _hub_cache(offline_hub, "org/tiny", {COMMIT_A: old, COMMIT_B: new}, {"main": COMMIT_B, "v1": COMMIT_A})

    x = torch.rand(1, 1, 48, 54, 48, generator=torch.Generator().manual_seed(2))
    latest = load_backbone("org/tiny").eval()  # refs/main -> COMMIT_B: the target encoder
    assert _same_weights(latest, target)
    with torch.no_grad():
        assert torch.equal(latest(x), load_backbone(new).eval()(x))  # round trip: bit-equal to the folder
    assert _same_weights(load_backbone("org/tiny", revision=COMMIT_A), context)  # pinned commit
    assert _same_weights(load_backbone("org/tiny", revision="v1"), context)  # tag
    card = (offline_hub / "models--org--tiny" / "snapshots" / COMMIT_B / "README.md").read_text()
    assert 'encoder = load_backbone("org/tiny")  # strict: any key mismatch is an error' in card


def test_hub_id_not_in_the_cache_is_one_clear_error(offline_hub):
    with pytest.raises(FileNotFoundError) as err:
        load_backbone("org/absent", revision="v2")
    assert str(err.value).startswith(
        "'org/absent' is not a local path, and the Hub repository org/absent at revision v2 could not be read from "
        "the local Hub cache only (HF_HUB_OFFLINE=1): LocalEntryNotFoundError: "
    )
    assert str(err.value).splitlines()[-1] == (
        "fix: check the path or the repository id and revision; for a gated repository set HF_TOKEN; offline, "
        "download it first (hf download <repo>) or pass the local folder."
    )


def test_bad_source_exits_2_with_the_message(tmp_path, capsys):
    missing = tmp_path / "missing.pt"
    assert main(["--checkpoint", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"neurojepa export: error: Checkpoint source {missing} does not exist.",
        "fix: check the path (a Hugging Face Hub id has the form 'org/name').",
    ]
    assert neurojepa(["export", "--checkpoint", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()
