"""Two CPU processes (gloo, ddp_spawn): different masks per rank, identical weights/EMA/MoE biases after every step,
MoE biases computed from the counts summed over both ranks, DDP not broadcasting the per-rank counts."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from jepa_tiny import TINY_DATA_ARGS, tiny_module, write_tiny_cohort
from lightning.pytorch.strategies import DDPStrategy

from neurojepa_pl.data_modules.pretrain import PretrainDataModule
from neurojepa_pl.models.moe import balance_bias_update

RATE = 0.05


class RankRecorder(pl.Callback):
    """Writes, per rank, what each step saw and the state around the MoE update to ``out/rank{r}.pt``.

    As a trainer callback it runs before the module's own callbacks, so in ``on_train_batch_end`` the counts are
    still those of the step and the biases those before the update.
    """

    def __init__(self, out: str):
        self.out = out
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        layer = pl_module.context_encoder.moe_layers()[0]
        self.steps.append(
            {
                "global_step": trainer.global_step,
                "context_idx": [c.clone() for c in batch["context_idx"]],
                "subjects": list(batch["subject_id"]),
                "counts": layer.counts.clone(),
                "bias_before": layer.gate.bias.clone(),
            }
        )

    def on_train_end(self, trainer, pl_module):
        ddp = trainer.strategy.model
        torch.save(
            {
                "steps": self.steps,
                "state_dict": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                "bias_after": pl_module.context_encoder.moe_layers()[0].gate.bias.clone(),
                "ignored": sorted(getattr(ddp, "parameters_to_ignore", [])),
                "update_step": pl_module.update_step,
            },
            Path(self.out) / f"rank{trainer.global_rank}.pt",
        )


@pytest.mark.slow
def test_two_process_ddp(tmp_path):
    manifest = write_tiny_cohort(tmp_path / "cohort", n_scans=8)
    module = tiny_module(moe_bias_rate=RATE, ema_momentum=0.9)
    data = PretrainDataModule(manifest=manifest, cache_dir=str(tmp_path / "cache"), seed=3, **TINY_DATA_ARGS)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(start_method="spawn", find_unused_parameters=False),
        max_steps=2,
        accumulate_grad_batches=2,
        precision="32",
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[RankRecorder(str(tmp_path))],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]

    # DDP honoured the per-rank MoE counts as "do not broadcast"
    for rank in ranks:
        assert "context_encoder.blocks.1.mlp.counts" in rank["ignored"]
        assert rank["update_step"] == 2

    # ranks trained on different scans with different masks
    for a, b in zip(ranks[0]["steps"], ranks[1]["steps"]):
        assert set(a["subjects"]).isdisjoint(b["subjects"])
        assert not all(torch.equal(x, y) for x, y in zip(a["context_idx"], b["context_idx"]))

    # identical weights, EMA target and MoE biases on both ranks
    sd0, sd1 = ranks[0]["state_dict"], ranks[1]["state_dict"]
    for key in sd0:
        if key.endswith(".counts"):
            continue
        assert torch.equal(sd0[key], sd1[key]), f"{key} differs between ranks"

    # counts accumulate per rank over the two micro-batches (never overwritten by rank 0's) ...
    per_forward = 3 * 2 * 144 * 2  # masks x B x context tokens x top-2
    for rank in ranks:
        first, second = rank["steps"][0]["counts"], rank["steps"][1]["counts"]
        assert int(first.sum()) == per_forward and int(second.sum()) == 2 * per_forward
        assert bool((second >= first).all())
    # ... and the last update used the sum over both ranks
    last0, last1 = ranks[0]["steps"][-1], ranks[1]["steps"][-1]
    assert not torch.equal(last0["counts"], last1["counts"])
    expected, _, _ = balance_bias_update(last0["bias_before"], last0["counts"] + last1["counts"], RATE, True, clip=0.3)
    for rank in ranks:
        torch.testing.assert_close(rank["bias_after"], expected, rtol=0, atol=0)
