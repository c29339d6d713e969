"""derive_seed / make_generator: pure, stable, collision-free over realistic key grids."""

from __future__ import annotations

import itertools

import pytest
import torch

from neurojepa_pl.seeding import derive_seed, make_generator


def test_derive_seed_is_pure_and_63_bit():
    first = derive_seed(1234, rank=3, worker=2, step=99, stream="mask")
    assert first == derive_seed(1234, rank=3, worker=2, step=99, stream="mask")
    assert 0 <= first < 2**63


def test_derive_seed_golden_value_pins_the_derivation():
    # Changing the derivation silently would change every resumed run's masks: this value must only change on
    # purpose (bump the domain tag in seeding.py and say so in the changelog).
    import hashlib

    payload = b"neurojepa_pl/derive_seed/v1seed=i:0;rank=i:0;worker=i:0;step=i:0;stream=i:0;"
    expected = int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little") >> 1
    assert derive_seed(0) == expected


def test_derive_seed_has_no_collisions_on_a_key_grid():
    keys = itertools.product(range(4), range(4), range(4), range(64), (0, 1, 2, "mask"))
    seeds = [derive_seed(s, rank=r, worker=w, step=t, stream=m) for s, r, w, t, m in keys]
    assert len(set(seeds)) == len(seeds) == 4 * 4 * 4 * 64 * 4


def test_derive_seed_separates_tuples_that_naive_mixes_conflate():
    # SeedSequence would see the same words for these two (2**32 is split into [0, 1]).
    assert derive_seed(2**32, rank=0) != derive_seed(0, rank=1)
    # Arithmetic mixes like seed * 1_000_003 + step collide here.
    assert derive_seed(1, step=0) != derive_seed(0, step=1_000_003)
    # A string stream is not the same as the int it spells.
    assert derive_seed(0, stream="3") != derive_seed(0, stream=3)
    # Each key matters.
    base = derive_seed(7)
    variants = [derive_seed(7, rank=1), derive_seed(7, worker=1), derive_seed(7, step=1), derive_seed(7, stream=1)]
    assert len({base, *variants}) == 5


@pytest.mark.parametrize("bad", [{"rank": 1.0}, {"step": True}, {"worker": "0"}, {"stream": 1.5}])
def test_derive_seed_rejects_non_int_keys(bad):
    with pytest.raises(TypeError, match="must be an int"):
        derive_seed(0, **bad)


def test_make_generator_reproduces_and_separates_streams():
    a = torch.rand(5, generator=make_generator(3, rank=1, step=10))
    b = torch.rand(5, generator=make_generator(3, rank=1, step=10))
    c = torch.rand(5, generator=make_generator(3, rank=2, step=10))
    d = torch.rand(5, generator=make_generator(3, rank=1, worker=1, step=10))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, d)
    assert make_generator(3, step=10).initial_seed() == derive_seed(3, step=10)
