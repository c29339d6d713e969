"""`make demo`: SynthBrain cohort -> JEPA pretraining on CPU -> where to look at the results.

    python -m neurojepa_pl.demos.pretrain_probe --workdir runs/demo

One function per stage, so later stages (downstream probes) plug in after :func:`pretrain`:

1. :func:`ensure_cohort`: the SynthBrain manifest (written by ``neurojepa synth`` in the Makefile; generated here if
   absent);
2. :func:`pretrain`: ``neurojepa fit --config experiments/pretrain/synth_small.yaml`` on that manifest;
3. :func:`export_encoder`: ``neurojepa export`` of its EMA target encoder to ``WORKDIR/export`` (what
   ``--model.init_args.checkpoint runs/demo/export`` of the SynthBrain fine-tune YAMLs loads);
4. :func:`report_pretraining`: the loss curve's start and end, the checkpoint, the export folder;
5. :func:`neurojepa_pl.demos.probe_table.run_probe_table`: tumour-presence probe on the pretrained encoder vs the same
   probe on a random encoder vs the from-scratch CNN, on one split, with bootstrap 95% CIs;
6. :func:`where_to_look`: TensorBoard, the checkpoints, the export, the probe table and how to read it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "experiments" / "pretrain" / "synth_small.yaml"


@dataclass(frozen=True)
class PretrainResult:
    """Where a pretraining run left its outputs, and its training-loss curve ``[(step, loss), ...]``."""

    checkpoint: Path
    log_dir: Path
    losses: list[tuple[int, float]]
    export_dir: Path | None = None


def ensure_cohort(workdir: Path, subjects: int = 48, seed: int = 0) -> Path:
    """The demo cohort's manifest, generating the cohort (96x108x96 model grid) if it is not there yet.

    Returns:
        ``workdir/synthbrain/manifest.csv``.
    """
    manifest = workdir / "synthbrain" / "manifest.csv"
    if manifest.exists():
        print(f"[demo] using the SynthBrain cohort at {manifest}")
        return manifest
    from neurojepa_pl.synth import generate_cohort

    print(f"[demo] generating a SynthBrain cohort of {subjects} subjects (seed {seed}) in {manifest.parent} ...")
    generate_cohort(manifest.parent, n_subjects=subjects, seed=seed, grid="model")
    return manifest


def read_losses(log_dir: Path, tag: str = "train/loss") -> list[tuple[int, float]]:
    """``(step, value)`` pairs of a scalar from the TensorBoard event files in ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        raise RuntimeError(f"no {tag!r} scalars in the TensorBoard logs at {log_dir}; did the run train at all?")
    return [(event.step, event.value) for event in events.Scalars(tag)]


def pretrain(
    manifest: Path, workdir: Path, config: Path = DEFAULT_CONFIG, extra_args: Sequence[str] = ()
) -> PretrainResult:
    """Run ``neurojepa fit --config CONFIG`` on ``manifest`` with every output under ``workdir``.

    Args:
        manifest: SynthBrain (or any) per-scan manifest.
        workdir: receives the TensorBoard logs (``pretrain/version_*``), checkpoints and the scan cache.
        config: the experiment YAML (default ``experiments/pretrain/synth_small.yaml``).
        extra_args: more ``neurojepa fit`` arguments, e.g. ``["--trainer.max_steps", "50"]``.
    """
    from neurojepa_pl.cli import lightning_main

    if not config.exists():
        raise FileNotFoundError(
            f"experiment file {config} not found: run the demo from a source checkout, or pass --config PATH."
        )
    args = [
        "fit",
        "--config",
        str(config),
        "--data.init_args.manifest",
        str(manifest),
        "--data.init_args.cache_dir",
        str(workdir / "cache"),
        "--trainer.logger.init_args.save_dir",
        str(workdir),
        "--trainer.default_root_dir",
        str(workdir),
        *extra_args,
    ]
    print("[demo] neurojepa " + " ".join(args))
    cli = lightning_main(args)
    log_dir = Path(cli.trainer.log_dir)
    # The YAML's ModelCheckpoint saves every N steps; a final save makes the end state available whatever max_steps is
    # (a full checkpoint, optimizer included, so that it can also be resumed).
    checkpoint = log_dir / "checkpoints" / "final.ckpt"
    cli.trainer.save_checkpoint(checkpoint, weights_only=False)
    return PretrainResult(checkpoint=checkpoint, log_dir=log_dir, losses=read_losses(log_dir))


def _export_name(checkpoint: Path) -> str:
    from neurojepa_pl.pretrain_run import read_pretraining_setup

    setup = read_pretraining_setup(checkpoint)
    name, _ = setup.backbone_args()  # the registry name (a spec's preset)
    return name


def export_encoder(checkpoint: Path, out_dir: Path) -> Path:
    """``neurojepa export --checkpoint CHECKPOINT --out OUT_DIR`` (the EMA target encoder, with its registry name).

    Returns:
        ``out_dir``, holding ``config.json`` + ``model.safetensors`` (read by ``load_backbone(out_dir)``).

    Raises:
        RuntimeError: if the export tool fails (it prints why).
    """
    from neurojepa_pl.tools.export import main as export_main

    args = [
        "--checkpoint",
        str(checkpoint),
        "--out",
        str(out_dir),
        "--name",
        _export_name(checkpoint),
    ]
    print("[demo] neurojepa export " + " ".join(args))
    if export_main(args) != 0:
        raise RuntimeError(f"neurojepa export of {checkpoint} failed (see the message above).")
    return Path(out_dir)


def report_pretraining(result: PretrainResult) -> None:
    """Print the loss at the start and the end, the checkpoint, the export folder and how to open TensorBoard."""
    first, last = result.losses[0], result.losses[-1]
    window = max(1, len(result.losses) // 10)
    start = sum(v for _, v in result.losses[:window]) / window
    end = sum(v for _, v in result.losses[-window:]) / window
    lines = [
        "\n[demo] JEPA pretraining done",
        f"  training loss: {start:.3f} (mean of the first {window} logged values, from step {first[0]}) -> "
        f"{end:.3f} (last {window}, to step {last[0]})",
        f"  checkpoint:    {result.checkpoint}",
    ]
    if result.export_dir is not None:
        lines.append(f"  exported:      {result.export_dir}   (load_backbone('{result.export_dir}'))")
    lines += [
        f"  TensorBoard:   {result.log_dir}",
        f"  open it with:  tensorboard --logdir {result.log_dir.parent}   (then browse http://localhost:6006; "
        "scalars train/*, images train/masks)",
    ]
    print("\n".join(lines))


def where_to_look(workdir: Path, result: PretrainResult, probe_table: Path | None = None) -> str:
    """The closing summary of ``make demo``: what was written where, and how to read the numbers."""
    workdir = Path(workdir)
    lines = [
        "",
        "[demo] done. What to look at:",
        f"  TensorBoard:  .venv/bin/tensorboard --logdir {workdir}   (http://localhost:6006; pretraining scalars "
        "train/loss, val/loss and the mask figures; the probe runs' val/* and test/* metrics)",
        f"  checkpoints:  {result.checkpoint.parent}/   (final.ckpt: the end of pretraining; resume or probe it)",
    ]
    if result.export_dir is not None:
        lines.append(
            f"  encoder:      {result.export_dir}/   (config.json + model.safetensors: "
            f"load_backbone('{result.export_dir}'))"
        )
    if probe_table is not None:
        lines += [
            f"  probe table:  {probe_table}   (per-run metrics.json, predictions.csv, figures/ beside it, in "
            f"{probe_table.parent}/<run>/)",
            "  reading it:   each row is a test AUROC / AUPRC [bootstrap 95% CI] on the same test scans; 0.5 AUROC is "
            "chance, jepa_probe minus random_probe is what the pretraining earned, and rows whose CIs overlap are not "
            "shown to differ (`neurojepa compare RUN_A RUN_B` gives the paired test).",
        ]
    if result.export_dir is not None:
        lines += [
            "  next: fine-tune on the exported encoder (README, Using it):",
            "    neurojepa fit --config experiments/finetune/synth_tumour_probe.yaml "
            f"--model.init_args.checkpoint {result.export_dir}",
        ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The demo's command line (also used by ``tests/test_readme.py`` to check the README's demo commands)."""
    parser = argparse.ArgumentParser(
        prog="python -m neurojepa_pl.demos.pretrain_probe",
        description="SynthBrain cohort -> JEPA pretraining on CPU (experiments/pretrain/synth_small.yaml) -> export "
        "of the encoder -> tumour-presence probe table.",
    )
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo"), help="where everything is written")
    parser.add_argument("--subjects", type=int, default=48, help="cohort size if it has to be generated")
    parser.add_argument("--seed", type=int, default=0, help="cohort seed if it has to be generated")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="pretraining experiment YAML")
    parser.add_argument("--max-steps", type=int, default=None, help="override trainer.max_steps (quick looks)")
    parser.add_argument("--skip-probe", action="store_true", help="stop after pretraining and export (no probe table)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    manifest = ensure_cohort(args.workdir, args.subjects, args.seed)
    extra = ["--trainer.max_steps", str(args.max_steps)] if args.max_steps is not None else []
    result = pretrain(manifest, args.workdir, args.config, extra)
    result = replace(result, export_dir=export_encoder(result.checkpoint, args.workdir / "export"))
    report_pretraining(result)
    table = None
    if not args.skip_probe:
        from neurojepa_pl.demos.probe_table import format_probe_table, run_probe_table

        rows = run_probe_table(args.workdir, manifest, result.checkpoint)
        print("\n[demo] tumour presence on FLAIR, test split (bootstrap 95% CIs):\n" + format_probe_table(rows))
        table = args.workdir / "probe" / "probe_table.csv"
    print(where_to_look(args.workdir, result, table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
