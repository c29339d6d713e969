"""``neurojepa fairness RUN [--columns site sex age ...]``: metrics per subgroup and fairness gaps of a test run
(the paper's Appendix H.3).

Reads the run's ``predictions.csv`` (a folder written by ``neurojepa test``), takes the subgroup columns from it or
from the manifest (recorded in ``metrics.json``, or ``--manifest``), computes each group's metrics with fairlearn's
``MetricFrame`` and the gap (max - min over a column's groups) with bootstrap CIs, flags small groups, merges the
result into ``metrics.json`` under ``"fairness"`` and draws ``figures/fairness.png``
(:mod:`neurojepa_pl.metrics.fairness`). ``neurojepa test`` does the same at the end of a run when the model's
``fairness_columns`` is set (``--model.init_args.fairness_columns [site,sex,age]`` or the YAML key).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "DEFAULT_COLUMNS"]

DEFAULT_COLUMNS = ("age", "sex", "site")
"""Subgroup columns used when none are named: those of them the predictions or the manifest have."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neurojepa fairness",
        description=(
            "Per-subgroup metrics (fairlearn MetricFrame) and fairness gaps (max - min across a column's groups) with "
            "bootstrap CIs for a test run; small groups are flagged and left out of the gap. Merges the result into "
            "RUN/metrics.json under 'fairness' and writes RUN/figures/fairness.png."
        ),
    )
    parser.add_argument("run", type=Path, help="run folder with predictions.csv and metrics.json (from neurojepa test)")
    parser.add_argument(
        "--columns",
        nargs="+",
        default=None,
        metavar="COL[:EDGES]",
        help="subgroup columns, e.g. site sex age or age:0:40:60:inf (numeric bins [a, b)); default: those of "
        f"{' '.join(DEFAULT_COLUMNS)} that exist (age in bins 0-45, 45-65, 65+)",
    )
    parser.add_argument(
        "--manifest", type=Path, default=None, help="manifest to take missing columns from (default: metrics.json's)"
    )
    parser.add_argument("--metrics", nargs="+", default=None, help="metrics per group (default: the task's set)")
    parser.add_argument("--task", default=None, help="override the task inferred from predictions.csv")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000; 0: no CIs)")
    parser.add_argument("--alpha", type=float, default=0.05, help="1 - CI level (default 0.05)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--min-samples", type=int, default=10, help="flag groups with fewer scans (default 10)")
    parser.add_argument(
        "--min-positives",
        type=int,
        default=5,
        help="flag groups whose rarest class (or events) has fewer scans (default 5)",
    )
    parser.add_argument("--no-figure", action="store_true", help="do not write figures/fairness.png")
    return parser


def _available_columns(run: Path, manifest: Path | None) -> list[str]:
    import json

    import pandas as pd

    header = list(pd.read_csv(run / "predictions.csv", nrows=0).columns)
    source = manifest
    if source is None and (run / "metrics.json").is_file():
        recorded = json.loads((run / "metrics.json").read_text()).get("manifest")
        source = Path(recorded) if recorded else None
    if source is not None and Path(source).is_file():
        header += list(pd.read_csv(source, nrows=0).columns)
    return [c for c in DEFAULT_COLUMNS if c in header]


def _format(report: dict[str, Any]) -> str:
    lines = [f"fairness of {report['n']} test scans (task {report['task']}, {report['ci_level']:.0%} bootstrap CIs)"]
    for name, result in report["columns"].items():
        lines.append(f"{name} ({result['spec']}; {result['n_missing']} missing):")
        for group in result["groups"]:
            values = ", ".join(
                f"{m} {v['value']:.3f}"
                + (f" [{v['ci_low']:.3f}, {v['ci_high']:.3f}]" if v["ci_low"] is not None else "")
                if v["value"] is not None
                else f"{m} undefined"
                for m, v in group["metrics"].items()
            )
            flag = f"  FLAGGED: {'; '.join(group['flags'])}" if group["flags"] else ""
            lines.append(f"  {group['group']:<12} n={group['n']:<5} {values}{flag}")
        if result["gap"]:
            gaps = ", ".join(
                f"{m} {v['value']:.3f}"
                + (f" [{v['ci_low']:.3f}, {v['ci_high']:.3f}]" if v["ci_low"] is not None else "")
                for m, v in result["gap"].items()
                if v["value"] is not None
            )
            lines.append(f"  gap (max - min over {', '.join(result['gap_groups'])}): {gaps}")
        else:
            lines.append(f"  {result['note']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from neurojepa_pl.errors import UserError, UserKeyError, UserValueError
    from neurojepa_pl.metrics.fairness import SubgroupColumn, evaluate_run_fairness

    run = args.run
    if run.name == "predictions.csv":
        run = run.parent
    if not (run / "predictions.csv").is_file():
        raise UserValueError(f"no predictions.csv in {run}.", "pass the run folder `neurojepa test` wrote into.")
    columns = args.columns or _available_columns(run, args.manifest)
    if not columns:
        raise UserValueError(
            f"none of the default subgroup columns {list(DEFAULT_COLUMNS)} is in {run / 'predictions.csv'} or the "
            "manifest.",
            "name the columns with --columns (and the manifest holding them with --manifest).",
        )
    try:
        specs = [SubgroupColumn.parse(c) for c in columns]
        report = evaluate_run_fairness(
            run,
            specs,
            manifest=args.manifest,
            task=args.task,
            figure=not args.no_figure,
            metrics=args.metrics,
            n_boot=args.n_boot,
            alpha=args.alpha,
            seed=args.seed,
            min_samples=args.min_samples,
            min_positives=args.min_positives,
        )
    except UserError:
        raise
    except KeyError as err:
        raise UserKeyError(str(err.args[0]) if err.args else str(err), "check --columns and --manifest.") from err
    except ValueError as err:
        raise UserValueError(str(err), "check --columns, --metrics and --manifest.") from err
    print(_format(report))
    print(
        f"written: {run / 'metrics.json'} ('fairness')"
        + ("" if args.no_figure else f", {run / 'figures' / 'fairness.png'}")
    )
    return 0
