"""FSDP2 (Lightning's ModelParallelStrategy, ``fully_shard``) for JEPA pretraining on CPU/gloo.

* one process: the sharding plan (every block and network a unit, every parameter a DTensor, context and target
  sharded alike), the EMA on the shards, the target encoder running on its post-EMA weights, and compilation over the
  FSDP2 units (same losses as eager, traced in the first step only);
* two processes: the same training under FSDP2 and under DDP gives the same losses, gradient norms and weights.

What needs a GPU (NCCL, bf16 autocast, throughput and memory against DDP) is in ``benchmarks/gpu_session.sh``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fsdp2_workers import StepRecorder, fit_worker, full_state_dict
from jepa_tiny import TinyJEPAData, tiny_module, tiny_trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from trainers import free_port

from neurojepa_pl.models import build_encoder, load_backbone

MOMENTUM = 0.9


@pytest.fixture
def destroy_process_group():
    """Lightning leaves the gloo group of a one-process run initialised; later tests must not see it."""
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


class _EMAWitness(pl.Callback):
    """Both encoders' full parameters before every batch and at the end (runs before the module's callbacks)."""

    def __init__(self) -> None:
        self.states: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []

    def _take(self, pl_module: pl.LightningModule) -> None:
        def full(module: torch.nn.Module) -> list[torch.Tensor]:
            return [(p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for p in module.parameters()]

        self.states.append((full(pl_module.target_encoder), full(pl_module.context_encoder)))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._take(pl_module)

    def on_train_end(self, trainer, pl_module):
        self._take(pl_module)


def test_fsdp2_sharding_plan_and_ema_on_shards(tmp_path, destroy_process_group):
    torch.manual_seed(0)
    module = tiny_module(ema_momentum=MOMENTUM)
    witness = _EMAWitness()
    strategy = ModelParallelStrategy(save_distributed_checkpoint=False)  # as experiments/trainer/fsdp2.yaml
    trainer = tiny_trainer(tmp_path, strategy=strategy, max_steps=2, callbacks=[witness])
    trainer.fit(module, datamodule=TinyJEPAData(n=4, batch_size=2))
    assert module.update_step == 2

    # the plan: one unit per block, one per network, every parameter sharded along dim 0 of the data-parallel mesh
    networks = (module.context_encoder, module.target_encoder, module.predictor)
    assert all(isinstance(network, FSDPModule) for network in networks)
    blocks = [*module.context_encoder.blocks, *module.target_encoder.blocks, *module.predictor.predictor_blocks]
    assert len(blocks) == 6 and all(isinstance(block, FSDPModule) for block in blocks)
    params = dict(module.named_parameters())
    assert params and all(isinstance(p, DTensor) for p in params.values())
    for name, context in module.context_encoder.named_parameters():
        target = dict(module.target_encoder.named_parameters())[name]
        assert (target.device_mesh, target.placements) == (context.device_mesh, context.placements), name
    assert {str(p.placements) for p in params.values()} == {"(Shard(dim=0),)"}

    # the EMA ran on the shards after each of the two updates: target <- m * target + (1 - m) * context
    (t0, _), (t1, c1), (t2, c2) = witness.states
    for before, online, after in ((t0, c1, t1), (t1, c2, t2)):
        for t, o, a in zip(before, online, after):
            torch.testing.assert_close(a, MOMENTUM * t + (1 - MOMENTUM) * o, rtol=0, atol=1e-6)

    # the target encoder runs on its post-EMA weights (FSDP2 would otherwise keep a root's gathered parameters after
    # a forward without backward, and the last EMA update would not reach the next forward)
    plain = build_encoder("vit_tiny_moe", **module.hparams.encoder_overrides).eval()
    plain.load_state_dict(
        {k.removeprefix("target_encoder."): v for k, v in full_state_dict(module).items() if k.startswith("target_")}
    )
    volume = torch.rand(2, 1, 32, 36, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(module.target_encoder(volume), plain(volume), rtol=1e-5, atol=1e-5)

    # the checkpoint is one ordinary file, gathered from the shards, that load_backbone reads (the EMA target)
    trainer.save_checkpoint(tmp_path / "fsdp2.ckpt")
    loaded = load_backbone(str(tmp_path / "fsdp2.ckpt")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(volume), plain(volume), rtol=0, atol=0)


def test_fsdp2_rejects_tensor_parallelism(tmp_path, destroy_process_group):
    class _Mesh:
        def __getitem__(self, name: str) -> _Mesh:
            return self

        def size(self) -> int:
            return 2

    strategy = ModelParallelStrategy()
    strategy._device_mesh = _Mesh()  # what a 1 x 2 (data x tensor) layout would give
    with pytest.raises(ValueError, match="tensor_parallel_size: 1"):
        tiny_module()._shard_fsdp2(strategy)


@pytest.mark.slow
def test_fsdp2_compiled_equals_eager_without_recompiles(tmp_path, monkeypatch, destroy_process_group):
    # compile (auto on CUDA) over the FSDP2 units: FSDP2's hooks run eagerly between the compiled graphs
    import torch._dynamo

    original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: original(self, backend="aot_eager"))
    losses, frames = {}, []

    class _Frames(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            frames.append(int(torch._dynamo.utils.counters["frames"]["total"]))

    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        module = tiny_module(encoder="vit_tiny", compile=compiled)
        recorder = StepRecorder()
        callbacks = [recorder, _Frames()] if compiled else [recorder]
        trainer = tiny_trainer(
            tmp_path / str(compiled),
            strategy=ModelParallelStrategy(),
            max_steps=3,
            use_distributed_sampler=False,
            callbacks=callbacks,
        )
        trainer.fit(module, datamodule=TinyJEPAData(n=6, batch_size=2))
        losses[compiled] = [step["train/loss"] for step in recorder.steps]
    assert module.context_encoder._compiled_call_impl is not None
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert frames[0] > 0 and frames == [frames[0]] * 3  # traced in the first step only


@pytest.mark.slow
def test_two_process_fsdp2_equals_ddp(tmp_path):
    mp.spawn(fit_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    runs = {
        name: [torch.load(tmp_path / f"{name}_rank{r}.pt", weights_only=False) for r in (0, 1)]
        for name in ("ddp", "fsdp2")
    }
    for rank in (0, 1):
        ddp, fsdp2 = runs["ddp"][rank], runs["fsdp2"][rank]
        assert ddp["update_step"] == fsdp2["update_step"] == 2
        assert fsdp2["dtensor_params"] == fsdp2["num_params"] and ddp["dtensor_params"] == 0
        for ddp_step, fsdp2_step in zip(ddp["steps"], fsdp2["steps"], strict=True):
            assert fsdp2_step["train/loss"] == pytest.approx(ddp_step["train/loss"], rel=1e-5)
            assert fsdp2_step["train/grad_norm"] == pytest.approx(ddp_step["train/grad_norm"], rel=1e-5)
        # weights, EMA target and MoE biases after two updates, gathered from the shards
        assert ddp["state"].keys() == fsdp2["state"].keys()
        for key, value in ddp["state"].items():
            torch.testing.assert_close(fsdp2["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    # each rank held half of every parameter with at least two rows (the shards, not replicas)
    local = [runs["fsdp2"][r]["local_numel"] for r in (0, 1)]
    full = runs["ddp"][0]["local_numel"]
    weight = "context_encoder.blocks.0.attn.qkv.weight"
    assert local[0][weight] + local[1][weight] == full[weight] and local[0][weight] == full[weight] // 2


@pytest.mark.gpu
def test_cuda_fsdp2_equals_one_device_in_bf16(tmp_path, destroy_process_group):
    steps = {}
    for name, strategy in (("single", "auto"), ("fsdp2", ModelParallelStrategy())):
        torch.manual_seed(0)
        module = tiny_module(ema_momentum=MOMENTUM, compile=False)
        recorder = StepRecorder()
        trainer = tiny_trainer(
            tmp_path / name,
            accelerator="gpu",
            precision="bf16-mixed",
            strategy=strategy,
            max_steps=3,
            deterministic=False,
            use_distributed_sampler=False,  # the same batches in the same order for both
            callbacks=[recorder],
        )
        trainer.fit(module, datamodule=TinyJEPAData(n=6, batch_size=2))
        steps[name] = recorder.steps
    assert len(steps["fsdp2"]) == 3
    for one, sharded in zip(steps["single"], steps["fsdp2"], strict=True):
        assert sharded["train/loss"] == pytest.approx(one["train/loss"], rel=1e-3)
        assert sharded["train/grad_norm"] == pytest.approx(one["train/grad_norm"], rel=1e-2)
