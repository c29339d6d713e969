"""JEPA pretraining as a LightningModule (docs/method.md §3.4, 5, 6, 7).

One training step, for a batch of volumes with M masks (3 multiscale masks in the paper):

1. targets: the EMA target encoder sees every token; its features are layer-normed (no affine) and gathered at each
   mask's target ids (no grad);
2. context: the context encoder runs ONCE for all M masks (the masks have fixed lengths, so they are stacked along
   the batch: ``[M*B, Kc, C]``; the patch embedding is shared);
3. prediction: the predictor runs ONCE on the stacked masks (mask token 0 for every mask, as the reference);
4. loss: foreground-weighted L1 (docs/method.md §6.2), averaged over masks.

The optimizer update around it follows the reference's per-step order (docs/method.md §7): schedules set before the
update (:meth:`JEPAPretrainModule.optimizer_step`), non-finite check (``NonFiniteLossGuard``), gradient clipping with
the pre-clip norm logged (:meth:`JEPAPretrainModule.configure_gradient_clipping`), AdamW, then the MoE bias update
(``MoELoadBalance``) and the EMA (``EMATargetUpdate``) in callbacks that :meth:`configure_callbacks` installs in that
order.

Exact resume: weights, EMA target, MoE biases, AdamW state and callback counters are in the Lightning checkpoint; the
schedules are pure functions of ``update_step`` (saved too); sample order, augmentation and masks are pure functions
of the samples' (epoch, position) keys, and the training loader's position is in the checkpoint too (a
``StatefulDataLoader``), so a run resumed mid-epoch is exact. See ``tests/modules/test_resume.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.fsdp.wrap import wrap
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from neurojepa_pl.callbacks import EMATargetUpdate, MaskFigureLogger, MoELoadBalance, NonFiniteLossGuard
from neurojepa_pl.config_specs import PAPER_ENCODER, PAPER_PREDICTOR, EncoderSpec, PredictorSpec
from neurojepa_pl.errors import UserValueError
from neurojepa_pl.losses.jepa import jepa_loss
from neurojepa_pl.models import Predictor3D, VisionTransformer3D, ddp_ignored_buffer_names
from neurojepa_pl.modules.init_from import InitFrom
from neurojepa_pl.schedules import PretrainSchedule

__all__ = ["JEPAPretrainModule", "gather_tokens", "patchify", "feature_std", "effective_rank"]

# Prefixes that wrappers (FSDP, activation checkpointing, torch.compile) insert into parameter names.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


# --------------------------------------------------------------------------------------------------- tensor helpers
def gather_tokens(tokens: Tensor, idx: Tensor) -> Tensor:
    """``tokens[b, idx[b, k]]``: ``[B, N, C]`` and ``[B, K]`` -> ``[B, K, C]`` (also ``[B, N]`` -> ``[B, K]``)."""
    if tokens.dim() == 2:
        return tokens.gather(1, idx)
    return tokens.gather(1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def patchify(images: Tensor, grid: Sequence[int]) -> Tensor:
    """Cut volumes into the encoder's patches, in token order (C-order over the grid).

    Args:
        images: ``[B, C, D, H, W]`` with ``D, H, W`` multiples of ``grid``.
        grid: token grid ``(g0, g1, g2)``.

    Returns:
        ``[B, N, C * p0 * p1 * p2]``, row ``n`` the voxels of token ``n``.
    """
    b, c, *spatial = images.shape
    p = [s // g for s, g in zip(spatial, grid)]
    x = images.reshape(b, c, grid[0], p[0], grid[1], p[1], grid[2], p[2])
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # [B, g0, g1, g2, C, p0, p1, p2]
    return x.reshape(b, grid[0] * grid[1] * grid[2], c * p[0] * p[1] * p[2])


def feature_std(features: Tensor) -> Tensor:
    """Mean over channels of the std over rows; tends to 0 when the representation collapses. ``[T, C]`` -> ``[]``."""
    return features.float().std(dim=0).mean()


def effective_rank(features: Tensor) -> Tensor:
    """Effective rank (Roy & Vetterli 2007): ``exp(entropy(s / sum(s)))`` of the singular values ``s`` of the
    centred ``[T, C]`` feature matrix; between 1 (collapsed to a line) and ``min(T, C)``.

    The singular values come from the eigenvalues of the ``[C, C]`` Gram matrix, far cheaper than an SVD of
    ``[T, C]`` when T is tens of thousands of tokens; float64 because the square root amplifies the rounding error of
    near-zero eigenvalues.
    """
    x = features.double()
    x = x - x.mean(dim=0, keepdim=True)
    singular = torch.linalg.eigvalsh(x.T @ x).clamp_min(0).sqrt()
    p = singular / singular.sum().clamp_min(1e-12)
    entropy = -(p * p.clamp_min(1e-12).log()).sum()
    return entropy.exp().float()


def _as_pair(value: float | Sequence[float], name: str) -> tuple[float, float]:
    if isinstance(value, (int, float)):
        return float(value), float(value)
    pair = tuple(float(v) for v in value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be a number or a [start, end] pair; got {value!r}.")
    return pair  # type: ignore[return-value]


def _with_geometry(overrides: dict[str, Any] | None, geometry: dict[str, Any], name: str) -> dict[str, Any]:
    """``overrides`` with the volume/patch geometry filled in; a different value stated in both places is an error."""
    merged = dict(overrides or {})
    for key, value in geometry.items():
        if key in merged and _as_geometry_value(merged[key]) != _as_geometry_value(value):
            raise ValueError(
                f"{name}.{key} = {merged[key]!r} contradicts the data geometry {key} = {value!r}. State the geometry "
                "once, in the data module (data.init_args.spatial_size / patch_size), and drop it from "
                f"model.init_args.{name}."
            )
        merged[key] = value
    return merged


def _as_geometry_value(value: Any) -> Any:
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else int(value)


def _clean_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


# --------------------------------------------------------------------------------------------------- the module
class JEPAPretrainModule(LightningModule):
    """Neuro-JEPA pretraining: context encoder, EMA target encoder, predictor, foreground-weighted L1 loss.

    Batches are dicts from ``neurojepa_pl.data_modules.pretrain.PretrainDataModule``: ``image`` ``[B, 1, D, H, W]``,
    ``context_idx`` / ``target_idx`` lists of M int64 ``[B, Kc]`` / ``[B, Kt]``, ``foreground`` bool ``[B, N]``.

    Args:
        encoder: registry name (``neurojepa_pl.models``), e.g. ``vit_base_moe`` (the paper's), or a mapping of
            constructor arguments (``preset: <name>`` plus values; what a saved config holds). Either way
            ``--print_config``, the saved ``config.yaml`` and ``hparams["encoder"]`` hold every constructor argument
            (:class:`neurojepa_pl.config_specs.EncoderSpec`, docs/method.md §9.4).
        encoder_overrides: constructor overrides applied on top, e.g. ``{depth: 6}``.
        predictor: registry name, e.g. ``predictor_base``, or a mapping, as ``encoder``.
        predictor_overrides: its overrides; ``encoder_embed_dim`` must match the encoder.
        img_size: volume size ``[D, H, W]`` of both networks (None: the registry entries' own). ``neurojepa fit``
            links it from the data module's ``spatial_size``, so a YAML states the geometry once, under ``data``.
        patch_size: patch edge of both networks (None: the registry entries' own); linked from the data module's
            ``patch_size`` (which the masks use) in the same way.
        target: ``"latent"`` (JEPA: layer-normed EMA-target features) or ``"pixel"`` (MAE-style ablation: a linear
            head maps each predicted token to its patch's voxels, normalised per patch to zero mean and unit variance
            as MAE's ``norm_pix_loss``; the loss, weighting and ``loss_exp`` are unchanged, and the target encoder is
            still EMA-updated but not used in the loss).
        per_mask_tokens: use predictor mask token m for mask m (one predictor call per mask) instead of token 0 for
            all (the reference, docs/method.md §4); the predictor needs one mask token per mask then.
        batch_masks: run all masks of equal length in one encoder and one predictor forward (default). False runs
            one forward per mask, like the reference (the benchmark baseline); masks of different lengths (V-JEPA 2
            masking) are always grouped by length.
        lr_start, lr_peak, lr_final, warmup_steps, total_steps, cooldown_shape: see
            :func:`neurojepa_pl.schedules.lr_at`.
        cooldown_steps: length of the final decay; default 0 in phase ``"pretrain"`` and ``total_steps`` in phase
            ``"cooldown"``.
        phase: ``"pretrain"`` (warm-up then constant, docs/method.md §7 phase 1) or ``"cooldown"`` (decay to
            ``lr_final`` from the phase-1 checkpoint given as ``init_from``; the step counter restarts at 0).
        weight_decay: AdamW weight decay, constant or ``[start, end]`` (cosine); never on biases and 1-D tensors.
        betas, eps: AdamW.
        fused_adamw: AdamW ``fused``; None picks fused on CUDA.
        ema_momentum: constant or ``[start, end]`` (linear).
        moe_bias_rate: MoE balance-bias update rate, constant or ``[start, end]`` (cosine).
        moe_proportional: token-averaged error correction (pretraining) instead of the sign rule.
        moe_bias_clip: balance-bias clip.
        bg_weight: loss weight of background target tokens (docs/method.md §6.2; 1.0 disables the weighting).
        loss_exp: loss exponent p (1 = L1).
        init_from: checkpoint to start from (the reference's cool-down), ignored when resuming with ``--ckpt_path``
            (that checkpoint wins): a Lightning checkpoint of this module, or a reference pretraining checkpoint
            (``encoder``, ``target_encoder``, ``predictor``, ``opt``, ...; docs/method.md §7.1). Context encoder, EMA
            target, predictor and MoE balance biases are loaded strictly; the AdamW moments are mapped onto this
            module's parameters by name (single device / DDP only). The step counter restarts at 0.
        init_from_mismatch: what to do when part of the optimizer state of ``init_from`` cannot be mapped (no
            optimizer state, a parameter without a counterpart, per-expert step counts that differ, a GradScaler
            state): ``"error"`` (default) refuses to start and names each item, ``"warn"`` starts with what maps
            (AdamW starts afresh for the rest) and warns naming each item.
        compile: ``torch.compile`` the encoders and the predictor (in place: parameter names are unchanged); None
            (default) compiles when the trainer runs on CUDA and stays eager on CPU.
        max_nonfinite_in_a_row: consecutive non-finite-loss steps that stop training.
        mask_figure_every_n_steps: log a mask figure every N optimizer steps (0 disables).
        collapse_every_n_steps: log target-feature std and effective rank every N updates (0 disables).
    """

    def __init__(
        self,
        encoder: EncoderSpec = PAPER_ENCODER,
        encoder_overrides: dict[str, Any] | None = None,
        predictor: PredictorSpec = PAPER_PREDICTOR,
        predictor_overrides: dict[str, Any] | None = None,
        img_size: Sequence[int] | None = None,
        patch_size: int | None = None,
        target: Literal["latent", "pixel"] = "latent",
        per_mask_tokens: bool = False,
        batch_masks: bool = True,
        lr_start: float = 1e-4,
        lr_peak: float = 5.25e-4,
        lr_final: float = 1e-6,
        warmup_steps: int = 64_000,
        total_steps: int = 320_000,
        cooldown_steps: int | None = None,
        cooldown_shape: Literal["linear", "cosine"] = "linear",
        phase: Literal["pretrain", "cooldown"] = "pretrain",
        weight_decay: float | tuple[float, float] = 0.04,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        fused_adamw: bool | None = None,
        ema_momentum: float | tuple[float, float] = (0.99925, 0.99925),
        moe_bias_rate: float | tuple[float, float] = 1e-4,
        moe_proportional: bool = True,
        moe_bias_clip: float = 0.3,
        bg_weight: float = 0.1,
        loss_exp: float = 1.0,
        init_from: str | None = None,
        init_from_mismatch: Literal["error", "warn"] = "error",
        compile: bool | None = None,
        max_nonfinite_in_a_row: int = 10,
        mask_figure_every_n_steps: int = 500,
        collapse_every_n_steps: int = 50,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        # Accept a name, a mapping or a spec; record the full spec as a plain dict (checkpoints are read back with
        # weights_only=True, which refuses custom classes).
        encoder, predictor = EncoderSpec(encoder), PredictorSpec(predictor)
        self.hparams["encoder"], self.hparams["predictor"] = encoder.to_dict(), predictor.to_dict()
        if init_from_mismatch not in ("error", "warn"):
            raise ValueError(f"init_from_mismatch must be 'error' or 'warn', got {init_from_mismatch!r}.")
        if target not in ("latent", "pixel"):
            raise ValueError(f"target must be 'latent' or 'pixel', got {target!r}.")
        if phase not in ("pretrain", "cooldown"):
            raise ValueError(f"phase must be 'pretrain' or 'cooldown', got {phase!r}.")

        # ---- networks: the target starts as an exact copy of the context encoder and is never trained by gradients
        geometry = {k: v for k, v in (("img_size", img_size), ("patch_size", patch_size)) if v is not None}
        self.context_encoder = VisionTransformer3D(
            **{**encoder.kwargs, **_with_geometry(encoder_overrides, geometry, "encoder_overrides")}
        )
        # Record the geometry the networks were built with: a saved config then states it even where the registry
        # default was used, and Lightning refuses a data module whose patch_size differs (it merges both hparams).
        self.hparams["img_size"] = list(self.context_encoder.config["img_size"])
        self.hparams["patch_size"] = self.context_encoder.config["patch_size"]
        self.target_encoder = copy.deepcopy(self.context_encoder).requires_grad_(False)
        self.predictor = Predictor3D(
            **{**predictor.kwargs, **_with_geometry(predictor_overrides, geometry, "predictor_overrides")}
        )
        self._check_predictor_matches_encoder()
        if not per_mask_tokens:
            # Only mask token 0 is used (docs/method.md §4); the others would never get a gradient, so freeze them
            # rather than make DDP look for unused parameters. (In the reference AdamW skips them too: they stay zero.)
            for token in list(self.predictor.mask_tokens)[1:]:
                token.requires_grad_(False)
        if target == "pixel":
            voxels_per_patch = math.prod(
                s // g for s, g in zip(self.context_encoder.config["img_size"], self.context_encoder.grid_size)
            )
            self.pixel_head = nn.Linear(self.context_encoder.embed_dim, voxels_per_patch)
        # Names of parameters without weight decay, taken before any wrapper renames or flattens them.
        self._no_decay = {f"context_encoder.{n}" for n in self.context_encoder.no_weight_decay()}
        self._no_decay |= {f"predictor.{n}" for n in self.predictor.no_weight_decay()}
        self._no_decay |= {n for n, p in self.named_parameters() if n.startswith("pixel_head.") and p.ndim == 1}
        # MoE routing counts differ per rank (MoELoadBalance all-reduces them): DDP must not broadcast rank 0's.
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            self,
            [
                f"{name}.{b}"
                for name in ("context_encoder", "target_encoder")
                for b in ddp_ignored_buffer_names(getattr(self, name))
            ],
        )

        # ---- schedules, as pure functions of the number of applied optimizer updates
        if cooldown_steps is None:
            cooldown_steps = total_steps if phase == "cooldown" else 0
        if phase == "cooldown" and warmup_steps:
            raise ValueError(f"phase 'cooldown' has no warm-up; set warmup_steps: 0 (got {warmup_steps}).")
        self.schedule = PretrainSchedule(
            lr_start=lr_start,
            lr_peak=lr_peak,
            lr_final=lr_final,
            warmup_steps=warmup_steps,
            total_steps=total_steps,
            cooldown_steps=cooldown_steps,
            cooldown_shape=cooldown_shape,
            weight_decay=_as_pair(weight_decay, "weight_decay"),
            ema_momentum=_as_pair(ema_momentum, "ema_momentum"),
            moe_rate=_as_pair(moe_bias_rate, "moe_bias_rate"),
        )
        self.update_step = 0  # optimizer updates applied so far (dropped non-finite steps excluded)
        self._collapse_logged_at: int | None = None  # update step whose collapse indicators were logged last
        self._model_configured = False

    def _check_predictor_matches_encoder(self) -> None:
        enc, pred = self.context_encoder, self.predictor
        problems = []
        if pred.encoder_embed_dim != enc.embed_dim:
            problems.append(f"encoder_embed_dim {pred.encoder_embed_dim} vs encoder width {enc.embed_dim}")
        if tuple(pred.grid_size) != tuple(enc.grid_size):
            problems.append(f"token grid {tuple(pred.grid_size)} vs encoder grid {tuple(enc.grid_size)}")
        if problems:
            raise ValueError(
                "The predictor does not fit the encoder: " + "; ".join(problems) + ". Set predictor_overrides "
                f"{{encoder_embed_dim: {enc.embed_dim}, img_size: {enc.config['img_size']}, "
                f"patch_size: {enc.config['patch_size']}}} (model.init_args.predictor_overrides)."
            )

    # ----------------------------------------------------------------------------------------------- the JEPA step
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        targets = self.target_features(batch["image"])  # [B, N, C]: the EMA encoder on every token (no grad)
        loss = self.masked_prediction_loss(batch, targets)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=batch["image"].shape[0])
        self._log_collapse_indicators(targets)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.compute_loss(batch)  # held-out scans, fixed masks (the data module's validation collator)
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=batch["image"].shape[0])
        return loss

    def compute_loss(self, batch: dict[str, Any]) -> Tensor:
        """The JEPA loss of one batch: :meth:`masked_prediction_loss` against :meth:`target_features`."""
        return self.masked_prediction_loss(batch, self.target_features(batch["image"]))

    def masked_prediction_loss(self, batch: dict[str, Any], targets: Tensor) -> Tensor:
        """Predict each mask's target tokens from its context tokens; foreground-weighted L1 (docs/method.md §6.2).

        Args:
            batch: ``image`` ``[B, 1, D, H, W]``, ``context_idx`` / ``target_idx`` (M x ``[B, K]``), ``foreground``.
            targets: ``[B, N, C]`` regression targets of every token (:meth:`target_features`).
        """
        if batch.get("masks_pending", False):
            # A batch of PretrainDataModule(augment_on="device") that skipped the data module's
            # on_after_batch_transfer (augmentation, foreground, masks): say so instead of a KeyError on context_idx.
            raise UserValueError(
                "this training batch is not augmented and has no masks yet (masks_pending): PretrainDataModule with "
                "augment_on='device' adds them in its on_after_batch_transfer hook, which the Trainer only calls "
                "when given the data module.",
                "call trainer.fit(module, datamodule=dm) instead of passing its loaders, or set "
                "data.init_args.augment_on: workers.",
            )
        images, context_idx, target_idx = batch["image"], batch["context_idx"], batch["target_idx"]
        preds = self.predict(images, context_idx, target_idx)  # M x [B, Kt, C]
        wanted = [gather_tokens(targets, idx) for idx in target_idx]  # M x [B, Kt, C]
        foreground = [gather_tokens(batch["foreground"], idx) for idx in target_idx]  # M x [B, Kt]
        return jepa_loss(preds, wanted, foreground, self.hparams.bg_weight, self.hparams.loss_exp)

    @torch.no_grad()
    def target_features(self, images: Tensor) -> Tensor:
        """Regression targets of every token, ``[B, N, C]``: the layer-normed (no affine, as the reference) EMA-target
        features, or for ``target="pixel"`` the patch voxels normalised per patch (``C`` = voxels per patch)."""
        if self.hparams.target == "pixel":
            patches = patchify(images.float(), self.context_encoder.grid_size)  # [B, N, P]
            mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
            return (patches - mean) / (var + 1e-6).sqrt()
        features = self.target_encoder(images)  # [B, N, C]
        return F.layer_norm(features, features.shape[-1:])

    def predict(self, images: Tensor, context_idx: Sequence[Tensor], target_idx: Sequence[Tensor]) -> list[Tensor]:
        """Predicted target tokens of every mask: M x ``[B, Kt, C]``; one encoder and one predictor forward per group
        of equal-length masks (a single group for the paper's masks)."""
        preds: list[Tensor] = []
        for group in self._mask_groups(context_idx, target_idx):
            contexts = [context_idx[m] for m in group]
            targets = [target_idx[m] for m in group]
            z = self.context_encoder(images, masks=contexts)  # [G*B, Kc, C]
            if self.hparams.per_mask_tokens:
                out = torch.cat(
                    [
                        self.predictor(z_m, c, t, mask_index=m)
                        for m, z_m, c, t in zip(group, z.chunk(len(group)), contexts, targets)
                    ]
                )
            else:
                out = self.predictor(z, torch.cat(contexts), torch.cat(targets))  # [G*B, Kt, C]
            if self.hparams.target == "pixel":
                out = self.pixel_head(out)
            preds.extend(out.chunk(len(group)))
        return preds

    def _mask_groups(self, context_idx: Sequence[Tensor], target_idx: Sequence[Tensor]) -> list[list[int]]:
        num_masks = len(context_idx)
        if self.hparams.per_mask_tokens and num_masks != len(self.predictor.mask_tokens):
            raise ValueError(
                f"per_mask_tokens=True needs one predictor mask token per mask: the batch has {num_masks} masks, the "
                f"predictor {len(self.predictor.mask_tokens)} tokens. Set model.init_args.predictor_overrides."
                f"num_mask_tokens: {num_masks}."
            )
        if not self.hparams.batch_masks:
            return [[m] for m in range(num_masks)]
        groups: dict[tuple[int, int], list[int]] = {}
        for m, (c, t) in enumerate(zip(context_idx, target_idx)):
            groups.setdefault((c.shape[1], t.shape[1]), []).append(m)
        return list(groups.values())

    @torch.no_grad()
    def _log_collapse_indicators(self, features: Tensor) -> None:
        """Every ``collapse_every_n_steps`` update steps: target feature std and effective rank, logged once.

        Written to the loggers directly at ``global_step``: ``self.log(on_step=True)`` on only some steps makes
        Lightning keep the last value and write it again at every later flush of the epoch, so TensorBoard showed
        each value twice (or more) and at the wrong steps. The guard keeps gradient accumulation's micro-batches of
        one update step from logging it more than once.
        """
        every = self.hparams.collapse_every_n_steps
        step = self.update_step
        if not every or step % every or self.hparams.target == "pixel" or self._collapse_logged_at == step:
            return
        self._collapse_logged_at = step
        flat = features.reshape(-1, features.shape[-1])
        metrics = {
            "train/target_std": float(feature_std(flat)),
            "train/target_effective_rank": float(effective_rank(flat)),
        }
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)

    # ----------------------------------------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW with the reference's four groups (docs/method.md §7): encoder / predictor weights with weight decay,
        then encoder / predictor biases and 1-D tensors without. Each group carries ``apply_wd`` for the schedule."""
        groups = {(part, decay): [] for decay in (True, False) for part in ("encoder", "predictor")}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            clean = _clean_name(name)
            part = "encoder" if clean.startswith("context_encoder.") else "predictor"  # predictor + pixel head
            groups[(part, clean not in self._no_decay)].append(param)
        first = self.schedule.at(1)
        param_groups = [
            {
                "params": params,
                "name": f"{part}{'' if decay else '_no_wd'}",
                "apply_wd": decay,
                "weight_decay": first.weight_decay if decay else 0.0,
            }
            for (part, decay), params in groups.items()
            if params
        ]
        fused = self.hparams.fused_adamw
        if fused is None:
            fused = True if self.device.type == "cuda" else None
        return torch.optim.AdamW(
            param_groups, lr=first.lr, betas=tuple(self.hparams.betas), eps=self.hparams.eps, fused=fused
        )

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """One optimizer update (after gradient accumulation), docs/method.md §7 order.

        The schedules are set first (the reference steps them before ``optimizer.step``, so update k uses the value at
        step k). ``optimizer.step(closure)`` then runs the last micro-batch's forward and backward, the callbacks'
        ``on_before_optimizer_step`` (``NonFiniteLossGuard`` may drop the update), gradient clipping and AdamW.
        ``update_step`` advances only if the update was applied, which this method reads off the parameters itself
        (:meth:`_update_applied`); the MoE and EMA callbacks act when it advances.
        """
        values = self.schedule.at(self.update_step + 1)
        for group in optimizer.param_groups:
            group["lr"] = values.lr
            group["weight_decay"] = values.weight_decay if group["apply_wd"] else 0.0
        optimizer.step(closure=optimizer_closure)
        if self._update_applied(optimizer):
            self.update_step += 1
            self.log_dict({"train/lr": values.lr, "train/wd": values.weight_decay}, on_step=True, on_epoch=False)

    @staticmethod
    def _update_applied(optimizer: Any) -> bool:
        """Whether the ``optimizer.step`` that just returned changed any parameter: some parameter has a gradient.

        Sound because of three facts. (1) Lightning zeroes gradients only inside the closure of the *first*
        micro-batch of the next accumulation window (after its forward, before its backward), so right after
        ``optimizer.step`` returns, the gradients AdamW consumed are still on the parameters. (2) ``torch.optim.AdamW``
        updates exactly the parameters whose ``grad`` is not None (weights, moments and step count). (3)
        ``NonFiniteLossGuard`` drops an update with ``zero_grad(set_to_none=True)``, and clipping never creates a
        gradient. So "no parameter has a gradient" is "AdamW changed nothing". The guard's decision is all-reduced, so
        all ranks agree; under FSDP (``use_orig_params``) a parameter outside a rank's shard has no gradient, but each
        rank holds a slice of every flat parameter larger than the world size, so an applied update leaves gradients
        on every rank. Not covered: an fp16 ``GradScaler`` that skips an overflowed step with a finite loss leaves the
        gradients in place, so that step counts as applied (the paper trains in bf16, which has no scaler).
        """
        return any(p.grad is not None for group in optimizer.param_groups for p in group["params"])

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Clip by global norm (``trainer.gradient_clip_val``, 1.0 in the paper) and log the pre-clip norm.

        A no-op without gradients: an update dropped by ``NonFiniteLossGuard`` has none (on every rank alike, the
        guard's decision is all-reduced), so nothing is clipped and no norm is logged.
        """
        if gradient_clip_algorithm not in (None, "norm"):
            raise ValueError(
                "Only gradient_clip_algorithm 'norm' is supported (docs/method.md §7); "
                f"got {gradient_clip_algorithm!r}."
            )
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return
        total_norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
        if isinstance(total_norm, DTensor):
            # FSDP2: the norm of DTensor gradient shards is a partial DTensor; full_tensor() all-reduces it.
            total_norm = total_norm.full_tensor()
        strategy = self.trainer.strategy
        if (
            isinstance(strategy, FSDPStrategy)
            and strategy.sharding_strategy.name != "NO_SHARD"
            and dist.is_initialized()
        ):
            # Every rank holds a disjoint gradient shard: the global norm is the root of the summed local squares.
            squared = total_norm.pow(2)
            dist.all_reduce(squared)
            total_norm = squared.sqrt()
        if gradient_clip_val:
            torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, total_norm)
        self.log("train/grad_norm", total_norm, on_step=True, on_epoch=False)

    def configure_callbacks(self) -> list[Callback]:
        """The pretraining callbacks, in the order their hooks must run (see ``callbacks/__init__.py``)."""
        # Lightning runs callback hooks in list order; this order IS the docs/method.md §7 per-step order:
        # guard (drops a non-finite update before clipping / AdamW) -> MoE bias update (after AdamW, from this step's
        # counts) -> EMA (after the bias update, so the target copies the new biases) -> figure (reads only).
        return [
            NonFiniteLossGuard(max_consecutive=self.hparams.max_nonfinite_in_a_row),
            MoELoadBalance(proportional=self.hparams.moe_proportional, clip=self.hparams.moe_bias_clip),
            EMATargetUpdate(),
            MaskFigureLogger(every_n_steps=self.hparams.mask_figure_every_n_steps),
        ]

    # ----------------------------------------------------------------------------------------------- model set-up
    def configure_model(self) -> None:
        """Sharding (FSDP or FSDP2: one unit per transformer block, then one per network), then ``torch.compile``.

        ``FSDPStrategy``: Lightning calls this inside FSDP's wrapping context, where ``wrap`` shards its argument; with
        any other strategy ``wrap`` returns the module unchanged. ``ModelParallelStrategy``: :meth:`_shard_fsdp2`.
        Either way context and target encoders are sharded identically, so their local shards line up and the EMA
        needs no communication, and every parameter ends up in a unit (the LightningModule root is not wrapped), so
        all gradients are reduced. ``compile`` (None: on CUDA only) then compiles each network in place.
        """
        if self._model_configured:
            return
        self._model_configured = True
        strategy = self._trainer_strategy()
        if isinstance(strategy, FSDPStrategy):
            if strategy.sharding_strategy.name not in ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"):
                raise ValueError(
                    f"JEPAPretrainModule supports FSDP sharding FULL_SHARD, SHARD_GRAD_OP or NO_SHARD, not "
                    f"{strategy.sharding_strategy.name}: its gradient-norm clipping assumes each gradient element "
                    "lives on exactly one rank (or on all). Set trainer.strategy.init_args.sharding_strategy."
                )
            if not strategy.kwargs.get("use_orig_params", False):
                raise ValueError(
                    "JEPAPretrainModule under FSDP needs use_orig_params: true (per-parameter weight-decay groups and "
                    "the EMA on parameter shards); set it in trainer.strategy.init_args "
                    "(experiments/trainer/fsdp.yaml)."
                )
            # Buffers stay in their own dtype: Lightning's bf16 FSDP config would round the MoE balance biases to
            # bf16, whose spacing (~5e-4 near 0.1) is coarser than one bias update (rate 1e-4).
            precision = strategy.mixed_precision_config
            overrides = (
                {} if precision is None else {"mixed_precision": dataclasses.replace(precision, buffer_dtype=None)}
            )
            for blocks in (self.context_encoder.blocks, self.target_encoder.blocks, self.predictor.predictor_blocks):
                for i in range(len(blocks)):
                    blocks[i] = wrap(blocks[i], **overrides)
            self.context_encoder = wrap(self.context_encoder, **overrides)
            self.target_encoder = wrap(self.target_encoder, **overrides)
            self.predictor = wrap(self.predictor, **overrides)
            if self.hparams.target == "pixel":
                self.pixel_head = wrap(self.pixel_head, **overrides)
        elif isinstance(strategy, ModelParallelStrategy):
            self._shard_fsdp2(strategy)
        if self._compile_enabled(strategy):
            # With the paper's masks every batch has the same shapes (fixed token counts, drop_last), so each network
            # compiles once per call signature (docs/method.md §2.5).
            for network in (self.context_encoder, self.target_encoder, self.predictor):
                network.compile()

    def _shard_fsdp2(self, strategy: ModelParallelStrategy) -> None:
        """FSDP2 (``fully_shard``) over the data-parallel mesh: every transformer block, then each network.

        The same plan for both encoders, so every parameter of the target is a DTensor with the placement of its
        context twin and the EMA runs on the local shards (``callbacks/ema.py``). No ``MixedPrecisionPolicy``:
        parameters are gathered in float32 and bf16 autocast does the compute, as under DDP, because the MoE router
        keeps its weight in float32 on purpose (``neurojepa_pl/models/moe.py``); buffers (MoE balance biases, RoPE
        tables) are never sharded or cast. ``reshard_after_forward=True`` is explicit on the networks: FSDP2 otherwise
        keeps a root's parameters gathered after a forward without backward, and the target encoder (forward only)
        would keep running on its pre-EMA weights.
        """
        mesh = strategy.device_mesh
        if mesh["tensor_parallel"].size() != 1:
            raise ValueError(
                f"JEPAPretrainModule shards data-parallel only (FSDP2); found tensor_parallel_size "
                f"{mesh['tensor_parallel'].size()}. Set trainer.strategy.init_args.tensor_parallel_size: 1 and "
                "data_parallel_size: the number of processes (experiments/trainer/fsdp2.yaml)."
            )
        data_parallel = mesh["data_parallel"]
        networks: list[nn.Module] = [self.context_encoder, self.target_encoder, self.predictor]
        for blocks in (self.context_encoder.blocks, self.target_encoder.blocks, self.predictor.predictor_blocks):
            for block in blocks:
                fully_shard(block, mesh=data_parallel)
        if self.hparams.target == "pixel":
            networks.append(self.pixel_head)
        for network in networks:
            fully_shard(network, mesh=data_parallel, reshard_after_forward=True)

    def _compile_enabled(self, strategy: Any) -> bool:
        """``compile`` as given; None (auto): True when the module will run on CUDA, so CPU runs stay eager."""
        if self.hparams.compile is not None:
            return bool(self.hparams.compile)
        device = strategy.root_device if strategy is not None else self.device
        return device.type == "cuda"

    def _trainer_strategy(self) -> Any:
        return self._trainer.strategy if self._trainer is not None else None

    def train(self, mode: bool = True) -> JEPAPretrainModule:
        """The target encoder stays in eval mode (it is only ever run under no_grad)."""
        super().train(mode)
        self.target_encoder.eval()
        return self

    # ----------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["update_step"] = self.update_step

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resume: restore the update counter, hence every schedule.

        The data stream (sample order, augmentation, mask step) is restored by Lightning from the data module's own
        ``state_dict`` (``PretrainDataModule``), before any loader is built.
        """
        if "update_step" not in checkpoint:
            raise KeyError(
                "Checkpoint has no 'update_step': it was not written by JEPAPretrainModule. To start from its weights "
                "instead of resuming, pass it as model.init_args.init_from and drop --ckpt_path."
            )
        self.update_step = int(checkpoint["update_step"])

    def setup(self, stage: str) -> None:
        """``init_from`` (a fit that does not resume): load its weights now, before any wrapping (docs/method.md §7.1).

        The source is our Lightning checkpoint or the reference's pretraining checkpoint
        (:class:`neurojepa_pl.modules.init_from.InitFrom`); its optimizer state is applied in :meth:`on_fit_start`.
        """
        if stage == "fit" and self.hparams.init_from and self.trainer.ckpt_path is None:
            self._init_from = InitFrom.read(self.hparams.init_from, self, self.hparams.init_from_mismatch)

    def on_fit_start(self) -> None:
        init = getattr(self, "_init_from", None)
        if init is None:
            return
        if init.restore is not None and isinstance(self.trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            raise NotImplementedError(
                "init_from restores the AdamW state only for single-device / DDP runs; under FSDP start the cool-down "
                "on DDP, or resume the phase-1 run with --ckpt_path and a cool-down schedule."
            )
        # The phase-1 AdamW moments carry over (docs/method.md §7: the cool-down loads the optimizer); lr and wd are
        # reset by the schedule at every update, and the step counter starts again at 0.
        if init.restore is not None:
            init.restore(self.trainer.optimizers[0], self)
        del self._init_from
