"""`neurojepa synth`: generate a SynthBrain cohort (NIfTI in a BIDS-like tree + manifest.csv)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence


def _grid(text: str):
    from neurojepa_pl.synth.grids import normalize_grid

    try:
        return normalize_grid(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _prevalence(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        return name, float(value) if sep else float("nan")
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected NAME=P, e.g. tumour=0.4; found {text!r}") from err


def default_workers(subjects: int) -> int:
    """Worker processes when ``--workers`` is not given: usable cores, capped at 4 (memory: about 1.5 GB per worker
    on the 1 mm grid) and at the number of subjects.

    Processes with one torch thread each scale better than one process with several intra-op threads, which also
    degrade badly when the machine is shared.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 4, subjects))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neurojepa synth",
        description=(
            "Generate a SynthBrain cohort from nilearn's packaged MNI ICBM152 2009a maps (no download): "
            "skull-stripped, MNI-registered T1w/T2w/FLAIR (and DWI, b=1000 trace) with atrophy, WMH, tumour "
            "(oedema, mass effect), haemorrhage, chronic and acute infarcts, site effects and survival from a known "
            "hazard. Writes sub-XXXX/ses-YY/anat/sub-XXXX_ses-YY_<contrast>.nii.gz (DWI: dwi/..._dwi.nii.gz; int16), "
            "participants.tsv, dataset_description.json and manifest.csv (one row per scan, paths relative to it). "
            "The same seed gives byte-identical files, and adding DWI leaves the other contrasts' files unchanged."
        ),
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    parser.add_argument("--subjects", type=int, required=True, metavar="N", help="number of subjects (patients)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="cohort seed (default 0)")
    parser.add_argument(
        "--modalities",
        nargs="+",
        default=["T1w", "T2w", "FLAIR"],
        choices=["T1w", "T2w", "FLAIR", "DWI"],
        help="contrasts to write (default T1w T2w FLAIR; DWI adds the b=1000 trace image, where acute infarcts are "
        "bright and CSF dark: the contrast absent from pretraining)",
    )
    parser.add_argument(
        "--grid",
        type=_grid,
        default="mni",
        metavar="mni|model|DxHxW",
        help="output grid: FSL MNI152 1 mm 182x218x182 (default), the model grid 96x108x96, or e.g. 48x54x48",
    )
    parser.add_argument("--sites", type=int, default=3, metavar="K", help="acquisition sites (default 3)")
    parser.add_argument(
        "--sessions",
        type=int,
        nargs=2,
        default=(1, 3),
        metavar=("MIN", "MAX"),
        help="sessions per subject (default 1 3; follow-ups stop at the event/censoring time)",
    )
    parser.add_argument(
        "--prevalence",
        type=_prevalence,
        nargs="+",
        default=None,
        metavar="NAME=P",
        help="pathology prevalences, e.g. tumour=0.4 wmh=0.35 haemorrhage=0.15 infarct=0.15 acute_infarct=0 (these "
        "are the defaults; acute_infarct > 0 makes a stroke cohort: hyperacute infarcts, visible on DWI only)",
    )
    parser.add_argument(
        "--wmh-scale",
        type=float,
        default=1.0,
        metavar="F",
        help=(
            "multiply every WMH volume by F (default 1; the multimodal WMH task uses 4: FLAIR then carries a clear "
            "signal)"
        ),
    )
    parser.add_argument("--split", action="store_true", help="add a patient-level 60/20/20 train/val/test split column")
    parser.add_argument(
        "--holdout-site",
        default=None,
        metavar="SITE",
        help="also write a site-shift transfer pair beside manifest.csv: manifest_source.csv (the other sites, "
        "patient-level 60/20/20 split) and manifest_holdout_<SITE>.csv (that site, all test), e.g. site-2",
    )
    parser.add_argument(
        "--stratify",
        default=None,
        metavar="COLUMN",
        help="with --holdout-site: stratify the source split by this label column (e.g. tumour)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="W",
        help="parallel worker processes, one torch thread each (default: the usable CPU cores, at most 4 and at most "
        "the number of subjects; the files do not depend on it)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.stratify is not None and args.holdout_site is None:
        parser.error("--stratify applies to the site-shift pair; add --holdout-site SITE")
    from neurojepa_pl.synth import generate_cohort
    from neurojepa_pl.synth.grids import grid_name

    workers = args.workers if args.workers is not None else default_workers(args.subjects)
    start = time.perf_counter()
    try:
        manifest = generate_cohort(
            args.out,
            n_subjects=args.subjects,
            seed=args.seed,
            modalities=tuple(args.modalities),
            grid=args.grid,
            n_sites=args.sites,
            sessions=tuple(args.sessions),
            prevalence=dict(args.prevalence) if args.prevalence else None,
            workers=workers,
            split=args.split,
            wmh_scale=args.wmh_scale,
        )
        pair = None
        if args.holdout_site is not None:
            from neurojepa_pl.synth.site_shift import write_site_shift_manifests

            pair = write_site_shift_manifests(
                os.path.join(args.out, "manifest.csv"), args.holdout_site, seed=args.seed, stratify=args.stratify
            )
    except ValueError as err:
        print(f"neurojepa synth: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    sessions = manifest[["subject_id", "session_id"]].drop_duplicates().shape[0]
    print(
        f"SynthBrain: {args.subjects} subjects, {sessions} sessions, {len(manifest)} scans, grid "
        f"{grid_name(args.grid)}, seed {args.seed}, {workers} workers -> {args.out}/manifest.csv in {seconds:.1f} s"
    )
    if pair is not None:
        print(f"site-shift pair: source {pair[0]}, held-out site {args.holdout_site}: {pair[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
