"""SynthBrain subjects and cohorts: render planned subjects, write a BIDS-like tree and the manifest.

Randomness is a pure function of ``(seed, subject index)``: labels come from ``labels.sample_subject_labels`` and image
noise from ``SeedSequence((seed, index, stream, ...))`` streams, so a subject renders identically whatever the number
of workers, the cohort size or the requested modalities. Streams:

- ``ANATOMY_STREAM`` (per subject, reused by every session so follow-ups keep the same anatomy and grow the same
  lesions): smooth warp, WMH pattern, lesion shapes, texture, acute infarct shape;
- ``SESSION_STREAM`` (per session): registration jitter, class-mean jitter (one stream for T1w/T2w/FLAIR, its own
  for DWI), and per contrast bias field and noise.

Adding DWI to a cohort therefore leaves its T1w/T2w/FLAIR files byte-identical.
"""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .anatomy import Jitter, session_state, smooth_warp, warp_atlas
from .atlas import Atlas, load_atlas
from .contrast import (
    DWI_B_VALUE,
    MODALITIES,
    STRUCTURAL,
    SiteProfile,
    acquire,
    bias_lattice,
    dwi_signal,
    jittered_means,
    texture_modulation,
    tissue_signal,
)
from .fields import torch_generator
from .grids import GridSpec, grid_name, normalize_grid
from .labels import (
    PATHOLOGIES,
    SURVIVAL_MODEL,
    SessionPlan,
    SubjectPlan,
    age_factor,
    resolve_prevalence,
    sample_subject_labels,
)
from .nifti import to_int16, write_nifti_gz
from .pathology import CLASSES, LesionPainter, class_index, wmh_noise

ANATOMY_STREAM = 1
SESSION_STREAM = 2
# Purposes within the anatomy stream.
_WARP, _WMH, _TUMOUR, _HAEMORRHAGE, _INFARCT, _TEXTURE, _ACUTE = range(7)
# Purposes within a session stream; contrasts use _CONTRAST + index in MODALITIES.
_JITTER, _MEANS, _DWI_MEANS, _CONTRAST = 0, 1, 2, 10
TEXTURE_CORRELATION_MM = 1.5
TUMOUR_TEXTURE_CORRELATION_MM = 4.0

LABEL_COLUMNS: tuple[str, ...] = (
    "site",
    "age",
    "sex",
    "wmh",
    "tumour",
    "haemorrhage",
    "infarct",
    "acute_infarct",
    "any_lesion",
    "wmh_volume_ml",
    "tumour_volume_ml",
    "acute_infarct_volume_ml",
    "survival_time",
    "survival_event",
)
MANIFEST_COLUMNS: tuple[str, ...] = ("subject_id", "session_id", "modality", "path", *LABEL_COLUMNS)


@dataclass
class SynthSession:
    """One rendered session.

    Attributes:
        session_id: ``"ses-01"`` style.
        images: ``{modality: [D, H, W] float32}`` on the full grid, exactly the values written (int16 scanner units).
        labels: the manifest label columns; lesion volumes are measured on the painted maps (ml).
        tissue: ``{class: [D, H, W] float32}`` fractions (``pathology.CLASSES``) when requested, else None.
        acute: ``[D, H, W]`` float32 share of each voxel's GM + WM in the hyperacute infarct core (part of those
            fractions, not a class of its own), when tissue is requested, else None.
    """

    session_id: str
    images: dict[str, np.ndarray]
    labels: dict[str, object]
    tissue: dict[str, np.ndarray] | None = None
    acute: np.ndarray | None = None


@dataclass
class SynthSubject:
    """A rendered subject: its plan, grid affine and sessions (baseline first)."""

    subject_id: str
    plan: SubjectPlan
    affine: np.ndarray
    sessions: list[SynthSession] = field(default_factory=list)


def _check_modalities(modalities: Sequence[str]) -> tuple[str, ...]:
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown or not modalities:
        raise ValueError(f"modalities must be a non-empty subset of {list(MODALITIES)}; got {list(modalities)}")
    return tuple(dict.fromkeys(modalities))


@dataclass(frozen=True)
class _SubjectFields:
    """Per-subject random fields, drawn once and reused by every session (same anatomy, nested lesion growth)."""

    warp_mm: torch.Tensor
    texture: torch.Tensor
    tumour_texture: torch.Tensor | None
    wmh_noise: torch.Tensor | None


def _anatomy_generator(seed: int, index: int, purpose: int) -> torch.Generator:
    """A fresh generator of the subject-level stream: every session gets the same draws."""
    return torch_generator(seed, index, ANATOMY_STREAM, purpose)


def _subject_fields(atlas: Atlas, plan: SubjectPlan, seed: int) -> _SubjectFields:
    texture = _anatomy_generator(seed, plan.index, _TEXTURE)
    tumour_texture = None
    if plan.tumour is not None:
        tumour_texture = atlas.box_noise(TUMOUR_TEXTURE_CORRELATION_MM, texture)[0]
    return _SubjectFields(
        warp_mm=smooth_warp(atlas, _anatomy_generator(seed, plan.index, _WARP)),
        texture=atlas.box_noise(TEXTURE_CORRELATION_MM, texture)[0],
        tumour_texture=tumour_texture,
        wmh_noise=wmh_noise(atlas, _anatomy_generator(seed, plan.index, _WMH)) if plan.flags["wmh"] else None,
    )


def _session_fractions(
    atlas: Atlas, plan: SubjectPlan, session: SessionPlan, number: int, seed: int, fields: _SubjectFields
) -> tuple[dict[str, torch.Tensor], torch.Tensor, LesionPainter, torch.Tensor | None]:
    """Warp the atlas for one session and paint its lesions.

    Returns:
        ``(warped maps {name: [K]}, class fractions [len(CLASSES), K] (zero outside the ICV mask), the painter,
        the acute infarct core share [K] or None)``.
    """
    index, tumour = plan.index, plan.tumour
    state = session_state(
        atlas,
        fields.warp_mm,
        Jitter.draw(torch_generator(seed, index, SESSION_STREAM, number, _JITTER)),
        age_factor(session.age),
        plan.atrophy_rate,
        tumour.centre_mm if tumour is not None else None,
        session.tumour_volume_ml,
    )
    maps = warp_atlas(atlas, state)
    mask = maps["icv"] > 0.5
    fractions = torch.zeros((len(CLASSES), atlas.n_points), dtype=torch.float32)
    for name in ("gm", "wm", "csf"):
        torch.mul(maps[name], mask, out=fractions[class_index(name)])
    painter = LesionPainter(atlas, fractions)
    if tumour is not None:
        painter.tumour(tumour, session.tumour_volume_ml, _anatomy_generator(seed, index, _TUMOUR))
    if plan.haemorrhage is not None:
        haemorrhage = plan.haemorrhage
        painter.haemorrhage(haemorrhage, haemorrhage.volume_ml[number], _anatomy_generator(seed, index, _HAEMORRHAGE))
    if plan.infarct is not None:
        painter.infarct(plan.infarct, plan.infarct.volume_ml[number], _anatomy_generator(seed, index, _INFARCT))
    if fields.wmh_noise is not None:
        painter.wmh(maps["periventricular"], fields.wmh_noise, session.wmh_volume_ml)
    acute = None
    if plan.acute_infarct is not None:  # last: it only takes tissue that is still GM/WM, and changes no fraction
        lesion = plan.acute_infarct
        acute = painter.acute_core(lesion, lesion.volume_ml[number], _anatomy_generator(seed, index, _ACUTE))
    return maps, fractions, painter, acute


def _render_session(
    atlas: Atlas,
    plan: SubjectPlan,
    session: SessionPlan,
    number: int,
    seed: int,
    fields: _SubjectFields,
    modalities: tuple[str, ...],
    return_tissue: bool,
) -> SynthSession:
    maps, fractions, painter, acute = _session_fractions(atlas, plan, session, number, seed, fields)
    index = plan.index
    site = SiteProfile.draw(seed, plan.site_index)
    means = jittered_means(torch_generator(seed, index, SESSION_STREAM, number, _MEANS))
    structural = tuple(m for m in modalities if m in STRUCTURAL)
    rows = [tissue_signal(fractions, maps["t1_detail"], means, structural)] if structural else []
    if "DWI" in modalities:
        dwi_means = jittered_means(torch_generator(seed, index, SESSION_STREAM, number, _DWI_MEANS), ("DWI",))
        rows.append(dwi_signal(fractions, maps["t1_detail"], dwi_means["DWI"], acute)[None])
    order = [*structural, *(["DWI"] if "DWI" in modalities else [])]
    signal = torch.cat(rows)[[order.index(m) for m in modalities]]
    signal.mul_(texture_modulation(fields.texture, fields.tumour_texture, fractions[class_index("tumour")]))
    signal.clamp_(min=0.0)
    generators = [
        torch_generator(seed, index, SESSION_STREAM, number, _CONTRAST + MODALITIES.index(m)) for m in modalities
    ]
    # All contrasts' bias lattices are upsampled in one call (the cost is per voxel, hardly per channel).
    bias = atlas.sample_box_lattice(torch.cat([bias_lattice(atlas, g) for g in generators]))
    mask = maps["icv"] > 0.5
    images = {}
    for row, (modality, generator) in enumerate(zip(modalities, generators)):
        values = acquire(modality, signal[row], bias[row], mask, site, atlas, generator)
        images[modality] = atlas.to_full(values.round_())
    labels = plan.session_labels(session)
    labels["wmh_volume_ml"] = round(painter.volume_ml("wmh"), 3)
    labels["tumour_volume_ml"] = round(painter.volume_ml("tumour"), 3)
    if acute is not None:
        healthy = fractions[class_index("gm")] + fractions[class_index("wm")]
        labels["acute_infarct_volume_ml"] = round(float((acute * healthy).double().sum()) * atlas.voxel_ml, 3)
    tissue = {name: atlas.to_full(fractions[class_index(name)]) for name in CLASSES} if return_tissue else None
    acute_full = None
    if return_tissue:
        acute_full = atlas.to_full(acute) if acute is not None else np.zeros(atlas.shape, dtype=np.float32)
    return SynthSession(session_id=session.session_id, images=images, labels=labels, tissue=tissue, acute=acute_full)


def iter_sessions(
    plan: SubjectPlan,
    seed: int,
    grid: GridSpec = "mni",
    modalities: Sequence[str] = STRUCTURAL,
    return_tissue: bool = False,
) -> Iterator[SynthSession]:
    """Render the sessions of a planned subject one at a time (baseline first); see ``generate_subject``."""
    atlas = load_atlas(grid)
    modalities = _check_modalities(modalities)
    fields = _subject_fields(atlas, plan, seed)
    for number, session in enumerate(plan.sessions):
        yield _render_session(atlas, plan, session, number, seed, fields, modalities, return_tissue)


def generate_subject(
    seed: int,
    index: int,
    grid: GridSpec = "mni",
    modalities: Sequence[str] = STRUCTURAL,
    n_sites: int = 3,
    sessions: tuple[int, int] = (1, 3),
    prevalence: dict[str, float] | None = None,
    return_tissue: bool = False,
    wmh_scale: float = 1.0,
) -> SynthSubject:
    """Render subject ``index`` of the cohort with ``seed`` in memory (nothing is written).

    Args:
        seed: cohort seed.
        index: 0-based subject index.
        grid: ``"mni"`` (182x218x182, 1 mm), ``"model"`` (96x108x96) or ``(D, H, W)``.
        modalities: contrasts to render, a subset of ``("T1w", "T2w", "FLAIR", "DWI")``.
        n_sites, sessions, prevalence: cohort options, see ``labels.sample_subject_labels``.
        return_tissue: also return the class fractions of every session (``pathology.CLASSES``).
        wmh_scale: WMH volume multiplier, see ``labels.sample_subject_labels``.

    Returns:
        The ``SynthSubject``; each session's images are ``[D, H, W]`` float32 in int16 scanner units.
    """
    plan = sample_subject_labels(
        seed, index, n_sites=n_sites, sessions=sessions, prevalence=prevalence, wmh_scale=wmh_scale
    )
    atlas = load_atlas(grid)
    subject = SynthSubject(subject_id=plan.subject_id, plan=plan, affine=atlas.affine.copy())
    subject.sessions.extend(iter_sessions(plan, seed, grid, modalities, return_tissue))
    return subject


def scan_path(subject_id: str, session_id: str, modality: str) -> str:
    """Relative BIDS-like path of one scan: ``sub-XXXX/ses-YY/anat/sub-XXXX_ses-YY_<modality>.nii.gz``, and for DWI
    (one 3-D b = 1000 trace image) ``sub-XXXX/ses-YY/dwi/sub-XXXX_ses-YY_dwi.nii.gz``."""
    if modality == "DWI":
        return f"{subject_id}/{session_id}/dwi/{subject_id}_{session_id}_dwi.nii.gz"
    return f"{subject_id}/{session_id}/anat/{subject_id}_{session_id}_{modality}.nii.gz"


@dataclass(frozen=True)
class _CohortTask:
    out_dir: str
    seed: int
    grid: GridSpec
    modalities: tuple[str, ...]
    n_sites: int
    sessions: tuple[int, int]
    prevalence: dict[str, float]
    wmh_scale: float = 1.0


def _write_subject(task: _CohortTask, index: int) -> tuple[list[dict[str, object]], dict[str, object]]:
    """Render and write one subject; returns its manifest rows and its participants.tsv row."""
    plan = sample_subject_labels(
        task.seed, index, task.n_sites, task.sessions, task.prevalence, wmh_scale=task.wmh_scale
    )
    affine = load_atlas(task.grid).affine
    rows: list[dict[str, object]] = []
    pending: list[Future] = []
    # One background thread compresses and writes while the next contrast renders (zlib releases the GIL).
    with ThreadPoolExecutor(max_workers=1) as writer:
        for session in iter_sessions(plan, task.seed, task.grid, task.modalities):
            for modality, image in session.images.items():
                relative = scan_path(plan.subject_id, session.session_id, modality)
                pending.append(writer.submit(write_nifti_gz, Path(task.out_dir) / relative, to_int16(image), affine))
                rows.append(
                    {
                        "subject_id": plan.subject_id,
                        "session_id": session.session_id,
                        "modality": modality,
                        "path": relative,
                        **session.labels,
                    }
                )
        for future in pending:
            future.result()
    participant = {
        "participant_id": plan.subject_id,
        "age": round(plan.sessions[0].age, 2),
        "sex": plan.sex,
        "site": plan.site,
        **{name: plan.flags[name] for name in PATHOLOGIES},
        "n_sessions": len(plan.sessions),
        "survival_time": plan.survival_time,
        "survival_event": plan.survival_event,
    }
    return rows, participant


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _description(task: _CohortTask, n_subjects: int) -> dict[str, object]:
    survival = SURVIVAL_MODEL
    return {
        "Name": "SynthBrain synthetic cohort",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "neurojepa_pl.synth"}],
        "SourceDatasets": [{"URL": "nilearn MNI ICBM152 2009a T1/GM/WM templates (packaged)"}],
        "Synthesis": {
            "seed": task.seed,
            "n_subjects": n_subjects,
            "grid": grid_name(task.grid),
            "modalities": list(task.modalities),
            "n_sites": task.n_sites,
            "sessions": list(task.sessions),
            "prevalence": task.prevalence,
            "wmh_scale": task.wmh_scale,
            "intensity_units": "int16, signal x site gain x 1000, no scaling",
            **(
                {"dwi": {"b_value_s_per_mm2": DWI_B_VALUE, "image": "trace, S0 * exp(-b * ADC)"}}
                if "DWI" in task.modalities
                else {}
            ),
            "survival_model": {
                "log_hazard_per_day": "b0 + b_age*age_z + b_tumour*tumour + b_volume*tumour_volume_z",
                "b0": survival.log_baseline_hazard_per_day,
                "b_age": survival.age,
                "b_tumour": survival.tumour,
                "b_volume": survival.tumour_volume,
                "age_z": f"(baseline age - {survival.age_mean}) / {survival.age_sd}",
                "tumour_volume_z": f"tumour * (nominal baseline core ml - {survival.tumour_volume_mean_ml}) / "
                f"{survival.tumour_volume_sd_ml}",
                "censoring": f"exponential, mean {survival.censoring_mean_days} days, administrative at "
                f"{survival.administrative_censoring_days} days",
                "survival_time": "days from the session's scan",
            },
        },
    }


def generate_cohort(
    out_dir: str | Path,
    n_subjects: int,
    seed: int = 0,
    modalities: Sequence[str] = STRUCTURAL,
    grid: GridSpec = "mni",
    n_sites: int = 3,
    sessions: tuple[int, int] = (1, 3),
    prevalence: dict[str, float] | None = None,
    workers: int = 1,
    split: bool = False,
    wmh_scale: float = 1.0,
) -> pd.DataFrame:
    """Generate a SynthBrain cohort: NIfTI scans in a BIDS-like tree, ``participants.tsv`` and ``manifest.csv``.

    Args:
        out_dir: output folder (created; existing files with the same names are overwritten).
        n_subjects: number of subjects (patients); sessions per subject follow ``sessions``.
        seed: cohort seed; the same seed gives byte-identical files.
        modalities: contrasts to write (default T1w, T2w, FLAIR; ``"DWI"`` adds the b = 1000 trace image).
        grid: ``"mni"`` (FSL MNI152 1 mm, 182x218x182), ``"model"`` (96x108x96) or ``(D, H, W)``.
        n_sites: acquisition sites (contrast curve, gain, noise, bias field and resolution differ per site).
        sessions: ``(min, max)`` sessions per subject.
        prevalence: pathology prevalences, e.g. ``{"tumour": 0.4}`` (see ``labels.DEFAULT_PREVALENCE``).
        workers: processes rendering subjects in parallel (1 = in this process).
        split: add a patient-level 60/20/20 ``split`` column (``neurojepa_pl.data.assign_patient_splits``).
        wmh_scale: WMH volume multiplier (default 1; the multimodal WMH task uses 4 so that FLAIR carries a clear
            signal), see ``labels.sample_subject_labels``.

    Returns:
        The per-scan manifest (also written to ``out_dir/manifest.csv``, paths relative to it).
    """
    if n_subjects < 1:
        raise ValueError(f"n_subjects must be at least 1; got {n_subjects}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1; got {workers}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = _CohortTask(
        out_dir=str(out),
        seed=int(seed),
        grid=normalize_grid(grid),
        modalities=_check_modalities(modalities),
        n_sites=int(n_sites),
        sessions=(int(sessions[0]), int(sessions[1])),
        prevalence=resolve_prevalence(prevalence),
        wmh_scale=float(wmh_scale),
    )
    load_atlas(task.grid)  # build once here so forked workers share it
    indices = range(n_subjects)
    if workers == 1:
        results = [_write_subject(task, i) for i in indices]
    else:
        threads = max(1, torch.get_num_threads() // workers)
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context(method),
            initializer=_init_worker,
            initargs=(threads,),
        ) as pool:
            results = list(pool.map(_write_subject, [task] * n_subjects, indices))

    manifest = pd.DataFrame([row for rows, _ in results for row in rows], columns=list(MANIFEST_COLUMNS))
    if split:
        from neurojepa_pl.data import assign_patient_splits

        manifest = assign_patient_splits(manifest, fractions=(0.6, 0.2, 0.2), seed=task.seed)
    manifest.to_csv(out / "manifest.csv", index=False)
    participants = pd.DataFrame([participant for _, participant in results])
    participants.to_csv(out / "participants.tsv", sep="\t", index=False)
    (out / "dataset_description.json").write_text(json.dumps(_description(task, n_subjects), indent=2) + "\n")
    return manifest
