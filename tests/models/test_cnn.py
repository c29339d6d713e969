"""The from-scratch CNN baseline: parameter count, shapes on paper and tiny grids, and that it learns."""

import torch

from neurojepa_pl.models.cnn import SimpleCNN3D


def test_default_parameter_count_is_about_32m():
    model = SimpleCNN3D(num_outputs=2)
    n = sum(p.numel() for p in model.parameters())
    assert n == 32_599_874  # as stated in the module docstring
    assert sum(p.numel() for p in SimpleCNN3D(num_outputs=3).parameters()) == n + 513
    # Convolutions alone: 1x1x1 stem 1->32, 3^3 32->256, 5^3 256->512, 3^3 512->512 (with biases).
    conv = 1 * 32 + 32 + 27 * 32 * 256 + 256 + 125 * 256 * 512 + 512 + 27 * 512 * 512 + 512
    assert sum(p.numel() for p in model.features.parameters()) == conv


def test_shapes_on_small_and_odd_grids():
    model = SimpleCNN3D(num_outputs=3, widths=(2, 4, 8, 8), feat_dim=16, hidden_dim=8)
    for grid in [(32, 36, 32), (16, 16, 16), (33, 20, 17)]:
        x = torch.randn(2, 1, *grid)
        assert model(x).shape == (2, 3)
        assert model.forward_features(x).shape == (2, 16)


def test_tiny_cnn_learns_a_bright_blob():
    g = torch.Generator().manual_seed(0)
    x = 0.1 * torch.randn(16, 1, 16, 16, 16, generator=g)
    y = torch.arange(16) % 2
    x[y == 1, :, 4:10, 4:10, 4:10] += 1.0
    torch.manual_seed(0)
    model = SimpleCNN3D(num_outputs=2, widths=(2, 4, 8, 8), feat_dim=16, hidden_dim=8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    assert (model(x).argmax(1) == y).all()
