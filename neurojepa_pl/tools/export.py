"""`neurojepa export`: turn any supported checkpoint into a Hub-style folder (docs/method.md §9.3).

The folder holds ``config.json`` (format, registry name, every constructor argument, contents, provenance),
``model.safetensors`` (the EMA target encoder by default; ``--full``: target encoder, context encoder and predictor,
the whole self-supervised state, under prefixes) and ``README.md``, a model card (:mod:`neurojepa_pl.model_card`).
``load_backbone(DIR)`` (and, once uploaded, ``load_backbone("org/name")``) reads it back bit for bit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from neurojepa_pl.errors import UserError, UserValueError, format_user_error
from neurojepa_pl.model_card import model_card_text, parameter_counts, read_run
from neurojepa_pl.models.checkpoint import export_backbone, load_backbone_with_info, load_predictor_with_info

CARD_FILENAME = "README.md"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neurojepa export",
        description=(
            "Load an encoder from a reference checkpoint (encoder/target_encoder dicts), a Lightning checkpoint, a "
            "bare .safetensors file, an exported folder or a Hub repository id, and write DIR/config.json + "
            "DIR/model.safetensors (reference key layout) + DIR/README.md (model card) that `load_backbone(DIR)` "
            "reads back."
        ),
    )
    parser.add_argument(
        "--checkpoint", required=True, metavar="SRC", help="source checkpoint file, exported folder or Hub id org/name"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created if needed)")
    parser.add_argument(
        "--which",
        choices=("target", "context"),
        default="target",
        help="for checkpoints holding both encoders: the EMA target encoder (default) or the online context encoder",
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="export the whole self-supervised state (target encoder, context encoder, predictor), e.g. to continue "
        "pretraining elsewhere; default: the --which encoder only",
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
    parser.add_argument(
        "--license", default=None, metavar="ID", help="Hub licence id for the model card, e.g. cc-by-nc-nd-4.0"
    )
    parser.add_argument(
        "--repo-id", default=None, metavar="ORG/NAME", help="the Hub repository it is meant for (card title, example)"
    )
    parser.add_argument(
        "--run-dir",
        default=None,
        metavar="DIR",
        help="run folder with config.yaml / metrics.json (default: the checkpoint's <run>/checkpoints/ parent)",
    )
    parser.add_argument("--revision", default=None, help="Hub revision of SRC (branch, tag or commit)")
    return parser


def _run_folder(source: str, given: str | None) -> Path | None:
    if given is not None:
        folder = Path(given)
        if not folder.is_dir():
            raise UserValueError(f"--run-dir {folder} is not a folder.", "pass the run folder (version_<k>).")
        return folder
    path = Path(source)
    return path.parent.parent if path.is_file() and path.parent.name == "checkpoints" else None


def main(argv: list[str]) -> int:
    """Run the export tool; returns the process exit status (2 for a bad source, printed as ``error:`` / ``fix:``)."""
    args = _parser().parse_args(argv)
    try:
        return _export(args)
    except UserError as err:
        print(format_user_error(err, "neurojepa export"), file=sys.stderr)
        return 2


def _export(args: argparse.Namespace) -> int:
    if args.full and args.which != "target":
        raise UserValueError(
            "--full exports both encoders (the target one under target_encoder.); --which does not apply.",
            "drop --which context.",
        )
    common = dict(ignore_keys=args.ignore_key, revision=args.revision)
    loaded = load_backbone_with_info(args.checkpoint, which=args.which, name=args.name, **common)
    context = predictor = None
    predictor_name = None
    if args.full:
        context = load_backbone_with_info(args.checkpoint, which="context", name=loaded.name, **common).encoder
        predictor, predictor_name = load_predictor_with_info(args.checkpoint, **common)
    checkpoint = loaded.checkpoint
    raw = checkpoint.raw or {}
    source = {"checkpoint": args.checkpoint, "which": args.which, "step": checkpoint.step}
    if isinstance(raw.get("update_step"), int):
        source["update_step"] = raw["update_step"]
    out = export_backbone(
        loaded.encoder,
        args.out,
        name=loaded.name,
        context_encoder=context,
        predictor=predictor,
        predictor_name=predictor_name,
        source=source,
    )
    config = json.loads((out / "config.json").read_text())
    counts = parameter_counts(loaded.encoder)
    card = model_card_text(
        title=args.repo_id or out.resolve().name,
        source=args.checkpoint,
        which=args.which,
        name=loaded.name,
        config=config["config"],
        overrides=config["overrides"],
        encoder_counts=counts,
        contents=config["contents"],
        predictor=(predictor_name, parameter_counts(predictor)) if predictor is not None else None,
        step=checkpoint.step,
        run=read_run(_run_folder(args.checkpoint, args.run_dir)),
        license=args.license,
        load_id=args.repo_id or str(out),
    )
    (out / CARD_FILENAME).write_text(card)
    what = "target + context encoders and predictor" if args.full else f"{args.which} encoder"
    active = f", {counts.active:,} active per token" if counts.active != counts.total else ""
    print(
        f"exported the {what} ({loaded.name or 'unnamed'}: {counts.total:,} parameters{active}, "
        f"{len(loaded.encoder.moe_layers())} MoE layers) to {out} (config.json, model.safetensors, README.md)"
    )
    return 0
