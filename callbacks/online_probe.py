"""Attentive probing of the frozen target encoder during pretraining (the reference's monitor, docs/method.md §8.7).

Every ``every_n_epochs`` training epochs, on global rank 0:

1. the scans of a small labelled manifest (``split`` = train / val, optionally test) are loaded once through the
   evaluation chain and kept in memory;
2. the target encoder (``pl_module.target_encoder``, the only module surface used) encodes them in eval mode without
   gradients, so training state (mode, MoE counts, RNG) is untouched;
3. one attentive head (1 logit, docs/method.md §8.7: depth 4, 16 heads) per label column is trained on the frozen
   train tokens with BCE over observed labels, AdamW, a fixed number of epochs;
4. per label the head of the epoch with the best val AUROC is kept (the reference's "best head per class"); its val
   AUROC, and its test AUROC when the manifest has a test split, are logged as ``probe/val_auroc/<label>``,
   ``probe/test_auroc/<label>`` plus the macro means ``probe/val_auroc_macro`` / ``probe/test_auroc_macro``.

With ``probe="linear"`` steps 3-4 are replaced by the cheap probe of ``neurojepa learning-curve``
(:func:`neurojepa_pl.metrics.probes.fit_linear_probe`): per label, standardisation + logistic regression on the
pooled train features (``linear_pooling``, :data:`neurojepa_pl.features.POOLINGS`), its L2 strength chosen by a
subject-grouped inner CV on the train rows, scored on val and test; the logged names are the same. It costs
milliseconds instead of probe epochs, so it can run every epoch and draws the learning curve during pretraining.

Other ranks wait at a barrier. The probe's randomness (head init, batch order) comes from ``seed`` and the epoch and
never touches the global RNG. Sharded encoders (FSDP) cannot run on one rank; the callback refuses them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer

from neurojepa_pl.data import load_manifest
from neurojepa_pl.data.transforms import TransformSettings
from neurojepa_pl.features import POOLINGS, extract_pooled_features, extract_tokens, load_eval_volumes
from neurojepa_pl.metrics.classification import classification_metrics
from neurojepa_pl.metrics.probes import fit_linear_probe, probe_metric, probe_scores
from neurojepa_pl.models.heads import AttentiveClassifier

log = logging.getLogger(__name__)

__all__ = ["OnlineProbeMonitor"]


class OnlineProbeMonitor(Callback):
    """Periodic attentive probes on frozen target-encoder features of a small labelled manifest.

    Args:
        manifest: per-scan manifest with ``path``, ``split`` (train/val[/test]) and the label columns.
        label_columns: binary label columns (0/1, empty = missing).
        every_n_epochs: probe after every n-th training epoch.
        modality: keep only rows of this modality (``None``: all rows).
        probe_epochs: training epochs of each probe.
        probe_lr: AdamW learning rate (docs/method.md §8.7: 1e-4).
        probe_weight_decay: AdamW weight decay (docs/method.md §8.7: 0.04).
        probe_depth: attentive head depth (docs/method.md §8.7: 4).
        probe_heads: attentive head attention heads (docs/method.md §8.7: 16).
        batch_size: probe training batch size and encoder batch size.
        spatial_size / resize_to / pad_crop_size / target_spacing: loading-chain settings; ``None`` takes all of
            them from the training data module's ``settings`` (so the probe sees the encoder's input size).
        seed: seed of head init and batch order (combined with the epoch).
        probe: ``"attentive"`` (the reference's monitor, default) or ``"linear"`` (see the module docstring; the
            ``probe_*`` settings of the attentive heads are then unused).
        linear_pooling: token pooling of the linear probe (``"mean"`` or ``"fg_mean"``).
        linear_inner_folds: subject-grouped inner CV folds choosing the linear probe's L2 strength.
    """

    def __init__(
        self,
        manifest: str,
        label_columns: list[str],
        every_n_epochs: int = 10,
        modality: str | None = None,
        probe_epochs: int = 10,
        probe_lr: float = 1e-4,
        probe_weight_decay: float = 0.04,
        probe_depth: int = 4,
        probe_heads: int = 16,
        batch_size: int = 16,
        spatial_size: list[int] | None = None,
        resize_to: list[int] | None = None,
        pad_crop_size: list[int] | None = None,
        target_spacing: list[float] | None = None,
        seed: int = 0,
        probe: str = "attentive",
        linear_pooling: str = "mean",
        linear_inner_folds: int = 3,
    ):
        if not label_columns:
            raise ValueError("OnlineProbeMonitor needs at least one label column.")
        if probe not in ("attentive", "linear"):
            raise ValueError(f"probe must be 'attentive' or 'linear'; got {probe!r}.")
        if linear_pooling not in POOLINGS:
            raise ValueError(f"linear_pooling must be one of {POOLINGS}; got {linear_pooling!r}.")
        if linear_inner_folds < 2:
            raise ValueError(f"linear_inner_folds must be >= 2; got {linear_inner_folds}.")
        self.probe = probe
        self.linear_pooling = linear_pooling
        self.linear_inner_folds = int(linear_inner_folds)
        if every_n_epochs < 1 or probe_epochs < 1 or batch_size < 1:
            raise ValueError("every_n_epochs, probe_epochs and batch_size must be >= 1.")
        self.manifest = manifest
        self.label_columns = list(label_columns)
        self.every_n_epochs = int(every_n_epochs)
        self.modality = modality
        self.probe_epochs = int(probe_epochs)
        self.probe_lr = float(probe_lr)
        self.probe_weight_decay = float(probe_weight_decay)
        self.probe_depth = int(probe_depth)
        self.probe_heads = int(probe_heads)
        self.batch_size = int(batch_size)
        given = {
            "spatial_size": spatial_size,
            "resize_to": resize_to,
            "pad_crop_size": pad_crop_size,
            "target_spacing": target_spacing,
        }
        self._explicit_settings = given if spatial_size is not None else None
        if spatial_size is None and any(v is not None for v in given.values()):
            raise ValueError(
                "give spatial_size together with the other loading settings, or none of them (then the "
                "data module's settings are used)."
            )
        self.seed = int(seed)
        self._volumes: dict[str, torch.Tensor] | None = None
        self._labels: dict[str, np.ndarray] | None = None
        self._subjects: dict[str, np.ndarray] = {}
        self.last_results: dict[str, float] = {}

    # ------------------------------------------------------------------ data
    def _settings(self, trainer: Trainer) -> TransformSettings:
        if self._explicit_settings is not None:
            return TransformSettings(**{k: v for k, v in self._explicit_settings.items()})
        settings = getattr(getattr(trainer, "datamodule", None), "settings", None)
        if not isinstance(settings, TransformSettings):
            raise ValueError(
                "OnlineProbeMonitor: the data module has no TransformSettings `settings`; pass "
                "spatial_size, resize_to, pad_crop_size and target_spacing to the callback."
            )
        return settings

    def _load(self, trainer: Trainer) -> None:
        df = load_manifest(self.manifest)
        # The linear probe's inner CV groups the train rows by subject.
        required = ("path", "split", *(("subject_id",) if self.probe == "linear" else ()), *self.label_columns)
        missing = [c for c in required if c not in df.columns]
        if missing:
            raise ValueError(f"{self.manifest}: OnlineProbeMonitor needs columns {missing}; found {list(df.columns)}.")
        if self.modality is not None:
            df = df[df["modality"] == self.modality]
        settings = self._settings(trainer)
        self._volumes, self._labels = {}, {}
        for split in ("train", "val", "test"):
            rows = df[df["split"] == split]
            if rows.empty:
                if split != "test":
                    raise ValueError(
                        f"{self.manifest} has no {split!r} rows (after the modality filter); the probe "
                        "needs train and val rows."
                    )
                continue
            self._volumes[split] = load_eval_volumes(rows["path"].tolist(), settings)
            labels = rows[self.label_columns].apply(lambda c: c.astype(float)).to_numpy(dtype=np.float64)
            self._labels[split] = labels
            if "subject_id" in rows.columns:
                self._subjects[split] = rows["subject_id"].to_numpy()
        log.info(
            "online probe: %s scans loaded from %s",
            {k: int(v.shape[0]) for k, v in self._volumes.items()},
            self.manifest,
        )

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if "fsdp" in type(trainer.strategy).__name__.lower():
            raise ValueError(
                "OnlineProbeMonitor runs the target encoder on rank 0 alone, which a sharded (FSDP) "
                "encoder cannot do; remove the callback or use DDP."
            )
        if not hasattr(pl_module, "target_encoder"):
            raise AttributeError("OnlineProbeMonitor needs pl_module.target_encoder (a pretraining module).")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        if (epoch + 1) % self.every_n_epochs or trainer.sanity_checking:
            return
        if trainer.is_global_zero:
            results = self.run_probe(trainer, pl_module.target_encoder, pl_module.device, epoch)
            for name, value in results.items():
                pl_module.log(name, value, rank_zero_only=True, on_step=False, on_epoch=True)
        trainer.strategy.barrier("online_probe")

    # ------------------------------------------------------------------ probing
    def run_probe(
        self, trainer: Trainer, encoder: torch.nn.Module, device: torch.device, epoch: int
    ) -> dict[str, float]:
        """Encode the probe scans with ``encoder`` and train/evaluate the probes; returns the logged values."""
        if self._volumes is None:
            self._load(trainer)
        if self.probe == "linear":
            return self._run_linear_probe(encoder, device, epoch)
        tokens = {
            split: extract_tokens(encoder, vols, self.batch_size, device) for split, vols in self._volumes.items()
        }
        embed_dim = tokens["train"].shape[-1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + epoch)
            heads = torch.nn.ModuleList(
                AttentiveClassifier(embed_dim, 1, depth=self.probe_depth, num_heads=self.probe_heads)
                for _ in self.label_columns
            ).to(device)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        optimizer = torch.optim.AdamW(heads.parameters(), lr=self.probe_lr, weight_decay=self.probe_weight_decay)
        train_x = tokens["train"]
        train_y = torch.tensor(self._labels["train"], dtype=torch.float32)
        best_val = [-math.inf] * len(self.label_columns)
        best_state: list[dict | None] = [None] * len(self.label_columns)
        with torch.enable_grad():
            for _ in range(self.probe_epochs):
                heads.train()
                order = torch.randperm(train_x.shape[0], generator=generator)
                for start in range(0, order.numel(), self.batch_size):
                    idx = order[start : start + self.batch_size]
                    x = train_x[idx].to(device)
                    y = train_y[idx].to(device)
                    observed = ~torch.isnan(y)
                    logits = torch.cat([head(x) for head in heads], dim=1)  # [b, L]
                    losses = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(y), reduction="none")
                    per_label = (losses * observed).sum(0) / observed.sum(0).clamp_min(1)
                    optimizer.zero_grad(set_to_none=True)
                    per_label.sum().backward()
                    optimizer.step()
                val_auroc = self._auroc(heads, tokens["val"], self._labels["val"], device)
                for j, value in enumerate(val_auroc):
                    if math.isfinite(value) and value > best_val[j]:
                        best_val[j] = value
                        best_state[j] = {k: v.detach().clone() for k, v in heads[j].state_dict().items()}
        results: dict[str, float] = {}
        for j, name in enumerate(self.label_columns):
            results[f"probe/val_auroc/{name}"] = best_val[j] if math.isfinite(best_val[j]) else float("nan")
            if best_state[j] is not None:
                heads[j].load_state_dict(best_state[j])
        results["probe/val_auroc_macro"] = _nanmean([results[f"probe/val_auroc/{n}"] for n in self.label_columns])
        if "test" in tokens:
            test_auroc = self._auroc(heads, tokens["test"], self._labels["test"], device)
            for name, value in zip(self.label_columns, test_auroc):
                results[f"probe/test_auroc/{name}"] = value
            results["probe/test_auroc_macro"] = _nanmean(test_auroc)
        self.last_results = results
        return results

    def _run_linear_probe(self, encoder: torch.nn.Module, device: torch.device, epoch: int) -> dict[str, float]:
        """``probe="linear"``: one logistic probe per label on pooled train features, scored on val (and test)."""
        assert self._volumes is not None and self._labels is not None
        features = {
            split: extract_pooled_features(encoder, vols, [self.linear_pooling], self.batch_size, device)[
                self.linear_pooling
            ]
            for split, vols in self._volumes.items()
        }
        results: dict[str, float] = {}
        for j, name in enumerate(self.label_columns):
            y = self._labels["train"][:, j]
            seen = ~np.isnan(y)
            try:
                probe = fit_linear_probe(
                    features["train"][seen],
                    y[seen].astype(np.int64),
                    self._subjects["train"][seen],
                    "binary",
                    self.linear_inner_folds,
                    self.seed * 1_000_003 + epoch,
                )
            except ValueError as err:  # e.g. a class in too few train subjects for the inner CV
                log.warning("online linear probe of %r not fitted at epoch %d: %s", name, epoch, err)
                probe = None
            for split in ("val", "test"):
                if split not in features:
                    continue
                target = self._labels[split][:, j]
                seen_split = ~np.isnan(target)
                value = float("nan")
                if probe is not None and seen_split.any():
                    scores = probe_scores(probe, features[split][seen_split], "binary")
                    value = probe_metric("binary", target[seen_split].astype(np.int64), scores)
                results[f"probe/{split}_auroc/{name}"] = value
        results["probe/val_auroc_macro"] = _nanmean([results[f"probe/val_auroc/{n}"] for n in self.label_columns])
        if "test" in features:
            results["probe/test_auroc_macro"] = _nanmean([results[f"probe/test_auroc/{n}"] for n in self.label_columns])
        self.last_results = results
        return results

    @torch.no_grad()
    def _auroc(
        self, heads: torch.nn.ModuleList, x: torch.Tensor, labels: np.ndarray, device: torch.device
    ) -> list[float]:
        heads.eval()
        scores = []
        for start in range(0, x.shape[0], self.batch_size):
            batch = x[start : start + self.batch_size].to(device)
            scores.append(torch.sigmoid(torch.cat([head(batch) for head in heads], dim=1)).cpu())
        probs = torch.cat(scores).numpy()
        metrics = classification_metrics(
            "multilabel", np.nan_to_num(labels).astype(int), probs, label_mask=~np.isnan(labels)
        )
        return [metrics[f"auroc/{j}"] for j in range(labels.shape[1])]


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")
