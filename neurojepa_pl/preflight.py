"""Checks of a ``neurojepa fit|validate|test|predict`` configuration that need neither a model nor an image.

A wrong manifest path, a misspelled label column, a model whose input size is not the data's or a checkpoint that is
not there are the user's to fix, and should say so in a second, not after the imports, the model build and the data
pass. ``neurojepa`` runs these checks twice:

1. :func:`check_command_line` in :func:`neurojepa_pl.cli.main`, *before Lightning is imported*, on a best-effort
   reading of the command line (``--config`` YAML files merged in order, then ``--section.key value`` overrides). It
   looks only at what it can read with certainty and gives up silently on anything else (a whole section given as one
   value, ``--print_config``, a config it cannot read): jsonargparse stays the judge of the configuration.
2. :func:`check_parsed_config` in LightningCLI's ``before_instantiate_classes`` hook, on the configuration jsonargparse
   parsed, before any class is instantiated: the same checks, plus model/data geometry, task and class counts, and the
   data module's own manifest validation (:meth:`neurojepa_pl.data_modules.base.MRIDataModule.check_manifest`: labels
   out of range, bad splits, leakage, ...).

Every failure is a :class:`neurojepa_pl.errors.UserError`; ``neurojepa`` prints it as ``neurojepa: error: ...`` and
``fix: ...`` and exits with status 2.
"""

from __future__ import annotations

import csv
import difflib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from neurojepa_pl.errors import UserFileNotFoundError, UserKeyError, UserValueError

SECTIONS_WITH_INIT_ARGS = ("data", "model")
CKPT_PATH_KEYWORDS = ("best", "last", "hpc")
"""``--ckpt_path`` values Lightning resolves itself (``registry...`` and URLs are left to it as well)."""

CHECKPOINT_ARGS: tuple[tuple[str, str, bool], ...] = (
    # (model init arg, what it is, whether an exported folder is accepted)
    ("init_from", "the Lightning checkpoint the run starts from", False),
    ("checkpoint", "the backbone checkpoint", True),
)
LABEL_ARGS = ("label_columns", "time_column", "event_column")
"""Data init args that name manifest columns."""

CNN_BACKBONE = "cnn"

Config = Mapping[str, Any]


# ----------------------------------------------------------------------------------------------------------------------
# Reading the command line without jsonargparse (stage 1)
# ----------------------------------------------------------------------------------------------------------------------
class _Unsure(Exception):
    """The command line holds something this reader does not interpret with certainty: no early verdict."""


def _merge(into: dict[str, Any], update: Mapping[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value


def _class_paths(config: Mapping[str, Any]) -> dict[str, Any]:
    return {s: config[s].get("class_path") for s in SECTIONS_WITH_INIT_ARGS if isinstance(config.get(s), Mapping)}


def _check_same_classes(before: dict[str, Any], config: Mapping[str, Any]) -> None:
    # jsonargparse keeps or drops the init args of a section whose class changes depending on the new class's
    # signature: what the merged dict says about that section is no longer certain.
    for section, class_path in _class_paths(config).items():
        if before.get(section) is not None and class_path != before[section]:
            raise _Unsure(f"{section}.class_path changed")


def _set_dotted(config: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    if (
        keys[0] in SECTIONS_WITH_INIT_ARGS
        and len(keys) > 1
        and keys[1] not in ("class_path", "init_args", "dict_kwargs")
    ):
        keys = [keys[0], "init_args", *keys[1:]]  # `--data.manifest X` is short for `--data.init_args.manifest X`
    node = config
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[keys[-1]] = value


def config_from_words(words: Sequence[str]) -> dict[str, Any] | None:
    """A best-effort reading of ``neurojepa SUBCOMMAND`` words into a configuration dict; ``None`` when unsure.

    Only ``--config FILE`` (YAML, merged in order) and ``--key value`` / ``--key=value`` overrides of the ``data``,
    ``model`` and ``ckpt_path`` keys are interpreted (values parsed as YAML, like jsonargparse does); other keys are
    skipped. A whole ``--data`` / ``--model`` value, ``--print_config``, ``--help`` or an unreadable config file make
    the reading unsure.

    Args:
        words: the words after the subcommand.

    Returns:
        The merged configuration (the subcommand's namespace as a dict), or ``None``.
    """
    import yaml

    config: dict[str, Any] = {}
    i = 0
    try:
        while i < len(words):
            word = words[i]
            if not word.startswith("--") and word != "-c":
                raise _Unsure(word)
            key, eq, value = word.partition("=")
            key = key.lstrip("-")
            if key in ("help", "h", "print_config") or key.startswith("print_config"):
                raise _Unsure(word)
            if not eq:
                if i + 1 >= len(words) or words[i + 1].startswith("--"):
                    raise _Unsure(word)  # a flag without a value: not a form the checked keys take
                value = words[i + 1]
                i += 1
            i += 1
            before = _class_paths(config)
            if key in ("config", "c"):
                path = Path(value)
                if not path.is_file():
                    raise _Unsure(value)  # an inline YAML string, or a missing file jsonargparse will report
                loaded = yaml.safe_load(path.read_text())
                if not isinstance(loaded, Mapping):
                    raise _Unsure(value)
                _merge(config, loaded)
            elif key.split(".")[0] in (*SECTIONS_WITH_INIT_ARGS, "ckpt_path"):
                if key in SECTIONS_WITH_INIT_ARGS or "+" in key:
                    raise _Unsure(word)
                _set_dotted(config, key, yaml.safe_load(value))
            _check_same_classes(before, config)
    except (_Unsure, yaml.YAMLError, OSError, UnicodeDecodeError):
        return None
    for section in SECTIONS_WITH_INIT_ARGS:
        if section in config and not isinstance(config[section], Mapping):
            return None
    return config


def check_command_line(subcommand: str, words: Sequence[str]) -> None:
    """Stage 1: :func:`check_config` on :func:`config_from_words`, before Lightning is imported (no-op if unsure)."""
    config = config_from_words(words)
    if config is not None:
        check_config(subcommand, config)


# ----------------------------------------------------------------------------------------------------------------------
# Checks on a configuration dict (both stages)
# ----------------------------------------------------------------------------------------------------------------------
def init_args(config: Config, section: str) -> Mapping[str, Any]:
    """``config[section]["init_args"]`` (or ``{}``)."""
    node = config.get(section)
    args = node.get("init_args") if isinstance(node, Mapping) else None
    return args if isinstance(args, Mapping) else {}


def check_config(subcommand: str, config: Config) -> None:
    """The checks that need only the file system: the manifest and its header, and the checkpoints.

    Raises:
        UserError: the first problem found.
    """
    check_manifest_header(init_args(config, "data"))
    check_checkpoints(subcommand, config)


def _near(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_manifest_header(data: Mapping[str, Any]) -> None:
    """The manifest exists, is a CSV with the columns of its form, and has the label columns the data module names.

    Only the header line is read (the manifest's rows are validated by the data module).
    """
    manifest = data.get("manifest")
    if not isinstance(manifest, (str, os.PathLike)) or not str(manifest):
        return  # unset: jsonargparse reports a missing required argument itself
    path = Path(manifest).expanduser()
    if not path.is_file():
        what = "is a directory, not a CSV file" if path.is_dir() else "does not exist"
        relative = "" if path.is_absolute() else f" (relative paths are taken from the current folder, {Path.cwd()})"
        raise UserFileNotFoundError(
            f"manifest {path} (data.init_args.manifest) {what}{relative}.",
            "pass the manifest CSV: --data.init_args.manifest PATH (`neurojepa synth --out DIR` writes one in DIR).",
        )
    try:
        with path.open(newline="") as fh:
            header = next(csv.reader(fh, skipinitialspace=True), None)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserValueError(
            f"manifest {path} cannot be read as a CSV file ({type(err).__name__}: {err}).",
            "pass a CSV text file with one row per scan (columns subject_id, session_id, modality, path).",
        ) from err
    if not header:
        raise UserValueError(
            f"manifest {path} is empty.", "write the header line and one row per scan (see the README's manifest)."
        )
    from neurojepa_pl.data.validation import check_columns

    problems = check_columns(header)
    if problems:
        raise UserKeyError(
            f"manifest {path}: " + "; ".join(p.message for p in problems),
            " ".join(dict.fromkeys(p.fix for p in problems)),
        )
    for arg in LABEL_ARGS:
        value = data.get(arg)
        names = [value] if isinstance(value, str) else list(value or []) if isinstance(value, list) else []
        for name in names:
            if name not in header:
                raise UserKeyError(
                    f"label column {name!r} (data.init_args.{arg}) is not in the manifest {path}; its columns are "
                    f"{header}.",
                    f"name one of those columns in data.init_args.{arg}{_near(name, header)}, or add the column.",
                )


def _checkpoint_problem(path: Path, accept_folder: bool) -> str | None:
    if path.is_dir():
        return None if accept_folder else "is a directory, not a checkpoint file"
    if not path.exists():
        return "does not exist"
    if path.stat().st_size == 0:
        return "is empty (0 bytes: an interrupted copy or save)"
    return None


def _nearby_checkpoints(path: Path) -> str:
    folder = path.parent
    if not folder.is_dir():
        return f"; the folder {folder} does not exist either"
    found = sorted(p.name for p in folder.iterdir() if p.suffix in (".ckpt", ".safetensors", ".pt", ".pth"))
    if not found:
        return ""
    shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
    return f"; that folder holds {shown}"


def _is_local(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike)) and bool(str(value)) and "://" not in str(value)


def check_checkpoints(subcommand: str, config: Config) -> None:
    """``--ckpt_path`` and the model's ``init_from`` / ``checkpoint`` exist and are not empty.

    Only existence and size are checked here; reading a checkpoint (and saying what is wrong inside one) is
    :mod:`neurojepa_pl.models.checkpoint`'s job.
    """
    ckpt_path = config.get("ckpt_path")
    if _is_local(ckpt_path) and str(ckpt_path) not in CKPT_PATH_KEYWORDS and not str(ckpt_path).startswith("registry"):
        path = Path(ckpt_path).expanduser()
        problem = _checkpoint_problem(path, accept_folder=False)
        if problem:
            drop = ", or drop --ckpt_path to start afresh" if subcommand == "fit" else ""
            raise UserFileNotFoundError(
                f"--ckpt_path {path} {problem}{_nearby_checkpoints(path)}.",
                "pass a checkpoint file of a fit run (`neurojepa fit` prints its checkpoints when it ends; they are in "
                f"<save_dir>/<name>/version_<k>/checkpoints/){drop}.",
            )
    model = init_args(config, "model")
    for arg, what, accept_folder in CHECKPOINT_ARGS:
        value = model.get(arg)
        if not _is_local(value):
            continue
        path = Path(value).expanduser()
        problem = _checkpoint_problem(path, accept_folder)
        if problem:
            accepted = "a checkpoint file or a folder written by `neurojepa export`" if accept_folder else "a .ckpt"
            raise UserFileNotFoundError(
                f"model.init_args.{arg} {path} ({what}) {problem}{_nearby_checkpoints(path)}.",
                f"pass {accepted} as model.init_args.{arg}, or set it to null.",
            )


# ----------------------------------------------------------------------------------------------------------------------
# Checks that need the parsed configuration (stage 2)
# ----------------------------------------------------------------------------------------------------------------------
def _triple(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return (int(value),) * 3
    return tuple(int(v) for v in value)


def check_geometry(config: Config, encoder_config: Callable[..., Mapping[str, Any]] | None = None) -> None:
    """The model's input volume and patch size are the data's.

    Compared where the configuration states both: the model's ``img_size`` / ``patch_size`` (pretraining; unset
    ones are linked from the data), ``backbone_kwargs.img_size`` / ``patch_size`` (downstream), and, for a registry
    backbone without a checkpoint and without a stated size, the registry entry's size (``encoder_config``).
    """
    data, model = init_args(config, "data"), init_args(config, "model")
    spatial, data_patch = _triple(data.get("spatial_size")), data.get("patch_size")
    if spatial is None:
        return
    backbone_kwargs = model.get("backbone_kwargs") if isinstance(model.get("backbone_kwargs"), Mapping) else {}
    stated = [
        ("model.init_args.img_size", _triple(model.get("img_size"))),
        ("model.init_args.backbone_kwargs.img_size", _triple(backbone_kwargs.get("img_size"))),
    ]
    backbone = model.get("backbone")
    if (
        encoder_config is not None
        and isinstance(backbone, str)
        and backbone != CNN_BACKBONE
        and model.get("checkpoint") is None
        and backbone_kwargs.get("img_size") is None
    ):
        try:
            registry = encoder_config(backbone)
        except (KeyError, ValueError):
            registry = None  # an unknown name is the model's to report, with the list of names
        if registry is not None:
            stated.append((f"the registry default of backbone {backbone!r}", _triple(registry.get("img_size"))))
    for where, size in stated:
        if size is not None and size != spatial:
            raise UserValueError(
                f"{where} = {list(size)} but the data module crops volumes to data.init_args.spatial_size = "
                f"{list(spatial)}; the model would reject every batch.",
                "state the size once: set data.init_args.spatial_size to the model's input size (and resize_to at "
                "least as large), or the model's size to the data's.",
            )
    patches = [
        ("model.init_args.patch_size", model.get("patch_size")),
        ("model.init_args.backbone_kwargs.patch_size", backbone_kwargs.get("patch_size")),
    ]
    for where, patch in patches:
        if patch is not None and data_patch is not None and int(patch) != int(data_patch):
            raise UserValueError(
                f"{where} = {patch} but data.init_args.patch_size = {data_patch} (the masks' token grid).",
                "set one patch size, in data.init_args.patch_size (the pretraining model takes it from there).",
            )


def check_task(config: Config, data_module: Any | None = None) -> None:
    """Model and data agree on the task and the number of outputs (``data_module``: an instance, for its
    ``num_classes``)."""
    data, model = init_args(config, "data"), init_args(config, "model")
    # A cohort module's `task` names the cohort's task ("ad", "amyloid"); the instance knows the task type it serves.
    data_task = getattr(data_module, "task", None) or data.get("task")
    where = "data.init_args.task" if data_task == data.get("task") else "the data module's task type"
    if data_task is not None and model.get("task") is not None and data_task != model["task"]:
        raise UserValueError(
            f"model.init_args.task = {model['task']!r} but {where} = {data_task!r}.",
            "set the same task in both.",
        )
    needed = getattr(data_module, "num_classes", None)
    given = model.get("num_classes")
    if isinstance(needed, int) and isinstance(given, int) and needed != given:
        raise UserValueError(
            f"model.init_args.num_classes = {given} but the data module serves {needed} output(s) for task "
            f"{getattr(data_module, 'task', data.get('task'))!r}.",
            f"set model.init_args.num_classes: {needed} (and data.init_args.num_classes to match for multiclass).",
        )


def check_parsed_config(subcommand: str, config: Config, data_module: Any | None = None) -> None:
    """Stage 2, on the configuration jsonargparse parsed (as a dict), before any class is instantiated.

    Args:
        subcommand: ``fit``, ``validate``, ``test`` or ``predict``.
        config: the subcommand's configuration.
        data_module: an instance of the configured data module when it is one of ours (the CLI builds it: cheap, its
            constructor reads no file): its ``num_classes`` is compared with the model's and its
            ``check_manifest()`` validates the manifest's rows (labels, splits, leakage, ...). No model is built and
            no image is opened.
    """
    check_config(subcommand, config)
    from neurojepa_pl.models.registry import encoder_config

    check_geometry(config, encoder_config)
    check_task(config, data_module)
    # A cohort module has no manifest yet: it joins its split files to the scans in prepare_data (and validates then).
    has_manifest = bool(getattr(getattr(data_module, "hparams", {}), "get", lambda _key: None)("manifest"))
    if data_module is not None and has_manifest and init_args(config, "data").get("validate", True):
        data_module.check_manifest()
