"""Downstream modules end to end on a tiny in-memory data module: fit + test, reports, freezing, MoE bias update,
optimizer groups and schedules, predictions gathered across ranks."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from trainers import free_port, tiny_trainer

sys.path.insert(0, str(Path(__file__).parent))
from dist_workers import store_worker  # noqa: E402
from tiny_data import TinyFinetuneData  # noqa: E402

from neurojepa_pl.metrics.survival import concordance_index  # noqa: E402
from neurojepa_pl.models.cnn import CNNEncoder3D, CNNLinearHead, SimpleCNN3D  # noqa: E402
from neurojepa_pl.modules.downstream import ClassificationModule, RegressionModule, SurvivalModule  # noqa: E402
from neurojepa_pl.modules.finetune_optim import DownstreamSchedule, backbone_layer_id, build_param_groups  # noqa: E402

TINY = dict(
    backbone="vit_tiny",
    backbone_kwargs={"img_size": [16, 16, 16], "patch_size": 8},
    head_heads=4,
    head_depth=2,
    lr=1e-3,
    warmup_epochs=0,
    n_bootstrap=50,
)


def _trainer(max_epochs=2, **kwargs):
    return tiny_trainer(max_epochs=max_epochs, **kwargs)


def _check_report(out: Path, n: int):
    data = json.loads((out / "metrics.json").read_text())
    assert data["n"] == n
    for name, entry in data["metrics"].items():
        assert set(entry) == {"value", "ci_low", "ci_high", "warnings"}
        if entry["value"] is not None and name != "selection":
            assert entry["ci_low"] - 1e-9 <= entry["value"] <= entry["ci_high"] + 1e-9
    table = pd.read_csv(out / "predictions.csv")
    assert len(table) == n and table["path"].is_unique
    return data, table


def test_binary_probe_fits_freezes_backbone_and_writes_report(tmp_path):
    torch.manual_seed(0)
    model = ClassificationModule(task="binary", num_classes=2, finetune="probe", output_dir=str(tmp_path), **TINY)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    assert not any(p.requires_grad for p in model.backbone.parameters())
    trainer = _trainer(max_epochs=3)
    trainer.fit(model, TinyFinetuneData("binary"))
    assert model.training and not model.backbone.training  # the frozen backbone stays in eval mode
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, before[key])
    assert "val/selection" in trainer.callback_metrics
    trainer.test(model, TinyFinetuneData("binary"))
    data, table = _check_report(tmp_path, 12)
    assert data["task"] == "binary" and data["finetune"] == "probe"
    assert set(table.columns) >= {"subject_id", "path", "target", "prob_0", "prob_1"}
    auroc = data["metrics"]["auroc"]["value"]
    assert auroc == pytest.approx(float(trainer.callback_metrics["test/auroc"]), abs=1e-6)
    assert auroc > 0.9  # the tiny task (blob position) is easy
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["pr.png", "roc.png"]


@pytest.mark.parametrize("task,num_classes", [("multiclass", 3), ("multilabel", 3)])
def test_multiclass_and_multilabel_report_per_class(tmp_path, task, num_classes):
    model = ClassificationModule(
        task=task, num_classes=num_classes, finetune="frozen", head="linear", output_dir=str(tmp_path), **TINY
    )
    trainer = _trainer(max_epochs=1)
    trainer.fit(model, TinyFinetuneData(task))
    trainer.test(model, TinyFinetuneData(task))
    data, table = _check_report(tmp_path, 12)
    names = ["finding0", "finding1", "finding2"] if task == "multilabel" else ["0", "1", "2"]
    assert {f"auroc/{n}" for n in names} <= set(data["metrics"])
    assert {f"prob_{n}" for n in names} <= set(table.columns)
    if task == "multilabel":
        # label 2 is missing for every 5th scan: an empty cell in the table
        assert table["target_finding2"].isna().sum() == 3


def test_regression_standardises_with_train_statistics(tmp_path):
    data = TinyFinetuneData("regression")
    model = RegressionModule(finetune="full", output_dir=str(tmp_path), **TINY)
    trainer = _trainer(max_epochs=2)
    trainer.fit(model, data)
    train_ages = np.array([r["label"] for r in data.datasets["train"].records])
    assert float(model.target_mean) == pytest.approx(train_ages.mean())
    assert float(model.target_std) == pytest.approx(train_ages.std(ddof=1))
    trainer.test(model, data)
    report, table = _check_report(tmp_path, 12)
    # Predictions are reported in years (around the training mean), not in standardised units.
    assert abs(table["prediction"].mean() - train_ages.mean()) < 3 * train_ages.std()
    mae = np.abs(table["prediction"] - table["target"]).mean()
    assert report["metrics"]["mae"]["value"] == pytest.approx(mae, rel=1e-6)
    assert (tmp_path / "figures" / "scatter.png").exists()


def test_regression_without_statistics_refuses_to_predict():
    model = RegressionModule(**TINY)
    with pytest.raises(RuntimeError, match="no target statistics"):
        model.to_target_units(torch.zeros(2, 1))
    raw = RegressionModule(standardize_targets=False, **TINY)
    torch.testing.assert_close(raw.to_target_units(torch.tensor([[3.0]])), torch.tensor([3.0], dtype=torch.float64))


def test_survival_cindex_is_computed_on_all_predictions(tmp_path):
    model = SurvivalModule(finetune="full", output_dir=str(tmp_path), **TINY)
    trainer = _trainer(max_epochs=2)
    data = TinyFinetuneData("survival", batch_size=5)  # several val/test batches
    trainer.fit(model, data)
    trainer.test(model, data)
    report, table = _check_report(tmp_path, 12)
    expected = concordance_index(table["time"], table["event"], table["risk"])
    assert report["metrics"]["cindex"]["value"] == pytest.approx(expected, abs=1e-12)
    assert (tmp_path / "figures" / "kaplan_meier.png").exists()


SMALL_CNN = {"widths": [2, 4, 8, 8], "feat_dim": 16, "hidden_dim": 8}
CNN = dict(backbone="cnn", backbone_kwargs=SMALL_CNN, head="linear", finetune="full", lr=1e-3, warmup_epochs=0)


def test_cnn_baseline_fits_and_predicts_embeddings(tmp_path):
    model = ClassificationModule(task="binary", n_bootstrap=20, output_dir=str(tmp_path), **CNN)
    assert isinstance(model.backbone, CNNEncoder3D) and isinstance(model.head, CNNLinearHead)
    trainer = _trainer(max_epochs=1)
    trainer.fit(model, TinyFinetuneData("binary"))
    trainer.test(model, TinyFinetuneData("binary"))
    data, _ = _check_report(tmp_path, 12)
    assert data["backbone"] == "cnn" and data["head"] == "linear" and data["finetune"] == "full"
    batches = trainer.predict(model, TinyFinetuneData("binary"))
    assert batches[0]["embedding"].shape == (6, 16)
    assert batches[0]["prediction"].shape == (6, 2)
    torch.testing.assert_close(batches[0]["prediction"].sum(1), torch.ones(6))
    # the embedding is the CNN's feature layer, the head's input
    batch = next(iter(TinyFinetuneData("binary").predict_dataloader()))
    with torch.no_grad():
        features = model.backbone.forward_features(batch["image"])
    torch.testing.assert_close(batches[0]["embedding"], features)


@pytest.mark.parametrize("task,num_classes", [("binary", 2), ("multilabel", 3)])
def test_cnn_module_is_the_single_model_baseline_at_a_seed(task, num_classes):
    # Same weights as SimpleCNN3D for the same seed (tests/models/test_cnn.py ties that to the pre-split model), and
    # every CNN parameter trained, none of them twice.
    torch.manual_seed(3)
    model = ClassificationModule(task=task, num_classes=num_classes, **CNN).eval()
    torch.manual_seed(3)
    reference = SimpleCNN3D(num_outputs=num_classes, **SMALL_CNN).eval()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())
    for new, ref in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(new, ref)
    x = torch.randn(4, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    assert all(p.requires_grad for p in model.parameters())
    groups = {g["name"]: len(g["params"]) for g in build_param_groups(model.backbone, model.head)}
    assert groups == {"backbone/decay": 5, "backbone/no_decay": 5, "head/decay": 2, "head/no_decay": 2}


def test_fit_checkpoint_reloads_with_its_hparams(tmp_path):
    # load_from_checkpoint passes the saved hyper-parameters back to __init__: the task class's own arguments only.
    data = TinyFinetuneData("regression")
    model = RegressionModule(finetune="full", **TINY)
    trainer = _trainer(max_epochs=1, limit_val_batches=0)
    trainer.fit(model, data)
    assert "task" not in model.hparams and "num_outputs" not in model.hparams
    assert model.hparams["backbone"] == "vit_tiny" and model.hparams["finetune"] == "full"
    trainer.save_checkpoint(tmp_path / "reg.ckpt")
    cnn = ClassificationModule(task="multiclass", num_classes=3, **CNN)
    _trainer(max_epochs=1, limit_val_batches=0).fit(cnn, TinyFinetuneData("multiclass"))
    assert dict(cnn.hparams) == {"task": "multiclass", "num_classes": 3, **CNN}
    cnn.trainer.save_checkpoint(tmp_path / "cnn.ckpt")
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    for cls, fitted, name in [(RegressionModule, model, "reg"), (ClassificationModule, cnn, "cnn")]:
        restored = cls.load_from_checkpoint(tmp_path / f"{name}.ckpt").eval()
        assert dict(restored.hparams) == dict(fitted.hparams)
        with torch.no_grad():
            outputs = restored(x)
            torch.testing.assert_close(outputs, fitted.eval()(x), rtol=0, atol=0)
            torch.testing.assert_close(restored.prediction_tensor(outputs), fitted.prediction_tensor(outputs))


def test_predict_step_returns_mean_token_embedding():
    model = ClassificationModule(task="binary", **TINY).eval()
    batch = next(iter(TinyFinetuneData("binary").test_dataloader()))
    out = model.predict_step(batch, 0)
    with torch.no_grad():
        tokens = model.backbone(batch["image"])
    torch.testing.assert_close(out["embedding"], tokens.mean(1))
    assert out["path"] == batch["path"]


@pytest.mark.parametrize("rate", [0.0, 0.05])
def test_moe_bias_update_on_and_off(rate):
    kwargs = {**TINY, "backbone": "vit_tiny_moe"}
    model = ClassificationModule(task="binary", finetune="full", moe_bias_update_rate=rate, **kwargs)
    layers = model.moe_layers()
    assert layers
    before = [layer.gate.bias.clone() for layer in layers]
    trainer = _trainer(max_epochs=1, limit_val_batches=0)
    trainer.fit(model, TinyFinetuneData("binary"))
    for layer, bias in zip(layers, before):
        if rate == 0.0:
            torch.testing.assert_close(layer.gate.bias, bias)
        else:
            # 4 sign updates of size <= 2 * rate each (after zero-mean projection), re-centred.
            change = (layer.gate.bias - bias).abs().max()
            assert 0 < float(change) <= 4 * 2 * rate + 1e-6
            assert float(layer.gate.bias.mean().abs()) < 1e-6
        assert int(layer.counts.sum()) == 0  # counts are consumed at every optimizer step


def test_invalid_combinations_are_rejected():
    with pytest.raises(ValueError, match="frozen backbone"):
        ClassificationModule(finetune="probe", moe_bias_update_rate=1e-4, **TINY)
    with pytest.raises(ValueError, match="linear head on a frozen"):
        ClassificationModule(finetune="frozen", **TINY)
    for bad, setting in [
        ({"finetune": "probe", "head": "attentive"}, "finetune: full"),
        ({"checkpoint": "pretrained.ckpt"}, "checkpoint: null"),
        ({"layer_decay": 0.75}, "layer_decay: null"),
        ({"head": "attentive"}, "head: linear"),
    ]:
        with pytest.raises(ValueError, match=f"from-scratch CNN baseline; set {setting}"):
            ClassificationModule(**{**CNN, **bad})
    with pytest.raises(ValueError, match="backbone: cnn, head: linear, with cnn_kwargs as backbone_kwargs"):
        ClassificationModule(head="cnn", finetune="full")
    with pytest.raises(ValueError, match="layer_decay"):
        ClassificationModule(finetune="probe", layer_decay=0.75, **TINY)
    with pytest.raises(ValueError, match="2 logits"):
        ClassificationModule(task="binary", num_classes=1, **TINY)
    model = ClassificationModule(task="multiclass", num_classes=4, **TINY)
    with pytest.raises(ValueError, match="num_classes"):
        _trainer(max_epochs=1).fit(model, TinyFinetuneData("multiclass"))


# ------------------------------------------------------------------------------------------- optimizer pieces
def test_param_groups_with_layer_decay_and_head_scale():
    from neurojepa_pl.models import build_encoder
    from neurojepa_pl.models.heads import AttentiveClassifier

    encoder = build_encoder("vit_tiny", img_size=(16, 16, 16), patch_size=8)
    head = AttentiveClassifier(64, 2, depth=1, num_heads=4)
    groups = build_param_groups(encoder, head, head_lr_scale=10.0, layer_decay=0.5)
    by_name = {g["name"]: g for g in groups}
    depth = len(encoder.blocks)  # 2 blocks -> layers 0..3
    assert by_name["backbone/layer0/decay"]["lr_scale"] == 0.5 ** (depth + 1)
    assert by_name["backbone/layer1/decay"]["lr_scale"] == 0.5**depth
    assert by_name["backbone/layer3/no_decay"]["lr_scale"] == 1.0  # final norm
    assert by_name["head/decay"]["lr_scale"] == 10.0 and by_name["head/no_decay"]["wd_scale"] == 0.0
    n_params = sum(p.numel() for g in groups for p in g["params"])
    assert n_params == sum(p.numel() for p in encoder.parameters()) + sum(p.numel() for p in head.parameters())
    # no_decay holds exactly the biases and 1-D parameters
    no_decay = {id(p) for g in groups if g["wd_scale"] == 0.0 for p in g["params"]}
    for name, p in list(encoder.named_parameters()) + list(head.named_parameters()):
        assert (id(p) in no_decay) == (p.ndim <= 1 or name.endswith("bias"))
    assert backbone_layer_id("patch_embed.proj.weight", 2) == 0 and backbone_layer_id("blocks.1.mlp.fc1.weight", 2) == 2


def test_warmup_cosine_schedule_values():
    s = DownstreamSchedule(
        lr=1e-3,
        start_lr=1e-6,
        final_lr=1e-5,
        warmup_steps=10,
        total_steps=110,
        weight_decay=0.04,
        final_weight_decay=0.4,
    )
    assert s.lr_at(0) == pytest.approx(1e-6)
    assert s.lr_at(5) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))
    assert s.lr_at(10) == pytest.approx(1e-3)
    assert s.lr_at(60) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s.lr_at(110) == pytest.approx(1e-5) and s.lr_at(200) == pytest.approx(1e-5)
    assert s.weight_decay_at(55) == pytest.approx(0.22)


def test_module_lr_follows_the_schedule(tmp_path):
    model = ClassificationModule(
        task="binary", finetune="full", **{**TINY, "lr": 1e-3, "warmup_epochs": 1.0, "start_lr": 0.0, "final_lr": 0.0}
    )
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = _trainer(max_epochs=2, limit_val_batches=0, callbacks=[Spy()])
    trainer.fit(model, TinyFinetuneData("binary"))  # 4 steps per epoch, warm-up 4 steps, 8 in total
    expected = [model.schedule.lr_at(k) for k in range(1, 9)]
    assert seen == pytest.approx(expected)
    assert expected[3] == pytest.approx(1e-3)


# ------------------------------------------------------------------------------------------- gathering across ranks
def test_prediction_store_gathers_all_ranks_and_drops_padding(tmp_path):
    mp.spawn(store_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"{rank}.pt", weights_only=False)
        assert result["path"] == ["scan0", "scan2", "scan4", "scan1", "scan3"]
        np.testing.assert_array_equal(result["risk"], [0.0, 2.0, 4.0, 1.0, 3.0])


@pytest.mark.slow
def test_survival_under_two_process_ddp_gathers_everything(tmp_path):
    # Real Lightning DDP on 2 CPU processes (gloo): Cox risk sets and the test report span both ranks, and the
    # padded duplicate of the distributed sampler is dropped (12 test scans over 2 ranks with batch 5).
    model = SurvivalModule(
        finetune="full", output_dir=str(tmp_path), **{**TINY, "backbone": "vit_tiny_moe"}, moe_bias_update_rate=0.01
    )
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = TinyFinetuneData("survival", batch_size=5, n_eval=13)
    trainer.fit(model, data)
    trainer.test(model, data)
    report, table = _check_report(tmp_path, 13)
    assert sorted(table["path"]) == sorted(item["path"] for item in data.splits["test"].items)
    expected = concordance_index(table["time"], table["event"], table["risk"])
    assert report["metrics"]["cindex"]["value"] == pytest.approx(expected, abs=1e-12)
