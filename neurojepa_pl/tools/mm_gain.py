"""``neurojepa mm-gain``: the paper's multimodal gain, best multimodal minus best unimodal, with paired CIs.

Paper ("Multimodal Fusion Evaluation"): the multimodal gain of a task is the difference between the best performance
over all fusion methods and the best unimodal performance. For each requested metric this tool

1. reads every run's ``metrics.json`` and picks the best unimodal and the best multimodal run by that metric's test
   value (as the paper does: the best of the five fusions, the best of the unimodal runs);
2. pairs the two runs' ``predictions.csv`` rows on the shared test sessions (``subject_id`` + ``session_id``: the
   unimodal run scored the T1w scan, the fusion run the whole session);
3. reports the gain on those sessions with a paired, class-stratified percentile-bootstrap CI (the same resampled
   sessions for both runs) and a two-sided paired permutation p-value (via
   :func:`neurojepa_pl.tools.compare.compare_runs`).

Under the paper's protocol (fusion restricted to sessions with every modality, unimodal runs on the same sessions)
the shared set is the whole test set; when it is not, a warning says how many sessions each run has.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from neurojepa_pl.metrics.report import read_metrics_json
from neurojepa_pl.tools.compare import compare_runs

log = logging.getLogger(__name__)

__all__ = ["main", "multimodal_gain", "METRIC_ALIASES"]

METRIC_ALIASES = {"auprc": "ap", "aupr": "ap", "average_precision": "ap"}
"""Names users type for the metrics.json keys (the paper says AUPRC, metrics.json says ``ap``)."""

LOWER_IS_BETTER = ("mae", "rmse", "mse")


def _metrics_file(run: str | Path) -> Path:
    run = Path(run)
    return run / "metrics.json" if run.is_dir() else run


def _run_dir(run: str | Path) -> Path:
    return _metrics_file(run).parent


def _metric_value(report: dict, metric: str, run: Path) -> float:
    entry = report.get("metrics", {}).get(metric)
    if entry is None:
        raise ValueError(f"{run}: metrics.json has no metric {metric!r}; it has {sorted(report.get('metrics', {}))}.")
    if entry["value"] is None:
        raise ValueError(
            f"{run}: metric {metric!r} is undefined (null) in metrics.json, e.g. a test set with one "
            "class; it cannot enter the comparison."
        )
    return float(entry["value"])


def _best(runs: list[Path], reports: dict[Path, dict], metric: str) -> tuple[Path, float]:
    values = {run: _metric_value(reports[run], metric, run) for run in runs}
    best = max(values, key=values.get)
    return best, values[best]


def multimodal_gain(
    unimodal: list[str | Path],
    multimodal: list[str | Path],
    metrics: list[str] | None = None,
    n_boot: int = 1000,
    n_perm: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> pd.DataFrame:
    """Multimodal gain table (see the module docstring).

    Args:
        unimodal: unimodal run folders (each with ``metrics.json`` and ``predictions.csv``) or their metrics files.
        multimodal: fusion run folders, likewise.
        metrics: metrics.json keys (higher is better); ``auprc`` means ``ap``. Default ``["auroc", "ap"]``.
        n_boot: bootstrap resamples of the paired CI.
        n_perm: permutations of the paired permutation test.
        alpha: 1 - CI level.
        seed: seed of resampling and permutations.

    Returns:
        One row per metric: ``metric, best_unimodal, unimodal_value, best_multimodal, multimodal_value, n_shared,
        gain, gain_ci_low, gain_ci_high, p_value`` (``*_value`` from metrics.json; the gain and its CI on the shared
        test sessions).
    """
    if not unimodal or not multimodal:
        raise ValueError("give at least one unimodal and one multimodal run.")
    metrics = [METRIC_ALIASES.get(m, m) for m in (metrics or ["auroc", "ap"])]
    bad = [m for m in metrics if m in LOWER_IS_BETTER]
    if bad:
        raise ValueError(
            f"metrics {bad} are lower-is-better regression errors; the multimodal gain is defined for "
            "classification metrics such as auroc, ap, balanced_accuracy."
        )
    uni_runs = [_run_dir(r) for r in unimodal]
    mm_runs = [_run_dir(r) for r in multimodal]
    reports = {run: read_metrics_json(run / "metrics.json") for run in uni_runs + mm_runs}
    fused_as_unimodal = [str(r) for r in uni_runs if reports[r].get("fusion")]
    if fused_as_unimodal:
        raise ValueError(
            f"{fused_as_unimodal} are fusion runs (their metrics.json names a fusion) but were given as "
            "--unimodal; pass them to --multimodal."
        )
    rows = []
    for metric in metrics:
        best_uni, uni_value = _best(uni_runs, reports, metric)
        best_mm, mm_value = _best(mm_runs, reports, metric)
        paired = compare_runs(
            best_mm, best_uni, metric, n_perm=n_perm, n_boot=n_boot, alpha=alpha, seed=seed, join_on="subject"
        )
        n_runs = (reports[best_uni].get("n"), reports[best_mm].get("n"))
        if any(n is not None and n != paired["n"] for n in n_runs):
            log.warning(
                "%s: the best unimodal run has %s test rows and the best multimodal run %s, of which %d "
                "sessions are shared; the gain is computed on the shared ones only.",
                metric,
                n_runs[0],
                n_runs[1],
                paired["n"],
            )
        rows.append(
            {
                "metric": metric,
                "best_unimodal": str(best_uni),
                "unimodal_value": uni_value,
                "best_multimodal": str(best_mm),
                "multimodal_value": mm_value,
                "n_shared": paired["n"],
                "gain": paired["delta"][0],
                "gain_ci_low": paired["delta"][1],
                "gain_ci_high": paired["delta"][2],
                "p_value": paired["p_value"],
            }
        )
    table = pd.DataFrame(rows)
    table.attrs["ci_level"] = 1.0 - alpha
    return table


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="neurojepa mm-gain",
        description="Multimodal gain (paper): best multimodal run minus best unimodal run per metric, with a paired "
        "bootstrap CI and a paired permutation p-value on the shared test sessions.",
    )
    parser.add_argument(
        "--unimodal",
        nargs="+",
        required=True,
        metavar="RUN",
        help="unimodal run folders (metrics.json + predictions.csv), e.g. T1w-only and FLAIR-only",
    )
    parser.add_argument(
        "--multimodal",
        nargs="+",
        required=True,
        metavar="RUN",
        help="fusion run folders (e.g. the five fusion methods)",
    )
    parser.add_argument(
        "--metric",
        nargs="+",
        default=["auroc", "auprc"],
        help="metrics.json keys, higher is better (default: auroc auprc; auprc = ap)",
    )
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--n-perm", type=int, default=1000, help="permutations of the p-value (default 1000)")
    parser.add_argument("--alpha", type=float, default=0.05, help="1 - CI level (default 0.05)")
    parser.add_argument("--seed", type=int, default=0, help="seed of resampling and permutations")
    parser.add_argument("--out", default=None, help="write the table to this file (.json: records, else CSV)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s", stream=sys.stderr)
    table = multimodal_gain(
        args.unimodal,
        args.multimodal,
        args.metric,
        n_boot=args.n_boot,
        n_perm=args.n_perm,
        alpha=args.alpha,
        seed=args.seed,
    )
    level = int(round(100 * (1 - args.alpha)))
    print(f"multimodal gain = best multimodal - best unimodal ({level}% paired bootstrap CI)")
    with pd.option_context("display.width", 200, "display.max_colwidth", 60):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".json":
            out.write_text(table.to_json(orient="records", indent=2) + "\n")
        else:
            table.to_csv(out, index=False)
    return 0
