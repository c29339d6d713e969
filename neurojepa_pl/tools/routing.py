"""``neurojepa routing --checkpoint SRC --manifest M --out DIR``: what the MoE experts of a frozen encoder do on a
cohort (docs/method.md §9.2; the paper's Fig. 5).

The encoder (any source :func:`neurojepa_pl.models.load_backbone` reads: exported folder, Lightning or reference
checkpoint, safetensors) runs in eval mode without masks over the manifest's scans, loaded by the evaluation chain
of training (docs/method.md §1.2, §1.5), batch by batch. Per MoE layer, the router's top-k selection (with the
balance bias, as in training) and weights of every token are accumulated into fixed-size tables
(:mod:`neurojepa_pl.analysis.routing`), so memory does not grow with the number of scans. Written into ``--out``:

* ``routing.json``: the inputs (checkpoint, manifest, loading settings, device, precision), the scans used and
  skipped, and per layer each expert's selections and share among foreground / background tokens and per modality
  within the foreground, the foreground / background and modality imbalance, the load violations, and the token x
  expert counts ``[N][E]``;
* ``routing_arrays.npz``: ``token_counts``, ``token_weight_sum``, ``token_score_sum`` ``[L, N, E]``,
  ``foreground_scans`` ``[N]``, ``fg_counts`` / ``bg_counts`` ``[L, M, E]``, ``blocks``, ``modalities``,
  ``token_affine``;
* ``maps/*.nii.gz``: per layer the share of each expert per token ``[g0, g1, g2, E]`` and the dominant expert
  (1..E), plus the foreground fraction, on the token grid with an affine that places it in MNI152 space (the mean of
  the scans' token-grid affines; their spread in mm is in ``routing.json``);
* ``figures/*.png`` (nilearn on the packaged MNI152 template; ``--no-figures`` skips them) and, with
  ``--tensorboard``, the same figures as TensorBoard images under ``DIR/tensorboard``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main", "build_parser", "run_routing"]

PRECISIONS = {"32": None, "bf16": "bfloat16", "16": "float16"}


def build_parser() -> argparse.ArgumentParser:
    from neurojepa_pl.tools.build_cache import add_transform_arguments

    parser = argparse.ArgumentParser(
        prog="neurojepa routing",
        description=(
            "MoE routing of a frozen encoder over a manifest's scans: expert shares among foreground and background "
            "tokens and per modality, imbalance, token x expert counts, and per-layer expert maps as NIfTI in MNI152 "
            "space with figures on the MNI template. Writes OUT/routing.json, routing_arrays.npz, maps/, figures/."
        ),
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="SRC",
        help="encoder weights: exported folder, Lightning .ckpt, reference checkpoint or .safetensors",
    )
    parser.add_argument(
        "--which",
        choices=("target", "context"),
        default="target",
        help="encoder of a checkpoint holding both (default: the EMA target)",
    )
    parser.add_argument("--manifest", required=True, type=Path, help="per-scan manifest CSV")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (created)")
    parser.add_argument(
        "--modalities",
        nargs="+",
        default=None,
        metavar="MOD",
        help="use only these modalities (default: all in the manifest)",
    )
    parser.add_argument(
        "--split", nargs="+", default=None, metavar="SPLIT", help="use only rows of these splits (default: every row)"
    )
    parser.add_argument(
        "--max-scans", type=int, default=None, metavar="N", help="a seeded random subset of N scans (default: all)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --max-scans (default 0)")
    parser.add_argument("--batch-size", type=int, default=4, help="scans per forward (default 4)")
    parser.add_argument("--num-workers", type=int, default=0, help="loader worker processes (default 0)")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument(
        "--precision",
        choices=tuple(PRECISIONS),
        default="32",
        help="32 (default) or autocast bf16 / 16; the router itself always runs in float32",
    )
    parser.add_argument(
        "--foreground-method",
        choices=("reference", "percentile"),
        default="reference",
        help="token foreground definition of docs/method.md §6.1 (default: reference, as trained)",
    )
    parser.add_argument(
        "--min-foreground-fraction",
        type=float,
        default=0.1,
        help="a token is foreground when this fraction of its voxels is (default 0.1)",
    )
    parser.add_argument(
        "--max-failed-fraction",
        type=float,
        default=0.01,
        help="stop when more than this fraction of the scans cannot be loaded (default 0.01)",
    )
    parser.add_argument("--no-figures", action="store_true", help="write numbers and maps only")
    parser.add_argument("--tensorboard", action="store_true", help="also log the figures to OUT/tensorboard")
    add_transform_arguments(parser)
    return parser


def _select_rows(args: argparse.Namespace) -> Any:
    from neurojepa_pl.tools.analysis_common import select_rows

    frame = select_rows(args.manifest, args.modalities, args.split)
    if args.max_scans is not None and args.max_scans < len(frame):
        frame = frame.sample(n=args.max_scans, random_state=args.seed).sort_index().reset_index(drop=True)
    return frame


def _load_encoder(args: argparse.Namespace, settings: Any) -> Any:
    from neurojepa_pl.errors import UserValueError
    from neurojepa_pl.models import load_backbone
    from neurojepa_pl.tools.analysis_common import check_input_size

    encoder = load_backbone(args.checkpoint, which=args.which)
    if not encoder.moe_layers():
        raise UserValueError(
            f"{args.checkpoint} holds a dense encoder (no MoE layer): there is no routing to analyse.",
            "pass an MoE encoder (e.g. vit_base_moe, vit_tiny_moe).",
        )
    check_input_size(encoder, settings, str(args.checkpoint))
    return encoder


def run_routing(args: argparse.Namespace) -> dict[str, Any]:
    """Run the analysis for parsed arguments (see :func:`build_parser`); returns the ``routing.json`` payload."""
    import torch

    from neurojepa_pl.analysis.routing import (
        RoutingAccumulator,
        RoutingRecorder,
        TokenGridPlacement,
        routing_maps,
        summarize_routing,
    )
    from neurojepa_pl.data.schema import MODALITIES
    from neurojepa_pl.data_modules.datasets import FailureLog, ScanFailure
    from neurojepa_pl.errors import UserValueError
    from neurojepa_pl.features import eval_loader
    from neurojepa_pl.masks.foreground import foreground_token_map
    from neurojepa_pl.models.vit3d import as_triple
    from neurojepa_pl.tools.analysis_common import json_ready, report_failed_scans, resolve_device
    from neurojepa_pl.tools.build_cache import settings_from_args

    if args.batch_size < 1:
        raise UserValueError(f"--batch-size must be >= 1; got {args.batch_size}.", "pass --batch-size 4.")
    settings = settings_from_args(args)
    rows = _select_rows(args)
    encoder = _load_encoder(args, settings)
    device = resolve_device(args.device)
    encoder = encoder.to(device).eval()
    layers = encoder.moe_layers()
    moe = layers[0].config
    patch = as_triple(encoder.config["patch_size"], "patch_size")
    grid = tuple(int(g) for g in encoder.grid_size)
    present = [m for m in MODALITIES if m in set(rows["modality"])]
    present += sorted(set(rows["modality"]) - set(present))
    acc = RoutingAccumulator(
        encoder.config["moe_block_indices"], encoder.num_patches, moe.num_experts, moe.top_k, present
    )
    placement = TokenGridPlacement(grid, patch)
    failures = FailureLog()
    dtype = getattr(torch, PRECISIONS[args.precision]) if PRECISIONS[args.precision] else None
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()

    paths = rows["path"].tolist()
    start = last = time.perf_counter()
    done = 0
    with RoutingRecorder(layers) as recorder, torch.no_grad():
        for batch in eval_loader(paths, settings, args.batch_size, args.num_workers):
            for index, reason in batch["failures"]:
                row = rows.iloc[index]
                failures.add(
                    ScanFailure(
                        str(row["path"]), reason, str(row["subject_id"]), str(row["session_id"]), str(row["modality"])
                    )
                )
            done += len(batch["failures"])
            if batch["image"] is None:
                continue
            images = batch["image"].to(device)
            with autocast:
                encoder(images)
            foreground = foreground_token_map(
                images, patch, min_fraction=args.min_foreground_fraction, method=args.foreground_method
            )
            modalities = [str(rows.at[int(i), "modality"]) for i in batch["index"]]
            acc.update(recorder.take(), foreground, modalities)
            placement.update(batch["affine"].numpy())
            done += len(modalities)
            now = time.perf_counter()
            if now - last > 30 or done == len(paths):
                rate = done / max(now - start, 1e-9)
                print(f"[routing] {done}/{len(paths)} scans, {rate:.2f} scans/s", file=sys.stderr, flush=True)
                last = now
    out = Path(args.out)
    report_failed_scans(failures, len(paths), args.max_failed_fraction, out)
    if acc.num_scans == 0:
        raise UserValueError(f"none of the {len(paths)} scans could be loaded.", f"see {out / 'skipped_scans.csv'}.")

    summary = summarize_routing(acc)
    for layer, entry in enumerate(summary["layers"]):
        entry["token_counts"] = acc.token_counts[layer].tolist()
    token_affine = placement.mean_affine()
    maps = routing_maps(acc, grid, token_affine)
    (out / "maps").mkdir(exist_ok=True)
    map_files = {}
    for name, image in maps.items():
        path = out / "maps" / f"{name}.nii.gz"
        image.to_filename(str(path))
        map_files[name] = str(path.relative_to(out))
    np.savez_compressed(
        out / "routing_arrays.npz",
        token_counts=acc.token_counts,
        token_weight_sum=acc.token_weight_sum,
        token_score_sum=acc.token_score_sum,
        foreground_scans=acc.foreground_scans,
        fg_counts=acc.fg_counts,
        bg_counts=acc.bg_counts,
        fg_tokens=acc.fg_tokens,
        bg_tokens=acc.bg_tokens,
        scans=acc.scans,
        blocks=np.asarray(acc.blocks),
        modalities=np.asarray(acc.modalities),
        token_affine=token_affine,
    )
    spread = placement.spread_mm()
    edge = placement.token_edge_mm()
    if spread > 0.5 * min(edge):
        print(
            f"[routing] warning: token centres of the scans spread over {spread:.1f} mm (token edge "
            f"{min(edge):.1f} mm): per-position statistics mix neighbouring anatomy; are the scans registered to "
            "MNI152 and skull-stripped?",
            file=sys.stderr,
        )
    figures = [] if args.no_figures else _write_figures(out, acc, summary, maps, args.tensorboard)
    payload = {
        "inputs": {
            "checkpoint": str(args.checkpoint),
            "which": args.which,
            "encoder": encoder.config,
            "manifest": str(Path(args.manifest).resolve()),
            "modalities": args.modalities,
            "split": args.split,
            "max_scans": args.max_scans,
            "seed": args.seed,
            "scans_selected": len(paths),
            "loading": {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.to_dict().items()},
            "foreground": {"method": args.foreground_method, "min_fraction": args.min_foreground_fraction},
            "device": str(device),
            "precision": args.precision,
            "batch_size": args.batch_size,
            "torch": torch.__version__,
        },
        "skipped_scans": [{"path": f.path, "reason": f.reason} for f in failures],
        "experts": list(range(1, moe.num_experts + 1)),
        **summary,
        "placement": {
            "space": "MNI152 (the scans' world coordinates)",
            "token_grid": list(grid),
            "token_affine": token_affine.tolist(),
            "token_edge_mm": edge,
            "token_centre_spread_mm": spread,
        },
        "outputs": {"maps": map_files, "arrays": "routing_arrays.npz", "figures": figures},
    }
    (out / "routing.json").write_text(json.dumps(json_ready(payload), indent=1, allow_nan=False) + "\n")
    return payload


def _write_figures(out: Path, acc: Any, summary: dict[str, Any], maps: dict[str, Any], tensorboard: bool) -> list[str]:
    from neurojepa_pl.analysis import routing_figures as rf

    template = rf.mni_template()
    foreground = acc.foreground_scans / max(1, acc.num_scans)
    figures: dict[str, Any] = {}
    for layer, entry in enumerate(summary["layers"]):
        block = entry["block"]
        tag = f"block{block:02d}"
        figures[f"{tag}_foreground_background"] = rf.foreground_background_figure(entry, acc.num_experts)
        figures[f"{tag}_modalities"] = rf.modality_figure(entry, acc.num_experts)
        figures[f"{tag}_token_expert"] = rf.token_expert_figure(
            acc.token_counts[layer], acc.num_scans, block, foreground
        )
        figures[f"{tag}_dominant_expert_mni"] = rf.dominant_expert_figure(
            maps[f"{tag}_dominant_expert"],
            maps["foreground_fraction"],
            acc.num_experts,
            f"block {block}: dominant expert per foreground token",
            template,
        )
        figures[f"{tag}_expert_share_mni"] = rf.expert_share_figure(maps[f"{tag}_expert_share"], block, template)
    folder = out / "figures"
    folder.mkdir(exist_ok=True)
    written = []
    for name, fig in figures.items():
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=110)
        written.append(str(path.relative_to(out)))
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))
        try:
            for name, fig in figures.items():
                block, _, kind = name.partition("_")
                writer.add_figure(f"routing/{block}/{kind}", fig, global_step=0, close=False)
        finally:
            writer.close()
    return written


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    payload = run_routing(args)
    out = Path(args.out)
    print(f"routing of {payload['num_scans']} scans ({payload['scans_by_modality']}) -> {out / 'routing.json'}")
    for entry in payload["layers"]:
        imbalance = np.asarray([np.nan if v is None else v for v in entry["fg_bg_imbalance"]], dtype=float)
        load = entry["load"]["all"]
        print(
            f"  block {entry['block']}: max/min violation {load['max_violation']:.2f}/{load['min_violation']:.2f}, "
            f"fg/bg imbalance |mean| {np.nanmean(np.abs(imbalance)):.2f}"
        )
    return 0
