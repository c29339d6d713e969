"""``neurojepa learning-curve``: does pretraining learn? Probe every checkpoint of a run against random inits.

    neurojepa learning-curve runs/x/pretrain/version_0 --manifest cohort/manifest.csv \
        --labels wmh age:continuous tumour --modalities FLAIR T1w --out runs/x/learning_curve

For each modality, every scan of the labelled manifest (all splits; ``--splits test`` keeps only scans pretraining did
not see) goes once through the evaluation loading chain of pretraining (grid read from the checkpoints'
hyper-parameters, :mod:`neurojepa_pl.pretrain_run`). Then, from one forward per batch, fixed poolings of the tokens
(:data:`neurojepa_pl.features.POOLINGS`: ``mean``, what the downstream linear head pools; ``fg_mean``, foreground
tokens only; the attentive probe's pooling is a trained head and has no fixed counterpart) are taken from:

* every checkpoint of the run (its EMA target encoder, ``--which``), the step-0 checkpoint being the run's own init
  (``ModelCheckpoint`` writes none; one is the same ``neurojepa fit`` with ``--trainer.max_steps 0`` followed by
  ``trainer.save_checkpoint``, as the seed fixes the init; without it the report says so);
* ``--random-inits`` (>= 3) freshly initialised encoders of the same architecture: the noise band;
* no network at all: the raw-intensity baselines of :mod:`neurojepa_pl.raw_features` (a 32-bin foreground intensity
  histogram and an average pool of the volume to the token grid).

Features are computed once per source and modality and cached in ``OUT/features/`` (keyed by the checkpoint file,
its size and time stamp, the scans and the settings), so more labels, or a rerun, reuse them. Each label is then
probed on each modality with the linear probes of :mod:`neurojepa_pl.metrics.probes` (standardisation + logistic /
ridge regression with a nested choice of L2 strength) under ``--repeats`` x ``--folds`` subject-grouped CV; every
feature set of one label and modality is scored on the same folds, so that each checkpoint's fold scores pair with
those of the best random init (and of the init) into a mean difference with a 95% CI (corrected resampled t-test).
"Beats random" means that interval lies above 0.

Written to ``OUT/``: ``learning_curve.json`` (everything: per label x modality x pooling x step the CV mean, the fold
values, the band, the differences), ``learning_curve.csv`` (one row per label, modality, pooling and source),
``tensorboard/`` scalars at each checkpoint's step, and ``figures/<label>.png`` (metric vs step per modality, random
band shaded, baselines as lines). Same inputs and ``--seed`` give byte-identical JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from neurojepa_pl.data import load_manifest
from neurojepa_pl.features import POOLINGS, extract_pooled_features, load_eval_volumes
from neurojepa_pl.metrics.learning_curve_report import (
    format_summary_table,
    learning_curve_figure,
    result_rows,
    write_tensorboard,
)
from neurojepa_pl.metrics.probes import (
    METRICS,
    Fold,
    ProbeTask,
    cross_validated_scores,
    noise_band,
    paired_fold_difference,
    repeated_grouped_folds,
)
from neurojepa_pl.pretrain_run import (
    PretrainingSetup,
    RunCheckpoint,
    find_checkpoints,
    load_run_encoder,
    random_init_encoder,
    read_pretraining_setup,
)
from neurojepa_pl.raw_features import RAW_BASELINES, raw_features

__all__ = ["LabelTask", "parse_label", "LearningCurveSettings", "FeatureCache", "run_learning_curve", "main"]

FORMAT = "neurojepa-learning-curve"
FORMAT_VERSION = 1
MIN_RANDOM_INITS = 3


def _log(message: str) -> None:
    print(f"[learning-curve] {message}", flush=True)


# ---------------------------------------------------------------------------------------------------- labels
@dataclass(frozen=True)
class LabelTask:
    """A label column and how it is probed (``binary``: logistic, AUROC; ``continuous``: ridge, R²)."""

    column: str
    task: ProbeTask | None = None

    @property
    def metric(self) -> str:
        return METRICS[self.task] if self.task else "?"


def parse_label(text: str) -> LabelTask:
    """``"wmh"``, ``"wmh:binary"`` or ``"age:continuous"`` -> :class:`LabelTask` (kind None = inferred later)."""
    column, _, kind = text.partition(":")
    if not column:
        raise ValueError(f"label {text!r}: expected COLUMN or COLUMN:binary / COLUMN:continuous.")
    if kind and kind not in METRICS:
        raise ValueError(f"label {text!r}: kind must be 'binary' or 'continuous'; got {kind!r}.")
    return LabelTask(column, kind or None)  # type: ignore[arg-type]


def _label_values(frame: pd.DataFrame, column: str, manifest: str) -> np.ndarray:
    try:
        return pd.to_numeric(frame[column], errors="raise").to_numpy(dtype=np.float64)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{manifest}: label column {column!r} is not numeric ({err}); probe numeric labels (0/1 or values)."
        ) from err


def _resolve_task(label: LabelTask, values: np.ndarray, manifest: str) -> LabelTask:
    observed = values[np.isfinite(values)]
    binary = observed.size > 0 and bool(np.isin(observed, (0.0, 1.0)).all())
    if label.task is None:
        return LabelTask(label.column, "binary" if binary else "continuous")
    if label.task == "binary" and not binary:
        raise ValueError(
            f"{manifest}: label {label.column!r} was given as binary but holds values other than 0/1 "
            f"({np.unique(observed)[:6].tolist()} ...); use {label.column}:continuous."
        )
    return label


# ---------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class LearningCurveSettings:
    """Choices of one learning-curve run (all recorded in the JSON).

    Attributes:
        poolings: token poolings from :data:`neurojepa_pl.features.POOLINGS`.
        random_inits: random-init encoders in the band (>= 3).
        folds / repeats: subject-grouped CV folds per repetition, and repetitions.
        inner_folds: inner CV folds choosing each probe's L2 strength.
        seed: seeds the folds, the inner folds and the random inits.
        baselines: raw baselines from :data:`neurojepa_pl.raw_features.RAW_BASELINES`.
        histogram_bins: bins of the intensity histogram.
        avgpool_grid: average-pool grid (None: the encoder's token grid).
        splits: manifest ``split`` values to keep (None: every row).
        which: ``"target"`` (EMA) or ``"context"`` encoder of the checkpoints.
        batch_size: volumes per encoder forward.
        device: where the encoders run.
        ci_level: level of the paired-difference intervals.
        jobs: CV folds fitted in parallel (joblib processes); the results do not depend on it.
    """

    poolings: tuple[str, ...] = POOLINGS
    random_inits: int = 3
    folds: int = 5
    repeats: int = 5
    inner_folds: int = 3
    seed: int = 0
    baselines: tuple[str, ...] = RAW_BASELINES
    histogram_bins: int = 32
    avgpool_grid: tuple[int, int, int] | None = None
    splits: tuple[str, ...] | None = None
    which: str = "target"
    batch_size: int = 8
    device: str = "cpu"
    ci_level: float = 0.95
    jobs: int = 1

    def random_seeds(self) -> list[int]:
        """Seeds of the random-init encoders: ``1000 * seed + 1, ..., 1000 * seed + random_inits``."""
        return [1000 * self.seed + i + 1 for i in range(self.random_inits)]


# ---------------------------------------------------------------------------------------------------- features
class FeatureCache:
    """Pooled features per (source, modality): computed once, kept in memory, and stored as ``.npz`` in ``folder``.

    An entry's key is a digest of its fingerprint (what determines the features: the source, the scans, the loading
    settings, the poolings); the fingerprint is stored beside the arrays and compared on reading, so an entry is
    reused only for exactly the same inputs.
    """

    def __init__(self, folder: Path | None):
        self.folder = Path(folder) if folder is not None else None
        self._memory: dict[str, dict[str, np.ndarray]] = {}
        self.computed = 0
        self.reused = 0

    def get(self, fingerprint: dict[str, Any], compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        text = json.dumps(fingerprint, sort_keys=True, default=str)
        key = hashlib.sha256(text.encode()).hexdigest()[:20]
        if key in self._memory:
            return self._memory[key]
        path = self.folder / f"{fingerprint['source_kind']}-{key}.npz" if self.folder is not None else None
        if path is not None and path.is_file():
            with np.load(path, allow_pickle=False) as stored:
                if str(stored["fingerprint"]) == text:
                    self._memory[key] = {k: stored[k] for k in stored.files if k != "fingerprint"}
                    self.reused += 1
                    return self._memory[key]
        features = compute()
        self.computed += 1
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, fingerprint=np.array(text), **features)
        self._memory[key] = features
        return features


def _file_identity(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _check_same_setup(checkpoints: Sequence[RunCheckpoint]) -> PretrainingSetup:
    setup = read_pretraining_setup(checkpoints[0].path)
    for checkpoint in checkpoints[1:]:
        other = read_pretraining_setup(checkpoint.path)
        if other != setup:
            raise ValueError(
                f"{checkpoint.path} has another encoder or grid than {checkpoints[0].path} ({other} vs {setup}); "
                "give the checkpoints of one run."
            )
    return setup


def _modality_rows(frame: pd.DataFrame, modality: str, manifest: str) -> pd.DataFrame:
    rows = frame[frame["modality"] == modality].reset_index(drop=True)
    if rows.empty:
        found = sorted(frame["modality"].dropna().unique().tolist())
        raise ValueError(f"{manifest}: no rows of modality {modality!r} (modalities present: {found}).")
    return rows


# ---------------------------------------------------------------------------------------------------- the run
class _ModalityFeatures:
    """The features of one modality's scans from every source, through the cache; volumes load on first need."""

    def __init__(
        self,
        modality: str,
        paths: list[str],
        setup: PretrainingSetup,
        settings: LearningCurveSettings,
        cache: FeatureCache,
        grid: Sequence[int],
    ):
        self.modality, self.paths, self.setup, self.settings, self.cache = modality, paths, setup, settings, cache
        self.grid = tuple(int(g) for g in grid)
        self.scans = {"modality": modality, "scans": hashlib.sha256("\n".join(paths).encode()).hexdigest()}
        self._volumes: torch.Tensor | None = None

    def volumes(self) -> torch.Tensor:
        if self._volumes is None:
            tic = time.perf_counter()
            self._volumes = load_eval_volumes(self.paths, self.setup.transform_settings())
            _log(f"{self.modality}: loaded {len(self.paths)} scans in {time.perf_counter() - tic:.1f} s")
        return self._volumes

    def release(self) -> None:
        self._volumes = None

    def _encoded(self, identity: dict[str, Any], make: Callable[[], torch.nn.Module], what: str) -> dict:
        settings = self.settings
        fingerprint = {
            **identity,
            **self.scans,
            "settings": self.setup.data_settings,
            "poolings": list(settings.poolings),
        }

        def compute() -> dict[str, np.ndarray]:
            tic = time.perf_counter()
            encoder = make().to(settings.device)
            features = extract_pooled_features(
                encoder, self.volumes(), settings.poolings, settings.batch_size, settings.device
            )
            _log(f"{self.modality}: features of {what} in {time.perf_counter() - tic:.1f} s")
            return features

        return self.cache.get(fingerprint, compute)

    def checkpoint(self, checkpoint: RunCheckpoint) -> dict[str, np.ndarray]:
        which = self.settings.which
        identity = {"source_kind": "checkpoint", **_file_identity(checkpoint.path), "which": which}
        return self._encoded(
            identity,
            lambda: load_run_encoder(checkpoint.path, self.setup, which),
            f"step {checkpoint.step}",
        )

    def random(self, seed: int) -> dict[str, np.ndarray]:
        identity = {
            "source_kind": "random",
            "encoder": self.setup.encoder,
            "overrides": self.setup.encoder_overrides,
            "seed": seed,
        }
        return self._encoded(identity, lambda: random_init_encoder(self.setup, seed), f"random init {seed}")

    def raw(self) -> dict[str, np.ndarray]:
        settings = self.settings
        fingerprint = {
            "source_kind": "raw",
            **self.scans,
            "settings": self.setup.data_settings,
            "baselines": list(settings.baselines),
            "bins": settings.histogram_bins,
            "grid": list(self.grid),
        }
        return self.cache.get(
            fingerprint, lambda: raw_features(self.volumes(), settings.baselines, settings.histogram_bins, self.grid)
        )


@dataclass(frozen=True)
class _Probe:
    """Fold scores of a feature set on one label's rows (``keep`` into the modality's rows) and folds."""

    keep: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    task: ProbeTask
    folds: Sequence[Fold]
    inner_folds: int
    seed: int
    jobs: int

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return cross_validated_scores(
            features[self.keep], self.y, self.groups, self.task, self.folds, self.inner_folds, self.seed, self.jobs
        )


def _scores_entry(scores: np.ndarray) -> dict[str, Any]:
    return {"mean": float(np.nanmean(scores)), "std": float(np.nanstd(scores)), "folds": scores.tolist()}


def _difference_entry(a: np.ndarray, b: np.ndarray, folds, level: float) -> dict[str, Any]:
    diff = paired_fold_difference(a, b, folds, level)
    return {
        "mean": diff.mean,
        "ci_low": diff.ci_low,
        "ci_high": diff.ci_high,
        "n_folds": diff.n_folds,
        "above_zero": diff.above_zero,
    }


def _label_entry(
    task: LabelTask, modality: str, values: np.ndarray, subjects: np.ndarray, settings: LearningCurveSettings
) -> tuple[dict[str, Any], _Probe]:
    """The description of one label on one modality, and the probe that scores feature sets on its shared folds."""
    keep = np.flatnonzero(np.isfinite(values))
    y = values[keep].astype(np.int64) if task.task == "binary" else values[keep]
    groups = subjects[keep]
    assert task.task is not None
    folds = repeated_grouped_folds(y, groups, task.task, settings.folds, settings.repeats, settings.seed)
    entry = {
        "label": task.column,
        "modality": modality,
        "task": task.task,
        "metric": task.metric,
        "n_scans": int(keep.size),
        "n_subjects": int(np.unique(groups).size),
        "n_positive": int(y.sum()) if task.task == "binary" else None,
        "n_folds": len(folds),
        "test_sizes": [int(f.test.size) for f in folds],
    }
    return entry, _Probe(keep, y, groups, task.task, folds, settings.inner_folds, settings.seed, settings.jobs)


def _pooling_entry(
    probe: _Probe,
    random_features: dict[int, np.ndarray],
    checkpoint_features: list[tuple[RunCheckpoint, np.ndarray]],
    level: float,
) -> dict[str, Any]:
    """The band of the random inits and the curve of the checkpoints (each paired with the best init and step 0)."""
    seeds = list(random_features)
    members = [probe(random_features[seed]) for seed in seeds]
    band = noise_band(members)
    best = members[band.best]
    scores = {c.step: probe(x) for c, x in checkpoint_features}
    init = scores.get(0)
    curve = []
    for c, _ in checkpoint_features:
        point = {"step": c.step, "checkpoint": str(c.path), **_scores_entry(scores[c.step])}
        point["vs_best_random"] = _difference_entry(scores[c.step], best, probe.folds, level)
        point["vs_init"] = (
            _difference_entry(scores[c.step], init, probe.folds, level) if init is not None and c.step != 0 else None
        )
        curve.append(point)
    return {
        "random": {
            "members": [{"seed": s, **_scores_entry(m)} for s, m in zip(seeds, members)],
            "band": {"low": band.low, "high": band.high, "mean": band.mean, "best_seed": seeds[band.best]},
        },
        "curve": curve,
    }


def run_learning_curve(
    sources: Sequence[str | Path],
    manifest: str | Path,
    labels: Sequence[LabelTask | str],
    modalities: Sequence[str],
    out_dir: str | Path,
    settings: LearningCurveSettings | None = None,
    cache_dir: str | Path | None = "default",
) -> dict[str, Any]:
    """Probe every checkpoint of a run, a noise band of random inits and the raw baselines; write the outputs.

    Args:
        sources: the run folder (``version_<k>/``), its ``checkpoints/`` folder, and/or ``.ckpt`` files.
        manifest: per-scan manifest with ``subject_id``, ``modality``, ``path`` and the label columns.
        labels: :class:`LabelTask` or ``"COLUMN[:binary|continuous]"`` strings (kind inferred from the values when
            not given: only 0/1 -> binary).
        modalities: modalities to probe on, each on its own.
        out_dir: receives the JSON, CSV, TensorBoard scalars, figures and (by default) the feature cache.
        settings: the run's choices (default :class:`LearningCurveSettings`).
        cache_dir: feature cache folder; ``"default"`` is ``out_dir/features``, None disables the disk cache.

    Returns:
        The dict written to ``out_dir/learning_curve.json``.
    """
    settings = settings or LearningCurveSettings()
    if settings.random_inits < MIN_RANDOM_INITS:
        raise ValueError(f"the noise band needs >= {MIN_RANDOM_INITS} random inits; got {settings.random_inits}.")
    unknown = [p for p in settings.poolings if p not in POOLINGS]
    if unknown or not settings.poolings:
        raise ValueError(f"poolings must be a non-empty subset of {POOLINGS}; got {list(settings.poolings)}.")
    if settings.which not in ("target", "context"):
        raise ValueError(f"which must be 'target' or 'context'; got {settings.which!r}.")
    out_dir = Path(out_dir)
    cache = FeatureCache(out_dir / "features" if cache_dir == "default" else cache_dir)
    started = time.perf_counter()

    checkpoints = find_checkpoints(sources)
    if not checkpoints:
        raise FileNotFoundError(f"no checkpoints found in {list(map(str, sources))}.")
    setup = _check_same_setup(checkpoints)
    init = next((c for c in checkpoints if c.step == 0), None)
    init_note = (
        f"step-0 checkpoint {init.path}"
        if init is not None
        else "no step-0 checkpoint in the run, so its own init is not shown (the random band stands in for it)"
    )
    _log(f"{len(checkpoints)} checkpoints at steps {[c.step for c in checkpoints]}; init: {init_note}")

    manifest = str(manifest)
    frame = load_manifest(manifest)
    tasks = [parse_label(label) if isinstance(label, str) else label for label in labels]
    missing = [c for c in ("subject_id", "modality", "path", *(t.column for t in tasks)) if c not in frame.columns]
    if missing:
        raise ValueError(f"{manifest}: missing column(s) {missing}; found {list(frame.columns)}.")
    if settings.splits is not None:
        if "split" not in frame.columns:
            raise ValueError(f"{manifest}: --splits given but the manifest has no 'split' column.")
        frame = frame[frame["split"].isin(settings.splits)]
    tasks = [_resolve_task(t, _label_values(frame, t.column, manifest), manifest) for t in tasks]
    _log("labels: " + ", ".join(f"{t.column} ({t.task}, {t.metric})" for t in tasks))

    random_seeds = settings.random_seeds()
    grid = settings.avgpool_grid or tuple(random_init_encoder(setup, random_seeds[0]).grid_size)
    results: list[dict[str, Any]] = []
    for modality in modalities:
        rows = _modality_rows(frame, modality, manifest)
        features = _ModalityFeatures(modality, rows["path"].tolist(), setup, settings, cache, grid)
        step_features = {c.step: features.checkpoint(c) for c in checkpoints}
        random_features = {seed: features.random(seed) for seed in random_seeds}
        raw = features.raw()
        features.release()  # the features are all there is to keep
        for task in tasks:
            tic = time.perf_counter()
            values = _label_values(rows, task.column, manifest)
            entry, probe = _label_entry(task, modality, values, rows["subject_id"].to_numpy(), settings)
            entry["baselines"] = {name: _scores_entry(probe(x)) for name, x in raw.items()}
            entry["poolings"] = {
                pooling: _pooling_entry(
                    probe,
                    {seed: random_features[seed][pooling] for seed in random_seeds},
                    [(c, step_features[c.step][pooling]) for c in checkpoints],
                    settings.ci_level,
                )
                for pooling in settings.poolings
            }
            results.append(entry)
            _log(f"{task.column} on {modality}: probes in {time.perf_counter() - tic:.1f} s")

    report = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "settings": {
            "manifest": manifest,
            "labels": [{"column": t.column, "task": t.task, "metric": t.metric} for t in tasks],
            "modalities": list(modalities),
            "poolings": list(settings.poolings),
            "random_seeds": random_seeds,
            "folds": settings.folds,
            "repeats": settings.repeats,
            "inner_folds": settings.inner_folds,
            "seed": settings.seed,
            "baselines": list(settings.baselines),
            "histogram_bins": settings.histogram_bins,
            "avgpool_grid": list(grid),
            "splits": list(settings.splits) if settings.splits is not None else None,
            "which": settings.which,
            "ci_level": settings.ci_level,
            "ci_method": "corrected resampled t over the paired fold differences (Nadeau & Bengio 2003)",
            "probe": "StandardScaler + LogisticRegressionCV (binary, AUROC) / RidgeCV (continuous, R²), L2 strength "
            "chosen by inner subject-grouped CV on log-loss / squared error",
        },
        "run": {
            "encoder": setup.encoder,
            "encoder_overrides": setup.encoder_overrides,
            "data_settings": setup.data_settings,
            "checkpoints": [{"step": c.step, "path": str(c.path)} for c in checkpoints],
            "init": {"step": 0, "path": str(init.path)} if init is not None else None,
            "init_note": init_note,
        },
        "results": results,
    }
    report = _json_safe(report)
    _write_outputs(report, out_dir)
    _log(f"done in {time.perf_counter() - started:.0f} s (features computed {cache.computed}, reused {cache.reused})")
    return report


def _json_safe(value: Any) -> Any:
    # NaN / Inf are not JSON: undefined values (a fold with one class) are written as null.
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _write_outputs(report: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "learning_curve.json").write_text(json.dumps(report, indent=1) + "\n")
    pd.DataFrame(result_rows(report)).to_csv(out_dir / "learning_curve.csv", index=False)
    write_tensorboard(report, out_dir / "tensorboard")
    figures = out_dir / "figures"
    figures.mkdir(exist_ok=True)
    for label in dict.fromkeys(r["label"] for r in report["results"]):
        learning_curve_figure(report, label).savefig(figures / f"{label}.png", dpi=110)


# ---------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neurojepa learning-curve",
        description="Probe every checkpoint of a pretraining run with frozen features (linear probes, repeated "
        "subject-grouped CV) against a band of random-init encoders and raw-intensity baselines; writes JSON, CSV, "
        "TensorBoard scalars and one figure per label.",
    )
    parser.add_argument(
        "sources",
        nargs="+",
        type=Path,
        help="run folder (version_<k>/), its checkpoints/ folder, or .ckpt files of JEPAPretrainModule",
    )
    parser.add_argument("--manifest", type=Path, required=True, help="labelled per-scan manifest CSV")
    parser.add_argument(
        "--labels",
        nargs="+",
        required=True,
        help="label columns, each COLUMN or COLUMN:binary / COLUMN:continuous (default: 0/1 values -> binary)",
    )
    parser.add_argument("--modalities", nargs="+", required=True, help="modalities to probe on, e.g. FLAIR T1w")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--poolings", nargs="+", default=list(POOLINGS), choices=POOLINGS, help="token poolings")
    parser.add_argument("--random-inits", type=int, default=3, help="random-init encoders in the band (>= 3)")
    parser.add_argument("--folds", type=int, default=5, help="subject-grouped CV folds per repetition")
    parser.add_argument("--repeats", type=int, default=5, help="CV repetitions")
    parser.add_argument("--inner-folds", type=int, default=3, help="inner CV folds choosing the L2 strength")
    parser.add_argument("--seed", type=int, default=0, help="seeds folds and random inits")
    parser.add_argument(
        "--baselines", nargs="*", default=list(RAW_BASELINES), choices=RAW_BASELINES, help="raw baselines"
    )
    parser.add_argument("--histogram-bins", type=int, default=32, help="bins of the intensity histogram")
    parser.add_argument(
        "--avgpool-grid", type=int, nargs=3, default=None, help="average-pool grid (default: the token grid)"
    )
    parser.add_argument("--splits", nargs="+", default=None, help="keep only these manifest splits (default: all)")
    parser.add_argument("--which", choices=("target", "context"), default="target", help="encoder of the checkpoints")
    parser.add_argument("--batch-size", type=int, default=8, help="volumes per encoder forward")
    parser.add_argument("--device", default="cpu", help="torch device of the encoders, e.g. cuda")
    parser.add_argument("--jobs", type=int, default=1, help="CV folds fitted in parallel (results do not change)")
    parser.add_argument("--no-feature-cache", action="store_true", help="do not read or write OUT/features/")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = LearningCurveSettings(
        poolings=tuple(dict.fromkeys(args.poolings)),
        random_inits=args.random_inits,
        folds=args.folds,
        repeats=args.repeats,
        inner_folds=args.inner_folds,
        seed=args.seed,
        baselines=tuple(dict.fromkeys(args.baselines)),
        histogram_bins=args.histogram_bins,
        avgpool_grid=tuple(args.avgpool_grid) if args.avgpool_grid else None,
        splits=tuple(args.splits) if args.splits else None,
        which=args.which,
        batch_size=args.batch_size,
        device=args.device,
        jobs=args.jobs,
    )
    try:
        labels = [parse_label(text) for text in args.labels]
        report = run_learning_curve(
            args.sources,
            args.manifest,
            labels,
            args.modalities,
            args.out,
            settings,
            cache_dir=None if args.no_feature_cache else "default",
        )
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print("\n" + format_summary_table(report))
    print(
        f"\n[learning-curve] wrote {args.out / 'learning_curve.json'}, learning_curve.csv, figures/<label>.png; "
        f"TensorBoard: tensorboard --logdir {args.out / 'tensorboard'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
