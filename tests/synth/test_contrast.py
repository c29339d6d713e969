import itertools

import pytest

from neurojepa_pl.synth.contrast import CLASS_MEANS, MEAN_JITTER, MODALITIES, SiteProfile

ORDERINGS = {"T1w": ("wm", "gm", "csf"), "T2w": ("csf", "gm", "wm"), "FLAIR": ("gm", "wm", "csf")}


@pytest.mark.parametrize("modality", MODALITIES)
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
