"""EMATargetUpdate: maths against hand values, foreach over mixed shapes, once per optimizer step, FSDP2 shards."""

import lightning.pytorch as pl
import pytest
import torch
from jepa_tiny import TinyJEPAData, tiny_module, tiny_trainer

from neurojepa_pl.callbacks import EMATargetUpdate, ema_update_


def test_ema_update_matches_hand_values():
    target = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0], [10.0]])]
    online = [torch.tensor([3.0, 5.0]), torch.tensor([[1.0], [0.0]])]
    ema_update_(target, online, 0.9)
    torch.testing.assert_close(target[0], torch.tensor([1.2, 2.3]), rtol=0, atol=1e-6)
    torch.testing.assert_close(target[1], torch.tensor([[0.1], [9.0]]), rtol=0, atol=1e-6)
    assert online[0].tolist() == [3.0, 5.0]  # online untouched


def test_ema_update_equals_per_tensor_formula_on_many_tensors():
    g = torch.Generator().manual_seed(0)
    shapes = [(7,), (3, 4), (2, 3, 5), (1,)]
    target = [torch.randn(s, generator=g) for s in shapes]
    online = [torch.randn(s, generator=g) for s in shapes]
    expected = [0.99925 * t + (1 - 0.99925) * o for t, o in zip(target, online)]
    ema_update_(target, online, 0.99925)
    for got, want in zip(target, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


def test_ema_update_momentum_bounds():
    ema_update_([torch.zeros(1)], [torch.ones(1)], 1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ema_update_([torch.zeros(1)], [torch.ones(1)], 1.5)


class _Snapshots(pl.Callback):
    """Parameters of both encoders before every batch and at the end (runs before the module's callbacks)."""

    def __init__(self):
        self.states = []

    def _take(self, pl_module):
        self.states.append(
            (
                [p.detach().clone() for p in pl_module.target_encoder.parameters()],
                [p.detach().clone() for p in pl_module.context_encoder.parameters()],
            )
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._take(pl_module)

    def on_train_end(self, trainer, pl_module):
        self._take(pl_module)


def _expected_ema(target, online, m):
    return [m * t + (1 - m) * o for t, o in zip(target, online)]


def _assert_lists_close(a, b, atol=1e-6):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


def test_ema_runs_once_per_optimizer_step_under_accumulation(tmp_path):
    momentum = 0.5  # large steps so a missed or doubled update is obvious
    module = tiny_module(ema_momentum=momentum)
    snaps = _Snapshots()
    trainer = tiny_trainer(tmp_path, max_steps=2, accumulate_grad_batches=2, callbacks=[snaps])
    trainer.fit(module, datamodule=TinyJEPAData(n=8, batch_size=2))
    assert trainer.global_step == 2 and module.update_step == 2
    (t0, c0), (t1, c1), (t2, c2), (t3, c3), (t4, c4) = snaps.states
    _assert_lists_close(t0, c0, atol=0)  # the target starts as a copy
    _assert_lists_close(t1, t0, atol=0)  # micro-batch 1 of 2: no optimizer step, no EMA
    _assert_lists_close(c1, c0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(c2, c1))  # step 1 changed the context encoder ...
    _assert_lists_close(t2, _expected_ema(t1, c2, momentum))  # ... and the target moved once towards it
    _assert_lists_close(t3, t2, atol=0)
    _assert_lists_close(t4, _expected_ema(t3, c4, momentum))
    # buffers: the MoE balance bias is copied to the target; the target never counts routed tokens
    for tgt, ctx in zip(module.target_encoder.moe_layers(), module.context_encoder.moe_layers()):
        torch.testing.assert_close(tgt.gate.bias, ctx.gate.bias, rtol=0, atol=0)
        assert int(tgt.counts.sum()) == 0


def test_ema_rejects_mismatched_encoders(tmp_path):
    module = tiny_module()
    module.target_encoder = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="target_encoder has .* parameters"):
        EMATargetUpdate().on_train_start(tiny_trainer(tmp_path), module)


@pytest.fixture
def gloo_world_of_one(tmp_path):
    """A one-process gloo group and its CPU device mesh, for DTensor parameters without a second process."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _fsdp2_pair(mesh, shard_target: bool = True):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    online = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    target = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    for module in (online, target) if shard_target else (online,):
        fully_shard(module[0], mesh=mesh)
        fully_shard(module, mesh=mesh, reshard_after_forward=True)
    return target, online


def test_ema_updates_dtensor_parameters_through_their_local_shards(gloo_world_of_one):
    from torch.distributed.tensor import DTensor

    from neurojepa_pl.callbacks.ema import _aligned_pairs, local_shards

    target, online = _fsdp2_pair(gloo_world_of_one)
    t_params, o_params = _aligned_pairs(target, online, "parameters")
    assert all(isinstance(p, DTensor) for p in t_params + o_params)
    before = [p.full_tensor().clone() for p in t_params]
    with torch.no_grad():
        shards = local_shards(t_params)
        assert not any(isinstance(s, DTensor) for s in shards)
        ema_update_(shards, local_shards(o_params), 0.75)
    for got, t, o in zip(t_params, before, o_params):  # the in-place shard update reached the DTensor parameters
        torch.testing.assert_close(got.full_tensor(), 0.75 * t + 0.25 * o.full_tensor(), rtol=0, atol=1e-6)


def test_ema_rejects_differently_sharded_encoders(gloo_world_of_one):
    from neurojepa_pl.callbacks.ema import _aligned_pairs

    target, online = _fsdp2_pair(gloo_world_of_one, shard_target=False)  # the context sharded, the target not
    with pytest.raises(RuntimeError, match="same plan"):
        _aligned_pairs(target, online, "parameters")
