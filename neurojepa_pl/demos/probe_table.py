"""The demo's downstream stage: a probe table on one SynthBrain split.

    python -m neurojepa_pl.demos.probe_table --workdir runs/demo \
        --checkpoint runs/demo/pretrain/version_0/checkpoints/final.ckpt

Three runs, each ``neurojepa fit`` then ``neurojepa test --ckpt_path best`` through the same LightningCLI, on the same
manifest, label, modality and seeded patient-level split:

1. ``jepa_probe``: attentive probe (frozen backbone, docs/method.md §8.2) on the JEPA-pretrained encoder
   (``experiments/finetune/synth_tumour_probe.yaml`` + ``--model.init_args.checkpoint CKPT``; the EMA target encoder),
   with a depth-1 head (the cross-attention pooler alone) instead of the YAML's 3 blocks, for CPU time;
2. ``random_probe``: the same probe on a randomly initialised encoder of the same architecture (the floor that says
   how much of the probe's result the pretraining earned);
3. ``cnn_scratch``: the from-scratch CNN baseline (``experiments/finetune/synth_tumour_cnn.yaml``), trained end to
   end, at a reduced width (:data:`SMALL_CNN`) so it fits a CPU budget; the paper's is 32.6M parameters.

The encoder architecture and the preprocessing grid are read from the pretraining checkpoint's hyper-parameters
(``encoder`` / ``encoder_overrides``; the data module's ``spatial_size``, ``resize_to``, ``pad_crop_size``,
``target_spacing``; :func:`neurojepa_pl.pretrain_run.read_pretraining_setup`), so the downstream runs see exactly what
the encoder was pretrained on. Each run writes ``metrics.json`` (bootstrap 95% CIs), ``predictions.csv`` and
``figures/`` into ``WORKDIR/probe/<run>/``, and the table is written to ``WORKDIR/probe/probe_table.csv``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from neurojepa_pl.metrics.report import read_metrics_json
from neurojepa_pl.pretrain_run import DATA_SETTING_KEYS, PretrainingSetup, read_pretraining_setup

__all__ = [
    "PretrainingSetup",
    "ProbeRun",
    "read_pretraining_setup",
    "plan_runs",
    "fit_and_test",
    "run_probe_table",
    "report_row",
    "cli_value",
    "format_with_ci",
    "format_probe_table",
    "main",
    "SMALL_CNN",
    "DATA_SETTING_KEYS",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
PROBE_CONFIG = REPO_ROOT / "experiments" / "finetune" / "synth_tumour_probe.yaml"
CNN_CONFIG = REPO_ROOT / "experiments" / "finetune" / "synth_tumour_cnn.yaml"

SMALL_CNN: dict[str, Any] = {"widths": [8, 16, 32, 32], "feat_dim": 64, "hidden_dim": 32, "pool_grid": [2, 2, 2]}
"""CPU-sized CNN baseline (same 4-stage design, ~1/1000 of the paper's parameters)."""


def cli_value(value: Any) -> str:
    # JSON is valid YAML, which is how LightningCLI parses dict / list / null values on the command line.
    return json.dumps(value)


@dataclass(frozen=True)
class ProbeRun:
    """One row of the table: a name (its output folder), a description, its experiment YAML and CLI overrides."""

    name: str
    description: str
    config: Path
    overrides: tuple[str, ...]


def plan_runs(
    workdir: Path,
    manifest: Path,
    pretrained_checkpoint: Path,
    setup: PretrainingSetup,
    *,
    task_label: str = "tumour",
    modality: str = "FLAIR",
    epochs: int = 15,
    cnn_epochs: int = 15,
    probe_lr: float = 1e-3,
    probe_head_depth: int = 1,
    cnn_lr: float = 1e-3,
    cnn_kwargs: dict[str, Any] | None = None,
    extra_args: Sequence[str] = (),
) -> list[ProbeRun]:
    """The three runs of the table with their full ``neurojepa fit`` overrides (see the module docstring)."""
    cnn_kwargs = dict(SMALL_CNN if cnn_kwargs is None else cnn_kwargs)
    out = Path(workdir) / "probe"
    shared = [
        "--data.init_args.manifest",
        str(manifest),
        "--data.init_args.cache_dir",
        str(Path(workdir) / "cache"),
        "--data.init_args.label_columns",
        cli_value([task_label]),
        "--data.init_args.modality",
        modality,
        *(arg for key, value in setup.data_settings.items() for arg in (f"--data.init_args.{key}", cli_value(value))),
        "--trainer.logger.init_args.save_dir",
        str(out),
        "--trainer.default_root_dir",
        str(out),
    ]
    backbone_name, backbone_kwargs = setup.backbone_args()
    backbone = [
        "--model.init_args.backbone",
        backbone_name,
        "--model.init_args.backbone_kwargs",
        cli_value(backbone_kwargs),
    ]
    probe = [
        *backbone,
        "--model.init_args.head_depth",
        str(probe_head_depth),
        "--model.init_args.lr",
        str(probe_lr),
        "--trainer.max_epochs",
        str(epochs),
    ]
    cnn_label = "x".join(str(w) for w in cnn_kwargs.get("widths", ()))
    runs = [
        ProbeRun(
            "jepa_probe",
            f"attentive probe (depth {probe_head_depth}), JEPA-pretrained encoder (frozen)",
            PROBE_CONFIG,
            (*probe, "--model.init_args.checkpoint", str(pretrained_checkpoint)),
        ),
        ProbeRun(
            "random_probe",
            f"attentive probe (depth {probe_head_depth}), random-init encoder (frozen)",
            PROBE_CONFIG,
            tuple(probe),
        ),
        ProbeRun(
            "cnn_scratch",
            f"CNN from scratch (small: widths {cnn_label})",
            CNN_CONFIG,
            (
                "--model.init_args.backbone_kwargs",
                cli_value(cnn_kwargs),
                "--model.init_args.lr",
                str(cnn_lr),
                "--trainer.max_epochs",
                str(cnn_epochs),
            ),
        ),
    ]
    return [
        ProbeRun(
            run.name,
            run.description,
            run.config,
            (
                *shared,
                *run.overrides,
                "--trainer.logger.init_args.name",
                run.name,
                "--model.init_args.output_dir",
                str(out / run.name),
                *extra_args,
            ),
        )
        for run in runs
    ]


def fit_and_test(config: Path, overrides: Sequence[str], out_dir: Path) -> dict:
    """``neurojepa fit --config CONFIG OVERRIDES``, then test the best validation checkpoint in the same process.

    ``best`` needs the fit's ``ModelCheckpoint`` (both finetune YAMLs monitor ``val/selection``), which only the
    trainer that ran the fit knows, hence one process (as ``neurojepa fewshot`` does).

    Returns:
        The run's ``metrics.json`` (read back from ``out_dir``, which the overrides must point the model's
        ``output_dir`` at).
    """
    from neurojepa_pl.cli import lightning_main

    args = ["fit", "--config", str(config), *overrides]
    print("[demo] neurojepa " + " ".join(args))
    cli = lightning_main(args)
    cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best")
    return read_metrics_json(Path(out_dir) / "metrics.json")


def _test_scans(out_dir: Path) -> list[tuple[str, str]]:
    frame = pd.read_csv(out_dir / "predictions.csv", dtype=str)
    return sorted(zip(frame["subject_id"], frame["session_id"]))


def report_row(
    report: dict, seconds: float, metrics: Sequence[str] = ("auroc", "ap", "balanced_accuracy"), **columns: Any
) -> dict[str, Any]:
    """One table row from a run's ``metrics.json``: ``columns`` (the run's identity), then each metric with its CI
    bounds (``<m>``, ``<m>_ci_low``, ``<m>_ci_high``), ``n_test`` and ``fit_test_seconds``."""
    row: dict[str, Any] = dict(columns)
    for name in metrics:
        entry = report["metrics"][name]
        row.update({name: entry["value"], f"{name}_ci_low": entry["ci_low"], f"{name}_ci_high": entry["ci_high"]})
    row.update(n_test=int(report["n"]), fit_test_seconds=round(seconds, 1))
    return row


def run_probe_table(
    workdir: Path,
    manifest: Path,
    pretrained_checkpoint: Path,
    *,
    task_label: str = "tumour",
    modality: str = "FLAIR",
    epochs: int = 15,
    cnn_epochs: int = 15,
    probe_lr: float = 1e-3,
    probe_head_depth: int = 1,
    cnn_lr: float = 1e-3,
    cnn_kwargs: dict[str, Any] | None = None,
    extra_args: Sequence[str] = (),
) -> list[dict]:
    """Fit and test the three runs on the same split and return one row per run.

    Args:
        workdir: outputs go to ``workdir/probe/<run>/``; the scan cache is ``workdir/cache`` (shared with pretraining
            when the grids agree).
        manifest: per-scan manifest with a ``task_label`` column (SynthBrain's ``manifest.csv``).
        pretrained_checkpoint: a JEPA pretraining Lightning checkpoint (its EMA target encoder is probed).
        task_label: binary label column.
        modality: the one contrast the downstream runs read.
        epochs: probe epochs (both probes).
        cnn_epochs: CNN epochs.
        probe_lr: peak learning rate of the probes' attentive head.
        probe_head_depth: attentive head blocks including the cross-attention block. The YAML's 3 (docs/method.md §8.2
            fine-tuning) costs several times more CPU per step than 1 (the cross-attention pooler alone), and did
            not help on SynthBrain tumour presence, so the demo uses 1.
        cnn_lr: peak learning rate of the CNN.
        cnn_kwargs: CNN size (default :data:`SMALL_CNN`).
        extra_args: more ``neurojepa fit`` arguments for every run, e.g. ``["--data.init_args.num_workers", "0"]``.

    Returns:
        Rows ``{"run", "description", "auroc", "auroc_ci_low", "auroc_ci_high", "ap", ..., "balanced_accuracy", ...,
        "n_test", "fit_test_seconds"}`` in the order jepa_probe, random_probe, cnn_scratch; also written to
        ``workdir/probe/probe_table.csv``.

    Raises:
        RuntimeError: if the runs were tested on different scans (the comparison would be meaningless).
    """
    setup = read_pretraining_setup(pretrained_checkpoint)
    runs = plan_runs(
        workdir,
        manifest,
        pretrained_checkpoint,
        setup,
        task_label=task_label,
        modality=modality,
        epochs=epochs,
        cnn_epochs=cnn_epochs,
        probe_lr=probe_lr,
        probe_head_depth=probe_head_depth,
        cnn_lr=cnn_lr,
        cnn_kwargs=cnn_kwargs,
        extra_args=extra_args,
    )
    rows, scans = [], {}
    for run in runs:
        out_dir = Path(workdir) / "probe" / run.name
        start = time.perf_counter()
        report = fit_and_test(run.config, run.overrides, out_dir)
        rows.append(report_row(report, time.perf_counter() - start, run=run.name, description=run.description))
        scans[run.name] = _test_scans(out_dir)
    reference = runs[0].name
    differing = [name for name, test in scans.items() if test != scans[reference]]
    if differing:
        raise RuntimeError(
            f"runs {differing} were tested on other scans than {reference!r} (see their "
            "predictions.csv); the runs must share manifest, data seed and split fractions."
        )
    pd.DataFrame(rows).to_csv(Path(workdir) / "probe" / "probe_table.csv", index=False)
    return rows


def format_with_ci(value: float | None, low: float | None, high: float | None) -> str:
    def fmt(x: float | None) -> str:
        return "nan" if x is None or not math.isfinite(x) else f"{x:.3f}"

    return f"{fmt(value)} [{fmt(low)}, {fmt(high)}]"


def format_probe_table(rows: Sequence[dict]) -> str:
    """Markdown table: run, test AUROC [95% CI], AUPRC [95% CI], balanced accuracy, n_test, fit+test time."""
    header = ["run", "test AUROC [95% CI]", "AUPRC [95% CI]", "balanced acc.", "n_test", "fit+test s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for row in rows:
        bacc = row["balanced_accuracy"]
        cells = [
            f"{row['run']}: {row['description']}",
            format_with_ci(row["auroc"], row["auroc_ci_low"], row["auroc_ci_high"]),
            format_with_ci(row["ap"], row["ap_ci_low"], row["ap_ci_high"]),
            "nan" if bacc is None or not math.isfinite(bacc) else f"{bacc:.3f}",
            str(row["n_test"]),
            f"{row['fit_test_seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m neurojepa_pl.demos.probe_table",
        allow_abbrev=False,
        description="Probe table on one SynthBrain split: attentive probe on the JEPA-pretrained encoder, the same "
        "probe on a random encoder, and a small from-scratch CNN; prints test AUROC / AUPRC with "
        "bootstrap 95% CIs. Unknown options (e.g. --data.init_args.num_workers 0) go to every "
        "`neurojepa fit`.",
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path("runs/demo"), help="demo folder (outputs in WORKDIR/probe)"
    )
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="JEPA pretraining .ckpt (e.g. the demo's final.ckpt)"
    )
    parser.add_argument("--manifest", type=Path, default=None, help="default: WORKDIR/synthbrain/manifest.csv")
    parser.add_argument("--label", default="tumour", help="binary label column (default tumour)")
    parser.add_argument("--modality", default="FLAIR", help="contrast to read (default FLAIR)")
    parser.add_argument("--epochs", type=int, default=15, help="probe epochs (default 15)")
    parser.add_argument("--cnn-epochs", type=int, default=15, help="CNN epochs (default 15)")
    parser.add_argument("--probe-lr", type=float, default=1e-3, help="probe head peak lr (default 1e-3)")
    parser.add_argument(
        "--head-depth",
        type=int,
        default=1,
        help="attentive head depth incl. the cross-attention block (default 1; the YAML's 3 is slower)",
    )
    parser.add_argument("--cnn-lr", type=float, default=1e-3, help="CNN peak lr (default 1e-3)")
    args, extra = parser.parse_known_args(argv)
    manifest = args.manifest or args.workdir / "synthbrain" / "manifest.csv"
    if not manifest.is_file():
        parser.error(f"manifest {manifest} not found; generate the cohort (`neurojepa synth`) or pass --manifest.")
    rows = run_probe_table(
        args.workdir,
        manifest,
        args.checkpoint,
        task_label=args.label,
        modality=args.modality,
        epochs=args.epochs,
        cnn_epochs=args.cnn_epochs,
        probe_lr=args.probe_lr,
        probe_head_depth=args.head_depth,
        cnn_lr=args.cnn_lr,
        extra_args=extra,
    )
    print(f"\n[demo] probe table ({args.label} on {args.modality}, test split of {manifest}):\n")
    print(format_probe_table(rows))
    print(
        f"\n[demo] per-run metrics.json / predictions.csv / figures: {args.workdir / 'probe'}/<run>/; "
        f"table: {args.workdir / 'probe' / 'probe_table.csv'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
