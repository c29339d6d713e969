"""The from-scratch CNN baseline: parameter count, shapes on paper and tiny grids, that it learns, and that the
backbone + linear head split reproduces the single-model baseline it replaced, weight for weight, at a given seed."""

import torch
from torch import nn

from neurojepa_pl.models.cnn import CNNEncoder3D, CNNLinearHead, SimpleCNN3D

SMALL = dict(widths=(2, 4, 8, 8), feat_dim=16, hidden_dim=8)


class _ReferenceCNN(nn.Module):
    """The baseline as one module, copied from the code before the backbone / head split (``head="cnn"``)."""

    def __init__(self, num_outputs, widths, feat_dim, hidden_dim, pool_grid=(2, 4, 2)):
        super().__init__()
        chans = (1, *widths)
        stages = []
        for i, (kernel, dilation) in enumerate(zip((1, 3, 5, 3), (1, 2, 2, 2))):
            stages.append(
                nn.Sequential(
                    nn.Conv3d(chans[i], chans[i + 1], kernel, padding=dilation * (kernel - 1) // 2, dilation=dilation),
                    nn.InstanceNorm3d(chans[i + 1]),
                    nn.ReLU(inplace=True),
                    nn.MaxPool3d(kernel_size=3, stride=2, padding=1),
                )
            )
        self.features = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool3d(pool_grid)
        self.fc_features = nn.Linear(widths[-1] * pool_grid[0] * pool_grid[1] * pool_grid[2], feat_dim)
        self.classifier = nn.Sequential(nn.Linear(feat_dim, hidden_dim), nn.Linear(hidden_dim, num_outputs))
        for module in self.modules():
            if isinstance(module, (nn.Conv3d, nn.Linear)):
                nn.init.xavier_normal_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_features(self, x):
        return self.fc_features(self.pool(self.features(x)).flatten(1))

    def forward(self, x):
        return self.classifier(self.forward_features(x))


def test_default_parameter_count_is_about_32m():
    model = SimpleCNN3D(num_outputs=2)
    n = sum(p.numel() for p in model.parameters())
    assert n == 32_599_874  # as stated in the module docstring
    assert sum(p.numel() for p in SimpleCNN3D(num_outputs=3).parameters()) == n + 513
    # Convolutions alone: 1x1x1 stem 1->32, 3^3 32->256, 5^3 256->512, 3^3 512->512 (with biases).
    conv = 1 * 32 + 32 + 27 * 32 * 256 + 256 + 125 * 256 * 512 + 512 + 27 * 512 * 512 + 512
    assert sum(p.numel() for p in model.encoder.features.parameters()) == conv
    assert sum(p.numel() for p in model.head.parameters()) == 525_826


def test_shapes_on_small_and_odd_grids():
    encoder = CNNEncoder3D(**SMALL)
    head = encoder.linear_head(3)
    assert isinstance(head, CNNLinearHead) and encoder.embed_dim == 16
    for grid in [(32, 36, 32), (16, 16, 16), (33, 20, 17)]:
        x = torch.randn(2, 1, *grid)
        tokens = encoder(x)
        assert tokens.shape == (2, 1, 16)  # one feature token, the [B, N, C] layout of the ViT backbones
        assert torch.equal(tokens[:, 0], encoder.forward_features(x))
        assert head(tokens).shape == (2, 3)


def test_split_reproduces_the_single_model_baseline_at_a_seed():
    x = torch.randn(3, 1, 20, 18, 16, generator=torch.Generator().manual_seed(1))
    for num_outputs in (1, 2, 4):
        torch.manual_seed(7)
        reference = _ReferenceCNN(num_outputs, **SMALL)
        torch.manual_seed(7)
        model = SimpleCNN3D(num_outputs=num_outputs, **SMALL)
        ref_params = list(reference.parameters())
        new_params = list(model.parameters())
        assert [p.shape for p in new_params] == [p.shape for p in ref_params]
        for new, ref in zip(new_params, ref_params):
            assert torch.equal(new, ref)
        after_model = torch.rand(4)  # the random stream is left where the reference leaves it
        assert torch.equal(model(x), reference(x))
        assert torch.equal(model.forward_features(x), reference.forward_features(x))
        torch.manual_seed(7)
        _ReferenceCNN(num_outputs, **SMALL)
        assert torch.equal(after_model, torch.rand(4))


def test_linear_head_initialises_the_encoder_once():
    torch.manual_seed(0)
    encoder = CNNEncoder3D(**SMALL)
    assert torch.count_nonzero(encoder.fc_features.bias) == 16  # PyTorch's default init until the head exists
    head = encoder.linear_head(2)
    assert torch.count_nonzero(encoder.fc_features.bias) == 0  # the reference's: zero biases
    assert torch.count_nonzero(head.classifier[0].bias) == 0
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    encoder.linear_head(5)  # a second head leaves the encoder's weights alone
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, before[key])


def test_tiny_cnn_learns_a_bright_blob():
    g = torch.Generator().manual_seed(0)
    x = 0.1 * torch.randn(16, 1, 16, 16, 16, generator=g)
    y = torch.arange(16) % 2
    x[y == 1, :, 4:10, 4:10, 4:10] += 1.0
    torch.manual_seed(0)
    model = SimpleCNN3D(num_outputs=2, **SMALL)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    assert (model(x).argmax(1) == y).all()
