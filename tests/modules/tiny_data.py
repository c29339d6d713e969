"""A tiny in-memory LightningDataModule yielding FinetuneDataModule-shaped batches, for module tests."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

GRID = (16, 16, 16)


class _Scans(Dataset):
    def __init__(self, task: str, n: int, seed: int, num_labels: int = 3):
        g = torch.Generator().manual_seed(seed)
        self.images = 0.1 * torch.randn(n, 1, *GRID, generator=g)
        self.task = task
        self.items = []
        strength = torch.rand(n, generator=g)
        for i in range(n):
            item = {
                "subject_id": f"sub-{seed}-{i:03d}",
                "session_id": "ses-01",
                "modality": "T1w",
                "path": f"/synthetic/{seed}/{i}.nii.gz",
            }
            cls = i % 2 if task != "multiclass" else i % 3
            if task in ("binary", "multiclass"):
                item["label"] = torch.tensor(cls, dtype=torch.long)
                self.images[i, :, 2 + 4 * cls : 6 + 4 * cls, 4:12, 4:12] += 1.0
            elif task == "multilabel":
                labels = torch.tensor([(i >> b) & 1 for b in range(num_labels)], dtype=torch.float32)
                for b in range(num_labels):
                    if labels[b]:
                        self.images[i, :, 4 * b : 4 * b + 4, 2:8, 2:8] += 1.0
                item["label"] = labels
                item["label_mask"] = torch.tensor([True] * (num_labels - 1) + [i % 5 != 0])
            elif task == "regression":
                age = 20.0 + 60.0 * float(strength[i])
                self.images[i] += float(strength[i])
                item["label"] = torch.tensor(age, dtype=torch.float32)
            else:
                risk = float(strength[i])
                self.images[i] += risk
                time = torch.distributions.Exponential(torch.tensor(1.0 + 5 * risk)).sample() * 100 + 1
                item["time"] = time.float()
                item["event"] = torch.tensor(int(i % 4 != 0), dtype=torch.long)
            self.items.append(item)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"image": self.images[i], **self.items[i]}


class SplitLoaders(LightningDataModule):
    """Loaders over ``self.splits`` (``train`` shuffled with a fixed seed; ``test`` also serves predict)."""

    splits: dict[str, Dataset]
    batch_size: int

    def train_dataloader(self):
        return DataLoader(
            self.splits["train"], batch_size=self.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)
        )

    def val_dataloader(self):
        return DataLoader(self.splits["val"], batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(self.splits["test"], batch_size=self.batch_size)

    def predict_dataloader(self):
        return DataLoader(self.splits["test"], batch_size=self.batch_size)


class TinyFinetuneData(SplitLoaders):
    """Train/val/test splits of a synthetic task; exposes ``task``, ``num_classes`` and ``datasets['train'].records``
    like ``neurojepa_pl.data_modules.finetune.FinetuneDataModule``."""

    def __init__(
        self, task: str = "binary", n_train: int = 24, n_eval: int = 12, batch_size: int = 6, num_labels: int = 3
    ):
        super().__init__()
        self.task = task
        self.batch_size = batch_size
        self.splits = {
            "train": _Scans(task, n_train, 0, num_labels),
            "val": _Scans(task, n_eval, 1, num_labels),
            "test": _Scans(task, n_eval, 2, num_labels),
        }
        self.num_classes = {"binary": 2, "multiclass": 3, "multilabel": num_labels}.get(task, 1)
        self.label_columns = [f"finding{b}" for b in range(num_labels)] if task == "multilabel" else ["label"]
        self.datasets = {
            "train": SimpleNamespace(
                records=[{"label": float(it["label"])} for it in self.splits["train"].items]
                if task == "regression"
                else []
            )
        }
