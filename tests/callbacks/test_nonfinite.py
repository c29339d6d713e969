"""NonFiniteLossGuard: a NaN-loss step changes nothing (weights, AdamW state, EMA, schedules); K in a row stops."""

import lightning.pytorch as pl
import pytest
import torch
from jepa_tiny import TinyJEPAData, tiny_module, tiny_trainer

from neurojepa_pl.callbacks import NonFiniteLossError
from neurojepa_pl.modules.pretrain import JEPAPretrainModule


class _NaNAt(JEPAPretrainModule):
    """Poisons the loss of chosen batches (after the forward, so MoE counts and the graph are real)."""

    def __init__(self, nan_batches=(), **kwargs):
        super().__init__(**kwargs)
        self.nan_batches = set(nan_batches)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.trainer.fit_loop.total_batch_idx in self.nan_batches else loss


def _nan_module(nan_batches, **kwargs):
    base = tiny_module()
    return _NaNAt(nan_batches=nan_batches, **{**dict(base.hparams), **kwargs})


class _Record(pl.Callback):
    def __init__(self):
        self.states, self.lrs = [], []

    def _take(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        self.states.append(
            {
                "context": [p.detach().clone() for p in pl_module.context_encoder.parameters()],
                "target": [p.detach().clone() for p in pl_module.target_encoder.parameters()],
                "bias": [m.gate.bias.clone() for m in pl_module.context_encoder.moe_layers()],
                "adam_steps": [float(s["step"]) for s in opt.state.values()],
                "update_step": pl_module.update_step,
            }
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._take(trainer, pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_train_end(self, trainer, pl_module):
        self._take(trainer, pl_module)


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_nan_step_is_skipped_without_side_effects(tmp_path, precision):
    module = _nan_module(nan_batches={1}, ema_momentum=0.5, moe_bias_rate=0.1)
    record = _Record()
    trainer = tiny_trainer(tmp_path, max_steps=3, precision=precision, callbacks=[record])
    with pytest.warns(UserWarning, match="Non-finite loss"):
        trainer.fit(module, datamodule=TinyJEPAData(n=8, batch_size=2))
    before, after = record.states[1], record.states[2]  # around the poisoned batch 1
    assert _same(before["context"], after["context"])
    assert _same(before["target"], after["target"])
    assert _same(before["bias"], after["bias"])
    assert before["adam_steps"] == after["adam_steps"] == [1.0] * len(after["adam_steps"])
    assert before["update_step"] == after["update_step"] == 1
    # the finite neighbours did update
    assert not _same(record.states[0]["context"], before["context"])
    assert not _same(after["context"], record.states[3]["context"])
    # schedules did not advance: the step after the skip uses the lr the skipped one would have used
    lr = module.schedule.at
    assert record.lrs == [lr(1).lr, lr(2).lr, lr(2).lr]
    assert trainer.global_step == 3 and module.update_step == 2
    assert all(int(m.counts.sum()) == 0 for m in module.context_encoder.moe_layers())
    guard = next(cb for cb in trainer.callbacks if type(cb).__name__ == "NonFiniteLossGuard")
    assert (guard.total, guard.consecutive) == (1, 0)
    assert float(trainer.callback_metrics["train/nonfinite_skipped"]) == 1.0


def test_k_nonfinite_steps_in_a_row_stop_training(tmp_path):
    module = _nan_module(nan_batches={1, 2, 3}, max_nonfinite_in_a_row=3)
    trainer = tiny_trainer(tmp_path, max_steps=10)
    with (
        pytest.warns(UserWarning, match="Non-finite loss"),
        pytest.raises(NonFiniteLossError, match="3 consecutive optimizer steps had a non-finite loss .*lower lr_peak"),
    ):
        trainer.fit(module, datamodule=TinyJEPAData(n=8, batch_size=2))
    assert module.update_step == 1


def test_guard_state_round_trips():
    from neurojepa_pl.callbacks import NonFiniteLossGuard

    guard = NonFiniteLossGuard(max_consecutive=4)
    guard.consecutive, guard.total = 2, 7
    other = NonFiniteLossGuard(max_consecutive=4)
    other.load_state_dict(guard.state_dict())
    assert (other.consecutive, other.total) == (2, 7)
