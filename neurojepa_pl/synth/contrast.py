"""Tissue fractions -> T1w / T2w / FLAIR / DWI intensities, with per-session and per-site acquisition effects.

Intensity model for contrast ``c`` at a voxel with class fractions ``f_k``::

    s   = sum_k f_k * mu[c, k] * (1 + jitter)            # class means, jittered +-8 % per session
        + DETAIL_WEIGHT * (mu[c, wm] - mu[c, gm]) * t1_detail * healthy_fraction
    s  *= 1 + 0.03 * texture + 0.12 * texture2 * tumour  # shared anatomical texture, heterogeneous tumour
    s   = s ** gamma_site                                # scanner contrast curve
    s  *= exp(bias_site * smooth field)                  # receive-coil bias field
    s   = blur(s, psf_site)                              # resolution / slice thickness
    out = gain_site * |s + sigma_site * (n1 + i n2)|     # Rician noise, then skull-stripped (zero outside ICV)

Means (relative, WM on T1w = 1) keep the orderings T1w WM > GM > CSF, T2w CSF > GM > WM, FLAIR GM > WM > CSF (dark
CSF) for any jitter, and WMH is nearly invisible on T1w (0.96 x WM) but bright on T2w/FLAIR, so multimodal fusion
has something to gain.

DWI is the b = 1000 s/mm^2 trace image of a spin-echo EPI, ``mu[DWI, k] = S0[k] * exp(-b * ADC[k])`` (mono-exponential
decay), with literature-typical apparent diffusion coefficients: GM 0.80, WM 0.70, CSF 3.0 x 1e-3 mm^2/s, so GM and WM
are moderate and close, CSF is very dark, chronic lesions (cystic infarct, gliosis, WMH, vasogenic oedema) have raised
ADC and are not bright. A hyperacute infarct has ADC 0.25e-3 (about a third of normal: cytotoxic oedema) and S0 raised
by 20 % (the early T2 prolongation, still below what FLAIR shows: the DWI-FLAIR mismatch), which makes it about twice
as bright as the tissue it replaced and the brightest tissue (``dwi_signal``). DWI is the one contrast absent from
pretraining (docs/method.md §1.6); its class-mean jitter comes from its own session stream and its site parameters are
drawn after the structural contrasts', so rendering it shifts no draw of T1w / T2w / FLAIR.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .atlas import Atlas
from .fields import gaussian_blur, lattice_noise
from .pathology import CLASSES, TISSUES

STRUCTURAL: tuple[str, ...] = ("T1w", "T2w", "FLAIR")
"""The pretraining contrasts, in the order their random draws are made (kept fixed so outputs stay bit-identical)."""
MODALITIES: tuple[str, ...] = (*STRUCTURAL, "DWI")
DWI_B_VALUE = 1000.0  # s/mm^2
#          gm    wm    csf   wmh   tumour oedema haem  infarct gliosis
DWI_S0: dict[str, float] = dict(zip(CLASSES, (0.60, 0.50, 1.00, 0.72, 0.80, 0.85, 0.25, 0.95, 0.75)))
"""b = 0 signal of the EPI readout (T2-weighted; haemorrhage dark from susceptibility)."""
ADC_MM2_PER_S: dict[str, float] = dict(zip(CLASSES, (0.80, 0.70, 3.00, 1.10, 1.00, 1.50, 0.70, 2.50, 1.20)))
ADC_MM2_PER_S = {k: v * 1e-3 for k, v in ADC_MM2_PER_S.items()}
"""Apparent diffusion coefficient per class (mm^2/s)."""
ACUTE_ADC_MM2_PER_S = 0.25e-3
"""ADC of a hyperacute ischaemic core (restricted diffusion), whatever the tissue it replaces."""
ACUTE_S0_GAIN = 1.2
"""S0 of the hyperacute core relative to its tissue's (early T2 prolongation, not yet visible on FLAIR)."""
CLASS_MEANS: dict[str, dict[str, float]] = {
    #        gm    wm    csf   wmh   tumour oedema haem  infarct gliosis
    "T1w": dict(zip(CLASSES, (0.62, 1.00, 0.28, 0.96, 0.45, 0.70, 1.12, 0.30, 0.72))),
    "T2w": dict(zip(CLASSES, (0.55, 0.38, 1.00, 0.72, 0.82, 0.80, 0.20, 0.95, 0.78))),
    "FLAIR": dict(zip(CLASSES, (0.60, 0.44, 0.10, 0.95, 0.80, 0.92, 0.95, 0.14, 0.92))),
    "DWI": {k: DWI_S0[k] * float(np.exp(-DWI_B_VALUE * ADC_MM2_PER_S[k])) for k in CLASSES},
}
ACUTE_DWI_MEANS: dict[str, float] = {
    k: ACUTE_S0_GAIN * DWI_S0[k] * float(np.exp(-DWI_B_VALUE * ACUTE_ADC_MM2_PER_S)) for k in ("gm", "wm")
}
"""DWI mean of GM / WM that has become hyperacute core (raised S0, restricted ADC)."""
MEAN_JITTER = 0.08
# Weight of the template-T1 residual (deep-GM and cortical detail the probability maps lack).
DETAIL_WEIGHT = 0.8
TEXTURE_SD = 0.03
TUMOUR_TEXTURE_SD = 0.12
BIAS_CORRELATION_MM = 45.0
# Stored intensities are gain * signal * INTENSITY_UNITS, rounded to int16 (see nifti.py).
INTENSITY_UNITS = 1000.0


@dataclass(frozen=True)
class SiteProfile:
    """Acquisition effects of one site (scanner), drawn once per (cohort seed, site).

    Attributes:
        gamma: per-contrast exponent of the contrast curve (0.8..1.25).
        gain: per-contrast global intensity scale (0.6..1.6): sites store different raw units.
        noise: per-contrast Rician sigma relative to WM-on-T1w signal (0.01..0.04; DWI 0.01..0.03, whose WM signal
            is about a quarter of T1w's: the low SNR of b = 1000 EPI).
        bias: sd of the log bias field (0.05..0.25).
        psf_mm: in-plane Gaussian blur sd (0..0.8 mm) and extra through-plane (z) blur (0..1.2 mm, thick slices).
    """

    gamma: dict[str, float]
    gain: dict[str, float]
    noise: dict[str, float]
    bias: float
    psf_mm: tuple[float, float]

    @staticmethod
    def draw(seed: int, site_index: int) -> SiteProfile:
        """Deterministic profile of site ``site_index`` for cohort ``seed``; site 0 is always the cleanest."""
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 1_000_003, int(site_index)]))
        gamma = {m: float(rng.uniform(0.8, 1.25)) for m in STRUCTURAL}
        gain = {m: float(rng.uniform(0.6, 1.6)) for m in STRUCTURAL}
        noise = {m: float(rng.uniform(0.01, 0.04)) for m in STRUCTURAL}
        bias = float(rng.uniform(0.05, 0.25))
        psf = (float(rng.uniform(0.0, 0.8)), float(rng.uniform(0.0, 1.2)))
        # DWI after every structural draw: the structural parameters of a site are those drawn before DWI existed.
        gamma["DWI"] = float(rng.uniform(0.8, 1.25))
        gain["DWI"] = float(rng.uniform(0.6, 1.6))
        noise["DWI"] = float(rng.uniform(0.01, 0.03))
        if site_index == 0:
            gamma = dict.fromkeys(MODALITIES, 1.0)
            gain = dict.fromkeys(MODALITIES, 1.0)
            noise = {**dict.fromkeys(STRUCTURAL, 0.015), "DWI": 0.01}
            bias, psf = 0.08, (0.0, 0.0)
        return SiteProfile(gamma=gamma, gain=gain, noise=noise, bias=bias, psf_mm=psf)


def jittered_means(generator: torch.Generator, modalities: tuple[str, ...] = STRUCTURAL) -> dict[str, dict[str, float]]:
    """Class means with a +-``MEAN_JITTER`` uniform multiplicative jitter per (contrast, class).

    Args:
        generator: the session's stream for these contrasts; one ``[len(modalities), len(CLASSES)]`` draw.
        modalities: contrasts in draw order (the structural three share one stream; DWI has its own).

    Returns:
        ``{modality: {class: mean}}``; for DWI also the hyperacute core's ``"acute_gm"`` / ``"acute_wm"`` means,
        jittered like GM / WM so the core keeps its contrast to the tissue it replaced.
    """
    jitter = (torch.rand(len(modalities), len(CLASSES), generator=generator, dtype=torch.float64) * 2 - 1) * MEAN_JITTER
    means = {
        m: {k: CLASS_MEANS[m][k] * (1.0 + float(jitter[i, j])) for j, k in enumerate(CLASSES)}
        for i, m in enumerate(modalities)
    }
    if "DWI" in means:
        row = modalities.index("DWI")
        for tissue in ("gm", "wm"):
            scale = 1.0 + float(jitter[row, CLASSES.index(tissue)])
            means["DWI"][f"acute_{tissue}"] = ACUTE_DWI_MEANS[tissue] * scale
    return means


def tissue_signal(
    fractions: torch.Tensor, detail: torch.Tensor, means: dict[str, dict[str, float]], modalities: tuple[str, ...]
) -> torch.Tensor:
    """Noise-free signal of several contrasts from class fractions and the template detail map.

    Args:
        fractions: ``[len(CLASSES), K]`` class fractions.
        detail: ``[K]`` warped template detail.
        means: ``{modality: {class: mean}}``.
        modalities: contrasts to compute, in output order.

    Returns:
        ``[len(modalities), K]`` float32, non-negative.
    """
    # Elementwise accumulation, not a matmul: BLAS may split the sum differently for different thread counts, and
    # the images must not depend on the machine. All-zero classes (absent lesions) are skipped.
    present = [k for k, name in enumerate(CLASSES) if k < len(TISSUES) or bool(fractions[k].any())]
    healthy_detail = detail * (fractions[0] + fractions[1] + fractions[2])
    signal = torch.empty((len(modalities), fractions.shape[1]), dtype=torch.float32)
    for row, modality in enumerate(modalities):
        contrast = DETAIL_WEIGHT * (means[modality]["wm"] - means[modality]["gm"])
        torch.mul(healthy_detail, contrast, out=signal[row])
        for k in present:
            signal[row].add_(fractions[k], alpha=means[modality][CLASSES[k]])
    return signal.clamp_(min=0.0)


def dwi_signal(
    fractions: torch.Tensor, detail: torch.Tensor, means: dict[str, float], acute: torch.Tensor | None
) -> torch.Tensor:
    """Noise-free b = 1000 DWI signal ``[K]`` with the hyperacute core's restricted diffusion.

    ``sum_k f_k * mu[DWI, k]`` plus, where a share ``a`` of a voxel's GM / WM is acute core,
    ``a * (f_gm * (mu_acute_gm - mu_gm) + f_wm * (mu_acute_wm - mu_wm))``.

    Args:
        fractions: ``[len(CLASSES), K]`` class fractions.
        detail: ``[K]`` warped template detail.
        means: the session's DWI means (``jittered_means(..., ("DWI",))["DWI"]``, with the ``acute_*`` entries).
        acute: ``[K]`` share of each point's GM + WM in the acute core (``LesionPainter.acute_core``) or None.

    Returns:
        ``[K]`` float32, non-negative.
    """
    signal = tissue_signal(fractions, detail, {"DWI": means}, ("DWI",))[0]
    if acute is not None:
        gm, wm = fractions[CLASSES.index("gm")], fractions[CLASSES.index("wm")]
        excess = gm * (means["acute_gm"] - means["gm"]) + wm * (means["acute_wm"] - means["wm"])
        signal.addcmul_(acute, excess)
    return signal.clamp_(min=0.0)


def texture_modulation(
    texture: torch.Tensor, tumour_texture: torch.Tensor | None, tumour: torch.Tensor
) -> torch.Tensor:
    """Multiplicative anatomical texture ``[K]``: ``1 + 0.03 * texture (+ 0.12 * tumour_texture * tumour)``."""
    modulation = 1.0 + TEXTURE_SD * texture
    if tumour_texture is not None:
        modulation.addcmul_(tumour_texture, tumour, value=TUMOUR_TEXTURE_SD)
    return modulation


def bias_lattice(atlas: Atlas, generator: torch.Generator) -> torch.Tensor:
    """Unit-sd log bias field of one contrast on a coarse box lattice ``[1, m1, m2, m3]`` (correlation 45 mm)."""
    return lattice_noise(atlas.box_shape, BIAS_CORRELATION_MM / atlas.spacing_mm, generator)


def acquire(
    modality: str,
    signal: torch.Tensor,
    bias: torch.Tensor,
    mask: torch.Tensor,
    site: SiteProfile,
    atlas: Atlas,
    generator: torch.Generator,
) -> torch.Tensor:
    """Scanner effects on one contrast's noise-free signal at the atlas points: contrast curve, bias field, blur,
    Rician noise, gain and skull strip.

    Args:
        modality: ``"T1w"``, ``"T2w"``, ``"FLAIR"`` or ``"DWI"``.
        signal: ``[K]`` noise-free signal (modified in place).
        bias: ``[K]`` unit-sd log bias field (``bias_lattice`` sampled at the points), consumed.
        mask: ``[K]`` bool intracranial mask (the skull strip).
        site: the subject's ``SiteProfile``.
        atlas: the grid's atlas (points, spacing, box for the blur).
        generator: this session/contrast's noise stream.

    Returns:
        ``[K]`` float32 in stored units (before rounding), zero outside ``mask``.
    """
    gamma = site.gamma[modality]
    if gamma != 1.0:
        signal.pow_(gamma)
    signal.mul_(bias.mul_(site.bias).exp_())
    spacing = atlas.spacing_mm
    in_plane, through_plane = site.psf_mm
    sigma_vox = (in_plane / spacing[0], in_plane / spacing[1], float(np.hypot(in_plane, through_plane)) / spacing[2])
    if max(sigma_vox) >= 0.2:  # below 0.2 voxel the Gaussian is an identity up to rounding
        signal = atlas.from_box(gaussian_blur(atlas.to_box(signal), sigma_vox))  # type: ignore[arg-type]
    sigma = site.noise[modality]
    real = torch.randn(signal.shape, generator=generator, dtype=torch.float32).mul_(sigma).add_(signal)
    imaginary = torch.randn(signal.shape, generator=generator, dtype=torch.float32).mul_(sigma)
    return torch.hypot(real, imaginary).mul_(site.gain[modality] * INTENSITY_UNITS).mul_(mask)
