"""Collect per-batch predictions of an evaluation epoch and gather them from every rank.

Evaluation metrics (AUROC, C-index, bootstrap CIs) need all predictions at once, over ALL ranks: the reference
computed its time-to-event C-index per rank shard (docs/method.md §8.5 [BUG]). Distributed samplers pad the last
shard by repeating scans, so the gathered rows are de-duplicated by scan path (one manifest row per scan).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["PredictionStore"]


class PredictionStore:
    """Accumulates named arrays and metadata lists batch by batch (on CPU).

    Args:
        dedupe_key: metadata column whose repeated values mark padded duplicates (``None`` keeps every row).
    """

    def __init__(self, dedupe_key: str | None = "path"):
        self.dedupe_key = dedupe_key
        self.reset()

    def reset(self) -> None:
        """Forget everything collected."""
        self._arrays: dict[str, list[np.ndarray]] = {}
        self._meta: dict[str, list] = {}

    def __len__(self) -> int:
        first = next(iter(self._arrays.values()), [])
        return int(sum(len(a) for a in first))

    def add(
        self, arrays: Mapping[str, torch.Tensor | np.ndarray], metadata: Mapping[str, Sequence] | None = None
    ) -> None:
        """Append one batch.

        Args:
            arrays: name -> ``[B, ...]`` tensor or array (detached and moved to CPU here).
            metadata: name -> list of B values (strings, numbers).
        """
        sizes = set()
        for name, value in arrays.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().to("cpu", torch.float64 if value.is_floating_point() else value.dtype).numpy()
            value = np.asarray(value)
            sizes.add(value.shape[0])
            self._arrays.setdefault(name, []).append(value)
        for name, values in (metadata or {}).items():
            values = list(values)
            sizes.add(len(values))
            self._meta.setdefault(name, []).extend(values)
        if len(sizes) > 1:
            raise ValueError(
                f"batch entries have different lengths {sorted(sizes)}; every array and metadata list "
                "must have one entry per sample."
            )

    def _local(self) -> tuple[dict[str, np.ndarray], dict[str, list]]:
        arrays = {k: np.concatenate(v, axis=0) for k, v in self._arrays.items()}
        return arrays, {k: list(v) for k, v in self._meta.items()}

    def gather(self) -> tuple[dict[str, np.ndarray], dict[str, list]]:
        """Concatenate this rank's batches with every other rank's (rank order), then drop padded duplicates.

        Every rank must call this (it is a collective when a process group is initialised) and gets the same result.

        Returns:
            ``(arrays, metadata)`` over all ranks.
        """
        local = self._local()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            payloads: list = [None] * dist.get_world_size()
            dist.all_gather_object(payloads, local)
        else:
            payloads = [local]
        # A rank may have seen no batch at all: take names from every payload, in first-seen order.
        names = list(dict.fromkeys(k for p in payloads for k in p[0]))
        meta_names = list(dict.fromkeys(k for p in payloads for k in p[1]))
        arrays = {k: np.concatenate([p[0][k] for p in payloads if k in p[0]], axis=0) for k in names}
        metadata = {k: [v for p in payloads for v in p[1].get(k, [])] for k in meta_names}
        if self.dedupe_key is not None and self.dedupe_key in metadata:
            keys = metadata[self.dedupe_key]
            seen: set = set()
            keep = []
            for i, key in enumerate(keys):
                if key not in seen:
                    seen.add(key)
                    keep.append(i)
            if len(keep) < len(keys):
                idx = np.asarray(keep, dtype=np.int64)
                arrays = {k: v[idx] for k, v in arrays.items()}
                metadata = {k: [v[i] for i in keep] for k, v in metadata.items()}
        return arrays, metadata
