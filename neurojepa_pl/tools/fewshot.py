"""``neurojepa fewshot``: the few-shot protocol (paper "Few-shots Evaluation"; docs/method.md §8.8).

For every k and every repetition r, fine-tune on a fresh few-shot draw of the training split
(``--data.init_args.k_shot k --data.init_args.few_shot_seed r``; val and test stay whole), then test, through the
same LightningCLI as ``neurojepa fit``. Each run writes its ``metrics.json`` / ``predictions.csv`` into
``OUT/k<k>/seed<r>/``. The summary gives, per k and metric, the mean over repetitions with a t-based 95% CI
(``mean ± t(0.975, R-1) · sd / sqrt(R)``), printed and written to ``OUT/fewshot_summary.csv``; every run's values go
to ``OUT/fewshot_runs.csv``.

The model is tested with the best validation checkpoint when the config has a ``ModelCheckpoint`` that wrote one,
otherwise with the weights at the end of training (e.g. under ``--trainer.fast_dev_run``).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from neurojepa_pl.metrics.report import read_metrics_json

__all__ = ["main", "run_fewshot", "summarise_runs"]


def _run_one(configs: Sequence[str], overrides: Sequence[str], k: int, seed: int, out_dir: Path) -> dict:
    from neurojepa_pl.cli import lightning_main

    args = ["fit"]
    for config in configs:
        args += ["--config", config]
    args += list(overrides)
    args += [
        "--data.init_args.k_shot",
        str(k),
        "--data.init_args.few_shot_seed",
        str(seed),
        "--model.init_args.output_dir",
        str(out_dir),
    ]
    cli = lightning_main(args)
    checkpoint = getattr(cli.trainer, "checkpoint_callback", None)
    best = getattr(checkpoint, "best_model_path", "") if checkpoint is not None else ""
    cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best or None)
    return read_metrics_json(out_dir / "metrics.json")


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)`` of a t-based CI over repetitions; NaN bounds with a single finite value."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(x.mean())
    if x.size < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, df=x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def summarise_runs(runs: pd.DataFrame, metrics: Sequence[str], level: float = 0.95) -> pd.DataFrame:
    """Per-k mean and CI over repetitions of the given metrics (``runs`` has columns k, seed, <metric>...)."""
    rows = []
    for k, group in runs.groupby("k", sort=True):
        for metric in metrics:
            mean, low, high = t_interval(group[metric].tolist(), level)
            rows.append(
                {
                    "k": int(k),
                    "metric": metric,
                    "mean": mean,
                    "ci_low": low,
                    "ci_high": high,
                    "repeats": int(group[metric].notna().sum()),
                }
            )
    return pd.DataFrame(rows)


def run_fewshot(
    configs: Sequence[str],
    ks: Sequence[int],
    repeats: int,
    out: Path,
    overrides: Sequence[str] = (),
    metrics: Sequence[str] | None = None,
    first_seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run the grid and return ``(runs, summary)`` tables (also written to ``out``)."""
    if repeats < 1 or not ks or any(k < 1 for k in ks):
        raise ValueError(f"need repeats >= 1 and every k >= 1; got k={list(ks)}, repeats={repeats}.")
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for k in ks:
        for seed in range(first_seed, first_seed + repeats):
            report = _run_one(configs, overrides, k, seed, out / f"k{k}" / f"seed{seed}")
            row = {"k": k, "seed": seed, "task": report["task"], "n_test": report["n"]}
            row.update({name: entry["value"] for name, entry in report["metrics"].items()})
            records.append(row)
    runs = pd.DataFrame(records)
    if metrics is None:
        task = runs["task"].iloc[0]
        metrics = {"regression": ["mae", "rmse", "r2"], "survival": ["cindex"]}.get(task, ["auroc", "ap"])
    unknown = [m for m in metrics if m not in runs.columns]
    if unknown:
        raise ValueError(
            f"metrics {unknown} are not in the runs' metrics.json; available: "
            f"{[c for c in runs.columns if c not in ('k', 'seed', 'task', 'n_test')]}."
        )
    summary = summarise_runs(runs, metrics)
    runs.to_csv(out / "fewshot_runs.csv", index=False)
    summary.to_csv(out / "fewshot_summary.csv", index=False)
    return runs, summary


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="neurojepa fewshot",
        allow_abbrev=False,
        description="Few-shot grid: for each k and repetition, fit on k training rows per class (per age quartile "
        "for regression) drawn with few_shot_seed = repetition, test, and report the mean and 95% CI "
        "over repetitions per k. Unknown options (e.g. --trainer.max_epochs 5) are passed to every "
        "`neurojepa fit`.",
    )
    parser.add_argument(
        "--config",
        action="append",
        required=True,
        help="experiment YAML (repeatable, stacked like `neurojepa fit --config`)",
    )
    parser.add_argument("--k", type=int, nargs="+", required=True, help="shots per class, e.g. --k 1 2 4 8 16")
    parser.add_argument("--repeats", type=int, default=5, help="draws per k (paper: 5)")
    parser.add_argument("--first-seed", type=int, default=0, help="few_shot_seed of the first repetition")
    parser.add_argument("--out", default="runs/fewshot", help="output folder (default runs/fewshot)")
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=None,
        help="metrics to summarise (default: auroc ap; mae rmse r2 for regression)",
    )
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("--data.init_args.k_shot") or o.startswith("--data.init_args.few_shot")]
    if bad:
        parser.error(f"{bad} are set by the tool from --k and the repetition; remove them.")
    _, summary = run_fewshot(
        args.config, args.k, args.repeats, Path(args.out), overrides, args.metrics, args.first_seed
    )
    with pd.option_context("display.width", 120, "display.max_columns", 10):
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\nwritten: {Path(args.out) / 'fewshot_summary.csv'} and {Path(args.out) / 'fewshot_runs.csv'}")
    return 0
