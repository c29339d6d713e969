"""Every command in the README's ```bash blocks is one this test knows how to run, and each one works.

Each command (continuation lines joined, comments dropped) must be a key of :data:`RECIPES`, and every key must still
be in the README: adding, changing or removing a README command without updating this file fails
:func:`test_every_readme_command_has_a_recipe`. A recipe says how the command is checked:

* run for real at tiny size, in README order, in a scratch folder that stands in for the repository root after
  ``make demo`` (:func:`test_readme_commands_run`, slow tier). The folder is built from this mapping:

  ===============================  ==================================================================================
  README path                      in the scratch folder
  ===============================  ==================================================================================
  ``experiments/``                 a link to the repository's ``experiments/`` (the YAMLs as shipped)
  ``runs/demo/synthbrain/``        a link to the 12-subject 48x54x48 SynthBrain cohort of ``conftest.synth_cohort``
  ``runs/demo/export/``            ``neurojepa export`` of the README's ``synth_small.yaml`` fit, i.e. the same encoder
                                   that ``make demo`` exports (written right after that command's run)
  ``runs/finetune/...``            written by the README's fine-tune commands themselves
  ===============================  ==================================================================================

  The tiny sizes are extra arguments after the README's own (:data:`TINY_PRETRAIN`, :data:`TINY_FINETUNE`,
  :data:`TINY_EVAL`: a few steps or batches, no worker processes), never replacements of them;
* resolved only, for what needs several GPUs, a real cohort or minutes of CPU: ``--print_config`` (the YAMLs and
  classes parse and resolve), the demo's own argument parser, an executable or a ``make`` target that exists
  (``make demo`` / ``make test`` run elsewhere: they are the CI's and the user's first commands).
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import re
import shlex
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BASH_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)

FINETUNE_CONFIG = "experiments/finetune/synth_tumour_probe.yaml"
FINETUNE_RUN = Path("runs/finetune/synth_tumour_probe")
BEST = FINETUNE_RUN / "version_0" / "checkpoints" / "best.ckpt"
CROSS_CONFIG = "experiments/crosscohort/synth_site_shift_tumour.yaml"
CROSS_TARGET = "experiments/crosscohort/synth_site_shift_tumour_to_site-2.yaml"
CROSS_BEST = "runs/crosscohort/synth_site_shift_tumour/version_0/checkpoints/best.ckpt"
DWI_CONFIG = "experiments/finetune/synth_infarct_dwi.yaml"
DWI_BEST = "runs/finetune/synth_infarct_dwi/version_0/checkpoints/best.ckpt"

TINY_PRETRAIN = [
    "--trainer.max_steps",
    "2",
    "--trainer.log_every_n_steps",
    "1",
    "--data.init_args.batch_size",
    "2",
    "--data.init_args.num_workers",
    "0",
]
TINY_FINETUNE = [
    "--trainer.max_epochs",
    "1",
    "--trainer.limit_train_batches",
    "2",
    "--data.init_args.batch_size",
    "4",
    "--data.init_args.num_workers",
    "0",
    "--model.init_args.warmup_epochs",
    "0",
    "--model.init_args.n_bootstrap",
    "20",
]
TINY_EVAL = ["--data.init_args.num_workers", "0"]


def readme_commands(text: str | None = None) -> list[str]:
    """The commands of the README's ```bash blocks, in order: ``\\``-continued lines joined, comments and blank lines
    dropped, words re-joined with single spaces."""
    text = README.read_text() if text is None else text
    commands = []
    for block in BASH_BLOCK.findall(text):
        for logical in re.sub(r"\\\n", " ", block).splitlines():
            words = shlex.split(logical, comments=True)
            if words:
                commands.append(shlex.join(words))
    return commands


# ---------------------------------------------------------------------------------------------- how to check them
def _neurojepa(words: list[str], extra: list[str] = ()) -> int:
    from neurojepa_pl.cli import main

    return main([*words[1:], *extra])


def _make_target(words: list[str], workspace: Path, capsys) -> None:
    assert words[0] == "make" and len(words) == 2
    makefile = (REPO / "Makefile").read_text()
    assert re.search(rf"^{re.escape(words[1])}:", makefile, re.MULTILINE), f"no `{words[1]}` target in the Makefile"


def _make_dry_run(words: list[str], workspace: Path, capsys) -> None:
    """``make install VAR=...``: the dry run of a fresh install passes the variable's value to pip."""
    assert words[:2] == ["make", "install"]
    variables = dict(word.split("=", 1) for word in words[2:])
    out = subprocess.run(["make", "-n", "-B", *words[1:]], cwd=REPO, capture_output=True, text=True, check=True).stdout
    pip_torch = [line for line in out.splitlines() if "pip install" in line and "torch" in line]
    assert pip_torch, out
    if "TORCH_INDEX_URL" in variables:
        assert f"--index-url {variables['TORCH_INDEX_URL']}" in pip_torch[0], pip_torch


def _usage(words: list[str], workspace: Path, capsys) -> None:
    from neurojepa_pl.cli import TOOLS

    assert _neurojepa(words) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("fit", "test", "predict", *TOOLS)), out


def _print_config(words: list[str], workspace: Path, capsys) -> None:
    """Parse and resolve the configuration only (the run needs GPUs, a real cohort or minutes to hours of CPU; the
    YAMLs run at tiny size in tests/experiments): the first YAML's model class is built, and the README's devices,
    manifest and checkpoints reach the resolved config."""
    with pytest.raises(SystemExit) as exit_info:
        _neurojepa(words, [] if "--print_config" in words else ["--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    model = yaml.safe_load((REPO / words[words.index("--config") + 1]).read_text())["model"]["class_path"]
    assert model.startswith("neurojepa_pl.modules.") and f"class_path: {model}" in out, out[-2000:]
    for option, value in zip(words, words[1:]):  # every README override reached the resolved config
        name = option.rsplit(".", 1)[-1].lstrip("-")
        if option.startswith("--") and name in ("devices", "manifest", "ckpt_path", "checkpoint"):
            assert re.search(rf"{name}: '?{re.escape(value)}'?$", out, re.MULTILINE), option


def _tool_arguments(words: list[str], workspace: Path, capsys) -> None:
    """A minutes-long tool run (a 150-subject cohort, a 4-trial sweep): the tool's own parser accepts the README's
    arguments (each tool runs at tiny size in tests/tools)."""
    from neurojepa_pl.cli import TOOLS

    assert words[0] == "neurojepa" and words[1] in TOOLS, words
    module = importlib.import_module(f"neurojepa_pl.tools.{TOOLS[words[1]][0]}")
    args, unknown = module.build_parser().parse_known_args(words[2:])
    if words[1] == "sweep":  # the grid parses, and what is left over goes to every trial as `neurojepa fit` options
        from neurojepa_pl.tools.sweep import parse_grid_item

        assert [parse_grid_item(item)[0] for item in args.grid] == [
            "model.init_args.lr",
            "model.init_args.weight_decay",
        ]
        assert unknown[:1] == ["--model.init_args.checkpoint"], unknown
    else:
        assert unknown == [], f"neurojepa {words[1]} does not know {unknown}"


def _demo_arguments(words: list[str], workspace: Path, capsys) -> None:
    """A minutes-long demo: its module exists and its own parser accepts the README's arguments."""
    assert words[0] == ".venv/bin/python" and words[1] == "-m", words
    module = importlib.import_module(words[2])
    args, unknown = module.build_parser().parse_known_args(words[3:])
    assert unknown == [], f"{words[2]} does not know {unknown}"
    assert isinstance(args.workdir, Path)


def _executable(words: list[str], workspace: Path, capsys) -> None:
    # `.venv/bin/X`: X is installed beside the interpreter running the tests (the venv `make` creates).
    assert words[0].startswith(".venv/bin/"), words
    name = words[0].rsplit("/", 1)[-1]
    assert (Path(sys.executable).parent / name).is_file(), f"{name} is not installed in {Path(sys.executable).parent}"
    importlib.import_module(name)


def _pretrain_synth_small(words: list[str], workspace: Path, capsys) -> None:
    assert _neurojepa(words, TINY_PRETRAIN) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\[progress\] step 1/2 \(50%\) \| epoch 0 \| loss \d\.\d{4} \|", out, re.MULTILINE), out
    last = Path("runs/demo/pretrain/version_0/checkpoints/last.ckpt")
    assert f"last checkpoint: {last}" in out
    # What `make demo` does next: export the encoder to runs/demo/export (the fine-tune YAML's checkpoint).
    assert _neurojepa(["neurojepa", "export", "--checkpoint", str(last), "--out", "runs/demo/export"]) == 0
    assert (workspace / "runs/demo/export/config.json").is_file()


def _finetune(words: list[str], workspace: Path, capsys) -> None:
    assert _neurojepa(words, TINY_FINETUNE) == 0
    out = capsys.readouterr().out
    assert BEST.is_file(), "the fine-tune YAML did not write the checkpoint path the README tests"
    assert f"--ckpt_path {BEST}" in out, "fit does not print the checkpoint path to test"
    assert sorted(p.name for p in FINETUNE_RUN.iterdir()) == ["version_0"]


def _test_best(words: list[str], workspace: Path, capsys) -> None:
    assert _neurojepa(words, TINY_EVAL) == 0
    run = BEST.parents[1]
    report = json.loads((run / "metrics.json").read_text())
    table = pd.read_csv(run / "predictions.csv")
    assert report["n"] == len(table) >= 1 and report["evaluated_checkpoint"] == str(BEST)
    assert (run / "config.yaml").is_file() and (run / "config_test.yaml").is_file()
    assert sorted(p.name for p in FINETUNE_RUN.iterdir()) == ["version_0"], "test opened a new version folder"


def _predict_best(words: list[str], workspace: Path, capsys) -> None:
    from neurojepa_pl.callbacks.embedding_writer import read_embeddings

    assert _neurojepa(words, TINY_EVAL) == 0
    run = BEST.parents[1]
    embedding, metadata, prediction = read_embeddings(run / "embeddings_test.npz")
    tested = pd.read_csv(run / "predictions.csv")
    assert sorted(metadata["path"]) == sorted(tested["path"])  # the test split's scans, one row each
    assert embedding.shape == (len(tested), 64) and prediction.shape == (len(tested), 2)
    assert sorted(p.name for p in FINETUNE_RUN.iterdir()) == ["version_0"], "predict opened a new version folder"


def _routing(words: list[str], workspace: Path, capsys) -> None:
    assert _neurojepa(words, ["--max-scans", "4"]) == 0
    report = json.loads((workspace / "runs/analysis/routing/routing.json").read_text())
    assert report and (workspace / "runs/analysis/routing/maps").is_dir()


def _embedding_geometry(words: list[str], workspace: Path, capsys) -> None:
    assert _neurojepa(words, ["--perplexity", "3"]) == 0
    assert list((workspace / "runs/analysis/geometry").glob("*.json"))


def _fairness(words: list[str], workspace: Path, capsys) -> None:
    assert _neurojepa(words) == 0
    assert "fairness" in json.loads((BEST.parents[1] / "metrics.json").read_text())


@dataclass(frozen=True)
class Recipe:
    check: Callable[[list[str], Path, object], None]
    runs: bool = False  # True: a real run (slow tier, README order, shared scratch folder)


RECIPES: dict[str, Recipe] = {
    "make demo": Recipe(_make_target),
    "make test": Recipe(_make_target),
    "make install TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu": Recipe(_make_dry_run),
    "neurojepa --help": Recipe(_usage),
    "neurojepa fit --config experiments/pretrain/neurojepa_base.yaml --print_config": Recipe(_print_config),
    "neurojepa fit --config experiments/pretrain/synth_small.yaml": Recipe(_pretrain_synth_small, runs=True),
    "neurojepa fit --config experiments/pretrain/neurojepa_base.yaml --config experiments/trainer/ddp.yaml "
    "--trainer.devices 4 --data.init_args.manifest /data/pretrain_manifest.csv": Recipe(_print_config),
    f"neurojepa fit --config {FINETUNE_CONFIG} --model.init_args.checkpoint runs/demo/export": Recipe(
        _finetune, runs=True
    ),
    f"neurojepa test --config {FINETUNE_CONFIG} --ckpt_path {BEST}": Recipe(_test_best, runs=True),
    f"neurojepa predict --config {FINETUNE_CONFIG} --ckpt_path {BEST}": Recipe(_predict_best, runs=True),
    ".venv/bin/tensorboard --logdir runs": Recipe(_executable),
    "neurojepa routing --checkpoint runs/demo/export --manifest runs/demo/synthbrain/manifest.csv "
    "--out runs/analysis/routing --spatial-size 48 54 48 --resize-to 50 60 50 --pad-crop-size none "
    "--target-spacing none": Recipe(_routing, runs=True),
    "neurojepa embedding-geometry --backbone jepa=runs/demo/export --backbone random=random "
    "--manifest runs/demo/synthbrain/manifest.csv --out runs/analysis/geometry "
    "--age-groups Young:0:40 Middle:40:60 Senior:60:inf "
    "--spatial-size 48 54 48 --resize-to 50 60 50 --pad-crop-size none --target-spacing none": Recipe(
        _embedding_geometry, runs=True
    ),
    f"neurojepa fairness {BEST.parents[1]} --columns site sex age": Recipe(_fairness, runs=True),
    ".venv/bin/python -m neurojepa_pl.demos.pretrain_probe --workdir runs/demo200 --subjects 200 --seed 1": Recipe(
        _demo_arguments
    ),
    ".venv/bin/python -m neurojepa_pl.demos.multimodal --workdir runs/mm_demo": Recipe(_demo_arguments),
    # Protocols on SynthBrain (cross-cohort transfer, an unseen modality, a sweep)
    "neurojepa synth --out runs/crosscohort/synthbrain --subjects 150 --seed 2 --grid model --modalities FLAIR "
    "--sites 3 --holdout-site site-2 --stratify tumour": Recipe(_tool_arguments),
    f"neurojepa fit --config {CROSS_CONFIG} --model.init_args.checkpoint runs/demo/export": Recipe(_print_config),
    f"neurojepa test --config {CROSS_CONFIG} --ckpt_path {CROSS_BEST}": Recipe(_print_config),
    f"neurojepa test --config {CROSS_CONFIG} --config {CROSS_TARGET} --ckpt_path {CROSS_BEST}": Recipe(_print_config),
    "neurojepa synth --out runs/dwi/synthbrain --subjects 150 --seed 3 --grid model --modalities T1w FLAIR DWI "
    "--prevalence acute_infarct=0.5": Recipe(_tool_arguments),
    f"neurojepa sweep --config {DWI_CONFIG} --grid 'model.init_args.lr=[1e-4,1e-3]' "
    "--grid 'model.init_args.weight_decay=[0.0,0.04]' --metric val/selection --direction maximize "
    "--out runs/sweeps/infarct_dwi --model.init_args.checkpoint runs/demo/export": Recipe(_tool_arguments),
    f"neurojepa fit --config {DWI_CONFIG} --model.init_args.checkpoint runs/demo/export": Recipe(_print_config),
    f"neurojepa test --config {DWI_CONFIG} --ckpt_path {DWI_BEST}": Recipe(_print_config),
}


def test_readme_commands_are_extracted():
    text = "x\n```bash\nneurojepa a \\\n   --b c   # note\n\n# only a comment\nmake demo\n```\n```python\nno()\n```\n"
    assert readme_commands(text) == ["neurojepa a --b c", "make demo"]
    assert len(readme_commands()) >= 10  # the README's blocks are found at all


def test_every_readme_command_has_a_recipe():
    commands = readme_commands()
    unknown = [c for c in commands if c not in RECIPES]
    assert not unknown, (
        f"README commands that tests/test_readme.py does not know how to run: {unknown}. Add each to RECIPES "
        "(a tiny-size run, or a resolve-only check for GPU / real-cohort commands)."
    )
    stale = [c for c in RECIPES if c not in commands]
    assert not stale, f"RECIPES entries no longer in the README (remove or update them): {stale}"


@pytest.mark.parametrize("command", [c for c, r in RECIPES.items() if not r.runs])
def test_readme_command_resolves(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # resolve-only checks read the repository's files as the README user would
    RECIPES[command].check(shlex.split(command), tmp_path, capsys)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.slow
def test_readme_commands_run(synth_cohort, tmp_path, monkeypatch, capsys):
    workspace = tmp_path / "repo"
    (workspace / "runs" / "demo").mkdir(parents=True)
    (workspace / "experiments").symlink_to(REPO / "experiments")
    (workspace / "runs" / "demo" / "synthbrain").symlink_to(synth_cohort.parent)
    monkeypatch.chdir(workspace)
    records = _Records()
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    rank_zero.addHandler(records)
    ran = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for command in readme_commands():
                if RECIPES[command].runs:
                    RECIPES[command].check(shlex.split(command), workspace, capsys)
                    ran.append(command)
    finally:
        rank_zero.removeHandler(records)
    assert len(ran) == 7
    # Item 2 of the CLI: no LightningCLI argv warning and no Lightning product tips, while its other messages pass.
    assert not [w for w in caught if "args parameter" in str(w.message)]
    assert any(m.startswith("GPU available") for m in records.messages), records.messages
    assert not [m for m in records.messages if "Tip:" in m]


# ---------------------------------------------------------------------------------------------- README claims
# "With the output sent to a file or a pipe, runs print a plain `[progress]` line every 50 steps or 30 s (step, epoch,
# loss, steps/s, ETA); on a terminal Lightning's progress bar is shown."
class _Stdout(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_line_progress_only_without_a_terminal(monkeypatch):
    from lightning.pytorch.callbacks import TQDMProgressBar

    from neurojepa_pl.callbacks.progress import wants_line_progress

    monkeypatch.setattr(sys, "stdout", _Stdout(tty=True))
    assert not wants_line_progress(None, [])
    monkeypatch.setattr(sys, "stdout", _Stdout(tty=False))
    assert wants_line_progress(None, []) and wants_line_progress(True, [])
    assert not wants_line_progress(False, [])  # --trainer.enable_progress_bar false
    assert not wants_line_progress(None, [TQDMProgressBar()])  # a bar chosen in the YAML stays


def test_line_progress_prints_every_n_steps_with_rate_and_eta(monkeypatch):
    import torch

    from neurojepa_pl.callbacks import progress

    trainer = SimpleNamespace(global_step=0, max_steps=200, current_epoch=0, max_epochs=-1, num_training_batches=10)
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock.now)
    out = io.StringIO()
    bar = progress.LineProgress(every_n_steps=50, every_seconds=0, stream=out)
    bar.on_train_start(trainer, None)
    for step in range(1, 201):
        clock.now += 2.0 / 3.0  # 1.5 steps/s
        trainer.global_step, trainer.current_epoch = step, (step - 1) // 10
        bar.on_train_batch_end(trainer, None, {"loss": torch.tensor(0.2931)}, None, step - 1)
    lines = out.getvalue().splitlines()
    assert lines[0] == (
        "[progress] training: 200 optimizer steps, ? epochs, 10 batches per epoch; a line every 50 steps"
    )
    assert [line.split(" | ")[0] for line in lines[1:]] == [
        f"[progress] step {s}/200 ({s // 2}%)" for s in (1, 50, 100, 150, 200)
    ]
    assert lines[3] == (
        "[progress] step 100/200 (50%) | epoch 9 | loss 0.2931 | 1.50 steps/s | elapsed 0:01:07 | ETA 0:01:07"
    )
    assert lines[-1].endswith("| ETA 0:00:00")


def test_line_progress_also_prints_every_n_seconds(monkeypatch):
    from neurojepa_pl.callbacks import progress

    trainer = SimpleNamespace(global_step=0, max_steps=100, current_epoch=0, max_epochs=3, num_training_batches=40)
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock.now)
    out = io.StringIO()
    bar = progress.LineProgress(every_n_steps=50, every_seconds=30, stream=out)
    bar.on_train_start(trainer, None)
    for step in range(1, 101):
        clock.now += 4.0  # 0.25 steps/s: the 30 s clock fires before 50 steps pass
        trainer.global_step = step
        bar.on_train_batch_end(trainer, None, None, None, step - 1)
    steps = [int(re.match(r"\[progress\] step (\d+)/", line).group(1)) for line in out.getvalue().splitlines()[1:]]
    assert steps[:5] == [1, 9, 17, 25, 33] and 50 in steps and 100 in steps  # first step, each 30 s, each 50 steps
    assert "loss" not in out.getvalue()  # no loss in the outputs: none shown rather than a made-up one
