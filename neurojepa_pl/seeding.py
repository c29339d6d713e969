"""Pure, collision-resistant seed derivation for every random stream in the project.

All mask (and other per-batch) randomness is keyed by ``(seed, rank, worker, step, stream)``, so that

* a resumed run that fast-forwards ``step`` redraws exactly the same random numbers,
* different ranks and workers draw different numbers (the reference seeded masks identically on every rank,
  docs/method.md §5.2 / 12.9; we fix that on purpose),
* adding a new random stream never shifts an existing one.

The key tuple is encoded canonically and hashed with BLAKE2b. A plain arithmetic mix (``seed * K + step``) collides
for nearby tuples, and ``numpy.random.SeedSequence`` splits integers above 2**32 into several words, so
``(2**32, 0)`` and ``(0, 1)`` would feed it the same entropy; a tagged byte encoding has neither problem.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["derive_seed", "make_generator"]

_DOMAIN = b"neurojepa_pl/derive_seed/v1"
_SEED_BITS = 63


def _encode_int(name: str, value: object) -> bytes:
    # bool is an int subclass; refusing it catches `derive_seed(seed, rank=is_main)`-style slips.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"derive_seed: `{name}` must be an int, found {type(value).__name__} ({value!r}); "
            f"pass an integer (e.g. int({name}))."
        )
    return f"{name}=i:{value};".encode()


def _encode_stream(stream: object) -> bytes:
    if isinstance(stream, str):
        # Tagged so that stream "3" and stream 3 are different streams.
        return f"stream=s:{len(stream)}:{stream};".encode()
    return _encode_int("stream", stream)


def derive_seed(seed: int, *, rank: int = 0, worker: int = 0, step: int = 0, stream: str | int = 0) -> int:
    """Mix a base seed with the coordinates of one random draw into a 63-bit seed.

    The result is a pure function of its arguments (stable across processes, platforms and Python's hash
    randomisation) and fits both ``torch.Generator.manual_seed`` and ``numpy.random.default_rng``.

    Args:
        seed: the experiment's base seed (any int, negative allowed).
        rank: distributed rank (global rank of the process).
        worker: DataLoader worker id (0 in the main process).
        step: position in the stream, e.g. the global batch index.
        stream: names the random stream (e.g. ``"mask"`` or a generator index) so streams stay independent.

    Returns:
        An int in ``[0, 2**63)``.

    Raises:
        TypeError: if a key is not an int (``stream`` may also be a str).
    """
    payload = b"".join(
        [
            _DOMAIN,
            _encode_int("seed", seed),
            _encode_int("rank", rank),
            _encode_int("worker", worker),
            _encode_int("step", step),
            _encode_stream(stream),
        ]
    )
    digest = hashlib.blake2b(payload, digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - _SEED_BITS)


def make_generator(
    seed: int,
    *,
    rank: int = 0,
    worker: int = 0,
    step: int = 0,
    stream: str | int = 0,
    device: str | torch.device = "cpu",
) -> torch.Generator:
    """A fresh ``torch.Generator`` seeded with ``derive_seed(seed, rank=..., worker=..., step=..., stream=...)``.

    Args:
        seed, rank, worker, step, stream: see `derive_seed`.
        device: device of the generator (masks are drawn on CPU).

    Returns:
        The seeded generator.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, rank=rank, worker=worker, step=step, stream=stream))
    return generator
