"""The tiny-size overrides every downstream YAML (finetune, fewshot, survival, multimodal) must accept.

One place for the project's convention, so the experiment tests of every downstream family run their YAMLs the same way.
"""

from __future__ import annotations

from pathlib import Path


def tiny_overrides(manifest: Path) -> list[str]:
    """`neurojepa fit` arguments that shrink a downstream experiment to the tiny test grid (8x9x8 tokens)."""
    return [
        "--model.init_args.backbone",
        "vit_tiny",
        "--model.init_args.backbone_kwargs",
        "{img_size: [32,36,32], patch_size: 4}",
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
