"""The tiny-size overrides every downstream YAML (finetune, fewshot, survival, multimodal) must accept.

One place for the project's convention, so the experiment tests of every downstream family run their YAMLs the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

TINY_CNN = {"widths": [2, 4, 8, 8], "feat_dim": 16, "hidden_dim": 8, "pool_grid": [2, 2, 2]}
"""``backbone_kwargs`` of the CNN baseline at test size (same 4-stage design, 2k parameters)."""


def _yaml_backbone(config: Path) -> str | None:
    init_args = (yaml.safe_load(Path(config).read_text()).get("model") or {}).get("init_args") or {}
    return init_args.get("backbone")


def tiny_overrides(manifest: Path, config: Path | None = None) -> list[str]:
    """`neurojepa fit` arguments that shrink a downstream experiment to the tiny test grid (8x9x8 tokens).

    Args:
        manifest: the tiny cohort's manifest.
        config: the YAML these overrides go with. A CNN-baseline YAML (``backbone: cnn``) keeps its backbone and is
            shrunk to :data:`TINY_CNN`; every other one runs ``vit_tiny``. Without it, ``vit_tiny``.
    """
    if config is not None and _yaml_backbone(config) == "cnn":
        backbone = ["--model.init_args.backbone_kwargs", json.dumps(TINY_CNN)]
    else:
        backbone = [
            "--model.init_args.backbone",
            "vit_tiny",
            "--model.init_args.backbone_kwargs",
            "{img_size: [32,36,32], patch_size: 4}",
        ]
    return [
        *backbone,
        "--data.init_args.manifest",
        str(manifest),
        "--data.init_args.spatial_size",
        "[32,36,32]",
        "--data.init_args.resize_to",
        "[34,40,34]",
        "--data.init_args.pad_crop_size",
        "null",
        "--data.init_args.target_spacing",
        "null",
        "--data.init_args.batch_size",
        "4",
        "--data.init_args.num_workers",
        "0",
        "--trainer.fast_dev_run",
        "1",
    ]
