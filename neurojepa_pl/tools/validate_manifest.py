"""`neurojepa validate-manifest FILE`: check a manifest before training; exit 1 on errors."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _parse_label(text: str):
    from neurojepa_pl.data import LabelSpec

    column, sep, spec = text.partition(":")
    if not sep or not column:
        raise argparse.ArgumentTypeError(f"expected COLUMN:KIND[:ARGS], e.g. tumour:binary; found {text!r}")
    try:
        return column, LabelSpec.parse(spec)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neurojepa validate-manifest",
        description=(
            "Validate a manifest CSV (one row per scan: subject_id, session_id, modality, path[, split, labels]; or "
            "the paired form with t1w_path/t2w_path/flair_path). Reports missing columns, missing, unreadable or "
            "truncated files, NaN/Inf volumes, non-3D images, constant (empty) volumes, duplicates, labels out of "
            "range and subjects in several splits, each with its row, path and fix: the same checks `neurojepa fit` "
            "runs. Exit status 1 if there is any error, 0 otherwise (warnings allowed)."
        ),
    )
    parser.add_argument("manifest", metavar="FILE", help="manifest CSV; relative paths resolve against its folder")
    parser.add_argument(
        "--labels",
        nargs="+",
        type=_parse_label,
        default=None,
        metavar="COL:KIND",
        help=(
            "label checks, e.g. `tumour:binary grade:categorical:3 age:continuous:0:120 os_days:time event:event`; "
            "append `:nan` to allow empty cells. Default: check the SynthBrain label columns that are present."
        ),
    )
    read = parser.add_mutually_exclusive_group()
    read.add_argument("--no-read", action="store_true", help="only check that files exist (do not open them)")
    read.add_argument("--header-only", action="store_true", help="read image headers only (shape checks, fast)")
    parser.add_argument("--max-listed", type=int, default=20, help="problems listed per kind (default 20)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from neurojepa_pl.data import load_manifest, validate_manifest
    from neurojepa_pl.errors import UserError, format_user_error

    try:
        df = load_manifest(args.manifest)
    except UserError as err:
        print(format_user_error(err, "neurojepa validate-manifest"), file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as err:  # pandas: not a CSV, bad encoding, ...
        print(f"neurojepa validate-manifest: error: {args.manifest} cannot be read as a CSV: {err}", file=sys.stderr)
        return 1
    check_readable = False if args.no_read else ("header" if args.header_only else True)
    report = validate_manifest(
        df, label_specs=dict(args.labels) if args.labels else None, check_files=True, check_readable=check_readable
    )
    report.max_listed_per_kind = args.max_listed
    print(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
