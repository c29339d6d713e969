"""Offline preprocessing of raw scans into the space the model expects (docs/method.md §1.1), parallel and resumable.

Per scan, in the reference's order: reorientation to RAS (``nibabel.as_closest_canonical``; the reference runs
``fslreorient2std``) -> N4 bias-field correction -> 12-DOF affine registration to the MNI152 template of the modality
(T1w -> T1; T2w and FLAIR -> the T2-like template of :mod:`.templates`) -> optional resampling to a voxel size
(``target_spacing``: for scans already in MNI space at another resolution; the order-5 spline of docs/method.md §1.2 as
matrix products, :mod:`neurojepa_pl.data.resample`, on a GPU when ``device`` is one) -> skull stripping **after**
registration (the reference moved SynthStrip there; here deepbet, whose weights ship in its wheel). FSL's ``robustfov``
has no offline Python equivalent and is skipped. N4 and registration use ANTsPy (optional extra ``preprocess``: antspyx
needs numpy < 2.4, so it is not a core dependency); skull stripping uses deepbet when installed.

Every step is a callable ``step(input_path, output_path, modality)`` so the orchestration (parallelism, resume, status
bookkeeping, failure recording) is independent of the heavy tools and testable without them.

Outputs: ``OUT/sub-<S>/ses-<T>/anat/<input file name>`` (written atomically), ``OUT/preprocess_status.csv`` (one row
per attempt: status ok/failed, reason, seconds; appended as scans finish, so an interrupted run keeps its progress)
and ``OUT/manifest.csv`` (the input manifest with ``path`` pointing at the outputs of the scans that succeeded).
"""

from __future__ import annotations

import csv
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

Step = Callable[[Path, Path, str], None]
"""A preprocessing step: read ``input_path`` (NIfTI), write ``output_path`` (NIfTI); ``modality`` picks templates."""

STATUS_FILE = "preprocess_status.csv"
STATUS_COLUMNS = ("manifest_row", "subject_id", "session_id", "modality", "input", "output", "status", "reason",
                  "seconds", "steps")  # fmt: skip
INSTALL_HINT = "pip install 'neurojepa_pl[preprocess]'"


class MissingDependencyError(ImportError):
    """An optional preprocessing tool is not installed; the message says how to install it."""


@dataclass
class PreprocessSteps:
    """The steps of one run, in order; ``None`` skips a step (reorientation always runs)."""

    reorient: Step
    bias_correct: Step | None = None
    register: Step | None = None
    skull_strip: Step | None = None
    resample: Step | None = None
    device: str = "cpu"  # where the steps compute; worker processes are spawned (not forked) for a GPU

    def named(self) -> list[tuple[str, Step]]:
        steps = [("reorient", self.reorient), ("bias_correct", self.bias_correct), ("register", self.register),
                 ("resample", self.resample), ("skull_strip", self.skull_strip)]  # fmt: skip
        return [(name, step) for name, step in steps if step is not None]


# ----------------------------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------------------------
def reorient_to_ras(input_path: Path, output_path: Path, modality: str) -> None:
    """Reorient to the closest canonical (RAS+) orientation; the voxel data are permuted/flipped, never resampled."""
    image = nib.load(str(input_path))
    canonical = nib.as_closest_canonical(image)
    canonical.get_fdata(dtype="float32")  # read everything now: a truncated file fails in this step, with its reason
    nib.save(canonical, str(output_path))


def _require_ants():
    try:
        import ants
    except ImportError as error:
        raise MissingDependencyError(
            f"N4 bias correction and affine registration need ANTsPy (antspyx), which is not installed: {INSTALL_HINT} "
            "(antspyx requires numpy < 2.4 and scipy < 1.16). Or skip these steps: --no-bias-correction "
            "--registration none."
        ) from error
    return ants


def ants_n4(input_path: Path, output_path: Path, modality: str, shrink_factor: int = 4) -> None:
    """N4 bias-field correction (ANTs ``n4_bias_field_correction``) inside an automatic head mask."""
    ants = _require_ants()
    image = ants.image_read(str(input_path))
    corrected = ants.n4_bias_field_correction(image, mask=ants.get_mask(image), shrink_factor=shrink_factor)
    ants.image_write(corrected, str(output_path))


def ants_affine_to_mni(input_path: Path, output_path: Path, modality: str, transform: str = "Affine") -> None:
    """12-DOF affine registration (Mattes MI) to the modality's MNI152 template, B-spline resampling onto its grid."""
    ants = _require_ants()
    from .templates import load_template

    with tempfile.TemporaryDirectory() as scratch:
        template_path = Path(scratch) / "template.nii.gz"
        nib.save(load_template(modality), str(template_path))
        fixed = ants.image_read(str(template_path))
        moving = ants.image_read(str(input_path))
        result = ants.registration(fixed=fixed, moving=moving, type_of_transform=transform, aff_metric="mattes")
        warped = ants.apply_transforms(
            fixed=fixed, moving=moving, transformlist=result["fwdtransforms"], interpolator="bSpline"
        )
        ants.image_write(warped, str(output_path))


def resample_to_spacing(
    input_path: Path,
    output_path: Path,
    modality: str,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    order: int = 5,
    device: str = "cpu",
) -> None:
    """Resample to ``spacing`` mm with an order-``order`` spline (border padding), MONAI ``Spacing``'s output grid.

    The chain's spacing step (docs/method.md §1.2) on the raw intensities, as three matrix products on ``device``
    (:class:`neurojepa_pl.data.resample.SeparableSpacingd`; within ~1e-6 of MONAI's SciPy path).
    """  # fmt: skip
    import torch
    from monai.transforms import EnsureChannelFirstd, LoadImaged

    from neurojepa_pl.data.resample import SeparableSpacingd

    load = LoadImaged("image", image_only=True, dtype=np.float32)
    data = EnsureChannelFirstd("image")(load({"image": str(input_path)}))
    step = SeparableSpacingd.from_pixdim("image", spacing, mode=order, padding_mode="border", device=device)
    out = step(data)["image"]  # a MetaTensor: the resampled volume and its affine (the input if nothing to do)
    volume = out.as_tensor().to("cpu", torch.float32).numpy()[0]
    nib.save(nib.Nifti1Image(volume, np.asarray(out.affine.cpu(), dtype=np.float64)), str(output_path))


def deepbet_skull_strip(input_path: Path, output_path: Path, modality: str, threshold: float = 0.5) -> None:
    """Brain extraction with deepbet (trained on T1w; used for every modality here, as the reference uses one tool)."""
    try:
        from deepbet import run_bet
    except ImportError as error:
        raise MissingDependencyError(
            "skull stripping needs deepbet, which is not installed: pip install deepbet "
            "(its wheel ships the weights; nothing downloads). Or pass --skull-strip none."
        ) from error
    import torch

    run_bet([str(input_path)], brain_paths=[str(output_path)], threshold=threshold, n_dilate=0,
            no_gpu=not torch.cuda.is_available())  # fmt: skip


def default_steps(
    bias_correction: bool = True,
    registration: str = "Affine",
    skull_strip: str = "deepbet",
    target_spacing: tuple[float, float, float] | None = None,
    device: str = "cpu",
) -> PreprocessSteps:
    """The paper-style steps with the offline tools.

    Args:
        bias_correction: run ANTs N4.
        registration: ANTs transform type (``"Affine"``: 12 DOF, ~1 min/scan on one core; ``"AffineFast"``: ~10 s)
            or ``"none"``.
        skull_strip: ``"deepbet"`` or ``"none"``.
        target_spacing: resample to this voxel size (mm) after registration; ``None`` skips the step.
        device: where the resampling runs (``cpu``, ``cuda``, ``cuda:N``; resolved by the caller).

    Raises:
        MissingDependencyError: a requested tool is not installed (checked now, not hours into the run).
    """
    if registration not in ("Affine", "AffineFast", "none"):
        raise ValueError(f"registration must be 'Affine', 'AffineFast' or 'none'; found {registration!r}.")
    if skull_strip not in ("deepbet", "none"):
        raise ValueError(f"skull_strip must be 'deepbet' or 'none'; found {skull_strip!r}.")
    if bias_correction or registration != "none":
        _require_ants()
    if skull_strip == "deepbet":
        try:
            import deepbet  # noqa: F401
        except ImportError as error:
            raise MissingDependencyError(
                "--skull-strip deepbet needs deepbet: pip install deepbet (weights included), or --skull-strip none."
            ) from error
    return PreprocessSteps(
        reorient=reorient_to_ras,
        bias_correct=ants_n4 if bias_correction else None,
        register=partial(ants_affine_to_mni, transform=registration) if registration != "none" else None,
        skull_strip=deepbet_skull_strip if skull_strip == "deepbet" else None,
        resample=(
            partial(resample_to_spacing, spacing=tuple(float(v) for v in target_spacing), device=str(device))
            if target_spacing is not None
            else None
        ),
        device=str(device),
    )


# ----------------------------------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------------------------------
def _bids_label(value: object, prefix: str) -> str:
    text = str(value).strip()
    return text if text.startswith(prefix) else f"{prefix}{text}"


def output_path_for(out_dir: Path, subject_id: object, session_id: object, input_path: str) -> Path:
    """``OUT/sub-<subject>/ses-<session>/anat/<input file name>`` (prefixes added only when missing)."""
    subject, session = _bids_label(subject_id, "sub-"), _bids_label(session_id, "ses-")
    return out_dir / subject / session / "anat" / Path(input_path).name


def run_steps(task: tuple[int, str, str, str, PreprocessSteps]) -> dict[str, object]:
    """Run all steps on one scan in a scratch folder; the output appears (atomically) only when every step worked."""
    index, input_path, output_path, modality, steps = task
    started = time.perf_counter()
    output = Path(output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    names = [name for name, _ in steps.named()]
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".work-") as scratch:
        current = Path(input_path)
        for number, (name, step) in enumerate(steps.named()):
            produced = Path(scratch) / f"{number}_{name}.nii.gz"
            try:
                step(current, produced, modality)
                if not produced.is_file():
                    raise RuntimeError("the step wrote no output file")
            # A step may fail with any exception (reader errors, ANTs/ITK errors, deepbet); each is recorded with
            # the step name and reason in the status file, and the other scans continue.
            except Exception as error:  # noqa: BLE001
                return {
                    "manifest_row": index,
                    "status": "failed",
                    "reason": f"{name}: {type(error).__name__}: {error}",
                    "seconds": round(time.perf_counter() - started, 3),
                    "steps": "+".join(names),
                }
            current = produced
        os.replace(current, output)  # same filesystem (scratch is a sibling): atomic, never half-written
    return {"manifest_row": index, "status": "ok", "reason": "", "seconds": round(time.perf_counter() - started, 3),
            "steps": "+".join(names)}  # fmt: skip


def read_status(out_dir: str | Path) -> pd.DataFrame:
    """All recorded attempts of a run folder (empty frame when none)."""
    path = Path(out_dir) / STATUS_FILE
    if not path.is_file():
        return pd.DataFrame(columns=list(STATUS_COLUMNS))
    return pd.read_csv(path, dtype={"subject_id": str, "session_id": str}, keep_default_na=False)


def _completed(out_dir: Path, status: pd.DataFrame) -> set[tuple[str, str]]:
    """(input, output) pairs whose last attempt succeeded and whose output still exists."""
    if status.empty:
        return set()
    last = status.drop_duplicates(subset=["input", "output"], keep="last")
    ok = last[last["status"] == "ok"]
    return {(i, o) for i, o in zip(ok["input"], ok["output"]) if (out_dir / o).is_file()}


def _pool_init() -> None:
    import torch

    torch.set_num_threads(1)


def preprocess_manifest(
    manifest: pd.DataFrame,
    out_dir: str | Path,
    steps: PreprocessSteps,
    workers: int = 1,
    resume: bool = False,
) -> pd.DataFrame:
    """Preprocess every scan of a per-scan manifest.

    Args:
        manifest: per-scan manifest with resolved paths (``load_manifest``).
        out_dir: output folder (BIDS-like tree, status CSV, output manifest).
        steps: the steps (:func:`default_steps`, or injected callables).
        workers: processes; steps must be picklable (module-level functions or ``functools.partial`` of them).
        resume: skip scans whose output exists and whose last recorded attempt succeeded; failed ones are retried.

    Returns:
        The output manifest (rows whose scan succeeded, now or in an earlier run; ``path`` relative to ``out_dir``),
        also written to ``out_dir/manifest.csv``. ``attrs["status"]`` holds this run's attempts.
    """
    if "path" not in manifest.columns or "modality" not in manifest.columns:
        raise ValueError(f"preprocessing needs the per-scan manifest (modality, path); found {list(manifest.columns)}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frame = manifest.reset_index(drop=True)
    outputs = [
        output_path_for(out, s, t, p) for s, t, p in zip(frame["subject_id"], frame["session_id"], frame["path"])
    ]
    relative = [str(o.relative_to(out)) for o in outputs]
    clash = pd.Series(relative)[pd.Series(relative).duplicated()]
    if len(clash):
        raise ValueError(
            f"two scans would be written to the same output {clash.iloc[0]}; give them distinct file names or "
            "sessions in the manifest."
        )
    if not resume and (out / STATUS_FILE).exists():
        raise FileExistsError(f"{out / STATUS_FILE} exists: pass resume=True (--resume) or choose a new --out folder.")
    done = _completed(out, read_status(out)) if resume else set()
    tasks = [
        (i, str(frame.at[i, "path"]), str(outputs[i]), str(frame.at[i, "modality"]), steps)
        for i in range(len(frame))
        if (str(frame.at[i, "path"]), relative[i]) not in done
    ]
    attempts = []
    new_file = not (out / STATUS_FILE).exists()
    with open(out / STATUS_FILE, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(STATUS_COLUMNS))
        if new_file:
            writer.writeheader()
        for result in _execute(tasks, workers, spawn=steps.device.startswith("cuda")):
            i = int(result["manifest_row"])
            record = {
                "manifest_row": i,
                "subject_id": frame.at[i, "subject_id"],
                "session_id": frame.at[i, "session_id"],
                "modality": frame.at[i, "modality"],
                "input": str(frame.at[i, "path"]),
                "output": relative[i],
                **{k: result[k] for k in ("status", "reason", "seconds", "steps")},
            }
            writer.writerow(record)
            handle.flush()
            attempts.append(record)
    succeeded = _completed(out, read_status(out))
    keep = [(str(p), r) in succeeded for p, r in zip(frame["path"], relative)]
    result_manifest = frame[keep].copy()
    result_manifest["path"] = [r for r, k in zip(relative, keep) if k]
    result_manifest.to_csv(out / "manifest.csv", index=False)
    result_manifest.attrs["status"] = pd.DataFrame(attempts, columns=list(STATUS_COLUMNS))
    return result_manifest


def _execute(tasks: list, workers: int, spawn: bool = False):
    if workers <= 1:
        yield from map(run_steps, tasks)
        return
    # A forked child cannot use CUDA once the parent has touched it: GPU steps run in spawned workers.
    context = multiprocessing.get_context("spawn") if spawn else None
    with ProcessPoolExecutor(max_workers=workers, initializer=_pool_init, mp_context=context) as pool:
        futures = [pool.submit(run_steps, task) for task in tasks]
        for future in as_completed(futures):
            yield future.result()
