"""The `neurojepa` command.

`fit|validate|test|predict` go to LightningCLI (models and data modules in subclass mode, driven by YAML experiment
files). Every other first word names a tool; each tool lives in `neurojepa_pl/tools/<module>.py` and exposes
`main(argv: list[str]) -> int` with its own argparse `--help`. Tools are imported lazily so that `neurojepa synth`
does not pay for importing Lightning (the LightningCLI subclass is built on first use for the same reason).

What the Lightning subcommands add to plain LightningCLI:

* ``test`` / ``validate`` / ``predict`` of a checkpoint that lies in a fit run's
  ``<save_dir>/<name>/version_<k>/checkpoints/`` log into that same ``version_<k>`` folder (reports, TensorBoard
  events and ``config_<subcommand>.yaml`` land beside the fit's checkpoints; the fit's ``config.yaml`` is kept);
* ``--ckpt_path best`` / ``last`` outside the process that ran ``fit`` is refused with the path to pass instead
  (Lightning resolves them from the fit's ``ModelCheckpoint``, which a new process does not have);
* ``fit`` ends by printing its checkpoints and the ``neurojepa test`` / ``predict`` commands for them;
* ``predict`` writes ``embeddings_<predict_split>.npz`` into the run folder when no prediction writer is configured
  (:class:`neurojepa_pl.callbacks.embedding_writer.EmbeddingWriter`);
* a model that takes ``img_size`` / ``patch_size`` and leaves them unset gets the data module's ``spatial_size`` /
  ``patch_size`` (:func:`_link_geometry`);
* with stdout not a terminal (a log file, a pipe), progress is printed as plain lines
  (:class:`neurojepa_pl.callbacks.progress.LineProgress`); on a terminal Lightning's bar is kept;
* the user's mistakes fail fast and plainly: the manifest, its columns, the checkpoints and the model/data geometry
  are checked before Lightning is imported where the command line allows it, and always before any model is built
  (:mod:`neurojepa_pl.preflight`); every :class:`neurojepa_pl.errors.UserError` (there, or later: a table of unusable
  scans, a manifest report) is printed as ``neurojepa: error: ...`` / ``fix: ...`` with exit status 2 and no traceback.
  ``--debug`` (anywhere on a Lightning subcommand's line, or first on a tool's) shows the traceback instead.
"""

from __future__ import annotations

import functools
import importlib
import logging
import re
import sys
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from neurojepa_pl.errors import UserError, UserValueError, format_user_error

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
EVAL_SUBCOMMANDS = ("validate", "test", "predict")
PROG = "neurojepa"
DEBUG_FLAG = "--debug"
USER_ERROR_STATUS = 2

# tool name -> (module under neurojepa_pl.tools, one-line help)
TOOLS: dict[str, tuple[str, str]] = {
    "synth": ("synth", "generate a SynthBrain cohort (NIfTI + manifest.csv)"),
    "validate-manifest": ("validate_manifest", "check a manifest CSV before training"),
    "export": ("export", "export a backbone to config.json + model.safetensors"),
    "qc": ("qc", "quality control of registered scans against MNI152"),
    "preprocess": ("preprocess", "reorient, N4, affine-register to MNI152, skull-strip"),
    "build-cache": ("build_cache", "preprocess a manifest once into the fast memory-mapped cache"),
    "compare": ("compare", "paired permutation test between two runs' test predictions"),
    "fewshot": ("fewshot", "run a few-shot grid (k per class x repeats) and report mean and CI"),
    "mm-gain": ("mm_gain", "multimodal gain table: best multimodal minus best unimodal"),
    "learning-curve": (
        "learning_curve",
        "probe every pretraining checkpoint against random-init bands and raw baselines",
    ),
    "routing": ("routing", "MoE routing statistics and expert maps in MNI152 space"),
    "embedding-geometry": ("embedding_geometry", "t-SNE of frozen features by age group, with silhouette scores"),
    "fairness": ("fairness", "metrics and fairness gaps across subgroups of a test run"),
    "sweep": ("sweep", "hyperparameter sweep with Optuna: choose on validation, then test"),
}

LIGHTNING_TIP = "💡 Tip:"
"""Prefix of Lightning's product tips (litlogger on every Trainer, litmodels without a ModelCheckpoint)."""

VERSION_DIR = re.compile(r"version_(\d+)")


def _usage() -> str:
    lines = [
        "usage: neurojepa [--debug] {fit,validate,test,predict} --config EXPERIMENT.yaml [...]",
        "       neurojepa [--debug] TOOL [--help]",
        "",
        "Mistakes in the input (paths, columns, labels, geometry, checkpoints) are reported as `neurojepa: error:`",
        "and `fix:` lines with exit status 2; --debug shows the Python traceback instead.",
        "",
        "Lightning subcommands (see `neurojepa fit --help`):",
        "  fit, validate, test, predict",
        "",
        "Tools:",
    ]
    lines += [f"  {name:<18} {help_}" for name, (_, help_) in TOOLS.items()]
    return "\n".join(lines)


class _DropLightningTips(logging.Filter):
    """Drop Lightning's "💡 Tip: try installing litlogger / litmodels" records, and nothing else.

    Lightning 2.6 prints the litlogger tip from ``Trainer.__init__`` for every logger that is not a ``LitLogger``, with
    no setting to turn it off (the litmodels one appears only when no ``ModelCheckpoint`` is configured, which the
    experiment YAMLs always do). Every other Lightning message passes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(LIGHTNING_TIP)


def _install_tip_filter() -> None:
    # Lightning's rank-zero messages (rank_zero_info) all go through this one logger.
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLightningTips) for f in logger.filters):
        logger.addFilter(_DropLightningTips())


@contextmanager
def _argv(words: Sequence[str]) -> Iterator[None]:
    """Make ``sys.argv`` the ``neurojepa`` command line for the duration of a LightningCLI run.

    LightningCLI warns (printing the whole command line) whenever ``args=`` is passed while ``sys.argv`` has words of
    its own, which is always the case when a script or a test calls the CLI. Parsing from ``sys.argv`` instead gives
    the same parse, no warning, and ``neurojepa`` as the program name in ``--help`` and error messages.
    """
    saved = sys.argv
    sys.argv = [PROG, *words]
    try:
        yield
    finally:
        sys.argv = saved


def _class_name(class_path: Any) -> str:
    return str(class_path).rsplit(".", 1)[-1]


def _is_overridden(model: Any, method: str) -> bool:
    from lightning.pytorch import LightningModule

    return getattr(type(model), method, None) is not getattr(LightningModule, method)


def run_folder_of(ckpt_path: str | Path) -> tuple[Path, str, int] | None:
    """``(save_dir, name, k)`` when ``ckpt_path`` lies in ``<save_dir>/<name>/version_<k>/checkpoints/``, else None."""
    path = Path(ckpt_path)
    if path.parent.name != "checkpoints":
        return None
    match = VERSION_DIR.fullmatch(path.parent.parent.name)
    if match is None or len(path.parents) < 4:
        return None
    run = path.parent.parent.parent
    return run.parent, run.name, int(match.group(1))


def _config_words(config: Any) -> str:
    paths = config.get("config") or []
    return " ".join(f"--config {getattr(p, 'relative', p)}" for p in paths)


GEOMETRY_LINKS = (("spatial_size", "img_size"), ("patch_size", "patch_size"))
"""(data init arg, model init arg): the volume / patch geometry a model takes from its data module."""


def _link_geometry(config: Any) -> None:
    """Give the model the data module's geometry (``spatial_size`` -> ``img_size``, ``patch_size``) where the model
    class takes it and the configuration leaves it unset, so that an experiment states the geometry once, under
    ``data`` (the pretraining module). Models without these arguments are left alone."""
    model, data = config.get("model"), config.get("data")
    model_args = model.get("init_args") if hasattr(model, "get") else None
    data_args = data.get("init_args") if hasattr(data, "get") else None
    if model_args is None or data_args is None:
        return
    for source, target in GEOMETRY_LINKS:
        if target in model_args and model_args[target] is None and data_args.get(source) is not None:
            model_args[target] = data_args[source]


def _checkable_data_module(config: dict[str, Any]) -> Any | None:
    """A throw-away instance of the configured data module, for :func:`neurojepa_pl.preflight.check_parsed_config`.

    Only for our :class:`~neurojepa_pl.data_modules.base.MRIDataModule` family, whose constructors check their
    arguments and read no file (other classes may do work in ``__init__``): ``None`` for any other class.
    """
    from neurojepa_pl.data_modules.base import MRIDataModule

    node = config.get("data")
    class_path = node.get("class_path") if isinstance(node, dict) else None
    if not isinstance(class_path, str) or "." not in class_path:
        return None
    module_name, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), name, None)  # jsonargparse imported it already
    if not (isinstance(cls, type) and issubclass(cls, MRIDataModule)):
        return None
    return cls(**(node.get("init_args") or {}), **(node.get("dict_kwargs") or {}))


@functools.cache
def _cli_class() -> type:
    from lightning.fabric.plugins import CheckpointIO
    from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.utilities import rank_zero_only

    from neurojepa_pl.callbacks.embedding_writer import EmbeddingWriter
    from neurojepa_pl.callbacks.preemption import PreemptionCheckpoint, find_resume_checkpoint
    from neurojepa_pl.callbacks.progress import LineProgress, wants_line_progress
    from neurojepa_pl.checkpoint_io import AtomicCheckpointIO
    from neurojepa_pl.preflight import check_checkpoints, check_parsed_config

    class NeuroJEPACLI(LightningCLI):
        """LightningCLI with the additions listed in :mod:`neurojepa_pl.cli`."""

        def _parse_ckpt_path(self) -> None:
            # Lightning reads the checkpoint's hyper-parameters here, before any hook of ours runs: check the file
            # first, and call a checkpoint that cannot be read what it is (not a traceback out of torch.load).
            subcommand = self.config.get("subcommand")
            ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
            if ckpt_path is not None:
                check_checkpoints(subcommand, {"ckpt_path": ckpt_path})
            try:
                super()._parse_ckpt_path()
            except Exception as err:
                # A complete torch.save file is a zip archive; one that is not, and fails to load, is broken.
                if ckpt_path is None or not Path(ckpt_path).is_file() or zipfile.is_zipfile(ckpt_path):
                    raise
                raise UserValueError(
                    f"--ckpt_path {ckpt_path} cannot be read ({type(err).__name__}: {err}); it is not a complete "
                    "checkpoint (a truncated copy, or a save that was interrupted).",
                    "pass another checkpoint (e.g. the run's last.ckpt or an earlier step), or copy this one again.",
                ) from err

        def before_instantiate_classes(self) -> None:
            subcommand = self.subcommand
            if subcommand is None:
                return
            _link_geometry(self.config[subcommand])
            if subcommand == "fit":
                self._resolve_last_for_fit(self.config["fit"])
            if subcommand in EVAL_SUBCOMMANDS:
                config = self.config[subcommand]
                self._refuse_unresolvable_ckpt_path(subcommand, config)
                self._log_beside_checkpoint(config)
                # The fit's config.yaml stays the record of the fit; each later subcommand saves its own.
                self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": f"config_{subcommand}.yaml"}
            # Before any class is built: the user's mistakes fail here in seconds, not after the model build.
            config = self.config[subcommand].as_dict()
            check_parsed_config(subcommand, config, _checkable_data_module(config))

        def _refuse_unresolvable_ckpt_path(self, subcommand: str, config: Any) -> None:
            ckpt_path = config.get("ckpt_path")
            if ckpt_path not in ("best", "last"):
                return
            hint = "the path of a checkpoint file (a fit prints its best and last checkpoints when it ends)"
            logger = config.trainer.get("logger")
            init_args = logger.get("init_args") if hasattr(logger, "get") else None
            if init_args is not None and init_args.get("save_dir") is not None:
                pattern = "best*.ckpt" if ckpt_path == "best" else "last*.ckpt"
                runs = Path(str(init_args.save_dir)) / str(init_args.get("name") or "")
                found = sorted(runs.glob(f"version_*/checkpoints/{pattern}"), key=lambda p: p.stat().st_mtime)
                if found:
                    hint += f", e.g. the newest one: --ckpt_path {found[-1]}"
            raise UserValueError(
                f"--ckpt_path {ckpt_path} names the {ckpt_path} checkpoint of a fit run in the same process only "
                f"(Lightning keeps it in that fit's ModelCheckpoint); `{PROG} {subcommand}` is a new process.",
                f"pass {hint}.",
            )

        def _resolve_last_for_fit(self, config: Any) -> None:
            """``fit --ckpt_path last`` in a new process: the newest last*.ckpt / preempted.ckpt / hpc_ckpt_*.ckpt of
            the logger's ``<save_dir>/<name>/version_*/`` (Lightning would look only in this run's new, empty version
            folder and start from step 0), and log into that checkpoint's run folder; none yet: start afresh."""
            if config.get("ckpt_path") != "last":
                return
            logger = config.trainer.get("logger")
            init_args = logger.get("init_args") if hasattr(logger, "get") else None
            if init_args is None or init_args.get("save_dir") is None:
                return  # no run folder to search: Lightning's own lookup
            runs = Path(str(init_args.save_dir)) / str(init_args.get("name") or "")
            found = find_resume_checkpoint(runs)
            where = f"resuming from {found}" if found else f"no checkpoint in {runs}/version_*/ yet; starting afresh"
            if rank_zero_only.rank == 0:
                print(f"[{PROG}] --ckpt_path last: {where}")
            config.ckpt_path = None if found is None else str(found)
            if found is not None:
                self._log_beside_checkpoint(config)

        def _log_beside_checkpoint(self, config: Any) -> None:
            ckpt_path = config.get("ckpt_path")
            run = run_folder_of(ckpt_path) if ckpt_path else None
            logger = config.trainer.get("logger")
            if run is None or not hasattr(logger, "get") or "init_args" not in logger:
                return
            if _class_name(logger.class_path) not in ("TensorBoardLogger", "CSVLogger"):
                return
            init_args = logger.init_args
            if init_args.get("version") is not None or init_args.get("sub_dir") is not None:
                return  # an explicit choice wins
            save_dir, name, version = run
            init_args.save_dir, init_args.name, init_args.version = str(save_dir), name, version
            if rank_zero_only.rank == 0:  # before the Trainer exists: Lightning's rank from the launcher's env
                print(f"[{PROG}] logging into the checkpoint's run folder {save_dir / name / f'version_{version}'}")

        def instantiate_trainer(self, **kwargs: Any):
            trainer_config = self._get(self.config_init, "trainer", default={})
            callbacks = trainer_config.get("callbacks") or []
            callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
            if wants_line_progress(trainer_config.get("enable_progress_bar"), callbacks):
                callbacks.append(LineProgress())
            if (
                self.subcommand == "predict"
                and _is_overridden(self.model, "predict_step")
                and not any(isinstance(cb, BasePredictionWriter) for cb in callbacks)
            ):
                callbacks.append(EmbeddingWriter())
            if self.subcommand in ("fit", None) and not any(isinstance(cb, PreemptionCheckpoint) for cb in callbacks):
                callbacks.append(PreemptionCheckpoint())  # SIGTERM: save, print the resume command, exit 0
            trainer_config["callbacks"] = callbacks
            plugins = trainer_config.get("plugins")
            plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list) else [plugins]
            if not any(isinstance(p, CheckpointIO) for p in plugins):
                plugins.append(AtomicCheckpointIO())  # a killed save never leaves a half checkpoint
            trainer_config["plugins"] = plugins
            return super().instantiate_trainer(**kwargs)

        # ---------------------------------------------------------------- what each subcommand left behind
        def after_fit(self) -> None:
            trainer = self.trainer
            log_dir = trainer.log_dir  # a broadcast from rank 0 under DDP: every rank must ask, not rank 0 alone
            if not trainer.is_global_zero or trainer.interrupted:
                return
            lines = [f"\n[{PROG}] fit done; run folder: {log_dir}"]
            best = last = ""
            for callback in trainer.checkpoint_callbacks:
                if not isinstance(callback, ModelCheckpoint):
                    continue
                if callback.best_model_path and callback.monitor:
                    best = best or callback.best_model_path
                    score = callback.best_model_score
                    score_text = f" = {float(score):.4f}" if score is not None else ""
                    lines.append(f"  best checkpoint ({callback.monitor}{score_text}): {callback.best_model_path}")
                if callback.last_model_path:
                    last = last or callback.last_model_path
                    lines.append(f"  last checkpoint: {callback.last_model_path}")
            chosen = best or last
            configs = _config_words(self.config["fit"])
            if chosen and _is_overridden(self.model, "test_step"):
                lines.append(f"  test it:         {PROG} test {configs} --ckpt_path {chosen}")
            if chosen and _is_overridden(self.model, "predict_step"):
                lines.append(f"  embeddings:      {PROG} predict {configs} --ckpt_path {chosen}")
            if chosen and hasattr(self.model, "target_encoder"):
                lines.append(f"  export encoder:  {PROG} export --checkpoint {chosen} --out DIR")
            print("\n".join(lines))

        def after_test(self) -> None:
            self._print_report_folder("test")

        def after_validate(self) -> None:
            self._print_report_folder("validate")

        def _print_report_folder(self, subcommand: str) -> None:
            log_dir = self.trainer.log_dir  # a broadcast under DDP: on every rank (see after_fit)
            if not self.trainer.is_global_zero:
                return
            resolve = getattr(self.model, "resolve_output_dir", None)
            where = resolve() if callable(resolve) and subcommand == "test" else log_dir
            metrics = Path(where) / "metrics.json" if where is not None else None
            if subcommand == "test" and metrics is not None and metrics.is_file():
                # The table marks metrics whose test set is too small to trust (metrics/reliability.py) with "!".
                from neurojepa_pl.metrics.report import format_metrics_table, read_metrics_json

                print(format_metrics_table(read_metrics_json(metrics)))
            print(f"[{PROG}] {subcommand} done; reports and logs in {where}")

        def after_predict(self) -> None:
            if not self.trainer.is_global_zero:
                return
            for callback in self.trainer.callbacks:
                if isinstance(callback, EmbeddingWriter) and callback.written is not None:
                    print(f"[{PROG}] predict wrote {callback.written} (read it with read_embeddings)")

    return NeuroJEPACLI


def lightning_main(args: Sequence[str] | None = None, run: bool = True):
    """Run LightningCLI; the entry point for fit/validate/test/predict (and for tests and the demos).

    Args:
        args: command-line words, starting with the subcommand (``["fit", "--config", ...]``); ``None`` reads
            ``sys.argv[1:]``.
        run: passed to LightningCLI; with ``False`` the CLI only instantiates (``args`` then has no subcommand).

    Returns:
        The ``LightningCLI`` instance.
    """
    from lightning.pytorch import LightningDataModule, LightningModule

    _install_tip_filter()
    words = list(sys.argv[1:] if args is None else args)
    with _argv(words):
        return _cli_class()(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=None,
            run=run,
            auto_configure_optimizers=False,
        )


def _take_debug_flag(argv: list[str]) -> tuple[list[str], bool]:
    """Remove ``--debug`` (first word, or anywhere on a Lightning subcommand's line); returns (words, found)."""
    debug = bool(argv) and argv[0] == DEBUG_FLAG
    if debug:
        argv = argv[1:]
    if argv and argv[0] in LIGHTNING_SUBCOMMANDS and DEBUG_FLAG in argv:
        argv, debug = [w for w in argv if w != DEBUG_FLAG], True
    return argv, debug


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to LightningCLI or to a tool.

    Returns:
        The exit status: 0, a tool's own status, or 2 for a :class:`neurojepa_pl.errors.UserError` (printed as
        ``neurojepa: error: ...`` and ``fix: ...`` on stderr; re-raised with its traceback under ``--debug``).
    """
    argv, debug = _take_debug_flag(list(sys.argv[1:] if argv is None else argv))
    try:
        return _dispatch(argv)
    except UserError as err:
        if debug:
            raise
        print(format_user_error(err, PROG), file=sys.stderr)
        return USER_ERROR_STATUS


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    word = argv[0]
    if word in LIGHTNING_SUBCOMMANDS or word.startswith("-"):
        if word in LIGHTNING_SUBCOMMANDS:
            # Before Lightning is imported (seconds): what the command line says for certain about paths.
            from neurojepa_pl.preflight import check_command_line

            check_command_line(word, argv[1:])
        lightning_main(argv)
        return 0
    if word not in TOOLS:
        print(f"neurojepa: unknown command {word!r}.\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"neurojepa_pl.tools.{TOOLS[word][0]}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
