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
  (:class:`neurojepa_pl.callbacks.progress.LineProgress`); on a terminal Lightning's bar is kept.
"""

from __future__ import annotations

import functools
import importlib
import logging
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
EVAL_SUBCOMMANDS = ("validate", "test", "predict")
PROG = "neurojepa"

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
}

LIGHTNING_TIP = "💡 Tip:"
"""Prefix of Lightning's product tips (litlogger on every Trainer, litmodels without a ModelCheckpoint)."""

VERSION_DIR = re.compile(r"version_(\d+)")


def _usage() -> str:
    lines = [
        "usage: neurojepa {fit,validate,test,predict} --config EXPERIMENT.yaml [...]",
        "       neurojepa TOOL [--help]",
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


@functools.cache
def _cli_class() -> type:
    from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.utilities import rank_zero_only

    from neurojepa_pl.callbacks.embedding_writer import EmbeddingWriter
    from neurojepa_pl.callbacks.progress import LineProgress, wants_line_progress

    class NeuroJEPACLI(LightningCLI):
        """LightningCLI with the additions listed in :mod:`neurojepa_pl.cli`."""

        def before_instantiate_classes(self) -> None:
            subcommand = self.subcommand
            if subcommand is None:
                return
            _link_geometry(self.config[subcommand])
            if subcommand in EVAL_SUBCOMMANDS:
                config = self.config[subcommand]
                self._refuse_unresolvable_ckpt_path(subcommand, config)
                self._log_beside_checkpoint(config)
                # The fit's config.yaml stays the record of the fit; each later subcommand saves its own.
                self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": f"config_{subcommand}.yaml"}

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
            sys.exit(
                f"{PROG} {subcommand}: error: --ckpt_path {ckpt_path} names the {ckpt_path} checkpoint of a fit run in "
                f"the same process only (Lightning keeps it in that fit's ModelCheckpoint). Pass {hint}."
            )

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
            trainer_config["callbacks"] = callbacks
            return super().instantiate_trainer(**kwargs)

        # ---------------------------------------------------------------- what each subcommand left behind
        def after_fit(self) -> None:
            trainer = self.trainer
            if not trainer.is_global_zero or trainer.interrupted:
                return
            lines = [f"\n[{PROG}] fit done; run folder: {trainer.log_dir}"]
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
            if not self.trainer.is_global_zero:
                return
            resolve = getattr(self.model, "resolve_output_dir", None)
            where = resolve() if callable(resolve) and subcommand == "test" else self.trainer.log_dir
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


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to LightningCLI or to a tool."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    word = argv[0]
    if word in LIGHTNING_SUBCOMMANDS or word.startswith("-"):
        lightning_main(argv)
        return 0
    if word not in TOOLS:
        print(f"neurojepa: unknown command {word!r}.\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"neurojepa_pl.tools.{TOOLS[word][0]}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
