import itertools
import math

import numpy as np
import pytest
import torch

from neurojepa_pl.synth.contrast import (
    ACUTE_DWI_MEANS,
    CLASS_MEANS,
    MEAN_JITTER,
    MODALITIES,
    STRUCTURAL,
    SiteProfile,
    dwi_signal,
    jittered_means,
)
from neurojepa_pl.synth.fields import torch_generator
from neurojepa_pl.synth.pathology import CLASSES, class_index

ORDERINGS = {"T1w": ("wm", "gm", "csf"), "T2w": ("csf", "gm", "wm"), "FLAIR": ("gm", "wm", "csf")}


@pytest.mark.parametrize("modality", STRUCTURAL)
def test_class_means_keep_the_tissue_ordering_under_any_jitter(modality):
    means = CLASS_MEANS[modality]
    for higher, lower in itertools.pairwise(ORDERINGS[modality]):
        assert means[higher] * (1 - MEAN_JITTER) > means[lower] * (1 + MEAN_JITTER)


def test_wmh_is_subtle_on_t1w_and_bright_on_t2w_and_flair():
    assert abs(CLASS_MEANS["T1w"]["wmh"] / CLASS_MEANS["T1w"]["wm"] - 1) <= 0.05
    assert CLASS_MEANS["FLAIR"]["wmh"] / CLASS_MEANS["FLAIR"]["wm"] > 1.8
    assert CLASS_MEANS["T2w"]["wmh"] / CLASS_MEANS["T2w"]["wm"] > 1.6
    # FLAIR suppresses CSF (dark) while T2w makes it the brightest tissue.
    assert CLASS_MEANS["FLAIR"]["csf"] < 0.3 * CLASS_MEANS["FLAIR"]["wm"]
    assert CLASS_MEANS["T2w"]["csf"] == max(CLASS_MEANS["T2w"][k] for k in ("gm", "wm", "csf"))


def test_site_profiles_are_deterministic_and_differ_between_sites():
    assert SiteProfile.draw(0, 1) == SiteProfile.draw(0, 1)
    assert SiteProfile.draw(0, 1) != SiteProfile.draw(0, 2)
    assert SiteProfile.draw(0, 1) != SiteProfile.draw(1, 1)
    reference = SiteProfile.draw(5, 0)
    assert reference.gamma == dict.fromkeys(MODALITIES, 1.0) and reference.psf_mm == (0.0, 0.0)
    assert reference.noise == {"T1w": 0.015, "T2w": 0.015, "FLAIR": 0.015, "DWI": 0.01}


def _jitter_bounds(value: float) -> tuple[float, float]:
    return value * (1 - MEAN_JITTER), value * (1 + MEAN_JITTER)


def test_dwi_means_follow_the_b1000_trace_ordering_under_any_jitter():
    dwi = CLASS_MEANS["DWI"]
    # S0 * exp(-b ADC) with b = 1000 s/mm^2: WM 0.5 * exp(-0.7), CSF 1.0 * exp(-3.0).
    assert dwi["wm"] == pytest.approx(0.5 * math.exp(-0.7))
    assert dwi["csf"] == pytest.approx(math.exp(-3.0))
    low_gm, high_gm = _jitter_bounds(dwi["gm"])
    low_wm, high_wm = _jitter_bounds(dwi["wm"])
    # GM and WM moderate and close (ratio 0.8..1.3), CSF very dark (below a quarter of either) for any jitter.
    assert 0.8 < low_gm / high_wm and high_gm / low_wm < 1.3
    assert _jitter_bounds(dwi["csf"])[1] < 0.25 * min(low_gm, low_wm)
    # The hyperacute core shares its tissue's jitter (test below), so it stays >= 1.45 x that tissue, and it is
    # brighter than every class for any jitter.
    for tissue in ("gm", "wm"):
        assert ACUTE_DWI_MEANS[tissue] > 1.45 * dwi[tissue]
    assert min(ACUTE_DWI_MEANS.values()) * (1 - MEAN_JITTER) > max(dwi.values()) * (1 + MEAN_JITTER)
    # Chronic lesions are not bright: the cystic infarct is CSF-like, gliosis / WMH / vasogenic oedema near tissue.
    assert dwi["infarct"] < 0.4 * dwi["wm"]
    for lesion in ("gliosis", "wmh", "oedema"):
        assert dwi[lesion] < 1.1 * max(dwi["gm"], dwi["wm"]), lesion


def test_dwi_signal_brightens_only_the_acute_core():
    fractions = torch.zeros(len(CLASSES), 4)
    fractions[class_index("gm"), :2] = 1.0
    fractions[class_index("wm"), 2:] = 1.0
    acute = torch.tensor([0.0, 1.0, 0.0, 0.5])
    means = jittered_means(torch_generator(0, 1), ("DWI",))["DWI"]
    signal = dwi_signal(fractions, torch.zeros(4), means, acute)
    assert signal[0] == pytest.approx(means["gm"]) and signal[2] == pytest.approx(means["wm"])
    assert signal[1] == pytest.approx(means["acute_gm"])
    assert signal[3] == pytest.approx(0.5 * (means["wm"] + means["acute_wm"]))
    # The core keeps its contrast to the tissue it replaced under the session's jitter.
    assert means["acute_gm"] / means["gm"] == pytest.approx(ACUTE_DWI_MEANS["gm"] / CLASS_MEANS["DWI"]["gm"])


def test_adding_dwi_to_the_site_draws_keeps_the_structural_parameters():
    profile = SiteProfile.draw(4, 2)
    assert set(profile.gamma) == set(MODALITIES)
    # The first draws of the site stream are the structural gammas, as before DWI existed.
    rng = np.random.default_rng(np.random.SeedSequence([4, 1_000_003, 2]))
    assert [profile.gamma[m] for m in STRUCTURAL] == [float(rng.uniform(0.8, 1.25)) for _ in STRUCTURAL]
    assert 0.01 <= profile.noise["DWI"] <= 0.03
