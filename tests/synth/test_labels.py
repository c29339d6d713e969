import math

import numpy as np
import pandas as pd
import pytest

from neurojepa_pl.synth import SURVIVAL_MODEL, sample_subject_labels
from neurojepa_pl.synth.labels import DAYS_PER_YEAR, resolve_prevalence


@pytest.fixture(scope="module")
def plans():
    return [sample_subject_labels(0, i) for i in range(3000)]


def test_labels_are_a_pure_function_of_seed_and_index():
    assert sample_subject_labels(3, 17) == sample_subject_labels(3, 17)
    assert sample_subject_labels(3, 17) != sample_subject_labels(4, 17)
    assert sample_subject_labels(3, 17).subject_id == "sub-0018"


def test_prevalences_and_ages(plans):
    tumour = np.mean([p.flags["tumour"] for p in plans])
    assert tumour == pytest.approx(0.40, abs=0.03)
    assert np.mean([p.flags["haemorrhage"] for p in plans]) == pytest.approx(0.15, abs=0.02)
    ages = np.array([p.sessions[0].age for p in plans])
    assert ages.min() >= 20 and ages.max() <= 90
    wmh = np.array([p.flags["wmh"] for p in plans])
    assert wmh.mean() == pytest.approx(0.35, abs=0.03)
    # WMH is an ageing disease here: prevalence over 70 is far above prevalence under 40.
    assert wmh[ages > 70].mean() > 2 * wmh[ages < 40].mean()


def test_prevalence_override_changes_only_that_pathology():
    base = [sample_subject_labels(1, i) for i in range(300)]
    none = [sample_subject_labels(1, i, prevalence={"tumour": 0.0}) for i in range(300)]
    assert sum(p.flags["tumour"] for p in none) == 0
    assert [p.flags["infarct"] for p in base] == [p.flags["infarct"] for p in none]
    with pytest.raises(ValueError, match="unknown pathology"):
        resolve_prevalence({"glioma": 0.3})


def test_wmh_scale_multiplies_only_the_wmh_volumes():
    base = [sample_subject_labels(1, i) for i in range(200)]
    scaled = [sample_subject_labels(1, i, wmh_scale=4.0) for i in range(200)]
    for plain, big in zip(base, scaled):
        assert plain.flags == big.flags and plain.tumour == big.tumour and plain.survival_time == big.survival_time
        for a, b in zip(plain.sessions, big.sessions):
            assert b.wmh_volume_ml == pytest.approx(4.0 * a.wmh_volume_ml, abs=3e-3)  # both rounded to 1e-3 ml
            assert b.tumour_volume_ml == a.tumour_volume_ml
    assert any(s.wmh_volume_ml > 0 for p in base for s in p.sessions)
    with pytest.raises(ValueError, match="wmh_scale must be positive"):
        sample_subject_labels(1, 0, wmh_scale=0.0)


def test_sessions_share_the_subject_and_move_forward(plans):
    multi = [p for p in plans if len(p.sessions) > 1]
    assert len(multi) > 300  # some patients get 2-3 sessions
    assert max(len(p.sessions) for p in plans) == 3
    for plan in multi:
        ages = [s.age for s in plan.sessions]
        assert ages == sorted(ages) and ages[-1] <= 90
        assert [s.session_id for s in plan.sessions] == [f"ses-{k + 1:02d}" for k in range(len(plan.sessions))]
        for session in plan.sessions:
            # Remaining time from each scan; follow-ups happen before the event/censoring time.
            assert session.survival_time == plan.survival_time - session.offset_days > 0
        if plan.flags["tumour"]:
            volumes = [s.tumour_volume_ml for s in plan.sessions]
            assert volumes == sorted(volumes)


def test_survival_hazard_is_recovered_by_a_cox_fit(plans):
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.util import Surv

    rows = []
    for plan in plans:
        baseline = plan.sessions[0]
        volume = plan.tumour.volume_ml[0] if plan.tumour is not None else 0.0
        rows.append(
            (
                *SURVIVAL_MODEL.covariates(baseline.age, plan.flags["tumour"], volume),
                plan.survival_event == 1,
                plan.survival_time,
            )
        )
    frame = pd.DataFrame(rows, columns=["age_z", "tumour", "volume_z", "event", "time"])
    assert 0.4 < frame["event"].mean() < 0.8
    model = CoxPHSurvivalAnalysis().fit(
        frame[["age_z", "tumour", "volume_z"]], Surv.from_dataframe("event", "time", frame)
    )
    truth = np.array([SURVIVAL_MODEL.age, SURVIVAL_MODEL.tumour, SURVIVAL_MODEL.tumour_volume])
    assert np.all(model.coef_ > 0)  # hazard monotone in every risk factor
    assert np.allclose(model.coef_, truth, atol=0.2), model.coef_


def test_baseline_hazard_matches_its_documented_value():
    # 55-year-old without tumour: mean event time 8 years.
    rate = math.exp(SURVIVAL_MODEL.log_hazard(55.0, 0, 0.0))
    assert 1.0 / rate == pytest.approx(8 * DAYS_PER_YEAR)


def test_acute_infarcts_are_off_by_default_and_change_no_other_label():
    plain = [sample_subject_labels(2, i) for i in range(300)]
    stroke = [sample_subject_labels(2, i, prevalence={"acute_infarct": 0.5}) for i in range(300)]
    assert not any(p.flags["acute_infarct"] for p in plain) and all(p.acute_infarct is None for p in plain)
    acute = np.array([p.flags["acute_infarct"] for p in stroke])
    assert acute.mean() == pytest.approx(0.5, abs=0.07)
    for before, after in zip(plain, stroke):
        assert {k: v for k, v in after.flags.items() if k != "acute_infarct"} == {
            k: v for k, v in before.flags.items() if k != "acute_infarct"
        }
        assert (before.tumour, before.infarct, before.survival_time, before.site) == (
            after.tumour,
            after.infarct,
            after.survival_time,
            after.site,
        )
        if after.flags["acute_infarct"]:
            # Admission scan only; the baseline session is the one the plain cohort has.
            assert after.sessions == before.sessions[:1]
            assert 2.0 <= after.acute_infarct.volume_ml[0] <= 80.0
            assert after.session_labels(after.sessions[0])["any_lesion"] == 1
        else:
            assert after.sessions == before.sessions
