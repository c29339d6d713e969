"""`neurojepa export` tool: help, export of the chosen encoder, clear failure on a bad source."""

from __future__ import annotations

import json

import pytest
import torch

from neurojepa_pl.models import build_encoder, load_backbone
from neurojepa_pl.models.checkpoint import native_to_reference
from neurojepa_pl.tools.export import main


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "neurojepa export" in capsys.readouterr().out


@pytest.mark.parametrize("which", ["target", "context"])
def test_exports_the_chosen_encoder(tmp_path, which):
    torch.manual_seed(0)
    target, context = build_encoder("vit_tiny_moe"), build_encoder("vit_tiny_moe")
    source = tmp_path / "latest.pt"
    torch.save(
        {
            "encoder": {f"module.backbone.{k}": v for k, v in native_to_reference(context.state_dict()).items()},
            "target_encoder": {f"module.backbone.{k}": v for k, v in native_to_reference(target.state_dict()).items()},
        },
        source,
    )
    out = tmp_path / "exported"
    assert main(["--checkpoint", str(source), "--out", str(out), "--which", which, "--name", "vit_tiny_moe"]) == 0
    assert json.loads((out / "config.json").read_text())["name"] == "vit_tiny_moe"
    expected = target if which == "target" else context
    loaded = load_backbone(out)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.state_dict().items())


def test_bad_source_returns_error(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")]) == 1
    assert "does not exist" in capsys.readouterr().err
