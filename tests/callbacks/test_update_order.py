"""The docs/method.md §7 order of one pretraining update, observed on real tiny training steps.

Every effect is recorded where it happens (wrapped functions, an optimizer post-hook that looks at AdamW's own step
counters), so the test sees what ran, not what was meant to run: guard check -> clip -> AdamW -> update_step += 1 ->
MoE bias update -> EMA, and a non-finite step that reaches only the guard.
"""

import lightning.pytorch as pl
import pytest
import torch
from jepa_tiny import TinyJEPAData, tiny_module, tiny_trainer

import neurojepa_pl.callbacks.ema as ema_mod
import neurojepa_pl.callbacks.moe_balance as moe_mod
from neurojepa_pl.callbacks import EMATargetUpdate, MaskFigureLogger, MoELoadBalance, NonFiniteLossGuard


def _has_grads(optimizer):
    return any(p.grad is not None for g in optimizer.param_groups for p in g["params"])


class _Recorder(pl.Callback):
    """Installs the probes once the optimizer exists; logs the MoE counts at the start of every batch."""

    def __init__(self, events):
        self.events = events
        self.counts_at_batch_start = []

    def on_train_start(self, trainer, pl_module):
        optimizer = trainer.optimizers[0]
        adam_steps = {"total": 0.0}

        def after_adamw(opt, args, kwargs):
            # AdamW's per-parameter step counters move only for parameters it actually updated.
            total = sum(float(s["step"]) for s in opt.state.values())
            if total > adam_steps["total"]:
                self.events.append(("adamw", opt.param_groups[0]["lr"]))
            adam_steps["total"] = total

        optimizer.register_step_post_hook(after_adamw)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.counts_at_batch_start.append(sum(int(m.counts.sum()) for m in pl_module.context_encoder.moe_layers()))


@pytest.fixture
def events(monkeypatch):
    log = []

    guard_check = NonFiniteLossGuard.on_before_optimizer_step

    def guard(self, trainer, pl_module, optimizer):
        guard_check(self, trainer, pl_module, optimizer)
        log.append(("guard", "pass" if _has_grads(optimizer) else "drop"))

    clip = torch.nn.utils.clip_grads_with_norm_

    def clipping(*args, **kwargs):
        log.append(("clip",))
        return clip(*args, **kwargs)

    rebalance = moe_mod.rebalance_moe_layers_

    def moe(layers, rate, **kwargs):
        log.append(("moe", sum(int(m.counts.sum()) for m in layers)))
        return rebalance(layers, rate, **kwargs)

    ema_update = ema_mod.ema_update_

    def ema(target, online, momentum):
        log.append(("ema",))
        return ema_update(target, online, momentum)

    monkeypatch.setattr(NonFiniteLossGuard, "on_before_optimizer_step", guard)
    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_", clipping)
    monkeypatch.setattr(moe_mod, "rebalance_moe_layers_", moe)
    monkeypatch.setattr(ema_mod, "ema_update_", ema)
    return log


def _instrumented_module(events, nan_batches=(), **kwargs):
    module = tiny_module(ema_momentum=0.5, moe_bias_rate=0.1, **kwargs)
    optimizer_step = module.optimizer_step
    training_step = module.training_step

    def step(*args, **kw):
        optimizer_step(*args, **kw)
        events.append(("update_step", module.update_step))

    def poisoned(batch, batch_idx):
        loss = training_step(batch, batch_idx)
        return loss * float("nan") if module.trainer.fit_loop.total_batch_idx in nan_batches else loss

    module.optimizer_step = step
    module.training_step = poisoned
    return module


def test_configure_callbacks_order():
    callbacks = tiny_module().configure_callbacks()
    assert [type(c) for c in callbacks] == [NonFiniteLossGuard, MoELoadBalance, EMATargetUpdate, MaskFigureLogger]


def test_one_update_runs_in_the_documented_order(tmp_path, events):
    module = _instrumented_module(events)
    trainer = tiny_trainer(tmp_path, max_steps=1, callbacks=[_Recorder(events)])
    trainer.fit(module, datamodule=TinyJEPAData(n=4, batch_size=2))
    routed = 3 * 2 * 144 * 2  # 3 masks x B=2 x 144 context tokens x top-2, the counts of this step's forward
    assert events == [
        ("guard", "pass"),
        ("clip",),
        ("adamw", module.schedule.at(1).lr),
        ("update_step", 1),
        ("moe", routed),
        ("ema",),
    ]
    # the EMA ran after the bias update: the target copied the new, non-zero biases
    context, target = module.context_encoder.moe_layers()[0], module.target_encoder.moe_layers()[0]
    assert float(context.gate.bias.abs().sum()) > 0
    torch.testing.assert_close(target.gate.bias, context.gate.bias, rtol=0, atol=0)


def test_nonfinite_update_reaches_only_the_guard_and_the_next_one_works(tmp_path, events):
    module = _instrumented_module(events, nan_batches={1})
    recorder = _Recorder(events)
    trainer = tiny_trainer(tmp_path, max_steps=3, callbacks=[recorder])
    with pytest.warns(UserWarning, match="Non-finite loss"):
        trainer.fit(module, datamodule=TinyJEPAData(n=8, batch_size=2))
    routed = 3 * 2 * 144 * 2
    lr = module.schedule.at
    applied = [("guard", "pass"), ("clip",), ("adamw", lr(1).lr), ("update_step", 1), ("moe", routed), ("ema",)]
    dropped = [("guard", "drop"), ("update_step", 1)]  # no clip, no AdamW, no MoE update, no EMA; counter unchanged
    # the next update is the second one: it uses the schedules at update 2, as the dropped one would have
    after = [("guard", "pass"), ("clip",), ("adamw", lr(2).lr), ("update_step", 2), ("moe", routed), ("ema",)]
    assert events == applied + dropped + after
    assert trainer.global_step == 3 and module.update_step == 2
    # the dropped step's routing counts were discarded, not carried into the next bias update
    assert recorder.counts_at_batch_start == [0, 0, 0]
