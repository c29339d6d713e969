"""`neurojepa qc MANIFEST [--thresholds FILE] [--out DIR] [--calibrate Q]`: QC of registered scans against MNI152."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from .build_cache import add_transform_arguments, settings_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neurojepa qc",
        description=(
            "Quality control of registered scans: conformance (readable, 3D, NaN/Inf, orientation, spacing, shape, "
            "intensity range, foreground fraction) and MI / PSNR / Pearson against the MNI152 template of each "
            "scan's modality after the training loading chain. Writes OUT/qc_manifest.csv (the manifest plus qc_pass, "
            "qc_reason and metric columns), OUT/qc_thresholds.yaml (thresholds used) and OUT/qc_report.html."
        ),
        epilog=(
            "The paper's thresholds are not published; the defaults (experiments/qc/default_thresholds.yaml) were "
            "calibrated on SynthBrain. --calibrate Q sets each modality's MI/PSNR/Pearson minimum at the Q-quantile "
            "of this manifest's scans (e.g. 0.01 rejects the lowest-scoring 1%%), keeping the conformance limits."
        ),
    )
    parser.add_argument("manifest", type=Path, help="per-scan manifest CSV (subject_id, session_id, modality, path)")
    parser.add_argument("--thresholds", type=Path, default=None, help="thresholds YAML (default: the shipped one)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <manifest dir>/qc)")
    parser.add_argument("--calibrate", type=float, default=None, metavar="Q", help="calibrate minima at quantile Q")
    parser.add_argument("--margin", type=float, default=0.0,
                        help="with --calibrate: minimum = q - MARGIN * |q| (the defaults used 0.1)")  # fmt: skip
    parser.add_argument("--worst", type=int, default=8, help="thumbnails of the N worst scans in the report")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when any scan fails")
    add_transform_arguments(parser)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from neurojepa_pl.data import load_manifest
    from neurojepa_pl.preprocess.qc import TemplateResampler, load_thresholds, run_qc
    from neurojepa_pl.preprocess.qc_report import write_html_report

    settings = settings_from_args(args)
    out = args.out or args.manifest.resolve().parent / "qc"
    out.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(args.manifest)
    thresholds = load_thresholds(args.thresholds)
    resampler = TemplateResampler()
    results, used = run_qc(manifest, thresholds, settings, resampler, calibrate=args.calibrate, margin=args.margin)
    results.to_csv(out / "qc_manifest.csv", index=False)
    (out / "qc_thresholds.yaml").write_text(yaml.safe_dump(used, sort_keys=False))
    report = write_html_report(results, used, out, settings, resampler, n_worst=args.worst)
    failed = results.loc[~results["qc_pass"]]
    print(f"neurojepa qc: {len(results)} scans, {len(results) - len(failed)} passed, {len(failed)} failed -> {report}")
    for row in failed.head(20).itertuples():
        print(f"  FAIL {row.path}: {row.qc_reason}", file=sys.stderr)
    if len(failed) > 20:
        print(f"  ... and {len(failed) - 20} more (see {out / 'qc_manifest.csv'})", file=sys.stderr)
    return 1 if args.strict and len(failed) else 0
