"""Exact resume: N steps straight == N/2 steps, checkpoint, a fresh process state, resume to N.

What is guaranteed (and tested here): resuming from a checkpoint written at an **epoch boundary** (the paper's
schedule: one checkpoint per 1,600-iteration "epoch") continues with bit-identical weights, EMA target, MoE balance
biases and counts, AdamW state, schedules (``update_step``) and data: the sample order is a pure function of
(seed, epoch), the augmentation of (seed, epoch, position) and the masks of (seed, rank, global batch index), all
restored from the checkpoint by ``PretrainDataModule``'s state and ``JEPAPretrainModule.on_load_checkpoint``.

Not guaranteed: a mid-epoch checkpoint (``every_n_train_steps`` that is not a multiple of the epoch length). Lightning
then restarts the epoch's loader from its first batch, so the rest of that epoch repeats already-seen batches (the
optimisation state itself is still restored exactly).
"""

import lightning.pytorch as pl
import pytest
import torch
from jepa_tiny import TINY_DATA_ARGS, tiny_module, tiny_trainer, write_tiny_cohort
from lightning.pytorch.callbacks import ModelCheckpoint

from neurojepa_pl.data_modules.pretrain import PretrainDataModule

STEPS_PER_EPOCH = 4  # 8 scans, batch 2, drop_last


class _RecordData(pl.Callback):
    """What each optimizer step trained on: (global step, mask step, subjects, a checksum of masks and images)."""

    def __init__(self):
        self.seen = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        checksum = sum(int(ids.sum()) for ids in batch["context_idx"]) + float(batch["image"].double().sum())
        self.seen[trainer.global_step] = (batch["mask_step"], tuple(batch["subject_id"]), checksum)


def _run(tmp_path, manifest, max_steps, ckpt_path=None, checkpoint_dir=None):
    torch.manual_seed(1234)  # a different global RNG state must not matter: nothing may draw from it
    record = _RecordData()
    callbacks = [record]
    if checkpoint_dir is not None:
        callbacks.append(
            ModelCheckpoint(
                dirpath=checkpoint_dir, filename="{step}", every_n_train_steps=STEPS_PER_EPOCH, save_top_k=-1
            )
        )
    module = tiny_module(ema_momentum=0.9, moe_bias_rate=1e-2, warmup_steps=3, total_steps=8, cooldown_steps=2)
    data = PretrainDataModule(manifest=manifest, cache_dir=str(tmp_path / "cache"), seed=7, **TINY_DATA_ARGS)
    trainer = tiny_trainer(
        tmp_path, max_steps=max_steps, callbacks=callbacks, enable_checkpointing=checkpoint_dir is not None
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, trainer, record.seen


@pytest.mark.slow
def test_kill_and_resume_at_epoch_boundary_is_exact(tmp_path):
    manifest = write_tiny_cohort(tmp_path / "cohort", n_scans=8)
    straight, straight_trainer, straight_seen = _run(
        tmp_path, manifest, max_steps=2 * STEPS_PER_EPOCH, checkpoint_dir=tmp_path / "ckpt"
    )
    half = tmp_path / "ckpt" / f"step={STEPS_PER_EPOCH}.ckpt"
    assert half.exists(), sorted(p.name for p in (tmp_path / "ckpt").iterdir())

    torch.manual_seed(999)  # the "new process": a different global RNG state
    resumed, resumed_trainer, resumed_seen = _run(
        tmp_path, manifest, max_steps=2 * STEPS_PER_EPOCH, ckpt_path=str(half)
    )

    # the same data and masks at every resumed step
    assert sorted(resumed_seen) == list(range(STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH))
    for step, seen in resumed_seen.items():
        assert seen == straight_seen[step], f"step {step}: resumed run saw {seen}, straight run {straight_seen[step]}"
        assert seen[0] == step  # mask step == global batch index

    # the same weights, EMA target, MoE biases/counts, schedules and optimizer state, bit for bit
    assert resumed.update_step == straight.update_step == 2 * STEPS_PER_EPOCH
    want, got = straight.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), f"{key} differs after resume"
    assert any(key.startswith("target_encoder.") and "gate.bias" in key for key in want)
    want_opt, got_opt = straight_trainer.optimizers[0].state_dict(), resumed_trainer.optimizers[0].state_dict()
    assert want_opt["param_groups"] == got_opt["param_groups"]
    for pid, state in want_opt["state"].items():
        for name, value in state.items():
            assert torch.equal(value, got_opt["state"][pid][name]), f"optimizer state {pid}.{name} differs"
