"""Worker functions for 2-process gloo tests; kept in a light module so spawned children import little."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from neurojepa_pl.metrics.prediction_store import PredictionStore


def store_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        store = PredictionStore()
        # 5 scans sharded over 2 ranks with padding: rank 0 gets 0, 2, 4; rank 1 gets 1, 3 and 0 again (padding).
        mine = [0, 2, 4] if rank == 0 else [1, 3, 0]
        store.add({"risk": torch.tensor([float(i) for i in mine])}, {"path": [f"scan{i}" for i in mine]})
        arrays, meta = store.gather()
        torch.save({"risk": arrays["risk"], "path": meta["path"]}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()
