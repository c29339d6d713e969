"""Schedules against hand-computed values (docs/method.md §7)."""

import math

import pytest

from neurojepa_pl.schedules import (
    PretrainSchedule,
    ema_momentum_at,
    lr_at,
    moe_rate_at,
    weight_decay_at,
)

PAPER = dict(lr_start=1e-4, lr_peak=5.25e-4, lr_final=1e-6, warmup_steps=64_000, total_steps=320_000)
COOLDOWN = dict(
    lr_start=1e-4, lr_peak=5.25e-4, lr_final=1e-6, warmup_steps=0, total_steps=64_000, cooldown_steps=64_000
)


def test_warmup_is_linear_from_start_to_peak():
    assert lr_at(0, **PAPER) == pytest.approx(1e-4, rel=1e-12)
    assert lr_at(1, **PAPER) == pytest.approx(1e-4 + 4.25e-4 / 64_000, rel=1e-12)
    assert lr_at(32_000, **PAPER) == pytest.approx(3.125e-4, rel=1e-12)
    assert lr_at(63_999, **PAPER) == pytest.approx(1e-4 + 4.25e-4 * 63_999 / 64_000, rel=1e-12)
    assert lr_at(64_000, **PAPER) == pytest.approx(5.25e-4, rel=1e-12)


def test_plateau_is_constant_at_peak():
    for step in (64_000, 100_000, 319_999, 320_000, 400_000):
        assert lr_at(step, **PAPER) == 5.25e-4


def test_linear_cooldown_reaches_final():
    assert lr_at(0, **COOLDOWN) == pytest.approx(5.25e-4)
    assert lr_at(1, **COOLDOWN) == pytest.approx(5.25e-4 - 5.24e-4 / 64_000, rel=1e-12)
    assert lr_at(16_000, **COOLDOWN) == pytest.approx(5.25e-4 - 0.25 * 5.24e-4, rel=1e-12)
    assert lr_at(32_000, **COOLDOWN) == pytest.approx(2.63e-4, rel=1e-12)
    assert lr_at(64_000, **COOLDOWN) == pytest.approx(1e-6, rel=1e-12)
    assert lr_at(70_000, **COOLDOWN) == pytest.approx(1e-6, rel=1e-12)


def test_cosine_cooldown_reaches_final():
    cos = dict(COOLDOWN, cooldown_shape="cosine")
    assert lr_at(0, **cos) == pytest.approx(5.25e-4)
    quarter = 1e-6 + 5.24e-4 * 0.5 * (1 + math.cos(math.pi / 4))
    assert lr_at(16_000, **cos) == pytest.approx(quarter, rel=1e-12)
    assert lr_at(32_000, **cos) == pytest.approx(2.63e-4, rel=1e-12)
    assert lr_at(64_000, **cos) == pytest.approx(1e-6, rel=1e-12)


def test_warmup_plateau_cooldown_in_one_run():
    wsd = dict(lr_start=0.0, lr_peak=1.0, lr_final=0.0, warmup_steps=10, total_steps=100, cooldown_steps=20)
    assert lr_at(5, **wsd) == 0.5
    assert lr_at(79, **wsd) == 1.0
    assert lr_at(80, **wsd) == 1.0
    assert lr_at(90, **wsd) == pytest.approx(0.5)
    assert lr_at(100, **wsd) == 0.0


def test_first_update_uses_step_one():
    sched = PretrainSchedule(**PAPER)
    assert sched.at(1).lr == lr_at(1, **PAPER)
    assert sched.at(1).lr != lr_at(0, **PAPER)
    with pytest.raises(ValueError, match="numbered from 1"):
        sched.at(0)


def test_ema_first_update_uses_start_momentum():
    sched = PretrainSchedule(**PAPER, ema_momentum=(0.99, 1.0))
    assert sched.at(1).ema_momentum == 0.99
    assert sched.at(160_001).ema_momentum == pytest.approx(0.995)
    assert ema_momentum_at(320_000, start=0.99, end=1.0, total_steps=320_000) == 1.0
    assert ema_momentum_at(10**6, start=0.99, end=1.0, total_steps=320_000) == 1.0


def test_weight_decay_and_moe_rate_cosine_and_paper_constants():
    assert weight_decay_at(0, start=0.04, end=0.4, total_steps=100) == pytest.approx(0.04)
    assert weight_decay_at(50, start=0.04, end=0.4, total_steps=100) == pytest.approx(0.22)
    assert weight_decay_at(100, start=0.04, end=0.4, total_steps=100) == pytest.approx(0.4)
    assert moe_rate_at(50, start=1e-4, end=3e-4, total_steps=100) == pytest.approx(2e-4)
    values = PretrainSchedule(**PAPER).at(123_456)
    assert values.weight_decay == pytest.approx(0.04)
    assert values.moe_rate == pytest.approx(1e-4)
    assert values.ema_momentum == pytest.approx(0.99925)


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="warmup_steps \\+ cooldown_steps <= total_steps"):
        PretrainSchedule(lr_start=0, lr_peak=1, lr_final=0, warmup_steps=60, total_steps=100, cooldown_steps=50)
    with pytest.raises(ValueError, match="cooldown_shape"):
        lr_at(1, **dict(COOLDOWN, cooldown_shape="step"))
    with pytest.raises(ValueError, match=">= 0"):
        lr_at(-1, **PAPER)
