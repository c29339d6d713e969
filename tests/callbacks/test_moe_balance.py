"""MoELoadBalance and the shared rebalance_moe_layers_: hand numbers on injected counts, counts reset, target copy,
no-op for dense encoders."""

import lightning.pytorch as pl
import pytest
import torch
from jepa_tiny import TinyJEPAData, tiny_module, tiny_trainer

from neurojepa_pl.models.moe import MoEConfig, MoEFeedForward, all_reduce_counts, rebalance_moe_layers_


class _InjectCounts(pl.Callback):
    """Replace the routing counts of the forward pass with known numbers just before the optimizer step."""

    def __init__(self, counts):
        self.counts = counts
        self.seen = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        for layer in pl_module.context_encoder.moe_layers():
            self.seen.append(layer.counts.clone())
            layer.counts.copy_(self.counts)


def test_bias_update_matches_hand_numbers(tmp_path):
    rate = 0.1
    module = tiny_module(moe_bias_rate=rate, ema_momentum=0.99)
    inject = _InjectCounts(torch.tensor([1, 2, 3, 6]))
    trainer = tiny_trainer(tmp_path, max_steps=1, callbacks=[inject])
    trainer.fit(module, datamodule=TinyJEPAData(n=4, batch_size=2))

    # the real forward counted every routed token of the 3 context forwards: 3 masks x B=2 x 144 tokens x top-2
    assert [int(c.sum()) for c in inject.seen] == [3 * 2 * 144 * 2]
    # c = [1, 2, 3, 6], mean 3: error / mean = [2/3, 1/3, 0, -1]; bias = 0.1 * that (already zero-mean, no clip)
    layer = module.context_encoder.moe_layers()[0]
    torch.testing.assert_close(layer.gate.bias, torch.tensor([2 / 30, 1 / 30, 0.0, -0.1]), rtol=0, atol=1e-6)
    assert int(layer.counts.sum()) == 0
    target_layer = module.target_encoder.moe_layers()[0]
    torch.testing.assert_close(target_layer.gate.bias, layer.gate.bias, rtol=0, atol=0)
    metrics = trainer.callback_metrics
    assert float(metrics["train/moe_min_vio"]) == torch.tensor(1 / 3).item()
    assert float(metrics["train/moe_max_vio"]) == 2.0
    assert float(metrics["train/moe_rate"]) == pytest.approx(rate)


def test_clip_and_recentre(tmp_path):
    module = tiny_module(moe_bias_rate=1.0)
    trainer = tiny_trainer(tmp_path, max_steps=1, callbacks=[_InjectCounts(torch.tensor([0, 0, 0, 12]))])
    trainer.fit(module, datamodule=TinyJEPAData(n=4, batch_size=2))
    # mean 3: u = [1, 1, 1, -3]; b = u -> clip to [0.3, 0.3, 0.3, -0.3] -> re-centre (mean 0.15)
    bias = module.context_encoder.moe_layers()[0].gate.bias
    torch.testing.assert_close(bias, torch.tensor([0.15, 0.15, 0.15, -0.45]), rtol=0, atol=1e-6)


def test_dense_encoder_is_a_no_op(tmp_path):
    module = tiny_module(encoder="vit_tiny")
    assert module.context_encoder.moe_layers() == []
    trainer = tiny_trainer(tmp_path, max_steps=1)
    trainer.fit(module, datamodule=TinyJEPAData(n=4, batch_size=2))
    assert module.update_step == 1
    assert "train/moe_min_vio" not in trainer.callback_metrics


def test_all_reduce_without_process_group_is_identity():
    counts = torch.tensor([[1, 2], [3, 4]])
    assert all_reduce_counts(counts) is counts
    assert counts.tolist() == [[1, 2], [3, 4]]


def _moe_layers(n):
    config = MoEConfig(num_experts=4, top_k=2, expert_hidden=8, shared_hidden=8)
    return [MoEFeedForward(8, config) for _ in range(n)]


def test_rebalance_moe_layers_proportional_two_layers_by_hand():
    layers = _moe_layers(2)
    layers[0].counts.copy_(torch.tensor([1, 2, 3, 6]))
    layers[1].counts.copy_(torch.tensor([4, 4, 4, 4]))
    min_vio, max_vio = rebalance_moe_layers_(layers, 0.1, proportional=True, clip=0.3)
    # layer 0: mean 3, u = [2/3, 1/3, 0, -1] (zero-mean already); layer 1 balanced: u = 0, bias stays 0
    torch.testing.assert_close(layers[0].gate.bias, torch.tensor([2 / 30, 1 / 30, 0.0, -0.1]), rtol=0, atol=1e-6)
    torch.testing.assert_close(layers[1].gate.bias, torch.zeros(4), rtol=0, atol=0)
    assert all(int(layer.counts.abs().sum()) == 0 for layer in layers)  # consumed
    # MinVio: mean(1/3, 1); MaxVio: mean(2, 1)
    assert float(min_vio) == pytest.approx((1 / 3 + 1) / 2, abs=1e-6)
    assert float(max_vio) == pytest.approx(1.5, abs=1e-6)
    assert min_vio.dtype == max_vio.dtype == torch.float32 and min_vio.dim() == 0


def test_rebalance_moe_layers_sign_rule_with_clip():
    (layer,) = _moe_layers(1)
    layer.gate.bias.copy_(torch.tensor([0.28, 0.0, 0.0, -0.28]))
    layer.counts.copy_(torch.tensor([0, 4, 4, 4]))
    rebalance_moe_layers_([layer], 0.05, proportional=False, clip=0.3)
    # mean 3: sign(err) = [1, -1, -1, -1], zero-mean [1.5, -0.5, -0.5, -0.5]; b + 0.05 u = [0.355, -0.025, -0.025,
    # -0.305] -> clip [0.3, -0.025, -0.025, -0.3] -> re-centre (mean -0.0125)
    expected = torch.tensor([0.3125, -0.0125, -0.0125, -0.2875])
    torch.testing.assert_close(layer.gate.bias, expected, rtol=0, atol=1e-6)


def test_rebalance_moe_layers_needs_a_layer():
    with pytest.raises(ValueError, match="at least one MoE layer"):
        rebalance_moe_layers_([], 0.1, proportional=True, clip=0.3)
