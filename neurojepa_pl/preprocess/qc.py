"""Quality control of registered scans against their modality's MNI152 template (paper Methods, docs/method.md §1.1).

For every scan of a per-scan manifest:

1. **Conformance** from the file itself: readable (a truncated ``.nii.gz`` fails here), one 3D volume, non-finite
   voxel count, original orientation code (reported; the chain reorients to RAS), voxel spacing, shape, raw intensity
   range, foreground fraction (voxels > 0).
2. **Similarity to the template** (the paper's MI, PSNR and Pearson): the scan goes through the deterministic loading
   chain of docs/method.md §1.2 (:func:`neurojepa_pl.data.transforms.loading_transforms` settings); the template of its
   modality (:mod:`.templates`) is resampled into the scan's RAS voxel grid through world coordinates and follows the
   *same* chain in lockstep (same percentile scaling, pad/crop, spacing, the scan's foreground crop box, resize), so
   both end on the same model grid. A scan whose data do not sit where its header says (misregistered, flipped axes) or
   that is drowned in noise therefore scores low. ``qc_pair_transforms`` is tested to give the scan exactly the training
   chain's output.
3. **Thresholds** per modality (``experiments/qc/default_thresholds.yaml``): a scan fails when any metric is below its
   modality's minimum or a conformance check fails; ``qc_reason`` lists every failed check.

Metrics (all on the chain outputs, values in [0, 1]):

* MI: mutual information (nats) of the 64x64-bin joint histogram over all voxels, counted with ``numpy.bincount``
  (written by hand: 2.5x faster than ``histogram2d``, skimage or sklearn, docs/data_notes.md §5; values agree).
* PSNR: ``10 log10(1 / MSE)`` over all voxels (data range 1).
* Pearson: correlation over the union of the two foregrounds (scan > 0 or template > 0).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import scipy.ndimage as ndi
import torch
import yaml
from monai.data import MetaTensor
from monai.transforms import Compose, MapTransform
from nibabel.filebasedimages import ImageFileError

from neurojepa_pl.data.transforms import IMAGE_KEY, ScanRejected, TransformSettings, loading_transforms

from .templates import load_template

TEMPLATE_KEY = "template"
MI_BINS = 64
SIMILARITY_METRICS = ("mi", "psnr", "pearson")
QC_COLUMNS = (
    "qc_pass", "qc_reason", "qc_mi", "qc_psnr", "qc_pearson", "qc_readable", "qc_orientation", "qc_spacing",
    "qc_shape", "qc_nonfinite", "qc_intensity_min", "qc_intensity_max", "qc_foreground_fraction",
)  # fmt: skip
DEFAULT_THRESHOLDS_PATH = Path(__file__).resolve().parents[2] / "experiments" / "qc" / "default_thresholds.yaml"


# ----------------------------------------------------------------------------------------------------------------------
# Similarity metrics (pure functions)
# ----------------------------------------------------------------------------------------------------------------------
def mutual_information(a: np.ndarray, b: np.ndarray, bins: int = MI_BINS) -> float:
    """Mutual information (nats) of two same-shaped arrays with values in [0, 1] (clipped), ``bins`` bins each.

    Hand-written joint histogram with one ``numpy.bincount`` because it is the fastest exact way
    (docs/data_notes.md §5).
    """
    if a.shape != b.shape:
        raise ValueError(f"mutual_information needs equal shapes, got {a.shape} and {b.shape}.")
    ia = np.clip((np.asarray(a, dtype=np.float64).ravel() * bins).astype(np.int64), 0, bins - 1)
    ib = np.clip((np.asarray(b, dtype=np.float64).ravel() * bins).astype(np.int64), 0, bins - 1)
    joint = np.bincount(ia * bins + ib, minlength=bins * bins).reshape(bins, bins).astype(np.float64)
    joint /= joint.sum()
    pa, pb = joint.sum(axis=1, keepdims=True), joint.sum(axis=0, keepdims=True)
    nonzero = joint > 0
    return float(np.sum(joint[nonzero] * np.log(joint[nonzero] / (pa @ pb)[nonzero])))


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(range^2 / MSE)``; ``inf`` for identical arrays."""
    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def pearson(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Pearson correlation of ``a`` and ``b`` (over ``mask`` when given); NaN when either is constant there."""
    x = np.asarray(a, dtype=np.float64)[mask] if mask is not None else np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64)[mask] if mask is not None else np.asarray(b, dtype=np.float64).ravel()
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(np.dot(x, x)) * float(np.dot(y, y)))
    return float(np.dot(x, y) / denominator) if denominator > 0 else math.nan


def similarity_metrics(scan: np.ndarray, template: np.ndarray) -> dict[str, float]:
    """MI, PSNR and Pearson (union-of-foreground mask) of two chain outputs ``[D, H, W]``."""
    return {
        "mi": mutual_information(scan, template),
        "psnr": psnr(scan, template),
        "pearson": pearson(scan, template, mask=(scan > 0) | (template > 0)),
    }


# ----------------------------------------------------------------------------------------------------------------------
# Conformance of the file
# ----------------------------------------------------------------------------------------------------------------------
def file_conformance(path: str | Path) -> dict[str, object]:
    """Header and raw-data checks of one NIfTI file (no resampling).

    Returns:
        ``readable`` (bool), ``read_error`` (str), ``orientation`` (original axis codes, e.g. ``"LAS"``),
        ``spacing`` (mm per axis), ``shape``, ``is_3d``, ``nonfinite`` (count), ``intensity_min``/``max`` (finite
        voxels), ``foreground_fraction`` (voxels > 0).
    """
    out: dict[str, object] = {"readable": False, "read_error": ""}
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except (OSError, EOFError, zlib.error, ImageFileError, ValueError) as error:
        out["read_error"] = f"{type(error).__name__}: {error}"
        return out
    shape = tuple(int(s) for s in image.shape)
    spatial = shape[:3] if len(shape) == 4 and shape[3] == 1 else shape
    finite = np.isfinite(data) if np.issubdtype(data.dtype, np.floating) else np.ones(data.shape, dtype=bool)
    values = data[finite]
    out.update(
        readable=True,
        orientation="".join(nib.aff2axcodes(image.affine)),
        spacing=tuple(round(float(z), 4) for z in image.header.get_zooms()[:3]),
        shape=spatial,
        is_3d=len(spatial) == 3,
        nonfinite=int(data.size - np.count_nonzero(finite)),
        intensity_min=float(values.min()) if values.size else math.nan,
        intensity_max=float(values.max()) if values.size else math.nan,
        foreground_fraction=float(np.count_nonzero(values > 0) / data.size) if data.size else 0.0,
    )
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The paired chain: scan + template in lockstep
# ----------------------------------------------------------------------------------------------------------------------
class TemplateResampler:
    """Templates of each modality, resampled into scan grids (memoised per grid within one QC run).

    Args:
        templates: modality -> template image; ``None`` loads :func:`load_template` lazily per modality.
    """

    def __init__(self, templates: Mapping[str, nib.Nifti1Image] | None = None):
        self._templates: dict[str, nib.Nifti1Image] = dict(templates or {})
        self._by_grid: dict[tuple, np.ndarray] = {}

    def template(self, modality: str) -> nib.Nifti1Image:
        if modality not in self._templates:
            self._templates[modality] = load_template(modality)
        return self._templates[modality]

    def on_grid(self, modality: str, affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
        """The template sampled (trilinear, 0 outside) at the voxel centres of a grid ``affine``/``shape``."""
        key = (modality, np.round(np.asarray(affine, dtype=np.float64), 6).tobytes(), tuple(shape))
        if key not in self._by_grid:
            template = self.template(modality)
            voxel_map = np.linalg.inv(template.affine) @ np.asarray(affine, dtype=np.float64)
            self._by_grid[key] = ndi.affine_transform(
                np.asarray(template.dataobj, dtype=np.float32),
                voxel_map[:3, :3],
                offset=voxel_map[:3, 3],
                output_shape=tuple(shape),
                order=1,
                mode="constant",
                cval=0.0,
            )
        return self._by_grid[key]


class AddTemplated(MapTransform):
    """Add ``d["template"]``: the modality's template on the (RAS-oriented) grid of ``d["image"]``."""

    def __init__(self, resampler: TemplateResampler, modality: str):
        super().__init__(keys=IMAGE_KEY)
        self.resampler, self.modality = resampler, modality

    def __call__(self, data):
        d = dict(data)
        image = d[IMAGE_KEY]
        affine = image.affine.numpy() if isinstance(image, MetaTensor) else np.eye(4)
        volume = self.resampler.on_grid(self.modality, affine, tuple(image.shape[1:]))
        meta = {key: value for key, value in getattr(image, "meta", {}).items() if key != "affine"}
        d[TEMPLATE_KEY] = MetaTensor(torch.from_numpy(volume[None].copy()), affine=torch.as_tensor(affine), meta=meta)
        return d


def qc_pair_transforms(settings: TransformSettings, resampler: TemplateResampler, modality: str) -> Compose:
    """docs/method.md §1.2 loading chain on ``image`` with the template carried along (keys ``image`` and ``template``).

    The very same :func:`neurojepa_pl.data.transforms.loading_transforms` with the template inserted after the RAS
    reorientation as a companion key, so the scan goes through exactly the training chain and the foreground crop box
    is the scan's.
    """
    return loading_transforms(
        settings, companion_keys=(TEMPLATE_KEY,), after_orientation=(AddTemplated(resampler, modality),)
    )


def load_pair(
    path: str | Path, modality: str, settings: TransformSettings, resampler: TemplateResampler
) -> tuple[np.ndarray, np.ndarray]:
    """Scan and template after the paired chain, both ``[*resize_to]`` float32 in [0, 1]."""
    out = qc_pair_transforms(settings, resampler, modality)({IMAGE_KEY: str(path)})
    return out[IMAGE_KEY][0].numpy(), out[TEMPLATE_KEY][0].numpy()


# ----------------------------------------------------------------------------------------------------------------------
# Thresholds
# ----------------------------------------------------------------------------------------------------------------------
def load_thresholds(path: str | Path | None = None) -> dict:
    """Read a thresholds YAML (default: ``experiments/qc/default_thresholds.yaml``) and check its structure."""
    path = Path(path) if path is not None else DEFAULT_THRESHOLDS_PATH
    if not path.is_file():
        raise FileNotFoundError(f"QC thresholds file {path} does not exist; pass --thresholds FILE.")
    thresholds = yaml.safe_load(path.read_text())
    check_thresholds(thresholds, str(path))
    return thresholds


def check_thresholds(thresholds: dict, source: str = "thresholds") -> None:
    """Raise ValueError naming the key when a thresholds mapping lacks a section or has a malformed value."""
    if not isinstance(thresholds, dict) or "modalities" not in thresholds:
        raise ValueError(f"{source}: expected a mapping with a 'modalities' section (see default_thresholds.yaml).")
    for modality, entry in thresholds["modalities"].items():
        for metric in SIMILARITY_METRICS:
            if f"{metric}_min" not in entry:
                raise ValueError(f"{source}: modalities.{modality} lacks '{metric}_min'.")
        for name in ("spacing_mm", "foreground_fraction"):
            bounds = entry.get(name)
            if bounds is not None and (len(bounds) != 2 or bounds[0] > bounds[1]):
                raise ValueError(f"{source}: modalities.{modality}.{name} must be [min, max]; found {bounds!r}.")


def calibrate_thresholds(metrics: pd.DataFrame, quantile: float, base: dict | None = None, margin: float = 0.0) -> dict:
    """Set each modality's MI/PSNR/Pearson minimum at the ``quantile`` of its scans' values (lowest-scoring tail).

    Args:
        metrics: QC output with ``modality``, ``qc_mi``, ``qc_psnr``, ``qc_pearson`` (scans whose metrics could not be
            computed are ignored).
        quantile: e.g. 0.01 flags the 1 % lowest-scoring scans of this reference manifest.
        base: thresholds whose conformance limits are kept (default: none; similarity minima are replaced).
        margin: relative slack below the quantile, ``minimum = q - margin * |q|`` (the shipped defaults use
            ``quantile=0, margin=0.1``: 10 % below the lowest SynthBrain scan).

    Returns:
        A thresholds mapping (same structure as the YAML) with a ``calibration`` note.
    """
    if not 0.0 <= quantile < 1.0:
        raise ValueError(f"calibration quantile must be in [0, 1); found {quantile}.")
    out = {"modalities": {}, **{k: v for k, v in (base or {}).items() if k != "modalities"}}
    base_modalities = (base or {}).get("modalities", {})
    for modality, group in metrics.groupby("modality"):
        entry = dict(base_modalities.get(modality, {}))
        for metric in SIMILARITY_METRICS:
            values = group[f"qc_{metric}"].astype(float)
            values = values[np.isfinite(values)]
            if values.empty:
                raise ValueError(f"cannot calibrate {modality}: no scan has a finite {metric}.")
            value = float(np.quantile(values, quantile))
            # Rounded down to 4 decimals so that the scan at the quantile itself still passes.
            entry[f"{metric}_min"] = math.floor((value - margin * abs(value)) * 1e4) / 1e4
        out["modalities"][modality] = entry
    counts = metrics.groupby("modality").size().to_dict()
    out["calibration"] = {
        "quantile": quantile,
        "margin": margin,
        "scans_per_modality": {k: int(v) for k, v in counts.items()},
    }
    return out


def _failures(row: Mapping[str, object], entry: Mapping[str, object] | None) -> list[str]:
    if not row["qc_readable"]:
        return [f"unreadable ({row['qc_read_error']})"]
    reasons = []
    if row["qc_nonfinite"]:
        reasons.append(f"{row['qc_nonfinite']} non-finite voxels")
    if row["qc_intensity_max"] <= row["qc_intensity_min"]:
        reasons.append("constant image")
    if row["qc_reject"]:
        # No metrics exist for a scan the chain rejects (not 3D, blank): the rejection is the reason.
        return reasons + [f"rejected by the loading chain ({row['qc_reject']})"]
    if entry is None:
        return reasons + [f"no thresholds for modality {row['modality']!r}"]
    for metric in SIMILARITY_METRICS:
        value, minimum = row[f"qc_{metric}"], entry[f"{metric}_min"]
        if not np.isfinite(value) or value < minimum:
            reasons.append(f"{metric} {value:.3f} < {minimum}")
    spacing = entry.get("spacing_mm")
    if spacing is not None and row["qc_spacing"]:
        bad = [s for s in row["qc_spacing"] if not spacing[0] <= s <= spacing[1]]
        if bad:
            reasons.append(f"spacing {row['qc_spacing']} outside {list(spacing)} mm")
    fraction = entry.get("foreground_fraction")
    if fraction is not None and not fraction[0] <= row["qc_foreground_fraction"] <= fraction[1]:
        reasons.append(f"foreground fraction {row['qc_foreground_fraction']:.3f} outside {list(fraction)}")
    return reasons


def apply_thresholds(metrics: pd.DataFrame, thresholds: dict) -> pd.DataFrame:
    """Set ``qc_pass`` and ``qc_reason`` (``"; "``-joined failed checks, empty when passed)."""
    out = metrics.copy()
    modalities = thresholds["modalities"]
    reasons = ["; ".join(_failures(row, modalities.get(row["modality"]))) for row in out.to_dict(orient="records")]
    out["qc_reason"] = reasons
    out["qc_pass"] = [not reason for reason in reasons]
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Running QC over a manifest
# ----------------------------------------------------------------------------------------------------------------------
def scan_metrics(
    path: str | Path, modality: str, settings: TransformSettings, resampler: TemplateResampler
) -> dict[str, object]:
    """Conformance + similarity of one scan (no thresholds). Keys are the ``qc_*`` columns."""
    conformance = file_conformance(path)
    row: dict[str, object] = {
        "qc_readable": conformance["readable"],
        "qc_read_error": conformance["read_error"],
        "qc_reject": "",
        "qc_mi": math.nan,
        "qc_psnr": math.nan,
        "qc_pearson": math.nan,
        "qc_orientation": conformance.get("orientation", ""),
        "qc_spacing": conformance.get("spacing", ()),
        "qc_shape": conformance.get("shape", ()),
        "qc_nonfinite": conformance.get("nonfinite", 0),
        "qc_intensity_min": conformance.get("intensity_min", math.nan),
        "qc_intensity_max": conformance.get("intensity_max", math.nan),
        "qc_foreground_fraction": conformance.get("foreground_fraction", math.nan),
    }
    if not conformance["readable"]:
        return row
    # Metrics are still computed for scans with NaN voxels (zero-filled here only) so the report can show them;
    # the non-finite count alone fails the scan.
    chain_settings = dataclasses.replace(settings, nan_policy="zero") if row["qc_nonfinite"] else settings
    try:
        scan, template = load_pair(path, modality, chain_settings, resampler)
    except ScanRejected as error:
        row["qc_reject"] = error.reason
        return row
    row.update({f"qc_{name}": value for name, value in similarity_metrics(scan, template).items()})
    return row


def run_qc(
    manifest: pd.DataFrame,
    thresholds: dict | None,
    settings: TransformSettings,
    resampler: TemplateResampler | None = None,
    calibrate: float | None = None,
    margin: float = 0.0,
) -> tuple[pd.DataFrame, dict]:
    """QC every row of a per-scan manifest.

    Args:
        manifest: per-scan manifest (``modality``, ``path`` absolute or resolved by ``load_manifest``).
        thresholds: thresholds mapping (see :func:`load_thresholds`); conformance limits are kept when calibrating.
        settings: loading-chain settings (the chain the model will see).
        resampler: template provider (one is created when ``None``).
        calibrate: when given, similarity minima are set at this quantile of this manifest's scans first.
        margin: relative slack below the calibrated quantile (see :func:`calibrate_thresholds`).

    Returns:
        ``(manifest with the qc columns, thresholds used)``.
    """
    if "path" not in manifest.columns or "modality" not in manifest.columns:
        raise ValueError(
            "QC needs the per-scan manifest form (columns modality, path); convert a paired manifest back to one "
            f"row per scan first. Found columns {list(manifest.columns)}."
        )
    resampler = resampler or TemplateResampler()
    rows = [scan_metrics(p, m, settings, resampler) for p, m in zip(manifest["path"], manifest["modality"])]
    metrics = pd.concat([manifest.reset_index(drop=True), pd.DataFrame(rows)], axis=1)
    if calibrate is not None:
        usable = metrics[metrics["qc_readable"] & metrics["qc_reject"].eq("")]
        thresholds = calibrate_thresholds(usable, calibrate, base=thresholds, margin=margin)
    if thresholds is None:
        raise ValueError("run_qc needs thresholds (or calibrate=Q to derive them from this manifest).")
    check_thresholds(thresholds)
    return apply_thresholds(metrics, thresholds), thresholds
