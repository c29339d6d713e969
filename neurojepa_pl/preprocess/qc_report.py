"""HTML report of a QC run: per-modality summary, thresholds, failed scans, thumbnails of the worst scans."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from neurojepa_pl.data.transforms import TransformSettings

from .qc import TemplateResampler, load_pair

SUMMARY_COLUMNS = ["path", "modality", "qc_pass", "qc_reason", "qc_mi", "qc_psnr", "qc_pearson", "qc_orientation"]


def worst_scans(results: pd.DataFrame, count: int) -> pd.DataFrame:
    """Failed scans first (then by Pearson ascending); at most ``count`` rows."""
    ordered = results.assign(_fail=~results["qc_pass"], _pearson=results["qc_pearson"].fillna(-np.inf))
    ordered = ordered.sort_values(["_fail", "_pearson"], ascending=[False, True], kind="stable")
    return ordered.drop(columns=["_fail", "_pearson"]).head(count)


def save_thumbnail(scan: np.ndarray, template: np.ndarray, title: str, path: Path) -> Path:
    """Mid-slices (sagittal, coronal, axial) of the scan (top) and its template (bottom) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(7.5, 5.0))
    for row, (name, volume) in enumerate((("scan", scan), ("template", template))):
        centre = [s // 2 for s in volume.shape]
        slices = (volume[centre[0], :, :], volume[:, centre[1], :], volume[:, :, centre[2]])
        for column, plane in enumerate(slices):
            axes[row, column].imshow(np.rot90(plane), cmap="gray", vmin=0.0, vmax=1.0)
            axes[row, column].set_axis_off()
        axes[row, 0].set_title(name, loc="left", fontsize=9)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def write_html_report(
    results: pd.DataFrame,
    thresholds: dict,
    out_dir: str | Path,
    settings: TransformSettings,
    resampler: TemplateResampler,
    n_worst: int = 8,
) -> Path:
    """Write ``qc_report.html`` and ``thumbnails/*.png`` into ``out_dir``; returns the HTML path."""
    out = Path(out_dir)
    thumbs = out / "thumbnails"
    thumbs.mkdir(parents=True, exist_ok=True)
    summary = (
        results.groupby("modality")
        .agg(
            scans=("qc_pass", "size"),
            passed=("qc_pass", "sum"),
            mi_median=("qc_mi", "median"),
            psnr_median=("qc_psnr", "median"),
            pearson_median=("qc_pearson", "median"),
        )  # fmt: skip
        .reset_index()
    )
    failed = results.loc[~results["qc_pass"], [c for c in SUMMARY_COLUMNS if c in results.columns]]
    figures = []
    for index, row in enumerate(worst_scans(results, n_worst).to_dict(orient="records")):
        caption = f"{Path(row['path']).name}: {row['qc_reason'] or 'passed'}"
        if not row["qc_readable"] or row["qc_reject"]:
            figures.append((None, caption))
            continue
        scan, template = load_pair(row["path"], row["modality"], settings, resampler)
        title = f"{row['modality']} pearson={row['qc_pearson']:.3f} mi={row['qc_mi']:.3f} psnr={row['qc_psnr']:.1f}"
        png = save_thumbnail(scan, template, title, thumbs / f"worst_{index:02d}.png")
        figures.append((png.relative_to(out).as_posix(), caption))
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>neurojepa qc</title>",
        "<style>body{font-family:sans-serif;margin:2em} table{border-collapse:collapse} "
        "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px} figure{display:inline-block;margin:8px}</style>",
        "</head><body><h1>Quality control</h1>",
        f"<p>{len(results)} scans, {int(results['qc_pass'].sum())} passed, {int((~results['qc_pass']).sum())} "
        "failed. The paper's thresholds are not published; see the thresholds below.</p>",
        "<h2>Per modality</h2>",
        summary.to_html(index=False, float_format=lambda v: f"{v:.3f}"),
        "<h2>Thresholds</h2><pre>",
        html.escape(yaml.safe_dump(thresholds, sort_keys=False)),
        "</pre><h2>Failed scans</h2>",
        failed.to_html(index=False, float_format=lambda v: f"{v:.3f}") if len(failed) else "<p>none</p>",
        f"<h2>Worst {len(figures)} scans (scan above, template below, after the loading chain)</h2>",
    ]
    for png, caption in figures:
        image = f"<img src='{html.escape(png)}' alt='thumbnail'>" if png else "<p>(no image: unreadable)</p>"
        parts.append(f"<figure>{image}<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    path = out / "qc_report.html"
    path.write_text("\n".join(parts))
    return path
