"""Subject plans: every label and generative parameter of a SynthBrain subject, drawn without rendering images.

``sample_subject_labels(seed, index)`` is a pure function of ``(seed, index)`` and the cohort options; the renderer
(``cohort.generate_subject``) draws its image noise from separate streams, so label statistics (prevalence, survival,
ages) can be studied on thousands of subjects in milliseconds and match the rendered cohort exactly.

Survival follows a KNOWN proportional-hazards model (exponential, time in days from the session's scan)::

    log h = log(1 / 2922)                        # baseline: mean 8 years for a 55-year-old without tumour
          + 0.6 * age_z                          # age_z = (baseline age - 55) / 20
          + 1.5 * tumour                         # tumour present at baseline
          + 0.5 * tumour_volume_z                # tumour * (baseline nominal core volume ml - 18) / 12

with independent exponential censoring (mean 10 years) and administrative censoring at 10 years after the baseline
scan. Follow-up sessions happen only before the event/censoring time, and each session row carries the remaining time.

Acute (hyperacute, < 4.5 h) ischaemic infarcts are the lesion of stroke cohorts, not an incidental finding, so their
default prevalence is 0 (``prevalence={"acute_infarct": 0.5}`` builds a stroke cohort). Their draws come after every
other draw of the subject's stream, so asking for them changes no other label; a subject with one is scanned at
admission only (SynthBrain does not model the lesion's evolution into a chronic infarct).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

DAYS_PER_YEAR = 365.25
AGE_RANGE = (20.0, 90.0)
DEFAULT_PREVALENCE: dict[str, float] = {
    "wmh": 0.35,
    "tumour": 0.40,
    "haemorrhage": 0.15,
    "infarct": 0.15,
    "acute_infarct": 0.0,
}
PATHOLOGIES: tuple[str, ...] = ("wmh", "tumour", "haemorrhage", "infarct", "acute_infarct")
"""Label columns of the pathologies; ``infarct`` is a chronic (cystic) infarct, ``acute_infarct`` a hyperacute one
(bright on DWI only: the DWI-FLAIR mismatch of the first hours)."""
# Stream ids of numpy.random.SeedSequence((seed, index, stream, ...)); the renderer uses others (cohort.py).
LABEL_STREAM = 0

# Lesion sites in MNI world mm for the left hemisphere (x is mirrored for the right); checked against the atlas in
# tests (deep WM for tumours, deep grey nuclei or lobar WM for haemorrhages, cortex/WM junction for infarcts).
TUMOUR_SITES_MM = (
    (-26.0, 20.0, 28.0),
    (-28.0, -40.0, 34.0),
    (-24.0, -10.0, 36.0),
    (-26.0, -70.0, 12.0),
    (-22.0, 38.0, 6.0),
)
HAEMORRHAGE_SITES_MM = ((-24.0, 2.0, 2.0), (-12.0, -18.0, 8.0), (-30.0, -52.0, 30.0), (-30.0, 28.0, 22.0))
INFARCT_SITES_MM = (
    (-46.0, -8.0, 30.0),
    (-44.0, 20.0, 12.0),
    (-48.0, -40.0, 28.0),
    (-14.0, -82.0, 6.0),
    (-8.0, 30.0, 42.0),
)
SITE_JITTER_MM = 4.0
# Median nominal volume of an acute ischaemic core (lognormal, sd 0.7 in log space, clipped to 2..80 ml): the order of
# the DWI lesion volumes of stroke-unit admissions.
ACUTE_INFARCT_MEDIAN_ML = 15.0


@dataclass(frozen=True)
class SurvivalModel:
    """Exponential proportional-hazards model of the synthetic outcome (coefficients per unit of each z-score)."""

    log_baseline_hazard_per_day: float = math.log(1.0 / (8.0 * DAYS_PER_YEAR))
    age: float = 0.6
    tumour: float = 1.5
    tumour_volume: float = 0.5
    age_mean: float = 55.0
    age_sd: float = 20.0
    tumour_volume_mean_ml: float = 18.0
    tumour_volume_sd_ml: float = 12.0
    censoring_mean_days: float = 10.0 * DAYS_PER_YEAR
    administrative_censoring_days: float = 10.0 * DAYS_PER_YEAR

    def covariates(self, age: float, tumour: int, tumour_volume_ml: float) -> tuple[float, float, float]:
        """``(age_z, tumour, tumour_volume_z)`` as they enter the linear predictor."""
        age_z = (age - self.age_mean) / self.age_sd
        volume_z = tumour * (tumour_volume_ml - self.tumour_volume_mean_ml) / self.tumour_volume_sd_ml
        return age_z, float(tumour), volume_z

    def log_hazard(self, age: float, tumour: int, tumour_volume_ml: float) -> float:
        """Log hazard per day at baseline."""
        age_z, tumour_f, volume_z = self.covariates(age, tumour, tumour_volume_ml)
        linear = self.age * age_z + self.tumour * tumour_f + self.tumour_volume * volume_z
        return self.log_baseline_hazard_per_day + linear


SURVIVAL_MODEL = SurvivalModel()


@dataclass(frozen=True)
class Lesion:
    """A focal lesion: centre (world mm), nominal volume (ml) per session and shape parameters.

    Attributes:
        centre_mm: ``(x, y, z)`` in MNI world mm.
        volume_ml: nominal core volume at each session (same length as the plan's sessions).
        halo_ratio: volume of the surrounding class (tumour oedema, haemorrhage oedema, infarct gliosis) relative
            to the core.
        axes: ellipsoid semi-axis ratios (product 1).
        rotation: ``[3, 3]`` orientation of the ellipsoid.
    """

    centre_mm: tuple[float, float, float]
    volume_ml: tuple[float, ...]
    halo_ratio: float
    axes: tuple[float, float, float]
    rotation: tuple[tuple[float, float, float], ...]


@dataclass(frozen=True)
class SessionPlan:
    """One scanning session of a subject."""

    session_id: str
    offset_days: float
    age: float
    wmh_volume_ml: float
    tumour_volume_ml: float
    survival_time: float
    survival_event: int


@dataclass(frozen=True)
class SubjectPlan:
    """Everything about a subject that is not image noise.

    Attributes:
        subject_id: ``"sub-0001"`` style (index + 1, four digits).
        index: 0-based subject index in the cohort.
        sex: ``"M"`` or ``"F"`` (no effect on the images: all scans are registered to MNI, which removes head size).
        site: ``"site-0"`` .. ``"site-{K-1}"``; site_index its number.
        atrophy_rate: subject multiplier of the age effect on ventricles and cortex (lognormal, 0.6..1.6).
        flags: ``{"wmh", "tumour", "haemorrhage", "infarct", "acute_infarct"} -> 0/1``.
        tumour, haemorrhage, infarct: ``Lesion`` or None; wmh_volume_ml per session lives in ``sessions``.
        acute_infarct: the hyperacute ischaemic core (``Lesion``, no halo) or None.
        survival_time, survival_event: from the baseline scan (days, 0/1).
        sessions: the sessions, baseline first.
    """

    subject_id: str
    index: int
    sex: str
    site: str
    site_index: int
    atrophy_rate: float
    flags: dict[str, int]
    tumour: Lesion | None
    haemorrhage: Lesion | None
    infarct: Lesion | None
    survival_time: float
    survival_event: int
    sessions: tuple[SessionPlan, ...] = field(default_factory=tuple)
    acute_infarct: Lesion | None = None

    def session_labels(self, session: SessionPlan) -> dict[str, object]:
        """The manifest label columns of one session (nominal lesion volumes)."""
        return {
            "site": self.site,
            "age": round(session.age, 2),
            "sex": self.sex,
            **{name: self.flags[name] for name in PATHOLOGIES},
            "any_lesion": int(any(self.flags.values())),
            "wmh_volume_ml": session.wmh_volume_ml,
            "tumour_volume_ml": session.tumour_volume_ml,
            "acute_infarct_volume_ml": self.acute_infarct.volume_ml[0] if self.acute_infarct is not None else 0.0,
            "survival_time": session.survival_time,
            "survival_event": session.survival_event,
        }


def resolve_prevalence(prevalence: dict[str, float] | None) -> dict[str, float]:
    """Merge a partial prevalence dict into the defaults, checking names and ranges."""
    merged = dict(DEFAULT_PREVALENCE)
    for name, value in (prevalence or {}).items():
        if name not in DEFAULT_PREVALENCE:
            raise ValueError(f"unknown pathology {name!r} in prevalence; expected some of {sorted(DEFAULT_PREVALENCE)}")
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"prevalence[{name!r}] must be in [0, 1]; got {value}")
        merged[name] = float(value)
    return merged


def age_factor(age: float) -> float:
    """``(age - 20) / 70``: 0 at 20 years, 1 at 90 years; drives atrophy and WMH load."""
    return (age - AGE_RANGE[0]) / (AGE_RANGE[1] - AGE_RANGE[0])


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.standard_normal(4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _lesion(
    rng: np.random.Generator,
    sites: tuple[tuple[float, float, float], ...],
    volumes: tuple[float, ...],
    halo_ratio: float,
    elongation: float,
) -> Lesion:
    centre = np.array(sites[rng.integers(len(sites))], dtype=float)
    if rng.random() < 0.5:
        centre[0] = -centre[0]
    centre += np.clip(rng.normal(0.0, SITE_JITTER_MM, 3), -2 * SITE_JITTER_MM, 2 * SITE_JITTER_MM)
    axes = np.exp(rng.uniform(-elongation, elongation, 3))
    axes /= np.prod(axes) ** (1.0 / 3.0)
    return Lesion(
        centre_mm=tuple(float(c) for c in centre),  # type: ignore[arg-type]
        volume_ml=tuple(round(float(v), 3) for v in volumes),
        halo_ratio=float(halo_ratio),
        axes=tuple(float(a) for a in axes),  # type: ignore[arg-type]
        rotation=tuple(tuple(float(v) for v in row) for row in _random_rotation(rng)),
    )


def _n_sessions(rng: np.random.Generator, sessions: tuple[int, int]) -> int:
    """Sessions planned: ``lo`` plus a run of extra sessions each kept with probability 0.4, up to ``hi``."""
    low, high = sessions
    count = low
    while count < high and rng.random() < 0.4:
        count += 1
    return count


def sample_subject_labels(
    seed: int,
    index: int,
    n_sites: int = 3,
    sessions: tuple[int, int] = (1, 3),
    prevalence: dict[str, float] | None = None,
    survival: SurvivalModel = SURVIVAL_MODEL,
    wmh_scale: float = 1.0,
) -> SubjectPlan:
    """Draw the plan (labels and generative parameters) of subject ``index`` of the cohort with ``seed``.

    Args:
        seed: cohort seed.
        index: 0-based subject index.
        n_sites: number of acquisition sites; the subject's site is uniform over them.
        sessions: ``(min, max)`` planned sessions per subject; follow-ups fall 0.5-2.5 years apart and are dropped
            after the event/censoring time or beyond age 90.
        prevalence: pathology prevalences (defaults ``DEFAULT_PREVALENCE``); WMH probability rises with age around
            its mean prevalence: ``p = prevalence * (0.3 + 1.4 * age_factor)``, clipped to [0, 1]. A subject with an
            acute infarct keeps its baseline session only.
        survival: the hazard model.
        wmh_scale: multiplies every WMH volume (the 80 ml cap too); > 1 builds a WMH-detection task where FLAIR
            carries a clear signal (the multimodal experiments use 4). Changes no other draw.

    Returns:
        The ``SubjectPlan``.
    """
    low, high = int(sessions[0]), int(sessions[1])
    if not 1 <= low <= high:
        raise ValueError(f"sessions must be (min, max) with 1 <= min <= max; got {sessions}")
    if n_sites < 1:
        raise ValueError(f"n_sites must be at least 1; got {n_sites}")
    rates = resolve_prevalence(prevalence)
    if not wmh_scale > 0:
        raise ValueError(f"wmh_scale must be positive; got {wmh_scale}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), LABEL_STREAM]))

    sex = "M" if rng.random() < 0.5 else "F"
    site_index = int(rng.integers(n_sites))
    age0 = float(rng.uniform(*AGE_RANGE))
    atrophy_rate = float(np.clip(np.exp(rng.normal(0.0, 0.25)), 0.6, 1.6))
    planned = _n_sessions(rng, (low, high))
    offsets = np.concatenate([[0.0], np.cumsum(rng.uniform(0.5, 2.5, planned - 1) * DAYS_PER_YEAR)])

    flags = {
        "wmh": int(rng.random() < min(1.0, rates["wmh"] * (0.3 + 1.4 * age_factor(age0)))),
        "tumour": int(rng.random() < rates["tumour"]),
        "haemorrhage": int(rng.random() < rates["haemorrhage"]),
        "infarct": int(rng.random() < rates["infarct"]),
    }
    years = offsets / DAYS_PER_YEAR

    # Every draw below happens whatever the flags are, so changing one prevalence does not reshuffle the others.
    wmh0 = float(np.clip(np.exp(rng.normal(math.log(3.0 + 12.0 * age_factor(age0)), 0.5)), 0.5, 60.0))
    wmh_volumes = tuple(wmh_scale * min(80.0, wmh0 * (1.0 + 0.2 * y)) if flags["wmh"] else 0.0 for y in years)
    tumour0 = float(np.clip(np.exp(rng.normal(math.log(15.0), 0.6)), 3.0, 50.0))
    growth = float(rng.uniform(0.3, 1.0))
    tumour_volumes = tuple(min(90.0, tumour0 * math.exp(growth * y)) for y in years)
    tumour = _lesion(rng, TUMOUR_SITES_MM, tumour_volumes, float(rng.uniform(1.5, 4.0)), 0.25)
    diameter = float(rng.uniform(10.0, 25.0))
    haemorrhage_volume = math.pi / 6.0 * diameter**3 / 1000.0
    haemorrhage = _lesion(rng, HAEMORRHAGE_SITES_MM, (haemorrhage_volume,) * planned, 0.6, 0.2)
    infarct_volume = float(np.clip(np.exp(rng.normal(math.log(6.0), 0.6)), 1.0, 40.0))
    infarct = _lesion(rng, INFARCT_SITES_MM, (infarct_volume,) * planned, 0.4, 0.35)

    log_hazard = survival.log_hazard(age0, flags["tumour"], tumour0 if flags["tumour"] else 0.0)
    event_time = float(rng.exponential(1.0 / math.exp(log_hazard)))
    censor_time = min(float(rng.exponential(survival.censoring_mean_days)), survival.administrative_censoring_days)
    time = max(1.0, math.ceil(min(event_time, censor_time)))
    event = int(event_time <= censor_time)

    # Drawn last, so that a stroke cohort (acute_infarct > 0) keeps every other label of the same seed unchanged.
    flags["acute_infarct"] = int(rng.random() < rates["acute_infarct"])
    acute_volume = float(np.clip(np.exp(rng.normal(math.log(ACUTE_INFARCT_MEDIAN_ML), 0.7)), 2.0, 80.0))
    acute = _lesion(rng, INFARCT_SITES_MM, (round(acute_volume, 3),), 0.0, 0.35)

    plans = []
    for k, (offset, volume_wmh, volume_tumour) in enumerate(zip(offsets, wmh_volumes, tumour_volumes)):
        age = float(age0 + offset / DAYS_PER_YEAR)
        # An acute stroke is scanned at admission only: its evolution into a chronic infarct is not modelled.
        if k > 0 and (offset >= time - 1 or age > AGE_RANGE[1] or flags["acute_infarct"]):
            break
        plans.append(
            SessionPlan(
                session_id=f"ses-{k + 1:02d}",
                offset_days=float(round(offset)),
                age=age,
                wmh_volume_ml=round(volume_wmh, 3),
                tumour_volume_ml=round(volume_tumour, 3) if flags["tumour"] else 0.0,
                survival_time=float(time - round(offset)),
                survival_event=event,
            )
        )
    return SubjectPlan(
        subject_id=f"sub-{index + 1:04d}",
        index=int(index),
        sex=sex,
        site=f"site-{site_index}",
        site_index=site_index,
        atrophy_rate=atrophy_rate,
        flags=flags,
        tumour=tumour if flags["tumour"] else None,
        haemorrhage=haemorrhage if flags["haemorrhage"] else None,
        infarct=infarct if flags["infarct"] else None,
        survival_time=float(time),
        survival_event=event,
        sessions=tuple(plans),
        acute_infarct=acute if flags["acute_infarct"] else None,
    )
