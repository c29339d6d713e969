"""Multimodal fusion fine-tuning (docs/method.md §8.6; paper Appendix B.4): one shared backbone, one of five fusion
heads.

:class:`MultimodalModule` is a :class:`neurojepa_pl.modules.downstream.ClassificationModule` whose head is a fusion
head (:mod:`neurojepa_pl.models.fusion`) and whose batches come from
:class:`neurojepa_pl.data_modules.multimodal.MultimodalDataModule` (``images`` ``[B, M, 1, D, H, W]``, ``validity``
``[B, M]``). Of the base class's builders it overrides only
:meth:`~neurojepa_pl.modules.downstream.DownstreamModule.build_head`. Everything else is inherited: backbone
construction and loading, full / probe fine-tuning, the optimizer and its schedules, the MoE bias update, the
evaluation metrics gathered over ranks, ``val/selection``, and the test report (``metrics.json`` with bootstrap CIs,
``predictions.csv``, figures).

The backbone runs once per step on the valid scans of all modalities stacked along the batch; a missing modality's
placeholder volume is never encoded (whatever it holds, even NaN), its tokens are zeros, and the heads ignore them
by selection (:mod:`neurojepa_pl.models.fusion`), so neither the outputs nor any gradient depend on the placeholder.
PoE heads output log-probabilities and train with NLL; the other heads output logits and train with cross-entropy
(the softmax of either gives the class probabilities for the metrics).
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from neurojepa_pl.models.fusion import FUSION_HEADS, build_fusion_head
from neurojepa_pl.modules.downstream import CNN_BACKBONE, METADATA_KEYS, ClassificationModule

__all__ = ["MultimodalModule"]


class MultimodalModule(ClassificationModule):
    """Shared-backbone multimodal classifier with a fusion head.

    Args:
        fusion: ``avg`` (logit averaging), ``late`` (gated cross-attention), ``mil`` (classify-then-aggregate MIL),
            ``poe`` (product of experts) or ``poe_joint`` (PoE + joint head); the reference's ``vit_<name>``.
        fusion_kwargs: options of the fusion head (e.g. ``{gate: tanh}`` for ``late``, ``{head_heads: 16,
            head_depth: 1}`` for the PoE heads, ``{dropout: 0.5}`` for ``mil``).
        modalities: the modality slots, in the data module's order (checked at setup).
        task: ``binary`` (2 outputs) or ``multiclass``.
        num_classes: K.
        finetune: ``full`` (backbone and fusion head trained; the reference's mm setting) or ``probe`` (frozen
            backbone, trained fusion head).
        **kwargs: :class:`neurojepa_pl.modules.downstream.DownstreamModule` arguments (backbone, checkpoint,
            backbone_kwargs, lr, weight_decay, warmup_epochs, moe_bias_update_rate, n_bootstrap, output_dir, ...);
            not ``head``/``head_depth``/``head_heads``: the fusion head replaces the unimodal head. The backbone is a
            ViT: the CNN baseline (``backbone: cnn``) is unimodal.
    """

    UNIMODAL_HEAD_ARGS = ("head", "head_depth", "head_heads")

    def __init__(
        self,
        fusion: str = "avg",
        fusion_kwargs: dict | None = None,
        modalities: list[str] | None = None,
        task: str = "binary",
        num_classes: int = 2,
        finetune: str = "full",
        **kwargs: Any,
    ):
        if fusion.removeprefix("vit_") not in FUSION_HEADS:
            raise ValueError(f"fusion must be one of {sorted(FUSION_HEADS)}; got {fusion!r}.")
        if task not in ("binary", "multiclass"):
            raise ValueError(f"multimodal fusion is defined for binary and multiclass tasks; got {task!r}.")
        if finetune not in ("full", "probe"):
            raise ValueError(f"finetune must be 'full' or 'probe' (frozen backbone) for fusion; got {finetune!r}.")
        unimodal = [name for name in self.UNIMODAL_HEAD_ARGS if name in kwargs]
        if unimodal:
            raise TypeError(
                f"MultimodalModule takes no {unimodal}: the fusion head replaces the unimodal head; set fusion and "
                "fusion_kwargs."
            )
        if kwargs.get("backbone") == CNN_BACKBONE:
            raise ValueError("the fusion heads run on a ViT backbone; backbone: cnn is the unimodal CNN baseline.")
        modalities = list(modalities) if modalities is not None else ["T1w", "FLAIR"]
        # Plain attributes, set before the base __init__ because its call of build_head reads them.
        self.fusion = fusion.removeprefix("vit_")
        self.modalities = modalities
        # The base __init__ saves this call's arguments as the hyper-parameters, then calls build_head (below). Its
        # unimodal head options are unused here; naming them keeps them out of this class's CLI options, which
        # jsonargparse reads through **kwargs into the base signature ("attentive" passes the base's finetune check).
        super().__init__(
            task=task,
            num_classes=num_classes,
            finetune=finetune,
            head="attentive",
            head_depth=1,
            head_heads=1,
            **kwargs,
        )

    def build_head(self) -> nn.Module:
        """The fusion head over the modalities' tokens ``[B, M, N, C]`` (+ validity ``[B, M]``) -> ``[B, K]``."""
        return build_fusion_head(
            self.fusion,
            int(self.backbone.embed_dim),
            self.num_outputs,
            len(self.modalities),
            **(self.hparams["fusion_kwargs"] or {}),
        )

    # ------------------------------------------------------------------ model
    def encode_modalities(self, images: torch.Tensor, validity: torch.Tensor) -> torch.Tensor:
        """Backbone tokens of every modality, the backbone called once.

        Args:
            images: ``[B, M, 1, D, H, W]``.
            validity: ``[B, M]`` bool.

        Returns:
            ``[B, M, N, C]``; zeros for invalid modalities, whose placeholder volumes are not encoded at all (so their
            values, NaN included, cannot reach the backbone's outputs or its gradients).
        """
        b, m = validity.shape
        flat = images.flatten(0, 1)
        valid = validity.flatten().bool()
        if bool(valid.all()):
            tokens = self.encode(flat)
        else:
            encoded = self.encode(flat[valid])
            tokens = encoded.new_zeros(b * m, *encoded.shape[1:])
            tokens[valid] = encoded
        return tokens.unflatten(0, (b, m))

    def forward(self, images: torch.Tensor, validity: torch.Tensor) -> torch.Tensor:
        """``images`` ``[B, M, 1, D, H, W]``, ``validity`` ``[B, M]`` -> ``[B, K]`` logits, or log-probabilities for
        the PoE heads."""
        return self.head(self.encode_modalities(images, validity), validity.bool())

    def forward_with_embedding(self, images: torch.Tensor, validity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(outputs [B, K], embedding [B, C])``; the embedding averages the tokens of the valid modalities."""
        validity = validity.bool()
        tokens = self.encode_modalities(images, validity)
        # Selected, not weighted by the validity (the fusion heads' rule): invalid slots add exact zeros.
        pooled = tokens.mean(dim=2).masked_fill(~validity[:, :, None], 0.0)
        embedding = pooled.sum(dim=1) / validity.sum(dim=1, keepdim=True).to(pooled.dtype)
        return self.head(tokens, validity), embedding

    # ------------------------------------------------------------------ loss
    def compute_loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        target = batch["label"].long()
        if self.head.returns_log_probs:
            return F.nll_loss(outputs.float(), target)
        return F.cross_entropy(outputs.float(), target)

    # ------------------------------------------------------------------ steps (paired batches)
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(self(batch["images"], batch["validity"]), batch)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch["label"]))
        return loss

    def _eval_step(self, batch: dict, stage: str) -> None:
        outputs = self(batch["images"], batch["validity"])
        loss = self.compute_loss(outputs, batch)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(batch["label"]))
        metadata = {k: list(batch[k]) for k in METADATA_KEYS if k in batch}
        self._stores[stage].add(self.prediction_arrays(outputs, batch), metadata)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """``{"embedding": [B, C], "prediction": [B, K] probabilities, **metadata}`` on CPU."""
        outputs, embedding = self.forward_with_embedding(batch["images"], batch["validity"])
        result = {
            "embedding": embedding.detach().float().cpu(),
            "prediction": self.prediction_tensor(outputs).detach().float().cpu(),
        }
        result.update({k: list(batch[k]) for k in METADATA_KEYS if k in batch})
        return result

    # ------------------------------------------------------------------ checks and reports
    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        dm_modalities = getattr(datamodule, "modality_names", None)
        if dm_modalities is not None and list(dm_modalities) != self.modalities:
            raise ValueError(
                f"the model's modality slots are {self.modalities} but the data module serves "
                f"{list(dm_modalities)}; set the same list, in the same order, in model.init_args."
                "modalities and data.init_args.modalities."
            )

    def _write_test_report(self, arrays, metadata) -> dict:
        results = super()._write_test_report(arrays, metadata)
        # metrics.json also records which fusion and modalities produced it (read by `neurojepa mm-gain`); "head"
        # would otherwise name the base class's unused unimodal head option.
        path = self.resolve_output_dir() / "metrics.json"
        payload = json.loads(path.read_text())
        payload.update(head=f"fusion:{self.fusion}", fusion=self.fusion, modalities=self.modalities)
        path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
        return results
