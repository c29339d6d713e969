"""``JEPAPretrainModule(compile=...)``: auto (None) compiles on CUDA only; compiled, a training run traces its graphs in
the first step and never again, because the paper's masks give every batch the same shapes (docs/method.md §2.5)."""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch._dynamo
from jepa_tiny import TinyJEPAData, tiny_module, tiny_trainer


def _compiled(network: torch.nn.Module) -> bool:
    return network._compiled_call_impl is not None


def test_auto_compiles_on_cuda_only(tmp_path):
    module = tiny_module()  # compile=None: auto
    assert module.hparams.compile is None
    cuda, cpu = SimpleNamespace(root_device=torch.device("cuda", 0)), SimpleNamespace(root_device=torch.device("cpu"))
    assert module._compile_enabled(cuda) and not module._compile_enabled(cpu)
    assert not module._compile_enabled(None)  # no trainer: the module's own device (CPU here)
    assert not tiny_module(compile=False)._compile_enabled(cuda)
    assert tiny_module(compile=True)._compile_enabled(cpu)  # an explicit choice wins

    trainer = tiny_trainer(tmp_path, max_steps=1)
    trainer.fit(module, datamodule=TinyJEPAData(n=2, batch_size=2))  # a CPU run stays eager
    assert not any(_compiled(n) for n in (module.context_encoder, module.target_encoder, module.predictor))


class _FramesAfterFirstStep(pl.Callback):
    """Dynamo's frame counters after the first optimizer step."""

    def __init__(self) -> None:
        self.after_first: dict[str, int] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:
            self.after_first = dict(torch._dynamo.utils.counters["frames"])


@pytest.mark.slow
def test_compiled_training_traces_only_in_the_first_step(tmp_path, monkeypatch):
    # The module's own `network.compile()`, with the graph front end only (aot_eager: no C++ toolchain on CPU).
    original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: original(self, backend="aot_eager"))
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = tiny_module(encoder="vit_tiny", compile=True)
    frames = _FramesAfterFirstStep()
    trainer = tiny_trainer(tmp_path, max_steps=4, callbacks=[frames])
    trainer.fit(module, datamodule=TinyJEPAData(n=8, batch_size=2))  # 4 batches, 4 different mask sets
    assert all(_compiled(n) for n in (module.context_encoder, module.target_encoder, module.predictor))
    assert module.update_step == 4
    assert frames.after_first and frames.after_first["ok"] >= 3  # target, context and predictor graphs
    assert dict(torch._dynamo.utils.counters["frames"]) == frames.after_first  # steps 2-4: no new trace
    # and no name changed: in-place compilation keeps the checkpoint keys
    assert not any("_orig_mod" in key for key in module.state_dict())
