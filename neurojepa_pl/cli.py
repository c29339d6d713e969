"""The `neurojepa` command.

`fit|validate|test|predict` go to LightningCLI (models and data modules in subclass mode, driven by YAML experiment
files). Every other first word names a tool; each tool lives in `neurojepa_pl/tools/<module>.py` and exposes
`main(argv: list[str]) -> int` with its own argparse `--help`. Tools are imported lazily so that `neurojepa synth`
does not pay for importing Lightning.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")

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


def lightning_main(args: Sequence[str] | None = None, run: bool = True):
    """Run LightningCLI; the entry point for fit/validate/test/predict (and for tests).

    Args:
        args: command-line words, starting with the subcommand (``["fit", "--config", ...]``).
        run: passed to LightningCLI; with ``False`` the CLI only instantiates (``args`` then has no subcommand).

    Returns:
        The ``LightningCLI`` instance.
    """
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    return LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=list(args) if args is not None else None,
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
