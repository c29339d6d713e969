"""Downstream LightningModules: classification, regression and time-to-event fine-tuning / probing
(docs/method.md §8.1-8.5).

One base class, :class:`DownstreamModule`, owns the backbone + head, freezing, the optimizer and schedules, the MoE
bias update, the collection of evaluation predictions across ranks, and the test-time report (``metrics.json`` with
bootstrap CIs, ``predictions.csv``, figures, TensorBoard). The task classes only choose the outputs, the loss and the
prediction arrays:

* :class:`ClassificationModule`: binary (2 logits + cross-entropy, docs/method.md §8.3), multiclass (CE), multilabel
  (BCE over observed labels, ``label_mask``);
* :class:`RegressionModule`: MSE on standardised targets (train mean/std), reported in target units;
* :class:`SurvivalModule`: Cox partial likelihood with risk sets gathered across ranks (docs/method.md §8.5 fixed).

Backbone regimes (``finetune``): ``"full"`` trains backbone and head (the reference's default), ``"probe"`` trains an
attentive head on a frozen backbone, ``"frozen"`` a linear head on a frozen backbone. A frozen backbone is kept in
eval mode and run under ``no_grad``. ``backbone="cnn"`` is the from-scratch CNN baseline
(:class:`neurojepa_pl.models.cnn.CNNEncoder3D`, one feature token per scan) under its reference linear classifier,
trained end to end (``head="linear"``, ``finetune="full"``).

Construction: the base ``__init__`` checks the options, saves the hyper-parameters and then calls the builders
:meth:`DownstreamModule.build_backbone` and :meth:`DownstreamModule.build_head`; a subclass overrides the part it
changes (the multimodal module: the head) and nothing is built twice.

Validation logs ``val/selection`` (higher is better: 0.5·AUROC + 0.5·AP, −MAE, C-index) for
``ModelCheckpoint(monitor="val/selection", mode="max")``. All evaluation metrics use the predictions of every rank.

Deliberate differences from the reference: regression targets are standardised (docs/method.md §8.4 computes the
statistics, then trains on raw years; ``standardize_targets=False`` restores that); Cox risk sets and the C-index span
all ranks; MoE routing counts are reset at the start of every training epoch so evaluation forwards can never leak
into a bias update (docs/method.md §3.4 [BUG]); layer-wise lr decay is available (off by default).
"""

from __future__ import annotations

import inspect
import logging
import math
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from neurojepa_pl.data.label_mapping import CHECKPOINT_KEY as LABEL_SIGNATURE_KEY
from neurojepa_pl.data.label_mapping import check_label_mapping, label_signature
from neurojepa_pl.losses.cox import cox_ph_loss, gather_survival_batch
from neurojepa_pl.metrics.fairness import SubgroupColumn, evaluate_run_fairness
from neurojepa_pl.metrics.prediction_store import PredictionStore
from neurojepa_pl.metrics.predictions import write_predictions
from neurojepa_pl.metrics.report import log_figures, save_figures, write_metrics_json
from neurojepa_pl.metrics.tasks import bootstrap_task_metrics, compute_task_metrics, task_figures
from neurojepa_pl.models import build_encoder, ddp_ignored_buffer_names, load_backbone
from neurojepa_pl.models.cnn import CNNEncoder3D
from neurojepa_pl.models.heads import AttentiveClassifier, LinearProbe, masked_mean
from neurojepa_pl.models.moe import rebalance_moe_layers_
from neurojepa_pl.modules.finetune_optim import DownstreamSchedule, build_param_groups

log = logging.getLogger(__name__)

__all__ = ["DownstreamModule", "ClassificationModule", "RegressionModule", "SurvivalModule", "METADATA_KEYS"]

FINETUNE_MODES = ("probe", "full", "frozen")
HEADS = ("attentive", "linear")
CNN_BACKBONE = "cnn"
"""``backbone`` name of the from-scratch CNN baseline (:class:`neurojepa_pl.models.cnn.CNNEncoder3D`)."""
CLASSIFICATION_TASKS = ("binary", "multiclass", "multilabel")
METADATA_KEYS = ("subject_id", "session_id", "modality", "path")
"""Batch metadata carried into ``predictions.csv`` and prediction outputs (string lists)."""
PREDICT_METADATA_KEYS = (*METADATA_KEYS, "site", "sex")
"""Metadata ``predict_step`` passes on (when the batch has it), e.g. to the embedding writer."""


def _batch_size(batch: dict) -> int:
    return int(batch["image"].shape[0])


def _check_cnn_options(head: str, finetune: str, checkpoint: str | None, layer_decay: float | None) -> None:
    """The from-scratch CNN baseline is trained end to end, from random init, under its reference classifier."""
    problems = []
    if finetune != "full":
        problems.append(f"finetune: full (got {finetune!r}; a frozen random-init CNN learns nothing)")
    if checkpoint is not None:
        problems.append(f"checkpoint: null (got {checkpoint!r}; pretrained checkpoints hold ViT weights, not CNN ones)")
    if layer_decay is not None:
        problems.append(f"layer_decay: null (got {layer_decay}; it scales the lr per transformer block)")
    if head != "linear":
        problems.append(f"head: linear (got {head!r}; the reference's two-layer linear classifier)")
    if problems:
        raise ValueError("backbone='cnn' is the from-scratch CNN baseline; set " + "; ".join(problems) + ".")


def _outermost_init_frame(module: nn.Module) -> types.FrameType:
    """Frame of the most derived ``__init__`` running on ``module``, for the base ``__init__`` to call.

    Its arguments are what the caller passed, hence what ``load_from_checkpoint`` must pass back: the base class saves
    them as the hyper-parameters, and the arguments a task class fixes itself (``task="regression"``,
    ``num_outputs``) stay out of them.
    """
    here = inspect.currentframe()
    assert here is not None and here.f_back is not None  # CPython always has frames
    frame: types.FrameType | None = here.f_back  # the base __init__
    outermost = here.f_back
    while frame is not None and frame.f_code.co_name == "__init__" and frame.f_locals.get("self") is module:
        outermost, frame = frame, frame.f_back
    return outermost


class DownstreamModule(LightningModule):
    """Shared machinery of the downstream tasks (not instantiated directly; use a task class).

    Args:
        task: task name (set by the subclass).
        num_outputs: head outputs K (set by the subclass).
        backbone: registry name of the encoder (random init unless ``checkpoint`` is given; then it names the
            architecture when the checkpoint stores none, and must agree when it does), or ``"cnn"`` for the
            from-scratch CNN baseline (needs ``head="linear"``, ``finetune="full"``, no checkpoint, no layer decay).
        checkpoint: pretrained weights (Lightning checkpoint, exported folder, safetensors, reference checkpoint),
            loaded strictly with :func:`neurojepa_pl.models.load_backbone`.
        checkpoint_which: ``"target"`` (EMA encoder, default) or ``"context"`` for checkpoints holding both.
        backbone_kwargs: encoder constructor overrides (``img_size``, ``patch_size``,
            ``use_activation_checkpointing``, ...); for the CNN its :class:`neurojepa_pl.models.cnn.CNNEncoder3D`
            options (``widths``, ``feat_dim``, ``hidden_dim``, ``pool_grid``).
        head: ``"attentive"`` (docs/method.md §8.2) or ``"linear"`` (mean-pooled tokens; on the CNN, its reference
            two-layer linear classifier).
        head_depth: attentive head blocks including the cross-attention block.
        head_heads: attentive head attention heads.
        finetune: ``"full"``, ``"probe"`` (frozen backbone, attentive head) or ``"frozen"`` (frozen backbone, linear
            head).
        lr: peak learning rate.
        start_lr: learning rate at the start of warm-up.
        final_lr: learning rate at the end of the cosine.
        head_lr_scale: lr multiplier of the head (the reference's ``lr_scale``).
        weight_decay: AdamW weight decay at the start.
        final_weight_decay: weight decay at the end (cosine); ``None`` = constant ``weight_decay``.
        layer_decay: layer-wise lr decay of the backbone (``None`` = off).
        warmup_epochs: linear warm-up length in epochs.
        max_epochs: cosine schedule length in epochs (``None`` = the trainer's ``max_epochs``).
        moe_bias_update_rate: sign-rule MoE bias update rate after every optimizer step (0 = off; needs
            ``finetune="full"``).
        moe_bias_clip: bias clip of that update (the reference hard-wires 0.3).
        n_bootstrap: bootstrap resamples for the test CIs.
        ci_alpha: 1 - confidence level of the CIs.
        bootstrap_seed: seed of the bootstrap resampling.
        output_dir: where ``metrics.json``, ``predictions.csv`` and ``figures/`` go (``None`` = the logger's
            directory, else the trainer's ``default_root_dir``).
        class_names: names of the classes / labels in reports (multilabel defaults to the data module's label
            columns).
        fairness_columns: subgroup columns (``site``, ``sex``, ``age`` or ``age:0:45:65:inf``, any manifest column)
            whose per-group metrics and fairness gaps are added to ``metrics.json`` under ``"fairness"`` after the
            test report (:func:`neurojepa_pl.metrics.fairness.evaluate_run_fairness`; ``None``: off).
    """

    def __init__(
        self,
        task: str,
        num_outputs: int,
        backbone: str = "vit_base_moe",
        checkpoint: str | None = None,
        checkpoint_which: str = "target",
        backbone_kwargs: dict | None = None,
        head: str = "attentive",
        head_depth: int = 3,
        head_heads: int = 16,
        finetune: str = "probe",
        lr: float = 3e-5,
        start_lr: float = 0.0,
        final_lr: float = 0.0,
        head_lr_scale: float = 1.0,
        weight_decay: float = 1e-5,
        final_weight_decay: float | None = None,
        layer_decay: float | None = None,
        warmup_epochs: float = 2.0,
        max_epochs: int | None = None,
        moe_bias_update_rate: float = 0.0,
        moe_bias_clip: float = 0.3,
        n_bootstrap: int = 1000,
        ci_alpha: float = 0.05,
        bootstrap_seed: int = 0,
        output_dir: str | None = None,
        class_names: list[str] | None = None,
        fairness_columns: list[str] | None = None,
    ):
        super().__init__()
        if head not in HEADS:
            moved = " (the CNN baseline is now backbone: cnn, head: linear, with cnn_kwargs as backbone_kwargs)"
            raise ValueError(f"head must be one of {HEADS}; got {head!r}{moved if head == 'cnn' else ''}.")
        if finetune not in FINETUNE_MODES:
            raise ValueError(f"finetune must be one of {FINETUNE_MODES}; got {finetune!r}.")
        if backbone == CNN_BACKBONE:
            _check_cnn_options(head, finetune, checkpoint, layer_decay)
        if finetune == "probe" and head != "attentive":
            raise ValueError(
                "finetune='probe' trains an attentive head on a frozen backbone; set head: attentive, "
                "or finetune: frozen for a linear head."
            )
        if finetune == "frozen" and head != "linear":
            raise ValueError(
                "finetune='frozen' means a linear head on a frozen backbone; set head: linear, or "
                "finetune: probe for an attentive head on a frozen backbone."
            )
        self.backbone_frozen = finetune in ("probe", "frozen")
        if moe_bias_update_rate and self.backbone_frozen:
            raise ValueError(
                f"moe_bias_update_rate={moe_bias_update_rate} would change a frozen backbone "
                f"(finetune={finetune!r}); set it to 0.0 or use finetune: full."
            )
        if layer_decay is not None and self.backbone_frozen:
            raise ValueError(
                f"layer_decay scales the lr of a trained backbone, but finetune={finetune!r} freezes it; "
                "set layer_decay: null or finetune: full."
            )
        if checkpoint_which not in ("target", "context"):
            raise ValueError(f"checkpoint_which must be 'target' or 'context'; got {checkpoint_which!r}.")
        self.task = task
        self.num_outputs = int(num_outputs)
        self.finetune = finetune
        self.backbone_name = backbone
        self.backbone_kwargs = dict(backbone_kwargs or {})
        self.checkpoint_path = checkpoint
        self.checkpoint_which = checkpoint_which
        self.head_kind = head
        self.head_depth = int(head_depth)
        self.head_heads = int(head_heads)
        self.lr = float(lr)
        self._settings = dict(
            start_lr=start_lr,
            final_lr=final_lr,
            head_lr_scale=head_lr_scale,
            weight_decay=weight_decay,
            final_weight_decay=final_weight_decay,
            layer_decay=layer_decay,
            warmup_epochs=warmup_epochs,
            max_epochs=max_epochs,
        )
        self.moe_bias_update_rate = float(moe_bias_update_rate)
        self.moe_bias_clip = float(moe_bias_clip)
        self.n_bootstrap = int(n_bootstrap)
        self.ci_alpha = float(ci_alpha)
        self.bootstrap_seed = int(bootstrap_seed)
        self.output_dir = output_dir
        self.class_names = list(class_names) if class_names is not None else None
        # Parsed now, so that a mistyped column spec fails before training rather than after the test.
        self.fairness_columns = [SubgroupColumn.parse(c).spec() for c in fairness_columns or []]
        # Saved before the builders run, so a subclass's builder can read its own options from self.hparams.
        self.save_hyperparameters(frame=_outermost_init_frame(self))

        self.backbone = self.build_backbone()
        self.head = self.build_head()
        if self.backbone_frozen:
            self.backbone.requires_grad_(False)
            self.backbone.eval()
        # MoE routing counts differ per rank and are all-reduced at the bias update: DDP must not broadcast them.
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            self, [f"backbone.{name}" for name in ddp_ignored_buffer_names(self.backbone)]
        )
        self.schedule: DownstreamSchedule | None = None
        self._stores = {"val": PredictionStore(), "test": PredictionStore()}
        self.test_results: dict[str, tuple[float, float, float]] | None = None
        self.label_transfer: dict[str, Any] | None = None  # source/target labels of a loaded checkpoint

    # ------------------------------------------------------------------ builders (called once by __init__)
    def build_backbone(self) -> nn.Module:
        """The backbone: image ``[B, 1, D, H, W]`` -> tokens ``[B, N, C]``, with an ``embed_dim`` attribute (C).

        The from-scratch CNN for ``backbone="cnn"`` (one token), else the registry encoder, loaded strictly from
        ``checkpoint`` when one is given.
        """
        if self.backbone_name == CNN_BACKBONE:
            return CNNEncoder3D(**self.backbone_kwargs)
        if self.checkpoint_path is not None:
            return load_backbone(
                self.checkpoint_path,
                strict=True,
                which=self.checkpoint_which,
                name=self.backbone_name,
                overrides=self.backbone_kwargs,
            )
        return build_encoder(self.backbone_name, **self.backbone_kwargs)

    def build_head(self) -> nn.Module:
        """The head on the backbone's tokens: ``[B, N, C]`` -> outputs ``[B, K]``.

        A backbone with its own ``linear_head`` (the CNN's reference classifier) supplies the linear head.
        """
        embed_dim = int(self.backbone.embed_dim)
        if self.head_kind == "attentive":
            return AttentiveClassifier(embed_dim, self.num_outputs, depth=self.head_depth, num_heads=self.head_heads)
        if hasattr(self.backbone, "linear_head"):
            return self.backbone.linear_head(self.num_outputs)
        return LinearProbe(embed_dim, self.num_outputs)

    # ------------------------------------------------------------------ task hooks (subclasses)
    def compute_loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        """Training / validation loss of head ``outputs`` ``[B, K]`` on ``batch``."""
        raise NotImplementedError

    def prediction_arrays(self, outputs: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """Canonical arrays of the task (see :mod:`neurojepa_pl.metrics.tasks`) for one batch."""
        raise NotImplementedError

    def prediction_tensor(self, outputs: torch.Tensor) -> torch.Tensor:
        """What ``predict_step`` returns as ``prediction``: probabilities, values in target units, or log-risk."""
        raise NotImplementedError

    def report_unit(self) -> str:
        """Unit shown on figures (regression / survival)."""
        return ""

    # ------------------------------------------------------------------ model
    def train(self, mode: bool = True) -> DownstreamModule:
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()  # a frozen backbone never runs in training mode (no dropout / MoE counting)
        return self

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Backbone tokens ``[B, N, C]`` of ``image`` ``[B, 1, D, H, W]`` (no_grad when frozen)."""
        if self.backbone_frozen:
            with torch.no_grad():
                return self.backbone(image)
        return self.backbone(image)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Image ``[B, 1, D, H, W]`` -> head outputs ``[B, K]`` (logits, standardised value or log-risk)."""
        return self.head(self.encode(image))

    def forward_with_embedding(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(outputs [B, K], embedding [B, C])``; the embedding is the mean of the backbone tokens (the CNN's
        feature layer for the baseline), independent of the task head."""
        tokens = self.encode(image)
        return self.head(tokens), masked_mean(tokens)

    # ------------------------------------------------------------------ setup checks
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            return
        dm_task = getattr(datamodule, "task", None)
        if dm_task is not None and dm_task != self.task:
            raise ValueError(
                f"the model's task is {self.task!r} but the data module serves {dm_task!r}; set the "
                "same task in model.init_args and data.init_args."
            )
        dm_outputs = getattr(datamodule, "num_classes", None)
        if isinstance(dm_outputs, int) and dm_outputs != self.num_outputs:
            raise ValueError(
                f"the data module needs {dm_outputs} model outputs for task {self.task!r} but the "
                f"model has {self.num_outputs}; fix model.init_args.num_classes."
            )
        if self.class_names is None and self.task == "multilabel" and getattr(datamodule, "label_columns", None):
            self.class_names = list(datamodule.label_columns)

    # ------------------------------------------------------------------ label mapping (cross-cohort tests)
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # What the head's outputs mean, so that a later test on other data can be checked (docs/method.md §11).
        datamodule = getattr(self.trainer, "datamodule", None)
        if getattr(datamodule, "task", None) is not None:
            checkpoint[LABEL_SIGNATURE_KEY] = label_signature(datamodule, split="all").to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning restores after setup: the data module is the one the checkpoint will be trained or tested on.
        # Prediction (embeddings) is allowed on any data.
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        if datamodule is not None and not trainer.predicting:
            stored = checkpoint.get(LABEL_SIGNATURE_KEY)
            self.label_transfer = check_label_mapping(stored, datamodule, trainer.ckpt_path)

    # ------------------------------------------------------------------ optimisation
    def _schedule_steps(self) -> tuple[int, int]:
        """(optimizer updates per epoch, schedule length in updates)."""
        trainer = self.trainer
        estimated = int(trainer.estimated_stepping_batches)  # also sets up the train loader
        per_epoch = max(1, math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches))
        epochs = self._settings["max_epochs"] or (trainer.max_epochs if trainer.max_epochs not in (None, -1) else None)
        total = per_epoch * int(epochs) if epochs else estimated
        return per_epoch, max(1, total)

    def configure_optimizers(self) -> dict:
        s = self._settings
        backbone = None if self.backbone_frozen else self.backbone
        groups = build_param_groups(backbone, self.head, s["head_lr_scale"], s["layer_decay"])
        per_epoch, total = self._schedule_steps()
        wd = float(s["weight_decay"])
        final_wd = wd if s["final_weight_decay"] is None else float(s["final_weight_decay"])
        self.schedule = DownstreamSchedule(
            lr=self.lr,
            start_lr=float(s["start_lr"]),
            final_lr=float(s["final_lr"]),
            warmup_steps=int(round(s["warmup_epochs"] * per_epoch)),
            total_steps=total,
            weight_decay=wd,
            final_weight_decay=final_wd,
        )
        for group in groups:
            group["lr"] = self.lr * group["lr_scale"]
            group["weight_decay"] = wd * group["wd_scale"]
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=(0.9, 0.999), eps=1e-8)
        schedule = self.schedule
        # LambdaLR calls the factor with the number of scheduler steps taken so far (0 for the first update); the
        # k-th update uses the schedule value at step k, as the reference steps its schedulers before the update.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: schedule.lr_factor(done + 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.schedule is None:
            return
        weight_decay = self.schedule.weight_decay_at(self.trainer.global_step + 1)
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                group["weight_decay"] = weight_decay * group.get("wd_scale", 1.0)

    # ------------------------------------------------------------------ MoE balancing
    def moe_layers(self) -> list[nn.Module]:
        """The backbone's MoE layers (empty for dense backbones and the CNN)."""
        if not hasattr(self.backbone, "moe_layers"):
            return []
        return list(self.backbone.moe_layers())

    def on_train_epoch_start(self) -> None:
        # Only training forwards of this epoch may feed the next bias update (docs/method.md §3.4 [BUG] fixed).
        for layer in self.moe_layers():
            layer.counts.zero_()

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure=optimizer_closure)
        self._update_moe_bias()

    @torch.no_grad()
    def _update_moe_bias(self) -> None:
        layers = self.moe_layers()
        if not layers:
            return
        if self.moe_bias_update_rate == 0.0:
            for layer in layers:
                layer.counts.zero_()
            return
        # Fine-tuning: sign rule at a fixed rate (docs/method.md §3.3); the counts are summed over ranks inside.
        min_vio, max_vio = rebalance_moe_layers_(
            layers, self.moe_bias_update_rate, proportional=False, clip=self.moe_bias_clip
        )
        self.log("train/moe_min_vio", min_vio, on_step=True, on_epoch=False)
        self.log("train/moe_max_vio", max_vio, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(self(batch["image"]), batch)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=_batch_size(batch))
        return loss

    def _eval_step(self, batch: dict, stage: str) -> None:
        outputs = self(batch["image"])
        loss = self.compute_loss(outputs, batch)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=_batch_size(batch))
        metadata = {k: list(batch[k]) for k in METADATA_KEYS if k in batch}
        self._stores[stage].add(self.prediction_arrays(outputs, batch), metadata)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """``{"embedding": [B, C], "prediction": [B, ...], **metadata}`` on CPU (see :meth:`prediction_tensor`)."""
        outputs, embedding = self.forward_with_embedding(batch["image"])
        result = {
            "embedding": embedding.detach().float().cpu(),
            "prediction": self.prediction_tensor(outputs).detach().float().cpu(),
        }
        result.update({k: list(batch[k]) for k in PREDICT_METADATA_KEYS if k in batch})
        return result

    # ------------------------------------------------------------------ evaluation epochs
    def on_validation_epoch_start(self) -> None:
        self._stores["val"].reset()

    def on_test_epoch_start(self) -> None:
        self._stores["test"].reset()

    def _log_metrics(self, stage: str, metrics: dict[str, float]) -> None:
        # Every rank holds the same gathered metrics, so no further synchronisation is needed.
        for name, value in metrics.items():
            self.log(f"{stage}/{name}", float(value), prog_bar=name == "selection", sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        arrays, _ = self._stores["val"].gather()
        self._stores["val"].reset()
        if not arrays:
            return
        self._log_metrics("val", compute_task_metrics(self.task, arrays, self.class_names))

    def on_test_epoch_end(self) -> None:
        arrays, metadata = self._stores["test"].gather()
        self._stores["test"].reset()
        if not arrays:
            raise RuntimeError("the test loop produced no predictions; check the test split of the manifest.")
        point = compute_task_metrics(self.task, arrays, self.class_names)
        self._log_metrics("test", point)
        if self.trainer.is_global_zero:
            self.test_results = self._write_test_report(arrays, metadata)

    def resolve_output_dir(self) -> Path:
        """``output_dir``, else the logger's directory, else the trainer's ``default_root_dir``."""
        if self.output_dir:
            return Path(self.output_dir)
        return Path(self.trainer.log_dir or self.trainer.default_root_dir)

    def _write_test_report(self, arrays: dict[str, np.ndarray], metadata: dict[str, list]) -> dict:
        out = self.resolve_output_dir()
        results = bootstrap_task_metrics(
            self.task,
            arrays,
            n_boot=self.n_bootstrap,
            alpha=self.ci_alpha,
            seed=self.bootstrap_seed,
            class_names=self.class_names,
        )
        datamodule = getattr(self.trainer, "datamodule", None)
        dm_hparams = getattr(datamodule, "hparams", {}) or {}
        extra = {
            "backbone": self.backbone_name,
            "head": self.head_kind,
            "finetune": self.finetune,
            "pretrained_checkpoint": self.checkpoint_path,
            "evaluated_checkpoint": self.trainer.ckpt_path,
            "class_names": self.class_names,
            "k_shot": dm_hparams.get("k_shot"),
            "few_shot_seed": dm_hparams.get("few_shot_seed") if dm_hparams.get("k_shot") is not None else None,
            "manifest": dm_hparams.get("manifest"),
            "transfer": self.label_transfer,
        }
        write_metrics_json(
            out / "metrics.json",
            results,
            n=len(next(iter(arrays.values()))),
            task=self.task,
            n_bootstrap=self.n_bootstrap,
            ci_level=1.0 - self.ci_alpha,
            extra=extra,
        )
        write_predictions(out / "predictions.csv", self.task, arrays, metadata, self._table_class_names())
        figures = task_figures(self.task, arrays, self.class_names, self.report_unit())
        save_figures(figures, out / "figures")
        log_figures(self.loggers, figures, step=self.global_step, prefix="test")
        if self.fairness_columns:
            evaluate_run_fairness(
                out, self.fairness_columns, manifest=dm_hparams.get("manifest"), class_names=self.class_names,
                n_boot=self.n_bootstrap, alpha=self.ci_alpha, seed=self.bootstrap_seed,
            )  # fmt: skip
        log.info("test report written to %s", out)
        return results

    def _table_class_names(self) -> list[str] | None:
        return None if self.task == "binary" else self.class_names


class ClassificationModule(DownstreamModule):
    """Binary, multiclass or multilabel classification (docs/method.md §8.3, 8.7).

    Args:
        task: ``"binary"`` (2 logits, cross-entropy, softmax, P(class 1) for metrics), ``"multiclass"`` (CE) or
            ``"multilabel"`` (one logit per label, BCE over observed labels).
        num_classes: outputs: 2 for binary, C classes, or L labels.
        **kwargs: :class:`DownstreamModule` arguments.
    """

    def __init__(self, task: str = "binary", num_classes: int = 2, **kwargs: Any):
        if task not in CLASSIFICATION_TASKS:
            raise ValueError(f"ClassificationModule task must be one of {CLASSIFICATION_TASKS}; got {task!r}.")
        if task == "binary" and num_classes != 2:
            raise ValueError(
                f"binary classification uses 2 logits (docs/method.md §8.3); set num_classes: 2 (got {num_classes})."
            )
        if num_classes < 1 or (task == "multiclass" and num_classes < 2):
            raise ValueError(f"num_classes={num_classes} is not valid for task {task!r}.")
        super().__init__(task=task, num_outputs=num_classes, **kwargs)

    def compute_loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        if self.task == "multilabel":
            target = batch["label"].float()
            mask = batch.get("label_mask")
            mask = torch.ones_like(target) if mask is None else mask.to(target.dtype)
            losses = F.binary_cross_entropy_with_logits(outputs.float(), target, reduction="none")
            return (losses * mask).sum() / mask.sum().clamp_min(1.0)
        return F.cross_entropy(outputs.float(), batch["label"].long())

    def prediction_tensor(self, outputs: torch.Tensor) -> torch.Tensor:
        if self.task == "multilabel":
            return torch.sigmoid(outputs.float())
        return torch.softmax(outputs.float(), dim=-1)

    def prediction_arrays(self, outputs: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        probs = self.prediction_tensor(outputs)
        if self.task == "binary":
            return {"target": batch["label"], "score": probs[:, 1]}
        if self.task == "multiclass":
            return {"target": batch["label"], "score": probs}
        mask = batch.get("label_mask")
        mask = torch.ones_like(batch["label"], dtype=torch.bool) if mask is None else mask.bool()
        return {"target": batch["label"].round().long(), "score": probs, "mask": mask}


class RegressionModule(DownstreamModule):
    """Scalar regression, e.g. brain age (docs/method.md §8.4): MSE on standardised targets, metrics in target units.

    Args:
        standardize_targets: train on ``(y - mean) / std`` with the training split's mean and std (default). False
            trains on raw values like the reference (its standardisation is commented out).
        target_mean: fixed mean (``None``: computed from the data module's training records at fit start).
        target_std: fixed std (``None``: as above).
        target_unit: unit shown on figures.
        **kwargs: :class:`DownstreamModule` arguments.
    """

    def __init__(
        self,
        standardize_targets: bool = True,
        target_mean: float | None = None,
        target_std: float | None = None,
        target_unit: str = "years",
        **kwargs: Any,
    ):
        super().__init__(task="regression", num_outputs=1, **kwargs)
        self.standardize_targets = bool(standardize_targets)
        self.target_unit = target_unit
        if target_std is not None and target_std <= 0:
            raise ValueError(f"target_std must be > 0; got {target_std}.")
        if standardize_targets:
            mean = float("nan") if target_mean is None else float(target_mean)
            std = float("nan") if target_std is None else float(target_std)
        else:
            mean, std = 0.0, 1.0
        # Buffers, so the statistics travel with the checkpoint to `neurojepa test`.
        self.register_buffer("target_mean", torch.tensor(mean, dtype=torch.float64))
        self.register_buffer("target_std", torch.tensor(std, dtype=torch.float64))

    def report_unit(self) -> str:
        return self.target_unit

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage != "fit" or not self.standardize_targets:
            return
        if not (torch.isnan(self.target_mean) or torch.isnan(self.target_std)):
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        datasets = getattr(datamodule, "datasets", None)
        if not datasets or "train" not in datasets:
            raise RuntimeError(
                "RegressionModule needs the training targets to standardise them, but the data module "
                "exposes no datasets['train']; set model.init_args.target_mean and target_std."
            )
        values = np.array([float(r["label"]) for r in datasets["train"].records], dtype=np.float64)
        std = float(values.std(ddof=1)) if values.size > 1 else 0.0
        if not np.isfinite(values).all() or std <= 0:
            raise ValueError(
                f"cannot standardise {values.size} training targets (std {std}); set target_mean and "
                "target_std explicitly or standardize_targets: false."
            )
        self.target_mean.fill_(float(values.mean()))
        self.target_std.fill_(std)
        log.info("regression targets standardised with train mean %.4g and std %.4g", values.mean(), std)

    def _check_statistics(self) -> None:
        if torch.isnan(self.target_mean) or torch.isnan(self.target_std):
            raise RuntimeError(
                "RegressionModule has no target statistics: fit it first (they are saved in its "
                "checkpoint: pass --ckpt_path) or set target_mean and target_std."
            )

    def to_target_units(self, outputs: torch.Tensor) -> torch.Tensor:
        """Head outputs ``[B, 1]`` -> predictions ``[B]`` in target units."""
        self._check_statistics()
        return outputs.squeeze(-1).double() * self.target_std + self.target_mean

    def compute_loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        self._check_statistics()
        target = ((batch["label"].double() - self.target_mean) / self.target_std).float()
        return F.mse_loss(outputs.squeeze(-1).float(), target)

    def prediction_tensor(self, outputs: torch.Tensor) -> torch.Tensor:
        return self.to_target_units(outputs)

    def prediction_arrays(self, outputs: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        return {"target": batch["label"], "prediction": self.to_target_units(outputs)}


class SurvivalModule(DownstreamModule):
    """Time-to-event with a Cox head (docs/method.md §8.5): the head outputs the log-risk; loss = Cox partial
    likelihood over the batch gathered from all ranks; metric = Harrell's C-index over all ranks' predictions.

    Args:
        cox_ties: ``"breslow"`` or ``"efron"``.
        cox_l2: weight of ``mean(h^2)`` (the reference's ``l2_lambda``; its code default is 1e-3).
        head_depth: attentive head depth (docs/method.md §8.5: 1).
        time_unit: unit shown on Kaplan-Meier figures.
        **kwargs: :class:`DownstreamModule` arguments.
    """

    def __init__(
        self,
        cox_ties: str = "breslow",
        cox_l2: float = 0.0,
        head_depth: int = 1,
        time_unit: str = "days",
        **kwargs: Any,
    ):
        if cox_ties not in ("breslow", "efron"):
            raise ValueError(f"cox_ties must be 'breslow' or 'efron'; got {cox_ties!r}.")
        super().__init__(task="survival", num_outputs=1, head_depth=head_depth, **kwargs)
        self.cox_ties = cox_ties
        self.cox_l2 = float(cox_l2)
        self.time_unit = time_unit

    def report_unit(self) -> str:
        return self.time_unit

    def compute_loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        log_risk, time, event = gather_survival_batch(
            outputs.squeeze(-1).float(), batch["time"].float(), batch["event"].long()
        )
        return cox_ph_loss(log_risk, time, event, ties=self.cox_ties, l2=self.cox_l2)

    def prediction_tensor(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.squeeze(-1).float()

    def prediction_arrays(self, outputs: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        return {"time": batch["time"], "event": batch["event"], "risk": outputs.squeeze(-1)}
