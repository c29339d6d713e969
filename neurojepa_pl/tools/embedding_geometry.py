"""``neurojepa embedding-geometry --backbone NAME=SRC ... --manifest M --out DIR``: t-SNE of frozen embeddings per
modality, coloured by age group, with silhouette scores per backbone (the paper's Appendix H.4).

Every backbone (``NAME=SRC`` for weights :func:`neurojepa_pl.models.load_backbone` reads; ``NAME=random`` for a
random initialisation of the first loaded backbone's architecture, ``NAME=random:REGISTRY`` of a registry
architecture) embeds the same scans, streamed once through the evaluation loading chain (docs/method.md §1.2, §1.5);
the tokens are pooled without training (``--pooling mean``, the paper's average, or ``fg_mean`` over foreground
tokens). Scans whose age falls in an age group (default: the paper's Young 0-24, Adult 35-44, Senior 65+) enter.
Per modality and backbone: a seeded 2-D t-SNE and the silhouette score of the age groups in the t-SNE plane and in the
feature space. Written into ``--out``: ``embedding_geometry.json`` (inputs, counts, scores), ``points.csv`` (one row
per scan and backbone with its t-SNE coordinates) and ``embedding_geometry.png`` (rows: modalities, columns:
backbones, side by side).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main", "build_parser", "run_geometry", "parse_backbone"]

RANDOM = "random"


def parse_backbone(text: str) -> tuple[str, str]:
    """``NAME=SRC`` -> ``(NAME, SRC)``; a bare ``random`` or ``random:REGISTRY`` is named after itself."""
    name, sep, source = text.partition("=")
    if not sep:
        if text == RANDOM or text.startswith(RANDOM + ":"):
            return text, text
        raise argparse.ArgumentTypeError(f"expected NAME=SRC (e.g. jepa=runs/demo/export) or 'random'; got {text!r}")
    if not name or not source:
        raise argparse.ArgumentTypeError(f"expected NAME=SRC with both parts; got {text!r}")
    return name, source


def build_parser() -> argparse.ArgumentParser:
    from neurojepa_pl.features import POOLINGS
    from neurojepa_pl.tools.build_cache import add_transform_arguments

    parser = argparse.ArgumentParser(
        prog="neurojepa embedding-geometry",
        description=(
            "t-SNE of frozen pooled embeddings per modality coloured by age group, with silhouette scores per "
            "backbone in the t-SNE plane and in feature space; several backbones side by side (e.g. pretrained, "
            "random init, released weights). Writes OUT/embedding_geometry.json, points.csv, embedding_geometry.png."
        ),
    )
    parser.add_argument(
        "--backbone",
        dest="backbones",
        action="append",
        type=parse_backbone,
        required=True,
        metavar="NAME=SRC",
        help="a backbone (repeatable): NAME=weights (exported folder, .ckpt, reference checkpoint, .safetensors), "
        "NAME=random (random init of the first loaded backbone's architecture, seeded by --seed) or "
        "NAME=random:REGISTRY (e.g. random:vit_tiny_moe)",
    )
    parser.add_argument(
        "--which", choices=("target", "context"), default="target", help="encoder of checkpoints holding both"
    )
    parser.add_argument("--manifest", required=True, type=Path, help="per-scan manifest CSV with an age column")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (created)")
    parser.add_argument("--modalities", nargs="+", default=None, metavar="MOD", help="modalities (default: all)")
    parser.add_argument(
        "--split", nargs="+", default=None, metavar="SPLIT", help="use only these splits (default: all)"
    )
    parser.add_argument(
        "--age-groups",
        nargs="+",
        default=None,
        metavar="NAME:LOW:HIGH",
        help="half-open age groups [LOW, HIGH) in years (default: the paper's Young:0:25 Adult:35:45 Senior:65:inf)",
    )
    parser.add_argument(
        "--per-group", type=int, default=None, metavar="N", help="at most N scans per (modality, age group), seeded"
    )
    parser.add_argument("--pooling", choices=POOLINGS, default="mean", help="token pooling (default mean)")
    parser.add_argument(
        "--perplexity", type=float, default=30.0, help="t-SNE perplexity (default 30; capped at (n-1)/3)"
    )
    parser.add_argument(
        "--silhouette-metric", default="euclidean", help="distance of the feature-space silhouette (default euclidean)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling, random init and t-SNE (default 0)")
    parser.add_argument("--batch-size", type=int, default=4, help="scans per forward (default 4)")
    parser.add_argument("--num-workers", type=int, default=0, help="loader worker processes (default 0)")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda', ...")
    parser.add_argument(
        "--max-failed-fraction", type=float, default=0.01, help="stop when more scans than this fraction fail to load"
    )
    add_transform_arguments(parser)
    return parser


def _groups(args: argparse.Namespace) -> list[Any]:
    from neurojepa_pl.analysis.embedding import PAPER_AGE_GROUPS, parse_age_group
    from neurojepa_pl.errors import UserValueError

    try:
        return [parse_age_group(t) for t in args.age_groups] if args.age_groups else list(PAPER_AGE_GROUPS)
    except ValueError as err:
        raise UserValueError(
            str(err), "write each group as NAME:LOW:HIGH, e.g. --age-groups Young:0:25 Senior:65:inf."
        ) from err


def _rows(args: argparse.Namespace, groups: list[Any]) -> Any:
    import pandas as pd

    from neurojepa_pl.analysis.embedding import assign_age_groups
    from neurojepa_pl.errors import UserValueError
    from neurojepa_pl.tools.analysis_common import select_rows

    frame = select_rows(args.manifest, args.modalities, args.split, required=("age",))
    frame["age"] = pd.to_numeric(frame["age"], errors="coerce")
    try:
        frame["age_group"] = assign_age_groups(frame["age"].to_numpy(), groups)
    except ValueError as err:
        raise UserValueError(str(err), "pass disjoint --age-groups.") from err
    frame = frame[frame["age_group"].notna()]
    if frame.empty:
        raise UserValueError(
            f"no scan of {args.manifest} has an age in the groups {[g.describe() for g in groups]}.",
            "check the age column or pass --age-groups that cover the cohort's ages.",
        )
    if args.per_group is not None:
        cells = frame.groupby(["modality", "age_group"], sort=False)
        frame = pd.concat([c.sample(n=min(len(c), args.per_group), random_state=args.seed) for _, c in cells])
        frame = frame.sort_index()
    return frame.reset_index(drop=True)


def _backbones(args: argparse.Namespace, settings: Any) -> dict[str, Any]:
    import torch

    from neurojepa_pl.errors import UserValueError
    from neurojepa_pl.models import build_encoder, load_backbone
    from neurojepa_pl.models.vit3d import VisionTransformer3D
    from neurojepa_pl.tools.analysis_common import check_input_size

    names = [name for name, _ in args.backbones]
    if len(set(names)) != len(names):
        raise UserValueError(
            f"backbone names must be distinct; got {names}.", "name each --backbone NAME=SRC uniquely."
        )
    loaded: dict[str, Any] = {}
    for name, source in args.backbones:
        if source != RANDOM and not source.startswith(RANDOM + ":"):
            loaded[name] = load_backbone(source, which=args.which)
    backbones: dict[str, Any] = {}
    for name, source in args.backbones:
        if source == RANDOM:
            if not loaded:
                raise UserValueError(
                    "a 'random' backbone copies the architecture of a loaded one, and none is given.",
                    "add a --backbone NAME=SRC, or name the architecture: --backbone random:vit_tiny_moe.",
                )
            torch.manual_seed(args.seed)
            backbones[name] = VisionTransformer3D(**next(iter(loaded.values())).config)
        elif source.startswith(RANDOM + ":"):
            torch.manual_seed(args.seed)
            backbones[name] = build_encoder(source.split(":", 1)[1])
        else:
            backbones[name] = loaded[name]
        check_input_size(backbones[name], settings, f"backbone {name!r} ({source})")
    return backbones


def run_geometry(args: argparse.Namespace) -> dict[str, Any]:
    """Run the analysis for parsed arguments (see :func:`build_parser`); returns the JSON payload."""
    import pandas as pd
    import torch

    from neurojepa_pl.analysis.embedding import geometry_figure, silhouette, tsne_projection
    from neurojepa_pl.data_modules.datasets import FailureLog, ScanFailure
    from neurojepa_pl.features import eval_loader, pool_tokens
    from neurojepa_pl.tools.analysis_common import json_ready, report_failed_scans, resolve_device
    from neurojepa_pl.tools.build_cache import settings_from_args

    settings = settings_from_args(args)
    groups = _groups(args)
    rows = _rows(args, groups)
    device = resolve_device(args.device)
    backbones = {name: b.to(device).eval() for name, b in _backbones(args, settings).items()}
    features: dict[str, list[np.ndarray]] = {name: [] for name in backbones}
    kept: list[int] = []
    failures = FailureLog()
    paths = rows["path"].tolist()
    with torch.no_grad():
        for batch in eval_loader(paths, settings, args.batch_size, args.num_workers):
            for index, reason in batch["failures"]:
                row = rows.iloc[index]
                failures.add(ScanFailure(str(row["path"]), reason, str(row["subject_id"]), str(row["session_id"])))
            if batch["image"] is None:
                continue
            images = batch["image"].to(device)
            for name, backbone in backbones.items():
                pooled = pool_tokens(backbone(images), images, args.pooling, backbone.config["patch_size"])
                features[name].append(pooled.float().cpu().numpy())
            kept += batch["index"].tolist()
            print(f"[embedding-geometry] {len(kept)}/{len(paths)} scans", file=sys.stderr, flush=True)
    out = Path(args.out)
    report_failed_scans(failures, len(paths), args.max_failed_fraction, out)
    used = rows.iloc[kept].reset_index(drop=True)
    stacked = {name: np.concatenate(chunks) for name, chunks in features.items()}

    results: dict[str, dict[str, Any]] = {}
    panels: dict[str, dict[str, dict[str, Any]]] = {}
    points = []
    for modality in dict.fromkeys(used["modality"]):
        chosen = (used["modality"] == modality).to_numpy()
        labels = used.loc[chosen, "age_group"].to_numpy().astype(str)
        counts = {g.name: int((labels == g.name).sum()) for g in groups}
        results[modality] = {"n": int(chosen.sum()), "groups": counts, "backbones": {}}
        panels[modality] = {}
        if chosen.sum() < 4:
            results[modality]["skipped"] = f"only {int(chosen.sum())} scans (t-SNE needs at least 4)"
            continue
        for name, values in stacked.items():
            feats = values[chosen]
            projected, perplexity = tsne_projection(feats, seed=args.seed, perplexity=args.perplexity)
            entry = {
                "silhouette_tsne": silhouette(projected, labels),
                "silhouette_features": silhouette(feats, labels, metric=args.silhouette_metric),
                "perplexity": perplexity,
                "feature_dim": int(feats.shape[1]),
            }
            results[modality]["backbones"][name] = entry
            panels[modality][name] = {"points": projected, "labels": labels, **entry}
            subset = used.loc[chosen, ["subject_id", "session_id", "modality", "path", "age", "age_group"]].copy()
            subset.insert(0, "backbone", name)
            subset["tsne_x"], subset["tsne_y"] = projected[:, 0], projected[:, 1]
            points.append(subset)
    if points:
        pd.concat(points).to_csv(out / "points.csv", index=False)
    drawn = {m: p for m, p in panels.items() if p}
    if drawn:
        geometry_figure(drawn, groups).savefig(out / "embedding_geometry.png", dpi=110)
    payload = {
        "inputs": {
            "backbones": {name: source for name, source in args.backbones},
            "which": args.which,
            "manifest": str(Path(args.manifest).resolve()),
            "modalities": args.modalities,
            "split": args.split,
            "age_groups": [{"name": g.name, "low": g.low, "high": g.high} for g in groups],
            "per_group": args.per_group,
            "pooling": args.pooling,
            "perplexity": args.perplexity,
            "silhouette_metric": args.silhouette_metric,
            "seed": args.seed,
            "loading": {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.to_dict().items()},
            "device": str(device),
            "torch": torch.__version__,
        },
        "skipped_scans": [{"path": f.path, "reason": f.reason} for f in failures],
        "modalities": results,
        "outputs": {"figure": "embedding_geometry.png" if drawn else None, "points": "points.csv" if points else None},
    }
    (out / "embedding_geometry.json").write_text(json.dumps(json_ready(payload), indent=1, allow_nan=False) + "\n")
    return payload


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    payload = run_geometry(args)
    print(f"embedding geometry -> {Path(args.out) / 'embedding_geometry.json'}")
    for modality, result in payload["modalities"].items():
        print(f"  {modality} (n={result['n']}, {result['groups']}):")
        for name, entry in result["backbones"].items():
            print(f"    {name:<16} silhouette t-SNE {entry['silhouette_tsne']:+.3f}  "
                  f"features {entry['silhouette_features']:+.3f}")  # fmt: skip
    return 0
