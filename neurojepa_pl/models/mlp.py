"""Two-layer GELU feed-forward (docs/method.md §2.3), used as the dense block MLP and as the MoE shared expert."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Mlp"]


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))`` with exact (erf) GELU and biases.

    Args:
        dim: input and output width C.
        hidden_dim: hidden width.
    """

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., C] -> [..., C]``."""
        return self.fc2(F.gelu(self.fc1(x)))
