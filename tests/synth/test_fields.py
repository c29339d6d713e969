import torch

from neurojepa_pl.synth.fields import gaussian_blur, lattice_noise, noise_at_points, smooth_noise, torch_generator


def test_torch_generator_is_a_pure_function_of_its_entropy():
    a = torch.randn(5, generator=torch_generator(0, 3, 1))
    b = torch.randn(5, generator=torch_generator(0, 3, 1))
    c = torch.randn(5, generator=torch_generator(0, 3, 2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_lattice_noise_is_unit_variance_and_smooth():
    noise = lattice_noise((40, 40, 40), 8.0, torch_generator(1), channels=2)
    assert noise.shape == (2, 11, 11, 11)  # lattice step = correlation / 2 = 4 voxels: ceil(39 / 4) + 1 points
    assert torch.allclose(noise.std(dim=(1, 2, 3), correction=0), torch.ones(2), atol=1e-4)
    assert torch.allclose(noise.mean(dim=(1, 2, 3)), torch.zeros(2), atol=1e-5)
    dense = smooth_noise((40, 40, 40), 8.0, torch_generator(1))[0]
    # Neighbouring voxels of a field with an 8-voxel correlation length are almost equal.
    neighbour_corr = torch.corrcoef(torch.stack([dense[:-1].flatten(), dense[1:].flatten()]))[0, 1]
    assert neighbour_corr > 0.95


def test_gaussian_blur_preserves_mass_and_spreads_a_delta():
    volume = torch.zeros(21, 21, 21)
    volume[10, 10, 10] = 1.0
    blurred = gaussian_blur(volume, (2.0, 2.0, 0.0))
    assert abs(float(blurred.sum()) - 1.0) < 1e-5
    assert float(blurred[10, 10, 10]) < 0.05
    assert float(blurred[10, 10, 9]) == 0.0  # sigma 0 along the last axis


def test_noise_at_points_is_anchored_in_world_coordinates():
    points = torch.tensor([[0.0, 0.0, 0.0], [5.0, 5.0, 5.0], [9.0, 1.0, 3.0]])
    lower, upper = [-10.0] * 3, [10.0] * 3
    a = noise_at_points(points, lower, upper, 4.0, torch_generator(7))
    b = noise_at_points(points[[2, 0]], lower, upper, 4.0, torch_generator(7))
    # The same world point gets the same value whatever other points are sampled.
    assert torch.allclose(a[0, [2, 0]], b[0])
