"""Figures of a routing analysis (the paper's Fig. 5): foreground / background and modality bars, token x expert
heat maps, and the expert maps drawn with nilearn on the MNI152 template.

Every function returns a ``matplotlib.figure.Figure`` built without pyplot (no global state, no display). The
template is nilearn's packaged MNI ICBM152 2009 T1 (:func:`nilearn.datasets.load_mni152_template`, read from the
installed package: no download).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import nibabel as nib
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

__all__ = [
    "foreground_background_figure",
    "modality_figure",
    "token_expert_figure",
    "dominant_expert_figure",
    "expert_share_figure",
    "mni_template",
    "expert_colormap",
]


def mni_template(resolution: int = 2) -> nib.Nifti1Image:
    """nilearn's packaged MNI152 T1 template (1 or 2 mm), the background of the map figures."""
    from nilearn.datasets import load_mni152_template

    return load_mni152_template(resolution=resolution)


def expert_colormap(num_experts: int) -> ListedColormap:
    """One distinct colour per expert number 1..E: tab10 up to 10 experts; tab20 with its dark shades first (so that
    neighbouring numbers never get two shades of one hue) up to 20; hsv beyond."""
    if num_experts <= 10:
        colours = list(matplotlib.colormaps["tab10"].colors[:num_experts])
    elif num_experts <= 20:
        tab20 = matplotlib.colormaps["tab20"].colors
        colours = [tab20[i] for i in (*range(0, 20, 2), *range(1, 20, 2))][:num_experts]
    else:
        colours = [matplotlib.colormaps["hsv"](i / num_experts) for i in range(num_experts)]
    return ListedColormap(colours, name=f"experts{num_experts}")


def _experts(values: Sequence[float]) -> np.ndarray:
    return np.arange(1, len(values) + 1)


def foreground_background_figure(layer: Mapping[str, Any], num_experts: int) -> Figure:
    """Each expert's share of the foreground and of the background selections, with the balanced share 1/E
    (Fig. 5a-c), for one layer of :func:`neurojepa_pl.analysis.routing.summarize_routing`."""
    fig = Figure(figsize=(max(5.0, 0.45 * num_experts + 2), 3.4), layout="constrained")
    ax = fig.add_subplot()
    share = layer["share"]
    experts = _experts(share["foreground"])
    width = 0.4
    ax.bar(experts - width / 2, share["foreground"], width, label="foreground", color="tab:red")
    ax.bar(experts + width / 2, share["background"], width, label="background", color="tab:gray")
    ax.axhline(1.0 / num_experts, color="black", lw=0.8, ls="--", label="balanced (1/E)")
    ax.set(xlabel="expert", ylabel="share of selections", title=f"block {layer['block']}: foreground vs background")
    ax.set_xticks(experts)
    ax.legend(fontsize="small", frameon=False)
    return fig


def modality_figure(layer: Mapping[str, Any], num_experts: int) -> Figure:
    """Each expert's share of the foreground selections per modality (Fig. 5d-f)."""
    by_modality = layer["foreground_share_by_modality"]
    fig = Figure(figsize=(max(5.0, 0.45 * num_experts + 2), 3.4), layout="constrained")
    ax = fig.add_subplot()
    names = list(by_modality)
    experts = np.arange(1, num_experts + 1)
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        ax.bar(experts - 0.4 + width * (i + 0.5), by_modality[name], width, label=name)
    ax.axhline(1.0 / num_experts, color="black", lw=0.8, ls="--", label="balanced (1/E)")
    ax.set(xlabel="expert", ylabel="share of foreground selections", title=f"block {layer['block']}: by modality")
    ax.set_xticks(experts)
    ax.legend(fontsize="small", frameon=False)
    return fig


def token_expert_figure(token_counts: np.ndarray, num_scans: int, block: int, foreground: np.ndarray) -> Figure:
    """Heat map of how often each token position selects each expert (Fig. 5g-h).

    Args:
        token_counts: ``[N, E]`` selections of one layer.
        num_scans: scans behind the counts (the colour is the fraction of scans).
        block: encoder block index (title).
        foreground: ``[N]`` fraction of scans in which each token is foreground, drawn as a strip above.
    """
    rate = token_counts.T / max(1, num_scans)  # [E, N]
    fig = Figure(figsize=(10, 0.22 * rate.shape[0] + 1.8), layout="constrained")
    strip, ax = fig.subplots(2, 1, sharex=True, height_ratios=[1, max(2, rate.shape[0] // 2)])
    strip.imshow(foreground[None, :], aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    strip.set_yticks([0], ["fg"])
    image = ax.imshow(rate, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set(xlabel="token index", ylabel="expert", title=None)
    ax.set_yticks(np.arange(rate.shape[0]), [str(e) for e in range(1, rate.shape[0] + 1)], fontsize="x-small")
    strip.set_title(f"block {block}: fraction of scans whose token selects the expert")
    fig.colorbar(image, ax=[strip, ax], fraction=0.03)
    return fig


def _cuts(image: nib.Nifti1Image, axis: int, count: int) -> list[float]:
    """World coordinates of ``count`` evenly spaced token centres along a world axis, inside the grid."""
    shape = image.shape[:3]
    centres = [image.affine[axis, :3] @ np.array(v, dtype=float) + image.affine[axis, 3]
               for v in ([0, 0, 0], [s - 1 for s in shape])]  # fmt: skip
    low, high = sorted(centres)
    return [float(c) for c in np.linspace(low, high, count + 2)[1:-1]]


def dominant_expert_figure(
    dominant: nib.Nifti1Image,
    foreground_fraction: nib.Nifti1Image,
    num_experts: int,
    title: str,
    template: nib.Nifti1Image | None = None,
    min_foreground: float = 0.5,
) -> Figure:
    """The dominant expert of each foreground token over the MNI152 template (Fig. 5i-j), with nilearn's ``plot_roi``.

    Tokens that are foreground in fewer than ``min_foreground`` of the scans are left transparent.
    """
    from nilearn import plotting

    template = template if template is not None else mni_template()
    labels = np.asarray(dominant.dataobj).astype(np.int16)
    labels[np.asarray(foreground_fraction.dataobj) < min_foreground] = 0
    shown = nib.Nifti1Image(labels, dominant.affine)
    legend_columns = 1 + (num_experts - 1) // 8
    fig = Figure(figsize=(12 + 1.2 * legend_columns, 3.2))
    width = (1.0 - 0.1 * legend_columns * 12 / (12 + 1.2 * legend_columns)) / 3
    cuts = [_cuts(dominant, axis, 3) for axis in range(3)]
    cmap = expert_colormap(num_experts)
    for row, (mode, axis) in enumerate((("x", 0), ("y", 1), ("z", 2))):
        ax = fig.add_axes((row * width, 0.0, width, 0.9))
        plotting.plot_roi(
            shown, bg_img=template, figure=fig, axes=ax, display_mode=mode, cut_coords=cuts[axis], cmap=cmap,
            vmin=0.5, vmax=num_experts + 0.5, resampling_interpolation="nearest", colorbar=False, annotate=True,
            draw_cross=False,
        )  # fmt: skip
    # A legend of expert numbers rather than a continuous colour bar: the values are labels.
    patches = [Patch(color=cmap(e), label=f"expert {e + 1}") for e in range(num_experts)]
    fig.legend(handles=patches, loc="center right", fontsize="small", frameon=False, ncols=legend_columns)
    fig.suptitle(title)
    return fig


def expert_share_figure(
    share: nib.Nifti1Image, block: int, template: nib.Nifti1Image | None = None, columns: int = 4
) -> Figure:
    """Each expert's share of the selections per token (one axial mosaic per expert) over the MNI152 template, with
    nilearn's ``plot_stat_map``; one colour scale for all experts of the layer."""
    from nilearn import plotting

    template = template if template is not None else mni_template()
    data = np.asarray(share.dataobj, dtype=np.float32)
    num_experts = data.shape[3]
    rows = -(-num_experts // columns)
    fig = Figure(figsize=(3.6 * columns, 1.6 * rows + 0.6))
    vmax = float(data.max()) or 1.0
    cuts = _cuts(share.slicer[..., 0], 2, 3)
    for e in range(num_experts):
        ax = fig.add_subplot(rows, columns, e + 1)
        plotting.plot_stat_map(
            nib.Nifti1Image(data[..., e], share.affine), bg_img=template, figure=fig, axes=ax, display_mode="z",
            cut_coords=cuts, cmap="inferno", vmin=0.0, vmax=vmax, symmetric_cbar=False, colorbar=e == num_experts - 1,
            resampling_interpolation="nearest", annotate=False, draw_cross=False, title=f"expert {e + 1}",
        )  # fmt: skip
    fig.suptitle(
        f"block {block}: share of the token's selections (max {vmax:.2f}; balanced 1/E = {1 / num_experts:.2f})"
    )
    return fig
