"""From-scratch CNN baseline of the paper's ref. [46] (Liu et al., Sci. Rep. 2022; Appendix H.1).

The paper describes it as "a wide 4-layer CNN with 32 million parameters" trained from scratch per task. We follow the
published design recipe of that work: a 1x1x1 stem, then dilated 3D convolutions (kernels 3, 5, 3, dilation 2),
InstanceNorm, ReLU and stride-2 max pooling after every convolution, channel widths ``(4, 32, 64, 64) x 8``
(expansion 8 = "wide"), a fully connected feature layer of 1024 units, and a two-layer linear classifier
(1024 -> 512 -> K).

Deliberate differences, so one model serves every grid from the paper's 96x108x96 down to test-sized volumes:

* every convolution and pooling is "same"-padded, so spatial size only halves at each pool (the original used
  unpadded layers sized for its 182x218x182 ADNI crops and fails on small inputs);
* the feature layer reads an adaptive average pool of the last map onto a fixed ``pool_grid`` (default 2x4x2)
  instead of a flatten whose size depends on the input grid. The default grid is chosen so the parameter count
  matches the paper's ~32M.

Parameter count at the defaults (``widths=(32, 256, 512, 512)``, ``feat_dim=1024``, ``hidden_dim=512``,
``pool_grid=(2, 4, 2)``): **32,599,874** for 2 outputs (convolutions 23,684,416; feature layer 8,389,632;
classifier 525,826), i.e. 32,599,360 + 513 per extra output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["SimpleCNN3D"]


def _conv_stage(in_ch: int, out_ch: int, kernel: int, dilation: int) -> nn.Sequential:
    """Conv3d ("same" padding) -> InstanceNorm3d -> ReLU -> MaxPool3d(3, stride 2, "same" padding)."""
    padding = dilation * (kernel - 1) // 2
    return nn.Sequential(
        nn.Conv3d(in_ch, out_ch, kernel_size=kernel, padding=padding, dilation=dilation),
        nn.InstanceNorm3d(out_ch),
        nn.ReLU(inplace=True),
        nn.MaxPool3d(kernel_size=3, stride=2, padding=1),
    )


class SimpleCNN3D(nn.Module):
    """Wide 4-layer 3D CNN baseline: image ``[B, in_chans, D, H, W]`` -> outputs ``[B, num_outputs]``.

    It stands in for a backbone + head pair: ``forward`` returns task outputs, ``forward_features`` the pooled
    ``[B, feat_dim]`` representation (used for embeddings).

    Args:
        in_chans: input channels.
        num_outputs: number of outputs K (2 logits for binary, L labels, 1 for regression / Cox).
        widths: channels of the four convolution stages (stem 1x1x1, then kernels 3, 5, 3 with dilation 2).
        feat_dim: width of the fully connected feature layer.
        hidden_dim: hidden width of the two-layer linear classifier.
        pool_grid: output grid of the adaptive average pool feeding the feature layer.
    """

    KERNELS = (1, 3, 5, 3)
    DILATIONS = (1, 2, 2, 2)

    def __init__(
        self,
        in_chans: int = 1,
        num_outputs: int = 2,
        widths: Sequence[int] = (32, 256, 512, 512),
        feat_dim: int = 1024,
        hidden_dim: int = 512,
        pool_grid: Sequence[int] = (2, 4, 2),
    ):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) != 4:
            raise ValueError(f"widths must list the 4 convolution stages' channels; got {widths}.")
        if len(pool_grid) != 3:
            raise ValueError(f"pool_grid must be 3 sizes (D, H, W); got {tuple(pool_grid)}.")
        chans = (in_chans, *widths)
        self.features = nn.Sequential(
            *(_conv_stage(chans[i], chans[i + 1], self.KERNELS[i], self.DILATIONS[i]) for i in range(4))
        )
        self.pool = nn.AdaptiveAvgPool3d(tuple(int(g) for g in pool_grid))
        n_cells = int(pool_grid[0]) * int(pool_grid[1]) * int(pool_grid[2])
        self.fc_features = nn.Linear(widths[-1] * n_cells, feat_dim)
        # The reference classifier is two stacked Linear layers with no non-linearity in between.
        self.classifier = nn.Sequential(nn.Linear(feat_dim, hidden_dim), nn.Linear(hidden_dim, num_outputs))
        self.feat_dim = feat_dim
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Conv3d, nn.Linear)):
            nn.init.xavier_normal_(module.weight)
            nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``[B, C_in, D, H, W]`` -> feature vector ``[B, feat_dim]``."""
        z = self.pool(self.features(x))
        return self.fc_features(z.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``[B, C_in, D, H, W]`` -> outputs ``[B, num_outputs]``."""
        return self.classifier(self.forward_features(x))
