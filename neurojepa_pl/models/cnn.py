"""From-scratch CNN baseline of the paper's ref. [46] (Liu et al., Sci. Rep. 2022; Appendix H.1).

The paper describes it as "a wide 4-layer CNN with 32 million parameters" trained from scratch per task. We follow the
published design recipe of that work: a 1x1x1 stem, then dilated 3D convolutions (kernels 3, 5, 3, dilation 2),
InstanceNorm, ReLU and stride-2 max pooling after every convolution, channel widths ``(4, 32, 64, 64) x 8``
(expansion 8 = "wide"), a fully connected feature layer of 1024 units, and a two-layer linear classifier
(1024 -> 512 -> K).

It is split like the ViT backbones and their heads, so the downstream modules treat it as one more backbone
(``backbone: cnn``):

* :class:`CNNEncoder3D`, the backbone: convolutions, pooling and the feature layer; it returns the feature vector as
  a single token ``[B, 1, feat_dim]``, the ``[B, N, C]`` layout of the ViT backbones;
* :class:`CNNLinearHead`, the reference's classifier on the mean of those tokens (:meth:`CNNEncoder3D.linear_head`);
* :class:`SimpleCNN3D`, the two together as one standalone image -> outputs model.

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
from typing import Any

import torch
from torch import nn

from neurojepa_pl.models.heads import masked_mean

__all__ = ["CNNEncoder3D", "CNNLinearHead", "SimpleCNN3D"]


def _conv_stage(in_ch: int, out_ch: int, kernel: int, dilation: int) -> nn.Sequential:
    """Conv3d ("same" padding) -> InstanceNorm3d -> ReLU -> MaxPool3d(3, stride 2, "same" padding)."""
    padding = dilation * (kernel - 1) // 2
    return nn.Sequential(
        nn.Conv3d(in_ch, out_ch, kernel_size=kernel, padding=padding, dilation=dilation),
        nn.InstanceNorm3d(out_ch),
        nn.ReLU(inplace=True),
        nn.MaxPool3d(kernel_size=3, stride=2, padding=1),
    )


def _init_weights(module: nn.Module) -> None:
    """The reference's initialisation: xavier-normal weights, zero biases."""
    if isinstance(module, (nn.Conv3d, nn.Linear)):
        nn.init.xavier_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class CNNLinearHead(nn.Module):
    """The reference classifier: two stacked ``Linear`` layers (no non-linearity in between) on mean-pooled tokens.

    Args:
        feat_dim: token width C (the CNN's feature layer).
        num_outputs: number of outputs K.
        hidden_dim: width between the two layers.
    """

    def __init__(self, feat_dim: int, num_outputs: int, hidden_dim: int):
        super().__init__()
        self.classifier = nn.Sequential(nn.Linear(feat_dim, hidden_dim), nn.Linear(hidden_dim, num_outputs))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens ``[B, N, C]`` (+ optional bool ``key_mask`` ``[B, N]``) -> outputs ``[B, num_outputs]``."""
        return self.classifier(masked_mean(x, key_mask))


class CNNEncoder3D(nn.Module):
    """The wide 4-layer 3D CNN as a backbone: image ``[B, in_chans, D, H, W]`` -> one token ``[B, 1, feat_dim]``.

    Its layers keep PyTorch's default initialisation until :meth:`linear_head` builds the classifier: the reference
    initialises all layers together once the whole model exists, and drawing the random numbers in that order gives
    the reference's weights for a given seed.

    Args:
        in_chans: input channels.
        widths: channels of the four convolution stages (stem 1x1x1, then kernels 3, 5, 3 with dilation 2).
        feat_dim: width of the fully connected feature layer (= ``embed_dim``, the token width).
        hidden_dim: hidden width of the two-layer classifier :meth:`linear_head` builds (an option of the baseline
            as a whole, like the rest of ``backbone_kwargs``).
        pool_grid: output grid of the adaptive average pool feeding the feature layer.
    """

    KERNELS = (1, 3, 5, 3)
    DILATIONS = (1, 2, 2, 2)

    def __init__(
        self,
        in_chans: int = 1,
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
        self.embed_dim = int(feat_dim)
        self.hidden_dim = int(hidden_dim)
        self._initialised = False

    def linear_head(self, num_outputs: int) -> CNNLinearHead:
        """The reference classifier ``feat_dim -> hidden_dim -> num_outputs`` on these features.

        The first call also initialises this encoder, after the head's layers exist, as the reference does.
        """
        head = CNNLinearHead(self.embed_dim, num_outputs, self.hidden_dim)
        if not self._initialised:
            self.apply(_init_weights)
            self._initialised = True
        head.apply(_init_weights)
        return head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``[B, C_in, D, H, W]`` -> feature vector ``[B, feat_dim]``."""
        z = self.pool(self.features(x))
        return self.fc_features(z.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``[B, C_in, D, H, W]`` -> the feature vector as one token ``[B, 1, feat_dim]``."""
        return self.forward_features(x).unsqueeze(1)


class SimpleCNN3D(nn.Module):
    """The whole baseline as one model: image ``[B, in_chans, D, H, W]`` -> outputs ``[B, num_outputs]``.

    Args:
        in_chans: input channels.
        num_outputs: number of outputs K (2 logits for binary, L labels, 1 for regression / Cox).
        **kwargs: :class:`CNNEncoder3D` options (``widths``, ``feat_dim``, ``hidden_dim``, ``pool_grid``).
    """

    def __init__(self, in_chans: int = 1, num_outputs: int = 2, **kwargs: Any):
        super().__init__()
        self.encoder = CNNEncoder3D(in_chans=in_chans, **kwargs)
        self.head = self.encoder.linear_head(num_outputs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``[B, C_in, D, H, W]`` -> feature vector ``[B, feat_dim]``."""
        return self.encoder.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``[B, C_in, D, H, W]`` -> outputs ``[B, num_outputs]``."""
        return self.head(self.encoder(x))
