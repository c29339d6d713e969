"""What a JEPA pretraining run left behind: its step checkpoints, its encoder architecture and preprocessing grid.

A run of ``neurojepa fit --config experiments/pretrain/<name>.yaml`` writes Lightning checkpoints of
``JEPAPretrainModule`` into ``<save_dir>/<name>/version_<k>/checkpoints/`` (``step=<n>.ckpt`` from a
``ModelCheckpoint`` with ``every_n_train_steps``, ``last.ckpt``, the demo's ``final.ckpt``). Their hyper-parameters
name the encoder (``encoder`` + ``encoder_overrides`` + the linked ``img_size`` / ``patch_size``) and the data
module's grid (``spatial_size``, ``resize_to``, ``pad_crop_size``, ``target_spacing``), so whatever evaluates them
can see exactly what the encoder was pretrained on and build random-init encoders of the same architecture.

Checkpoints are read with ``torch.load(weights_only=True, mmap=True)``: only plain containers are unpickled and only
the bytes touched are read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neurojepa_pl.data.transforms import TransformSettings
from neurojepa_pl.models.checkpoint import load_state_dict_checked, read_checkpoint, reference_to_native
from neurojepa_pl.models.registry import encoder_config
from neurojepa_pl.models.vit3d import VisionTransformer3D

log = logging.getLogger(__name__)

__all__ = [
    "DATA_SETTING_KEYS",
    "PretrainingSetup",
    "read_pretraining_setup",
    "RunCheckpoint",
    "checkpoint_step",
    "find_checkpoints",
    "random_init_encoder",
    "load_run_encoder",
]

DATA_SETTING_KEYS = ("spatial_size", "resize_to", "pad_crop_size", "target_spacing")
"""Preprocessing settings every evaluation of the encoder must share with pretraining."""


def _read(checkpoint: Path) -> dict[str, Any]:
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"pretraining checkpoint {checkpoint} not found; pass a .ckpt written by `neurojepa fit` (its run folder "
            "prints them when the fit ends)."
        )
    content = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(content, dict):
        raise ValueError(f"{checkpoint}: expected a Lightning checkpoint (a dict); found {type(content).__name__}.")
    return content


@dataclass(frozen=True)
class PretrainingSetup:
    """What every evaluation must match: the encoder and the preprocessing grid of the pretraining run.

    Attributes:
        encoder: the encoder as the checkpoint records it: a registry name, e.g. ``"vit_tiny_moe"``, or the full
            spec ``{"preset": name, <every constructor argument>: value}``.
        encoder_overrides: constructor overrides applied on top, e.g. ``{"img_size": [48, 54, 48], "patch_size": 6}``
            (the run's geometry included).
        data_settings: ``spatial_size``, ``resize_to``, ``pad_crop_size``, ``target_spacing`` of its data module.
    """

    encoder: str | dict[str, Any]
    encoder_overrides: dict[str, Any]
    data_settings: dict[str, Any]

    @property
    def preset(self) -> str | None:
        """The registry name the encoder was built from (None for a spec without one)."""
        return self.encoder if isinstance(self.encoder, str) else self.encoder.get("preset")

    def encoder_kwargs(self) -> dict[str, Any]:
        """``VisionTransformer3D`` constructor kwargs of the pretrained encoder (geometry included)."""
        if isinstance(self.encoder, str):
            return encoder_config(self.encoder, **self.encoder_overrides)
        return {**{k: v for k, v in self.encoder.items() if k != "preset"}, **self.encoder_overrides}

    def backbone_args(self) -> tuple[str, dict[str, Any]]:
        """``(registry name, kwargs)`` that rebuild the encoder as ``build_encoder(name, **kwargs)`` (what the
        downstream modules' ``backbone`` / ``backbone_kwargs`` take).

        Raises:
            ValueError: for a spec without a preset name.
        """
        if isinstance(self.encoder, str):
            return self.encoder, dict(self.encoder_overrides)
        if self.preset is None:
            raise ValueError(f"the encoder spec {self.encoder} names no preset; downstream modules need one.")
        return self.preset, self.encoder_kwargs()

    def transform_settings(self) -> TransformSettings:
        """The loading-chain settings of pretraining (other settings at their defaults, as the data module's)."""
        return TransformSettings(**self.data_settings)


def read_pretraining_setup(checkpoint: Path) -> PretrainingSetup:
    """Read the encoder and preprocessing settings from a pretraining Lightning checkpoint's hyper-parameters.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if the checkpoint has no ``hyper_parameters["encoder"]`` registry name or no data-module
            hyper-parameters (e.g. an exported folder or a bare state dict: the grid is not recorded there).
    """
    content = _read(checkpoint)
    hparams = content.get("hyper_parameters") or {}
    data_hparams = content.get("datamodule_hyper_parameters") or {}
    encoder = hparams.get("encoder")
    if not isinstance(encoder, (str, dict)):
        raise ValueError(
            f"{checkpoint}: expected a JEPA pretraining checkpoint with hyper_parameters['encoder'] set "
            f"to a registry name or an encoder spec; found {encoder!r}. Pass the .ckpt written by `neurojepa fit` "
            "with a JEPAPretrainModule config."
        )
    missing = [key for key in DATA_SETTING_KEYS if key not in data_hparams]
    if missing:
        raise ValueError(
            f"{checkpoint}: the data module's hyper-parameters lack {missing}, so the preprocessing grid "
            "of pretraining is unknown. Use a checkpoint saved by `neurojepa fit` with a data module."
        )
    # The pretraining module takes the geometry of both networks as img_size / patch_size (linked from the data).
    geometry = {key: hparams[key] for key in ("img_size", "patch_size") if hparams.get(key) is not None}
    return PretrainingSetup(
        encoder=dict(encoder) if isinstance(encoder, dict) else encoder,
        encoder_overrides={**dict(hparams.get("encoder_overrides") or {}), **geometry},
        data_settings={key: data_hparams[key] for key in DATA_SETTING_KEYS},
    )


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a Lightning checkpoint was saved at (its ``global_step``).

    Raises:
        ValueError: if the file has no integer ``global_step`` (not a Lightning checkpoint).
    """
    step = _read(checkpoint).get("global_step")
    if not isinstance(step, int):
        raise ValueError(
            f"{checkpoint}: no integer 'global_step' (found {step!r}); expected a Lightning checkpoint written by "
            "`neurojepa fit`."
        )
    return step


@dataclass(frozen=True)
class RunCheckpoint:
    """A checkpoint of the run and the optimizer step it holds."""

    step: int
    path: Path


def _name_rank(path: Path) -> tuple[int, str]:
    # Among files of one step, prefer the step checkpoint's own name over last.ckpt / final.ckpt aliases.
    return (0 if path.name.startswith("step=") else 1, path.name)


def find_checkpoints(sources: Iterable[str | Path]) -> list[RunCheckpoint]:
    """The checkpoints of a run, one per step, in step order.

    Args:
        sources: ``.ckpt`` files and/or folders; a folder contributes its ``*.ckpt`` files, or those of its
            ``checkpoints/`` subfolder (a ``version_<k>`` run folder).

    Returns:
        One :class:`RunCheckpoint` per distinct step. Files in a folder that repeat a step (``last.ckpt`` /
        ``final.ckpt`` beside ``step=<n>.ckpt``) are the same state and are dropped (logged).

    Raises:
        FileNotFoundError: for a missing source, or a folder without checkpoints.
        ValueError: if two files given explicitly hold the same step (they may come from different runs).
    """
    by_step: dict[int, RunCheckpoint] = {}
    explicit: dict[int, Path] = {}
    for source in sources:
        source = Path(source)
        if source.is_dir():
            folder = source / "checkpoints" if (source / "checkpoints").is_dir() else source
            files = sorted(folder.glob("*.ckpt"), key=_name_rank)
            if not files:
                raise FileNotFoundError(
                    f"no .ckpt files in {folder}; give the run folder (version_<k>/), its checkpoints/ folder, or "
                    "checkpoint files. A run keeps step checkpoints only with ModelCheckpoint(every_n_train_steps=N, "
                    "save_top_k=-1), e.g. --trainer.callbacks.init_args.save_top_k -1."
                )
            for path in files:
                step = checkpoint_step(path)
                if step in by_step:
                    log.info("%s repeats step %d of %s; skipped", path, step, by_step[step].path)
                    continue
                by_step[step] = RunCheckpoint(step, path)
        elif source.is_file():
            step = checkpoint_step(source)
            if step in explicit:
                raise ValueError(
                    f"{source} and {explicit[step]} both hold step {step}; give the checkpoints of one run."
                )
            explicit[step] = source
            by_step.setdefault(step, RunCheckpoint(step, source))
        else:
            raise FileNotFoundError(f"checkpoint source {source} does not exist.")
    return [by_step[step] for step in sorted(by_step)]


def random_init_encoder(setup: PretrainingSetup, seed: int) -> VisionTransformer3D:
    """A freshly initialised encoder of the run's architecture; its weights are a pure function of ``seed``.

    The global RNG is left untouched (the init draws from a forked, seeded state).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VisionTransformer3D(**setup.encoder_kwargs())


def load_run_encoder(checkpoint: Path, setup: PretrainingSetup, which: str = "target") -> VisionTransformer3D:
    """The ``which`` encoder of a run's checkpoint, built in the run's architecture and loaded strictly.

    Every checkpoint of a run and every random init are compared in one architecture, the one ``setup`` records
    (what the run's module built), so the weights are read with :func:`neurojepa_pl.models.read_checkpoint` and
    loaded into ``VisionTransformer3D(**setup.encoder_kwargs())``; any missing, unexpected or mis-shaped key is an
    error, as in ``load_backbone``.

    Args:
        checkpoint: a Lightning checkpoint of ``JEPAPretrainModule``.
        setup: the run's :class:`PretrainingSetup`.
        which: ``"target"`` (the EMA encoder) or ``"context"``.
    """
    if which not in ("target", "context"):
        raise ValueError(f"which must be 'target' or 'context'; got {which!r}.")
    loaded = read_checkpoint(checkpoint)
    if which not in loaded.encoders:
        raise ValueError(
            f"{checkpoint} holds encoder role(s) {sorted(loaded.encoders)}, not the {which} encoder of a "
            "JEPA pretraining checkpoint."
        )
    encoder = VisionTransformer3D(**setup.encoder_kwargs())
    load_state_dict_checked(encoder, reference_to_native(loaded.encoders[which]), True, (), f"{checkpoint} ({which})")
    return encoder
