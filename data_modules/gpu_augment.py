"""The docs/method.md §1.4 / 1.5 random augmentations, batched, on whatever device the batch lives on.

MONAI applies its random transforms one sample at a time on CPU in the DataLoader workers, where Gaussian noise and
the bias field cost ~30 ms per scan (docs/data_notes.md §3). :class:`BatchedAugment` does the same operations with the
same distributions and the same formulas as MONAI (``Flip``, ``RandBiasField``, ``AdjustContrast``,
``RandGaussianNoise(sample_std=True)``, ``ShiftIntensity``), batched on the GPU (or CPU), and only computes each
operation on the samples that drew it. It is written by hand because MONAI has no batched form of these transforms.

Per sample, in this order (docs/method.md §1.4, pretraining): optional centre crop; flip on each of the 3 spatial axes
with p=0.5 each; bias field exp(sum c_ijk P_i(x) P_j(y) P_k(z)), Legendre degree 3, 20 coefficients ~ U(0, 0.1), p=0.5;
contrast ((x - min) / (range + 1e-7))^gamma * range + min, gamma ~ U(0.6, 1.5), p=0.5; Gaussian noise with
std ~ U(0, 0.1), p=0.5; intensity shift by U(-0.1, 0.1), p=0.5. Fine-tuning (docs/method.md §1.5): flips with p=0.1, no
bias field, the rest the same.

Randomness, two ways:

* :meth:`BatchedAugment.forward` / :meth:`BatchedAugment.sample`: every random number comes from one CPU
  ``torch.Generator`` for the whole batch (a sample's draw depends on its place in the batch);
* :meth:`BatchedAugment.augment_keys` / :meth:`BatchedAugment.sample_per_key` (what
  :class:`neurojepa_pl.data_modules.pretrain.PretrainDataModule` uses with ``augment_on="device"``): each sample draws
  from its own CPU generator seeded by :func:`augment_generator` from ``(seed, epoch, position)`` of its
  ``sample_key``, so its augmentation does not depend on the batch it lands in, the number of loader workers or ranks,
  or the step a run resumed from (docs/method.md §1.4).

Parameters are drawn on CPU (so they do not depend on the device); the noise voxels are drawn on the batch's device
from a generator seeded by one draw of the CPU generator (per batch, or per sample with per-key seeding), so noise is
bit-reproducible on one device type but differs between CPU and CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import nn

from neurojepa_pl.seeding import make_generator

CONTRAST_EPSILON = 1e-7  # MONAI AdjustContrast
AUGMENT_STREAM = "augment"
"""``derive_seed`` stream name of the per-sample augmentation (the mask streams are the integers 0..M-1)."""
_MODE_DEFAULTS = {
    "pretrain": {"flip_prob": 0.5, "bias_field_prob": 0.5},  # docs/method.md §1.4
    "finetune": {"flip_prob": 0.1, "bias_field_prob": 0.0},  # docs/method.md §1.5: no bias field
}


def legendre_basis(n: int, degree: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Legendre polynomials P_0..P_degree at ``n`` points evenly spaced on [-1, 1] (MONAI's grid).

    Returns:
        ``[n, degree + 1]``.
    """
    x = torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype)
    basis = [torch.ones_like(x), x]
    for k in range(1, degree):
        # Bonnet recursion: (k + 1) P_{k+1} = (2k + 1) x P_k - k P_{k-1}
        basis.append(((2 * k + 1) * x * basis[k] - k * basis[k - 1]) / (k + 1))
    return torch.stack(basis[: degree + 1], dim=1)


def bias_field_exponents(degree: int) -> list[tuple[int, int, int]]:
    """(i, j, k) of each coefficient in MONAI's order: all i + j + k <= degree, i outermost (20 for degree 3)."""
    return [(i, j, k) for i in range(degree + 1) for j in range(degree + 1 - i) for k in range(degree + 1 - i - j)]


def legendre_bias_field(spatial_shape: tuple[int, int, int], coeffs: torch.Tensor, degree: int = 3) -> torch.Tensor:
    """Log bias fields sum c_ijk P_i(x) P_j(y) P_k(z), as MONAI ``RandBiasField._generate_random_field``.

    Args:
        spatial_shape: ``(D, H, W)``.
        coeffs: ``[B, n_coeff]`` in :func:`bias_field_exponents` order.
        degree: polynomial degree.

    Returns:
        ``[B, D, H, W]`` (same dtype/device as ``coeffs``), computed as three small contractions (separable basis).
    """
    exponents = bias_field_exponents(degree)
    if coeffs.shape[-1] != len(exponents):
        raise ValueError(f"degree {degree} needs {len(exponents)} coefficients per sample, got {coeffs.shape[-1]}.")
    size = degree + 1
    matrix = torch.zeros(coeffs.shape[0], size, size, size, device=coeffs.device, dtype=coeffs.dtype)
    index = torch.tensor(exponents, device=coeffs.device)
    matrix[:, index[:, 0], index[:, 1], index[:, 2]] = coeffs
    px, py, pz = (legendre_basis(n, degree, coeffs.device, coeffs.dtype) for n in spatial_shape)
    field = torch.einsum("bijk,wk->bijw", matrix, pz)
    field = torch.einsum("bijw,hj->bihw", field, py)
    return torch.einsum("bihw,di->bdhw", field, px)


def adjust_contrast(images: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """MONAI ``AdjustContrast`` per sample: min/max over all channels and voxels of each sample.

    Args:
        images: ``[B, C, D, H, W]``.
        gamma: ``[B]``.
    """
    flat = images.flatten(1)
    low = flat.amin(dim=1).view(-1, 1, 1, 1, 1)
    span = flat.amax(dim=1).view(-1, 1, 1, 1, 1) - low
    return ((images - low) / (span + CONTRAST_EPSILON)) ** gamma.view(-1, 1, 1, 1, 1) * span + low


def center_crop(images: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """MONAI ``CenterSpatialCrop``: start = in // 2 - out // 2 on each axis. ``images`` is ``[B, C, D, H, W]``."""
    slices = [slice(None), slice(None)]
    for axis, (have, want) in enumerate(zip(images.shape[2:], size)):
        if want > have:
            raise ValueError(f"cannot centre-crop axis {axis} of size {have} to {want}; the input is smaller.")
        start = have // 2 - want // 2
        slices.append(slice(start, start + want))
    return images[tuple(slices)]


@dataclass
class AugmentParameters:
    """Per-sample draws of one batch (CPU tensors, ``B`` samples).

    Attributes:
        flip: ``[B, 3]`` bool, flip spatial axis 0/1/2.
        bias: ``[B]`` bool; bias_coeffs ``[B, n_coeff]``.
        contrast: ``[B]`` bool; gamma ``[B]``.
        noise: ``[B]`` bool; noise_std ``[B]``.
        shift: ``[B]`` bool; offset ``[B]``.
        noise_seed: seed of one device generator for the noise voxels of the whole batch (drawn in sample order).
        noise_seeds: int64 ``[B]``, one noise generator seed per sample instead (:meth:`BatchedAugment.sample_per_key`:
            a sample's noise then does not depend on the other samples). Exactly one of the two is set.
    """

    flip: torch.Tensor
    bias: torch.Tensor
    bias_coeffs: torch.Tensor
    contrast: torch.Tensor
    gamma: torch.Tensor
    noise: torch.Tensor
    noise_std: torch.Tensor
    shift: torch.Tensor
    offset: torch.Tensor
    noise_seed: int | None = None
    noise_seeds: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.noise_seed is None) == (self.noise_seeds is None):
            raise ValueError(
                "AugmentParameters needs exactly one of noise_seed (per batch) and noise_seeds (per sample)."
            )

    @classmethod
    def cat(cls, parts: Sequence[AugmentParameters]) -> AugmentParameters:
        """Concatenate per-sample draws (each with its ``noise_seed``) into one batch with ``noise_seeds``."""
        if not parts:
            raise ValueError("AugmentParameters.cat needs at least one part.")
        tensors = {
            f.name: torch.cat([getattr(p, f.name) for p in parts])
            for f in fields(cls)
            if f.name not in ("noise_seed", "noise_seeds")
        }
        seeds = []
        for part in parts:
            if part.noise_seeds is not None:
                seeds.append(part.noise_seeds)
            else:  # a per-batch seed of a one-sample part is that sample's seed
                if len(part.flip) != 1:
                    raise ValueError("AugmentParameters.cat: a part with one noise_seed must hold one sample.")
                seeds.append(torch.tensor([part.noise_seed], dtype=torch.int64))
        return cls(**tensors, noise_seeds=torch.cat(seeds))


def augment_generator(seed: int, epoch: int, position: int) -> torch.Generator:
    """The CPU generator of one sample's augmentation: ``derive_seed(seed, step=position, stream="augment/<epoch>")``.

    A pure function of the run seed and the sample's ``(epoch, position)`` key, on a stream distinct from the mask
    streams (:mod:`neurojepa_pl.data_modules.collate`), so masks and augmentation never share random numbers.
    """
    if min(epoch, position) < 0:
        raise ValueError(f"epoch and position must be >= 0; got {(epoch, position)}.")
    return make_generator(int(seed), step=int(position), stream=f"{AUGMENT_STREAM}/{int(epoch)}")


class BatchedAugment(nn.Module):
    """Augmentations of docs/method.md §1.4 (``mode="pretrain"``) or 1.5 (``mode="finetune"``) on ``[B, C, D, H, W]``.

    Args:
        mode: ``"pretrain"`` (flips p=0.5, bias field p=0.5) or ``"finetune"`` (flips p=0.1, no bias field).
        spatial_size: centre crop applied first (e.g. ``(96, 108, 96)`` from a 100x120x100 cache); ``None`` = none.
        flip_prob / bias_field_prob: override the mode's defaults.
        contrast_prob, gamma_range: gamma contrast.
        noise_prob, noise_std: Gaussian noise, std drawn from U(0, noise_std).
        shift_prob, shift_offset: intensity shift drawn from U(-shift_offset, shift_offset).
        bias_degree, bias_coeff_range: Legendre bias field.
    """

    def __init__(
        self,
        mode: str = "pretrain",
        spatial_size: tuple[int, int, int] | None = None,
        flip_prob: float | None = None,
        bias_field_prob: float | None = None,
        contrast_prob: float = 0.5,
        gamma_range: tuple[float, float] = (0.6, 1.5),
        noise_prob: float = 0.5,
        noise_std: float = 0.1,
        shift_prob: float = 0.5,
        shift_offset: float = 0.1,
        bias_degree: int = 3,
        bias_coeff_range: tuple[float, float] = (0.0, 0.1),
    ) -> None:
        super().__init__()
        if mode not in _MODE_DEFAULTS:
            raise ValueError(f"mode must be one of {sorted(_MODE_DEFAULTS)}, found {mode!r}.")
        defaults = _MODE_DEFAULTS[mode]
        self.mode = mode
        self.spatial_size = tuple(spatial_size) if spatial_size is not None else None
        self.flip_prob = defaults["flip_prob"] if flip_prob is None else flip_prob
        self.bias_field_prob = defaults["bias_field_prob"] if bias_field_prob is None else bias_field_prob
        self.contrast_prob, self.gamma_range = contrast_prob, tuple(gamma_range)
        self.noise_prob, self.noise_std = noise_prob, noise_std
        self.shift_prob, self.shift_offset = shift_prob, shift_offset
        self.bias_degree, self.bias_coeff_range = bias_degree, tuple(bias_coeff_range)

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode!r}, spatial_size={self.spatial_size}, flip_prob={self.flip_prob}, "
            f"bias_field_prob={self.bias_field_prob}, contrast_prob={self.contrast_prob}, "
            f"noise_prob={self.noise_prob}, shift_prob={self.shift_prob}"
        )

    def sample(self, batch_size: int, generator: torch.Generator) -> AugmentParameters:
        """Draw every per-sample decision and parameter of one batch from ``generator`` (a CPU generator)."""
        if generator.device.type != "cpu":
            raise ValueError("BatchedAugment draws its parameters from a CPU torch.Generator; pass one created on CPU.")

        def uniform(shape, low: float, high: float) -> torch.Tensor:
            return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)

        def coin(p: float, shape=(batch_size,)) -> torch.Tensor:
            return torch.rand(shape, generator=generator, dtype=torch.float64) < p

        n_coeff = len(bias_field_exponents(self.bias_degree))
        flip = coin(self.flip_prob, (batch_size, 3))
        bias, bias_coeffs = coin(self.bias_field_prob), uniform((batch_size, n_coeff), *self.bias_coeff_range)
        contrast, gamma = coin(self.contrast_prob), uniform((batch_size,), *self.gamma_range)
        noise, noise_std = coin(self.noise_prob), uniform((batch_size,), 0.0, self.noise_std)
        shift, offset = coin(self.shift_prob), uniform((batch_size,), -self.shift_offset, self.shift_offset)
        noise_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        return AugmentParameters(flip, bias, bias_coeffs, contrast, gamma, noise, noise_std, shift, offset, noise_seed)

    def sample_per_key(self, keys: torch.Tensor, seed: int) -> AugmentParameters:
        """Per-sample draws: sample ``b`` gets ``sample(1, augment_generator(seed, *keys[b]))``.

        Args:
            keys: int ``[B, 2]`` ``(epoch, position)`` sample keys (``batch["sample_key"]``, any device).
            seed: the run's base seed.

        Returns:
            The batch's parameters, with per-sample ``noise_seeds``; sample ``b``'s draws depend on ``keys[b]`` only.
        """
        keys = torch.as_tensor(keys).detach().to("cpu", torch.int64).reshape(-1, 2)
        if len(keys) == 0:
            raise ValueError("sample_per_key needs at least one sample key.")
        return AugmentParameters.cat(
            [self.sample(1, augment_generator(seed, epoch, position)) for epoch, position in keys.tolist()]
        )

    @torch.no_grad()
    def apply(self, images: torch.Tensor, params: AugmentParameters) -> torch.Tensor:
        """Apply drawn parameters to ``images`` ``[B, C, D, H, W]``; returns a new tensor (input untouched).

        Each operation runs in place on the views of the samples that drew it (no gather/scatter copies), so an
        unselected sample costs nothing but the initial copy.
        """
        if images.dim() != 5 or not images.is_floating_point():
            raise ValueError(f"expected a float batch [B, C, D, H, W], found {images.dtype} {tuple(images.shape)}.")
        out = center_crop(images, self.spatial_size) if self.spatial_size else images
        out = out.clone(memory_format=torch.contiguous_format)
        device = out.device
        for axis in range(3):
            for i in params.flip[:, axis].nonzero().flatten().tolist():
                out[i] = out[i].flip(axis + 1)
        for i in params.bias.nonzero().flatten().tolist():
            # One sample at a time: a batched contraction may take another BLAS path for another batch size, and a
            # sample's output must not depend on the batch it is in (per-key seeding).
            coeffs = params.bias_coeffs[i : i + 1].to(device=device, dtype=torch.float32)
            out[i].mul_(torch.exp(legendre_bias_field(tuple(out.shape[2:]), coeffs, self.bias_degree)).to(out.dtype))
        for i in params.contrast.nonzero().flatten().tolist():
            sample, gamma = out[i], float(params.gamma[i])
            low, high = torch.aminmax(sample)
            span = high - low
            sample.sub_(low).div_(span + CONTRAST_EPSILON).pow_(gamma).mul_(span).add_(low)
        rows = params.noise.nonzero().flatten().tolist()
        if rows:
            noise_generator = torch.Generator(device=device)
            if params.noise_seeds is None:
                noise_generator.manual_seed(int(params.noise_seed))  # type: ignore[arg-type]
            noise = torch.empty(out.shape[1:], device=device, dtype=out.dtype)
            for i in rows:
                if params.noise_seeds is not None:
                    noise_generator.manual_seed(int(params.noise_seeds[i]))
                torch.randn(noise.shape, generator=noise_generator, device=device, dtype=out.dtype, out=noise)
                out[i].add_(noise, alpha=float(params.noise_std[i]))
        for i in params.shift.nonzero().flatten().tolist():
            out[i].add_(float(params.offset[i]))
        return out

    def forward(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a batch.

        Args:
            images: ``[B, C, D, H, W]`` on any device (float).
            generator: CPU ``torch.Generator``; the output is a pure function of (images, generator state).

        Returns:
            ``[B, C, *spatial_size]`` (or the input's spatial size), same device and dtype.
        """
        return self.apply(images, self.sample(images.shape[0], generator))

    def augment_keys(self, images: torch.Tensor, keys: torch.Tensor, seed: int) -> torch.Tensor:
        """Augment a batch with per-sample seeding (:meth:`sample_per_key`).

        Args:
            images: ``[B, C, D, H, W]`` on any device (float).
            keys: int ``[B, 2]`` ``(epoch, position)`` of each sample.
            seed: the run's base seed.

        Returns:
            ``[B, C, *spatial_size]``; sample ``b`` is a pure function of ``(images[b], seed, keys[b])`` on one device
            type.
        """
        if len(keys) != images.shape[0]:
            raise ValueError(f"got {len(keys)} sample keys for a batch of {images.shape[0]} images.")
        return self.apply(images, self.sample_per_key(keys, seed))
