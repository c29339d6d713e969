"""Frozen-backbone feature extraction from scan paths, through the evaluation loading chain.

Each path goes through the deterministic loading chain (:func:`neurojepa_pl.data.transforms.loading_transforms`: RAS,
percentile scaling, optional pad/crop and resampling, foreground crop, resize) and the evaluation transform
(:func:`neurojepa_pl.data.transforms.eval_transforms`: centre crop to ``spatial_size``), exactly as evaluation batches
are built, then through the backbone without gradients.

For whole manifests, :class:`EvalScans` + :func:`eval_loader` stream the same volumes batch by batch (memory does not
grow with the number of scans), with each volume's voxel -> world affine (:func:`load_eval_volume`), and report scans
that cannot be loaded instead of stopping.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, EnsureTyped
from torch import nn
from torch.utils.data import DataLoader, Dataset

from neurojepa_pl.data.transforms import (
    IMAGE_KEY,
    ScanRejected,
    TransformSettings,
    eval_transforms,
    loading_transforms,
)
from neurojepa_pl.masks.foreground import foreground_token_map
from neurojepa_pl.models.heads import masked_mean

__all__ = [
    "load_eval_volumes",
    "extract_tokens",
    "extract_features",
    "POOLINGS",
    "pool_tokens",
    "extract_pooled_features",
    "load_eval_volume",
    "EvalScans",
    "collate_eval_scans",
    "eval_loader",
]


def load_eval_volumes(paths: Sequence[str | Path], settings: TransformSettings | None = None) -> torch.Tensor:
    """Load scans as model inputs ``[n, 1, *spatial_size]`` float32 (CPU).

    Args:
        paths: NIfTI files.
        settings: loading-chain settings (default: the paper's, 96x108x96 inputs).
    """
    settings = settings or TransformSettings()
    load, crop = loading_transforms(settings), eval_transforms(settings)
    volumes = []
    for path in paths:
        path = str(path)
        if not Path(path).is_file():
            raise FileNotFoundError(f"scan {path} does not exist.")
        volumes.append(crop(load({IMAGE_KEY: path}))[IMAGE_KEY])
    if not volumes:
        raise ValueError("no scan paths given.")
    return torch.stack(volumes).float()


@torch.no_grad()
def _run_backbone(
    backbone: nn.Module,
    volumes: torch.Tensor,
    batch_size: int,
    device: torch.device | str | None,
    reduce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``reduce(tokens [b, N, C], volumes [b, 1, D, H, W])`` of every batch, concatenated on the CPU in float32."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    try:
        outputs = []
        for start in range(0, volumes.shape[0], batch_size):
            batch = volumes[start : start + batch_size].to(device)
            outputs.append(reduce(backbone(batch), batch).float().cpu())
    finally:
        backbone.train(was_training)
    return torch.cat(outputs, dim=0)


def extract_tokens(
    backbone: nn.Module, volumes: torch.Tensor, batch_size: int = 4, device: torch.device | str | None = None
) -> torch.Tensor:
    """Backbone tokens ``[n, N, C]`` (CPU float32) of already-loaded volumes ``[n, 1, D, H, W]``.

    The backbone runs in eval mode without gradients and is returned to its previous mode.
    """
    return _run_backbone(backbone, volumes, batch_size, device, lambda tokens, _: tokens)


def extract_features(
    backbone: nn.Module,
    paths: Sequence[str | Path],
    settings: TransformSettings | None = None,
    batch_size: int = 4,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Mean-pooled backbone features of scans.

    Args:
        backbone: an encoder mapping ``[B, 1, D, H, W]`` to tokens ``[B, N, C]`` (e.g. from ``load_backbone``).
        paths: NIfTI files.
        settings: loading-chain settings; ``spatial_size`` must match the backbone's ``img_size``.
        batch_size: scans per forward.
        device: where to run (default: the backbone's device).

    Returns:
        float32 array ``[n, C]`` in the order of ``paths``.
    """
    volumes = load_eval_volumes(paths, settings)
    return _run_backbone(backbone, volumes, batch_size, device, lambda tokens, _: tokens.mean(dim=1)).numpy()


POOLINGS: tuple[str, ...] = ("mean", "fg_mean")
"""Fixed (untrained) token poolings of :func:`pool_tokens`.

``mean`` is what the downstream linear head (``LinearProbe``, ``finetune: frozen``) and the multimodal ``vit_avg``
path pool with (docs/method.md §8.2); the attentive probe's pooling is a trained head, so it has no fixed
counterpart. ``fg_mean`` averages the foreground tokens only, by the token foreground map the JEPA loss weights with
(docs/method.md §6.1), so that background tokens do not dilute the brain's.
"""


def pool_tokens(
    tokens: torch.Tensor, volumes: torch.Tensor, pooling: str, patch_size: int | Sequence[int]
) -> torch.Tensor:
    """Pool tokens ``[B, N, C]`` of volumes ``[B, 1, D, H, W]`` into ``[B, C]`` by one of :data:`POOLINGS`.

    Args:
        tokens: encoder output ``[B, N, C]``.
        volumes: the encoder's input ``[B, 1, D, H, W]`` (``fg_mean`` reads the foreground from it).
        pooling: ``"mean"`` or ``"fg_mean"``.
        patch_size: the encoder's patch edge (``fg_mean``'s token grid).

    Raises:
        ValueError: for an unknown pooling, or a volume without foreground token under ``fg_mean``.
    """
    if pooling == "mean":
        return tokens.mean(dim=1)
    if pooling == "fg_mean":
        foreground = foreground_token_map(volumes, patch_size).to(tokens.device)  # [B, N]
        if foreground.shape != tokens.shape[:2]:
            raise ValueError(
                f"foreground map {tuple(foreground.shape)} does not match the tokens {tuple(tokens.shape[:2])}; "
                "pass the encoder's patch_size."
            )
        empty = (~foreground.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"volumes {empty} of the batch have no foreground token; fg_mean is undefined for them.")
        return masked_mean(tokens, foreground)
    raise ValueError(f"pooling must be one of {POOLINGS}; got {pooling!r}.")


def extract_pooled_features(
    backbone: nn.Module,
    volumes: torch.Tensor,
    poolings: Sequence[str] = ("mean",),
    batch_size: int = 4,
    device: torch.device | str | None = None,
) -> dict[str, np.ndarray]:
    """Several poolings of the backbone's tokens from one forward per batch (eval mode, no gradients).

    Args:
        backbone: an encoder ``[B, 1, D, H, W] -> [B, N, C]`` with ``config["patch_size"]`` (``VisionTransformer3D``).
        volumes: loaded volumes ``[n, 1, D, H, W]`` (:func:`load_eval_volumes`).
        poolings: names from :data:`POOLINGS`.
        batch_size: volumes per forward.
        device: where to run (default: the backbone's device).

    Returns:
        ``{pooling: float32 [n, C]}`` in the order of ``volumes``.
    """
    poolings = list(poolings)
    unknown = [p for p in poolings if p not in POOLINGS]
    if unknown or not poolings:
        raise ValueError(f"poolings must be a non-empty subset of {POOLINGS}; got {poolings}.")
    patch_size = backbone.config["patch_size"]

    def reduce(tokens: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return torch.stack([pool_tokens(tokens, batch, p, patch_size) for p in poolings], dim=1)  # [b, P, C]

    pooled = _run_backbone(backbone, volumes, batch_size, device, reduce).numpy()
    return {p: np.ascontiguousarray(pooled[:, i]) for i, p in enumerate(poolings)}


# ----------------------------------------------------------------------------------------------------------------------
# Streaming, with the voxel -> world affine of every model input
# ----------------------------------------------------------------------------------------------------------------------
def _with_metadata(chain: Compose) -> Compose:
    """``chain`` without its final plain-tensor conversions, so that MONAI's MetaTensor keeps the affine.

    The loading and evaluation chains end with ``EnsureTyped(track_meta=False)``, which only drops the metadata (the
    data are already float32); every geometric step before it (reorientation, pad/crop, spacing, foreground crop,
    resize, centre crop) updates the MetaTensor's affine, so what remains is the voxel -> world map of the model input.
    """
    return Compose([t for t in chain.transforms if not isinstance(t, EnsureTyped)])


def load_eval_volume(path: str | Path, settings: TransformSettings | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """One scan as a model input, with its voxel -> world affine.

    The values are exactly those of :func:`load_eval_volumes` (same chain); the affine maps model-input voxel indices
    to the scan's world coordinates (RAS millimetres, the scan's NIfTI space; MNI152 for registered scans), following
    the per-scan foreground crop and the resize of docs/method.md §1.2 and the centre crop of §1.5.

    Args:
        path: NIfTI file.
        settings: loading-chain settings (default: the paper's).

    Returns:
        ``(volume [1, *spatial_size] float32, affine [4, 4] float64)``.
    """
    settings = settings or TransformSettings()
    path = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"scan {path} does not exist.")
    load, crop = _with_metadata(loading_transforms(settings)), _with_metadata(eval_transforms(settings))
    image = crop(load({IMAGE_KEY: path}))[IMAGE_KEY]
    affine = np.asarray(image.affine, dtype=np.float64)
    return image.as_tensor().float().contiguous(), affine


def _failure_reason(exc: BaseException) -> str:
    # Same rule as the data modules' quarantine (neurojepa_pl.data_modules.datasets.failure_reason), which library code
    # may not import: MONAI wraps transform errors, the innermost cause is the useful part.
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    return root.reason if isinstance(root, ScanRejected) else f"{type(root).__name__}: {root}"


class EvalScans(Dataset):
    """Scans through the evaluation loading chain, one item per path, for streaming over a manifest.

    Items are ``{"index": i, "image": [1, *spatial_size] float32, "affine": [4, 4] float64}``, or
    ``{"index": i, "failure": reason}`` for a scan that cannot be loaded (missing, unreadable, non-finite, not 3-D,
    blank): the caller decides how many failures it tolerates, and nothing is ever replaced by a zero volume.

    Args:
        paths: NIfTI files.
        settings: loading-chain settings (default: the paper's).
    """

    def __init__(self, paths: Sequence[str | Path], settings: TransformSettings | None = None) -> None:
        self.paths = [str(p) for p in paths]
        self.settings = settings or TransformSettings()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            image, affine = load_eval_volume(self.paths[index], self.settings)
        except FileNotFoundError as err:
            return {"index": index, "failure": str(err)}
        except Exception as err:  # noqa: BLE001 - every failure is reported with its path by the caller
            return {"index": index, "failure": _failure_reason(err)}
        return {"index": index, "image": image, "affine": torch.from_numpy(affine)}


def collate_eval_scans(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack the loaded items of :class:`EvalScans` and set the failed ones aside.

    Returns:
        ``{"index": [B] int64, "image": [B, 1, D, H, W] | None, "affine": [B, 4, 4] float64 | None,
        "failures": [(index, reason), ...]}`` with B the loaded items of the batch (possibly 0).
    """
    loaded = [item for item in items if "failure" not in item]
    failures = [(int(item["index"]), str(item["failure"])) for item in items if "failure" in item]
    return {
        "index": torch.tensor([int(item["index"]) for item in loaded], dtype=torch.int64),
        "image": torch.stack([item["image"] for item in loaded]) if loaded else None,
        "affine": torch.stack([item["affine"] for item in loaded]) if loaded else None,
        "failures": failures,
    }


def eval_loader(
    paths: Sequence[str | Path],
    settings: TransformSettings | None = None,
    batch_size: int = 4,
    num_workers: int = 0,
) -> DataLoader:
    """Batches of :func:`collate_eval_scans` over ``paths`` in order (see :class:`EvalScans`).

    Args:
        paths: NIfTI files.
        settings: loading-chain settings.
        batch_size: scans per batch.
        num_workers: DataLoader worker processes running the loading chain.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    return DataLoader(
        EvalScans(paths, settings),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_eval_scans,
    )
