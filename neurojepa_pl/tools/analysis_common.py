"""Pieces shared by the analysis tools (``neurojepa routing``, ``neurojepa embedding-geometry``): choosing the
manifest rows, the device, writing JSON without NaN, and loading an encoder that fits the loading settings."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["resolve_device", "json_ready", "select_rows", "check_input_size"]


def resolve_device(text: str) -> Any:
    """``"auto"`` (CUDA when present, else CPU) or any ``torch.device`` string, as a ``torch.device``."""
    import torch

    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(text)


def json_ready(value: Any) -> Any:
    """``value`` with numpy scalars / arrays turned into Python numbers and lists, and NaN / inf into ``None``."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def select_rows(
    manifest: str | Path,
    modalities: Sequence[str] | None = None,
    splits: Sequence[str] | None = None,
    required: Sequence[str] = (),
) -> Any:
    """The manifest's rows (paths resolved) restricted to ``modalities`` and ``splits``.

    Args:
        manifest: per-scan manifest CSV.
        modalities: keep these modalities (``None``: all).
        splits: keep rows of these splits (``None``: all).
        required: further columns the caller needs (e.g. ``age``).

    Returns:
        A DataFrame with a fresh 0-based index.
    """
    from neurojepa_pl.data.schema import MANIFEST_COLUMNS, MODALITIES, load_manifest
    from neurojepa_pl.errors import UserValueError

    frame = load_manifest(manifest)
    missing = [c for c in (*MANIFEST_COLUMNS, *required) if c not in frame.columns]
    if missing:
        raise UserValueError(
            f"{manifest} lacks the columns {missing} (found {list(frame.columns)}).",
            f"give a per-scan manifest with {', '.join((*MANIFEST_COLUMNS, *required))} (see the README).",
        )
    if modalities:
        unknown = [m for m in modalities if m not in MODALITIES]
        if unknown:
            raise UserValueError(f"--modalities {unknown} are not modalities.", f"choose from {list(MODALITIES)}.")
        frame = frame[frame["modality"].isin(list(modalities))]
    if splits:
        if "split" not in frame.columns:
            raise UserValueError(f"--split given but {manifest} has no split column.", "drop --split.")
        frame = frame[frame["split"].isin(list(splits))]
    if frame.empty:
        raise UserValueError(
            f"no row of {manifest} is left after --modalities {modalities} / --split {splits}.",
            "check the manifest's modality and split columns.",
        )
    return frame.reset_index(drop=True)


def check_input_size(encoder: Any, settings: Any, source: str) -> None:
    """Fail with the fix when the loading chain's ``spatial_size`` is not the encoder's ``img_size``."""
    from neurojepa_pl.errors import UserValueError

    img_size = tuple(encoder.config["img_size"])
    if tuple(settings.spatial_size) != img_size:
        raise UserValueError(
            f"the encoder of {source} takes {list(img_size)} inputs but --spatial-size is "
            f"{list(settings.spatial_size)}.",
            f"pass --spatial-size {' '.join(map(str, img_size))} with the --resize-to / --pad-crop-size / "
            "--target-spacing the encoder was trained with (SynthBrain demo: --spatial-size 48 54 48 "
            "--resize-to 50 60 50 --pad-crop-size none --target-spacing none).",
        )


def report_failed_scans(failures: Any, num_scans: int, max_failed_fraction: float, out: Path) -> None:
    """Create ``out``, write ``out/skipped_scans.csv`` when scans failed, and stop (a ``UserValueError``) when more
    than ``max_failed_fraction`` of the ``num_scans`` did (``failures``: a ``datasets.FailureLog``)."""
    from neurojepa_pl.data_modules.datasets import TooManyFailedScans
    from neurojepa_pl.errors import UserValueError

    out.mkdir(parents=True, exist_ok=True)
    if len(failures):
        failures.write_csv(out / "skipped_scans.csv")
    try:
        failures.raise_if_too_many(num_scans, max_failed_fraction, out / "skipped_scans.csv")
    except TooManyFailedScans as err:
        raise UserValueError(str(err)) from err
