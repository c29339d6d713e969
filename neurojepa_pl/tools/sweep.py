"""``neurojepa sweep``: hyper-parameter sweeps chosen on validation, then tested (paper B.6; docs/method.md §8.9).

Each trial is a normal ``neurojepa fit`` of the experiment with the trial's values as command-line overrides
(``--model.init_args.lr 0.001``), run in its own folder ``OUT/trials/trial_<n>/`` (TensorBoard events, checkpoints,
``config.yaml``, the exact command in ``command.txt``). The trial's value is the best score of the experiment's
``ModelCheckpoint`` that monitors ``--metric`` (so the winner is also a checkpoint), else the metric's value at the
end of training. When every trial is done the best one is tested (``neurojepa test`` of its checkpoint, reports in
its folder) and the table of all trials is printed and written to ``OUT/sweep_summary.csv`` (``OUT/winner.json``
holds the winner's values, validation score and test metrics).

Optuna keeps the state (`optuna.org <https://optuna.org>`_): the study lives in ``OUT/sweep.db`` (SQLite), so

- grids (``--grid``, a :class:`optuna.samplers.GridSampler` study) put every grid point in Optuna's trial queue;
  ``--sampler tpe --n-trials N`` lets TPE choose ``N`` trials over the same values (or ranges, ``float:LOW:HIGH[:log]``,
  ``int:LOW:HIGH``);
- running the same command again resumes: completed trials are never rerun, a trial whose process died (killed, out of
  memory, a lost SLURM node) stops sending Optuna heartbeats and is marked failed and queued again, and grid points
  whose trial failed are queued again;
- ``--jobs N`` starts N worker processes on this machine that share the study (each takes the next queued trial;
  on a multi-GPU machine each worker gets its own GPU), and ``--slurm-array N`` writes ``OUT/sweep_array.sbatch``, a
  SLURM job array whose tasks run ``neurojepa sweep --worker --out OUT`` against the same study; the command run
  again afterwards summarises and tests.

What Optuna does not do, and this module does by hand: turning trial values into LightningCLI overrides, giving each
trial its run folder, reading the validation score off the fit, and testing the winner.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import math
import os
import shlex
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from neurojepa_pl.errors import UserError, UserValueError

log = logging.getLogger(__name__)

__all__ = [
    "SweepSpec",
    "main",
    "parse_grid_item",
    "read_grid_file",
    "render_slurm_array",
    "run_sweep",
    "summarise",
    "work",
]

STUDY_NAME = "sweep"
DB_NAME = "sweep.db"
SPEC_NAME = "sweep.json"
SUMMARY_NAME = "sweep_summary.csv"
WINNER_NAME = "winner.json"
SBATCH_NAME = "sweep_array.sbatch"
DIRECTIONS = ("maximize", "minimize")
SAMPLERS = ("grid", "tpe")
LOGGERS_WITH_FOLDERS = ("TensorBoardLogger", "CSVLogger")
# Sweep options only this tool may set: a trial's folder and its logger's.
RESERVED_OVERRIDES = ("--trainer.default_root_dir", "--trainer.logger")


# ----------------------------------------------------------------------------------------------------------------------
# The search space
# ----------------------------------------------------------------------------------------------------------------------
def _scalar(value: Any, where: str) -> Any:
    """A grid value as Optuna stores it: str, int, float, bool or None (YAML's ``1e-4`` is read as a float)."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
    if value is None or isinstance(value, (bool, int, float)):
        return value
    raise UserValueError(
        f"{where}: grid values must be numbers, strings, booleans or null; found {value!r}.",
        "give one scalar per grid point (a list-valued option such as spatial_size cannot be swept here).",
    )


def _range(text: str, where: str) -> dict[str, Any]:
    kind, *bounds = text.split(":")
    log_scale = bounds[-1:] == ["log"]
    bounds = bounds[:-1] if log_scale else bounds
    try:
        low, high = (float(b) for b in bounds) if kind == "float" else (int(b) for b in bounds)
    except ValueError:
        low = high = None
    if kind not in ("float", "int") or low is None or high is None or not low < high:
        raise UserValueError(
            f"{where}: cannot read the range {text!r}.",
            "write float:LOW:HIGH, float:LOW:HIGH:log or int:LOW:HIGH with LOW < HIGH, or a list [a, b, c].",
        )
    return {"range": kind, "low": low, "high": high, "log": log_scale}


def _values(key: str, raw: Any, where: str) -> list[Any] | dict[str, Any]:
    if isinstance(raw, str) and raw.split(":", 1)[0] in ("float", "int"):
        return _range(raw, where)
    values = raw if isinstance(raw, list) else [raw]
    if not values:
        raise UserValueError(f"{where}: {key} has no values.", "list at least one value, e.g. [1.0e-4, 1.0e-3].")
    parsed = [_scalar(v, where) for v in values]
    if len(set(map(repr, parsed))) != len(parsed):
        raise UserValueError(f"{where}: {key} lists a value twice: {parsed}.", "list each value once.")
    return parsed


def _check_key(key: str, where: str) -> str:
    key = key.strip().removeprefix("--")
    if not key or " " in key or key.split(".", 1)[0] not in ("model", "data", "trainer", "seed_everything"):
        raise UserValueError(
            f"{where}: {key!r} is not a LightningCLI option.",
            "name it as on the command line without the dashes, e.g. model.init_args.lr or data.init_args.batch_size.",
        )
    return key


def parse_grid_item(text: str) -> tuple[str, list[Any] | dict[str, Any]]:
    """One ``--grid`` item: ``KEY=[v1,v2,...]``, ``KEY=v``, or a range ``KEY=float:LOW:HIGH[:log]`` /
    ``KEY=int:LOW:HIGH``.

    Args:
        text: e.g. ``"model.init_args.lr=[1e-4,1e-3]"``.

    Returns:
        ``(key, values)``: a list of scalars, or a range dict (TPE only).
    """
    key, sep, value = text.partition("=")
    where = f"--grid {text!r}"
    if not sep:
        raise UserValueError(f"{where} has no '='.", "write KEY=[v1,v2], e.g. model.init_args.lr=[1e-4,1e-3].")
    key = _check_key(key, where)
    try:
        raw = yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise UserValueError(f"{where}: cannot read the values ({err}).", "write them as a YAML list [a, b].") from err
    return key, _values(key, value.strip() if isinstance(raw, str) else raw, where)


def read_grid_file(path: str | Path) -> dict[str, list[Any] | dict[str, Any]]:
    """A YAML mapping ``KEY: [values]`` (or ``KEY: float:LOW:HIGH``), e.g. ``model.init_args.lr: [1.0e-4, 1.0e-3]``."""
    path = Path(path)
    try:
        content = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise UserValueError(f"cannot read the grid file {path}: {err}", "pass a YAML mapping KEY: [values].") from err
    if not isinstance(content, dict) or not content:
        raise UserValueError(f"the grid file {path} is not a non-empty mapping.", "write KEY: [v1, v2] lines.")
    return {_check_key(str(k), str(path)): _values(str(k), v, str(path)) for k, v in content.items()}


def grid_points(space: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of a grid, in the order of its keys and values."""
    keys = list(space)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(space[k] for k in keys))]


def _cli_value(value: Any) -> str:
    if hasattr(value, "item"):  # a numpy scalar (from a summary table)
        value = value.item()
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------------------------------------------------
# The sweep's record
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class SweepSpec:
    """Everything a worker needs to run a trial; written to ``OUT/sweep.json`` when the sweep is created.

    Attributes:
        configs: absolute paths of the experiment YAMLs (stacked like ``neurojepa fit --config``).
        overrides: extra command-line words for every trial (e.g. ``--trainer.max_epochs 5``).
        space: ``{key: [values]}`` or ``{key: range dict}`` (TPE).
        metric: the validation metric to choose on (``val/selection``).
        direction: ``maximize`` or ``minimize``.
        sampler: ``grid`` or ``tpe``.
        n_trials: trials to complete (TPE; the grid size for grids).
        seed: sampler seed.
        cwd: the folder relative paths of the configs and overrides refer to.
        heartbeat_s: Optuna heartbeat interval of running trials.
        grace_s: seconds without a heartbeat after which a trial counts as dead.
        test: test the winner.
    """

    configs: list[str]
    overrides: list[str]
    space: dict[str, Any]
    metric: str
    direction: str
    sampler: str = "grid"
    n_trials: int = 0
    seed: int = 0
    cwd: str = field(default_factory=os.getcwd)
    heartbeat_s: int = 30
    grace_s: int = 120
    test: bool = True

    def identity(self) -> dict[str, Any]:
        """What defines the study: a resumed sweep must agree on these."""
        return {k: v for k, v in asdict(self).items() if k in ("configs", "overrides", "space", "metric", "direction",
                                                                "sampler", "n_trials", "seed")}  # fmt: skip

    def save(self, out: Path) -> None:
        (out / SPEC_NAME).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @staticmethod
    def load(out: Path) -> SweepSpec:
        path = out / SPEC_NAME
        if not path.is_file():
            raise UserValueError(
                f"{out} holds no sweep ({SPEC_NAME} is missing).",
                "start the sweep with --config and --grid first, or pass the --out folder of an existing sweep.",
            )
        return SweepSpec(**json.loads(path.read_text()))


def _storage(out: Path, spec: SweepSpec):
    import optuna

    # Heartbeats make a dead trial detectable (fail_stale_trials); the callback queues it again with its values.
    return optuna.storages.RDBStorage(
        f"sqlite:///{(out / DB_NAME).resolve()}",
        engine_kwargs={"connect_args": {"timeout": 120}},
        heartbeat_interval=spec.heartbeat_s,
        grace_period=spec.grace_s,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
    )


def _sampler(spec: SweepSpec):
    import optuna

    if spec.sampler == "grid":
        return optuna.samplers.GridSampler(spec.space, seed=spec.seed)
    return optuna.samplers.TPESampler(seed=spec.seed)


def load_study(out: Path, spec: SweepSpec):
    """The sweep's Optuna study (created on first use)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat options
        storage = _storage(out, spec)
        if STUDY_NAME in optuna.get_all_study_names(storage):
            return optuna.load_study(storage=storage, study_name=STUDY_NAME, sampler=_sampler(spec))
        # Two workers starting at once may both get here: create_study then loads the other's study.
        return optuna.create_study(
            storage=storage,
            study_name=STUDY_NAME,
            sampler=_sampler(spec),
            direction=spec.direction,
            load_if_exists=True,
        )


def _params_key(params: Mapping[str, Any]) -> str:
    return json.dumps({k: params[k] for k in sorted(params)}, sort_keys=True)


def _trial_params(trial) -> dict[str, Any]:
    """A trial's values: suggested ones, else the queued ones (a waiting trial has suggested nothing yet)."""
    return dict(trial.params) or dict(trial.system_attrs.get("fixed_params") or {})


def _trials_with_heartbeat(out: Path) -> set[int]:
    """Ids of the trials that recorded at least one heartbeat.

    Read from the ``trial_heartbeats`` table of Optuna's SQLite schema: its stale-trial check skips trials without any
    heartbeat, i.e. a process killed between taking a trial and its heartbeat thread's first beat, whose trial would
    stay RUNNING forever.
    """
    import sqlite3

    with contextlib.closing(sqlite3.connect(out / DB_NAME, timeout=120)) as db:
        return {row[0] for row in db.execute("SELECT trial_id FROM trial_heartbeats")}


def _fail_stale(study, spec: SweepSpec, out: Path) -> None:
    """Mark dead trials failed and queue them again: Optuna's heartbeat check, plus trials that died before their
    first heartbeat (RUNNING for longer than the grace period without one)."""
    import datetime

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if not running:
        return
    beating = _trials_with_heartbeat(out)
    grace = datetime.timedelta(seconds=spec.grace_s)
    now = datetime.datetime.now()  # Optuna stores datetime_start as local naive time
    storage = study._storage
    for trial in running:
        if trial._trial_id in beating or trial.datetime_start is None or now - trial.datetime_start < grace:
            continue
        try:
            if storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL):
                storage.get_heartbeat_stale_trial_callback()(study, storage.get_trial(trial._trial_id))
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another process got there first


def _queue_grid(study, spec: SweepSpec) -> int:
    """Queue every grid point that has no completed, queued or running trial; returns how many were queued."""
    from optuna.trial import TrialState

    taken = {
        _params_key(_trial_params(t))
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING))
    }
    queued = 0
    for point in grid_points(spec.space):
        if _params_key(point) not in taken:
            study.enqueue_trial(point)
            queued += 1
    return queued


def _count(study, *states) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def open_sweep(out: Path, spec: SweepSpec | None) -> tuple[SweepSpec, Any]:
    """Create or reopen the sweep in ``out``: check a resumed sweep's definition, fail dead trials, queue the grid."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / SPEC_NAME).is_file():
        stored = SweepSpec.load(out)
        if spec is not None and spec.identity() != stored.identity():
            changed = sorted(k for k, v in spec.identity().items() if stored.identity()[k] != v)
            raise UserValueError(
                f"{out} holds a sweep with another definition ({', '.join(changed)} differ), which cannot be resumed "
                "with these options.",
                "resume it with the options it was started with (or only --out), or start a new sweep with another "
                "--out folder.",
            )
        # Run-time options of this invocation (not part of the study's definition) replace the stored ones.
        if spec is not None:
            stored.heartbeat_s, stored.grace_s, stored.test = spec.heartbeat_s, spec.grace_s, spec.test
            stored.save(out)
        spec = stored
    elif spec is None:
        SweepSpec.load(out)  # raises the "no sweep here" error
        raise AssertionError("unreachable")
    else:
        spec.save(out)
    study = load_study(out, spec)
    _fail_stale(study, spec, out)
    if spec.sampler == "grid":
        queued = _queue_grid(study, spec)
        if queued:
            log.info("queued %d grid point(s) of %d", queued, len(grid_points(spec.space)))
    return spec, study


# ----------------------------------------------------------------------------------------------------------------------
# One trial
# ----------------------------------------------------------------------------------------------------------------------
def _merged_yaml(configs: Sequence[str]) -> dict[str, Any]:
    """The configs merged in order (dicts deep-merged, anything else replaced): enough to find the logger, the
    checkpoint callbacks and an explicit ``output_dir``."""

    def merge(into: dict[str, Any], update: Mapping[str, Any]) -> None:
        for key, value in update.items():
            if isinstance(value, Mapping) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = json.loads(json.dumps(value)) if isinstance(value, (dict, list)) else value

    merged: dict[str, Any] = {}
    for config in configs:
        content = yaml.safe_load(Path(config).read_text()) or {}
        if isinstance(content, dict):
            merge(merged, content)
    return merged


def _class_name(node: Any) -> str | None:
    return str(node.get("class_path", "")).rsplit(".", 1)[-1] if isinstance(node, dict) else None


def folder_overrides(configs: Sequence[str], run_dir: Path, testing: bool = False) -> list[str]:
    """Command-line words that put a run (its logger, checkpoints and reports) into ``run_dir``.

    Raises:
        UserValueError: for a logger without a folder of its own, or a ``ModelCheckpoint`` with a fixed ``dirpath``
            (every trial would write the same files).
    """
    merged = _merged_yaml(configs)
    trainer = merged.get("trainer") or {}
    words = ["--trainer.default_root_dir", str(run_dir)]
    logger = trainer.get("logger")
    loggers = logger if isinstance(logger, list) else [logger]
    if isinstance(logger, list) or (isinstance(logger, dict) and _class_name(logger) not in LOGGERS_WITH_FOLDERS):
        raise UserValueError(
            f"the experiment's logger ({[_class_name(x) for x in loggers]}) has no save_dir/name/version for the "
            "sweep to give each trial its folder.",
            "use one TensorBoardLogger or CSVLogger (or none) in trainer.logger for sweeps.",
        )
    if isinstance(logger, dict):
        words += [
            "--trainer.logger.init_args.save_dir",
            str(run_dir.parent.parent),
            "--trainer.logger.init_args.name",
            run_dir.parent.name,
            "--trainer.logger.init_args.version",
            run_dir.name,
        ]
    for callback in trainer.get("callbacks") or []:
        if _class_name(callback) == "ModelCheckpoint" and (callback.get("init_args") or {}).get("dirpath"):
            raise UserValueError(
                "a ModelCheckpoint of the experiment writes to a fixed dirpath, which every trial would share.",
                "drop its dirpath: checkpoints then go into each trial's folder.",
            )
    model_args = (merged.get("model") or {}).get("init_args") or {}
    if testing and model_args.get("output_dir"):
        words += ["--model.init_args.output_dir", str(run_dir)]
    return words


def trial_words(spec: SweepSpec, params: Mapping[str, Any], run_dir: Path, subcommand: str = "fit") -> list[str]:
    """The ``neurojepa <subcommand>`` words of one trial (without the program name)."""
    words = [subcommand]
    for config in spec.configs:
        words += ["--config", config]
    words += list(spec.overrides)
    for key, value in params.items():
        words += [f"--{key}", _cli_value(value)]
    return words + folder_overrides(spec.configs, run_dir, testing=subcommand != "fit")


def run_dir_of(out: Path, number: int) -> Path:
    """``OUT/trials/trial_<number>`` (zero-padded to 4 digits)."""
    return out / "trials" / f"trial_{number:04d}"


def read_validation_score(trainer: Any, metric: str, direction: str) -> tuple[float, str, str]:
    """``(value, source, checkpoint)`` of a finished fit.

    The best score of the ``ModelCheckpoint`` monitoring ``metric`` (source ``best_checkpoint``; its mode must agree
    with ``direction``), else the metric's last logged value (source ``last_epoch``; the checkpoint is the last one, if
    any was saved).

    Raises:
        UserValueError: when the fit logged no ``metric``, or the checkpoint selects in the other direction.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    last = ""
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint):
            continue
        last = last or callback.last_model_path or ""
        if callback.monitor != metric:
            continue
        if (callback.mode == "max") != (direction == "maximize"):
            raise UserValueError(
                f"the experiment's ModelCheckpoint keeps the {callback.mode} of {metric} but the sweep is told to "
                f"{direction} it.",
                f"pass --direction {'maximize' if callback.mode == 'max' else 'minimize'} (or change the callback).",
            )
        if callback.best_model_score is not None and callback.best_model_path:
            return float(callback.best_model_score), "best_checkpoint", str(callback.best_model_path)
        last = callback.last_model_path or last
    value = trainer.callback_metrics.get(metric)
    if value is None:
        logged = sorted(k for k in trainer.callback_metrics if not k.startswith("train/"))
        raise UserValueError(
            f"the trial logged no {metric!r}; its validation metrics were {logged}.",
            "pass --metric with one of those (check that validation runs: limit_val_batches > 0).",
        )
    return float(value), "last_epoch", last


def _objective(spec: SweepSpec, out: Path):
    import optuna

    from neurojepa_pl.cli import lightning_main

    def suggest(trial: optuna.Trial, key: str, values: Any) -> Any:
        if isinstance(values, dict):
            if values["range"] == "int":
                return trial.suggest_int(key, values["low"], values["high"], log=values["log"])
            return trial.suggest_float(key, values["low"], values["high"], log=values["log"])
        return trial.suggest_categorical(key, values)

    def objective(trial: optuna.Trial) -> float:
        params = {key: suggest(trial, key, values) for key, values in spec.space.items()}
        # Two workers may both find the last queued grid point gone and get the sampler's re-draw of a visited point.
        others = trial.study.get_trials(
            deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)
        )
        if any(t.number != trial.number and t.params == params for t in others):
            raise optuna.TrialPruned("duplicate of another trial's values")
        run_dir = run_dir_of(out, trial.number)
        run_dir.mkdir(parents=True, exist_ok=True)
        words = trial_words(spec, params, run_dir)
        (run_dir / "command.txt").write_text(shlex.join(["neurojepa", *words]) + "\n")
        trial.set_user_attr("run_dir", str(run_dir))
        start = time.perf_counter()
        try:
            cli = lightning_main(words)
        except SystemExit as err:  # jsonargparse rejected the command line: a configuration error, for every trial
            raise UserValueError(
                f"trial {trial.number}: `neurojepa fit` rejected its command line (exit {err.code}); it is in "
                f"{run_dir / 'command.txt'}.",
                "fix the grid keys or overrides (run that command to see the message).",
            ) from err
        value, source, checkpoint = read_validation_score(cli.trainer, spec.metric, spec.direction)
        trial.set_user_attr("duration_s", round(time.perf_counter() - start, 1))
        trial.set_user_attr("value_source", source)
        trial.set_user_attr("checkpoint", checkpoint)
        if not math.isfinite(value):
            raise ValueError(f"trial {trial.number}: {spec.metric} = {value}")
        return value

    return objective


# ----------------------------------------------------------------------------------------------------------------------
# Workers
# ----------------------------------------------------------------------------------------------------------------------
def _has_work(study, spec: SweepSpec) -> bool:
    from optuna.trial import TrialState

    if spec.sampler == "grid":
        return _count(study, TrialState.WAITING) > 0
    # TPE draws until n_trials completed; as many failures as that means the experiment, not the values, is broken.
    failed = _count(study, TrialState.FAIL)
    return _count(study, TrialState.COMPLETE, TrialState.RUNNING) < spec.n_trials and failed < spec.n_trials


def work(out: Path, max_trials: int | None = None) -> int:
    """Run queued (grid) or new (TPE) trials of the sweep in ``out`` one at a time, in this process, until none is
    left or ``max_trials`` ran; returns the number run.

    A trial that raises is recorded as failed (its traceback in ``error.txt`` of its folder) and the next one runs;
    a configuration error (:class:`neurojepa_pl.errors.UserError`) stops the worker, since every trial would hit it.
    """
    import optuna

    spec = SweepSpec.load(out)
    study = load_study(out, spec)
    objective = _objective(spec, out)
    failures: list[BaseException] = []

    def guarded(trial: optuna.Trial) -> float:
        try:
            return objective(trial)
        except optuna.TrialPruned:
            raise
        except Exception as err:
            failures.append(err)
            run_dir = run_dir_of(out, trial.number)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "error.txt").write_text("".join(traceback.format_exception(err)))
            first_line = str(err).splitlines()[0] if str(err) else ""
            trial.set_user_attr("error", f"{type(err).__name__}: {first_line}")
            raise

    ran = 0
    while (max_trials is None or ran < max_trials) and _has_work(study, spec):
        _fail_stale(study, spec, out)  # a dead worker's trial goes back to the queue
        before = len(failures)
        study.optimize(guarded, n_trials=1, catch=(Exception,))
        ran += 1
        if len(failures) > before and isinstance(failures[-1], UserError):
            raise failures[-1]
    return ran


def _worker_command(out: Path, max_trials: int | None = None) -> list[str]:
    words = [sys.executable, "-m", "neurojepa_pl", "sweep", "--worker", "--out", str(out)]
    return words + (["--max-trials", str(max_trials)] if max_trials is not None else [])


def _run_parallel(out: Path, jobs: int) -> None:
    """``jobs`` worker processes on this machine, one torch thread pool and (with several GPUs) one GPU each."""
    import torch

    gpus = torch.cuda.device_count()
    threads = max(
        1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1) // jobs
    )
    processes = []
    for rank in range(jobs):
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(threads)))
        if gpus > 1 and "CUDA_VISIBLE_DEVICES" not in os.environ:
            env["CUDA_VISIBLE_DEVICES"] = str(rank % gpus)
        log_file = (out / f"worker_{rank}.log").open("w")
        processes.append((subprocess.Popen(_worker_command(out), env=env, stdout=log_file, stderr=subprocess.STDOUT),
                          log_file))  # fmt: skip
    codes = []
    for process, log_file in processes:
        codes.append(process.wait())
        log_file.close()
    if any(codes):
        raise UserValueError(
            f"{sum(1 for c in codes if c)} of {jobs} sweep workers exited with an error (codes {codes}).",
            f"read {out}/worker_<k>.log; trials that finished are kept, so run the sweep again to resume.",
        )


# ----------------------------------------------------------------------------------------------------------------------
# Summary, winner, test
# ----------------------------------------------------------------------------------------------------------------------
def summarise(study, spec: SweepSpec) -> pd.DataFrame:
    """One row per trial (duplicates pruned by a worker race left out): state, values, validation score, folder."""
    from optuna.trial import TrialState

    rows = []
    for trial in study.get_trials(deepcopy=False):
        if trial.state == TrialState.PRUNED:
            continue
        row: dict[str, Any] = {"trial": trial.number, "state": trial.state.name}
        row.update({key: _trial_params(trial).get(key) for key in spec.space})
        row[spec.metric] = trial.value if trial.state == TrialState.COMPLETE else float("nan")
        attrs = trial.user_attrs
        row.update({k: attrs.get(k, "") for k in ("value_source", "duration_s", "run_dir", "checkpoint", "error")})
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    complete = table[table["state"] == "COMPLETE"]
    table["winner"] = False
    if not complete.empty:
        scores = complete[spec.metric]
        best = scores.idxmax() if spec.direction == "maximize" else scores.idxmin()  # ties: the first trial
        table.loc[best, "winner"] = True
    return table


def _test_winner(spec: SweepSpec, out: Path, winner: pd.Series) -> dict[str, Any]:
    """``neurojepa test`` of the winner's checkpoint in its folder; returns its test metrics."""
    from neurojepa_pl.cli import lightning_main
    from neurojepa_pl.metrics.report import read_metrics_json

    checkpoint = winner["checkpoint"]
    if not checkpoint:
        print(f"[sweep] the winner (trial {winner['trial']}) saved no checkpoint: not tested")
        return {}
    run_dir = Path(winner["run_dir"])
    params = {key: winner[key] for key in spec.space}
    cli = lightning_main([*trial_words(spec, params, run_dir, "test"), "--ckpt_path", checkpoint])
    report = run_dir / "metrics.json"
    if report.is_file():
        return {"metrics_json": str(report), **read_metrics_json(report)}
    return {name: float(v) for name, v in cli.trainer.callback_metrics.items() if name.startswith("test/")}


def _finish(study, spec: SweepSpec, out: Path) -> pd.DataFrame:
    table = summarise(study, spec)
    table.to_csv(out / SUMMARY_NAME, index=False)
    shown = table.drop(columns=[c for c in ("checkpoint", "error", "run_dir") if c in table.columns])
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"\n[sweep] {len(table)} trial(s) in {out / SUMMARY_NAME}")
    winners = table[table["winner"]] if not table.empty else table
    if winners.empty:
        print("[sweep] no trial completed: no winner")
        return table
    winner = winners.iloc[0]
    params = {key: winner[key] for key in spec.space}
    record: dict[str, Any] = {
        "trial": int(winner["trial"]),
        "params": {k: (v.item() if hasattr(v, "item") else v) for k, v in params.items()},
        "metric": spec.metric,
        "value": float(winner[spec.metric]),
        "value_source": winner["value_source"],
        "run_dir": winner["run_dir"],
        "checkpoint": winner["checkpoint"],
    }
    print(f"[sweep] winner: trial {record['trial']} {record['params']}: {spec.metric} = {record['value']:.4g}")
    if spec.test:
        record["test"] = _test_winner(spec, out, winner)
        metrics = record["test"].get("metrics", {})
        for name in ("auroc", "ap", "mae", "cindex"):
            if name in metrics:
                entry = metrics[name]
                print(
                    f"[sweep] winner test {name}: {entry['value']:.4f} [{entry['ci_low']:.4f}, {entry['ci_high']:.4f}]"
                )
    (out / WINNER_NAME).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return table


def render_slurm_array(
    out: Path,
    tasks: int,
    spec: SweepSpec,
    partition: str | None = None,
    time_limit: str = "24:00:00",
    gpus: int = 1,
    cpus: int = 8,
    mem: str = "64G",
) -> str:
    """An sbatch script whose array tasks are sweep workers on the study in ``out`` (one trial at a time each)."""
    lines = [
        "#!/bin/bash",
        f"# neurojepa sweep: {tasks} SLURM array task(s), each a worker of the Optuna study {out / DB_NAME}.",
        "# Submit with `sbatch` this file; when the array is done, run the sweep command again (or",
        f"# `neurojepa sweep --out {out}`) to summarise and test the winner. A task that dies mid-trial stops sending",
        f"# heartbeats; after {spec.grace_s} s its trial is queued again for the next worker.",
        "#SBATCH --job-name=neurojepa-sweep",
        f"#SBATCH --array=0-{tasks - 1}",
        f"#SBATCH --output={out}/slurm-%A_%a.out",
        f"#SBATCH --time={time_limit}",
        f"#SBATCH --cpus-per-task={cpus}",
        f"#SBATCH --mem={mem}",
    ]
    if gpus:
        lines.append(f"#SBATCH --gpus-per-task={gpus}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    lines += [
        "",
        "set -euo pipefail",
        f"cd {shlex.quote(spec.cwd)}",
        "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}",
        "# The Python environment that created the sweep (the cluster's nodes must see it).",
        f"srun {shlex.join(_worker_command(out))}",
        "",
    ]
    return "\n".join(lines)


def run_sweep(
    out: Path,
    spec: SweepSpec | None,
    jobs: int = 1,
    max_trials: int | None = None,
    test: bool | None = None,
) -> pd.DataFrame | None:
    """Create or resume the sweep in ``out``, run its trials (``jobs`` processes), then summarise and test.

    Args:
        out: the sweep folder.
        spec: the sweep's definition (None: resume the one in ``out``).
        jobs: worker processes (1: trials run in this process).
        max_trials: stop this invocation after that many trials (the sweep stays resumable; no summary then).
        test: test the winner (None: as the sweep was started).

    Trials still running elsewhere (another worker) are waited for; dead ones are queued again and run.
    """
    from optuna.trial import TrialState

    spec, study = open_sweep(out, spec)
    if test is not None:
        spec.test = test
    while True:
        if jobs > 1 and max_trials is None:
            _run_parallel(out, jobs)
        else:
            ran = work(out, max_trials)
            if max_trials is not None:
                left = _count(study, TrialState.WAITING) if spec.sampler == "grid" else "?"
                print(f"[sweep] ran {ran} trial(s) (--max-trials {max_trials}); queued: {left}. Run again to resume.")
                return None
        running = _count(study, TrialState.RUNNING)
        if not running and not _has_work(study, spec):
            break
        print(f"[sweep] {running} trial(s) still running elsewhere; waiting ({spec.heartbeat_s} s)")
        time.sleep(spec.heartbeat_s)
        _fail_stale(study, spec, out)
    return _finish(study, spec, out)


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neurojepa sweep",
        allow_abbrev=False,
        description="Hyper-parameter sweep with Optuna: every trial is a `neurojepa fit` of the experiment with the "
        "trial's values as overrides, in OUT/trials/trial_<n>/; the winner is chosen on a validation metric and "
        "tested; the table of all trials goes to OUT/sweep_summary.csv. The study is OUT/sweep.db: running the "
        "command again resumes it (completed trials are kept, killed or failed ones rerun). Unknown options (e.g. "
        "--trainer.max_epochs 5) are passed to every trial.",
        epilog="example: neurojepa sweep --config experiments/finetune/synth_tumour_probe.yaml "
        "--grid 'model.init_args.lr=[1e-4,1e-3]' --grid 'model.init_args.weight_decay=[0.0,0.04]' "
        "--metric val/selection --direction maximize --out runs/sweeps/tumour_probe",
    )
    parser.add_argument("--config", action="append", default=[], help="experiment YAML (repeatable, stacked)")
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=VALUES",
        help="a swept option and its values, e.g. 'model.init_args.lr=[1e-4,1e-3]' (repeatable; TPE also takes "
        "KEY=float:LOW:HIGH[:log] or KEY=int:LOW:HIGH)",
    )
    parser.add_argument("--grid-file", default=None, metavar="YAML", help="swept options from a YAML mapping")
    parser.add_argument("--metric", default="val/selection", help="validation metric to choose on (val/selection)")
    parser.add_argument("--direction", default="maximize", choices=DIRECTIONS, help="maximize (default) or minimize")
    parser.add_argument("--out", required=True, metavar="DIR", help="sweep folder (study, trials, summary)")
    parser.add_argument("--sampler", default="grid", choices=SAMPLERS, help="grid (every point, default) or tpe")
    parser.add_argument("--n-trials", type=int, default=None, help="trials to complete with --sampler tpe")
    parser.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes on this machine (default 1)")
    parser.add_argument(
        "--max-trials", type=int, default=None, help="stop this invocation after N trials (resume later)"
    )
    parser.add_argument("--no-test", action="store_true", help="do not test the winner")
    parser.add_argument("--heartbeat", type=int, default=30, metavar="S", help="heartbeat of running trials (30 s)")
    parser.add_argument(
        "--grace", type=int, default=None, metavar="S", help="a trial silent this long is dead (default 4 heartbeats)"
    )
    parser.add_argument("--worker", action="store_true", help="run queued trials of the sweep in --out, then exit")
    slurm = parser.add_argument_group("SLURM job array (instead of running here)")
    slurm.add_argument("--slurm-array", type=int, default=None, metavar="N", help="write an N-task sbatch array")
    slurm.add_argument("--slurm-partition", default=None)
    slurm.add_argument("--slurm-time", default="24:00:00")
    slurm.add_argument("--slurm-gpus", type=int, default=1, help="GPUs per task (default 1)")
    slurm.add_argument("--slurm-cpus", type=int, default=8, help="CPUs per task (default 8)")
    slurm.add_argument("--slurm-mem", default="64G")
    return parser


def _spec_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, overrides: list[str]) -> SweepSpec:
    space: dict[str, Any] = {}
    if args.grid_file:
        space.update(read_grid_file(args.grid_file))
    for item in args.grid:
        key, values = parse_grid_item(item)
        space[key] = values
    if not space:
        parser.error("give the swept options with --grid KEY=[v1,v2] (repeatable) or --grid-file")
    if not args.config:
        parser.error("--config is required to start a sweep")
    reserved = [w for w in overrides if w.split("=", 1)[0].startswith(RESERVED_OVERRIDES)]
    if reserved or any(w.split("=", 1)[0].lstrip("-") in space for w in overrides):
        parser.error(f"{reserved or 'an override'} is set by the sweep (trial folders / swept values); remove it.")
    ranges = [k for k, v in space.items() if isinstance(v, dict)]
    if args.sampler == "grid":
        if ranges:
            parser.error(f"{ranges} are ranges: a grid needs lists of values (or use --sampler tpe --n-trials N)")
        n_trials = len(grid_points(space))
        if args.n_trials is not None and args.n_trials != n_trials:
            parser.error(f"--n-trials is the grid size ({n_trials}) with --sampler grid; drop it")
    else:
        if not args.n_trials or args.n_trials < 1:
            parser.error("--sampler tpe needs --n-trials N")
        n_trials = args.n_trials
    for config in args.config:
        if not Path(config).is_file():
            parser.error(f"--config {config}: no such file")
    return SweepSpec(
        configs=[str(Path(c).resolve()) for c in args.config],
        overrides=list(overrides),
        space=space,
        metric=args.metric,
        direction=args.direction,
        sampler=args.sampler,
        n_trials=n_trials,
        seed=args.seed,
        heartbeat_s=args.heartbeat,
        grace_s=args.grace if args.grace is not None else 4 * args.heartbeat,
        test=not args.no_test,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, overrides = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    out = Path(args.out)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.worker:
        if args.config or args.grid or args.grid_file or overrides:
            parser.error("--worker takes only --out (and --max-trials): the sweep's definition is in its folder")
        work(out, args.max_trials)
        return 0
    starting = bool(args.config or args.grid or args.grid_file)
    spec = _spec_from_args(parser, args, overrides) if starting else None
    if args.slurm_array is not None:
        if args.slurm_array < 1:
            parser.error("--slurm-array needs at least 1 task")
        spec, _ = open_sweep(out, spec)
        script = out / SBATCH_NAME
        script.write_text(
            render_slurm_array(
                out.resolve(),
                args.slurm_array,
                spec,
                args.slurm_partition,
                args.slurm_time,
                args.slurm_gpus,
                args.slurm_cpus,
                args.slurm_mem,
            )  # fmt: skip
        )
        print(f"[sweep] wrote {script}; submit it with: sbatch {script}")
        print(f"[sweep] when the array is done: neurojepa sweep --out {out}   (summary and test of the winner)")
        return 0
    run_sweep(out, spec, jobs=args.jobs, max_trials=args.max_trials, test=False if args.no_test else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
