"""`neurojepa export`: turn any supported checkpoint into a backbone folder (config.json + model.safetensors)."""

from __future__ import annotations

import argparse
import sys

from neurojepa_pl.models.checkpoint import export_backbone, load_backbone


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neurojepa export",
        description=(
            "Load an encoder from a reference checkpoint (encoder/target_encoder dicts), a Lightning checkpoint, a "
            "bare .safetensors file or an exported folder, and write DIR/config.json + DIR/model.safetensors "
            "(reference key layout) that `load_backbone(DIR)` reads back."
        ),
    )
    parser.add_argument("--checkpoint", required=True, metavar="SRC", help="source checkpoint file or exported folder")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created if needed)")
    parser.add_argument(
        "--which",
        choices=("target", "context"),
        default="target",
        help="for checkpoints holding both encoders: the EMA target encoder (default) or the online context encoder",
    )
    parser.add_argument(
        "--name",
        default=None,
        help="registry encoder name (e.g. vit_base_moe) when the source stores no config; recorded in config.json",
    )
    parser.add_argument(
        "--ignore-key",
        action="append",
        default=[],
        metavar="KEY",
        help="key name or fnmatch pattern excused from the strict key check (repeatable)",
    )
    return parser


def main(argv: list[str]) -> int:
    """Run the export tool; returns the process exit status."""
    args = _parser().parse_args(argv)
    try:
        encoder = load_backbone(args.checkpoint, which=args.which, name=args.name, ignore_keys=args.ignore_key)
    except (ValueError, FileNotFoundError) as err:
        print(f"neurojepa export: error: {err}", file=sys.stderr)
        return 1
    out = export_backbone(encoder, args.out, name=args.name)
    params = sum(p.numel() for p in encoder.parameters())
    print(f"exported the {args.which} encoder ({params:,} parameters, {len(encoder.moe_layers())} MoE layers) to {out}")
    return 0
