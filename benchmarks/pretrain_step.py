"""Throughput of one JEPA pretraining step: ours vs an in-run baseline written like the reference.

    python benchmarks/pretrain_step.py --config experiments/pretrain/neurojepa_base.yaml --device cuda --preset paper
    python benchmarks/pretrain_step.py --device cpu --preset tiny          # what `make bench` runs (< 1 min)

One step = target forward + context forward + predictor + loss + backward + clip + AdamW + MoE bias update + EMA, on
random brain-like volumes with the real mask generators and foreground map.

- ours: all masks in one encoder and one predictor forward (``batch_masks=True``), grouped MoE dispatch
  (``torch._grouped_mm``), optionally ``torch.compile`` (``--compile``);
- baseline: one forward per mask and the per-expert Python loop (the reference's structure).

Both start from the same weights; the loss of both on the same batch is printed as a numerics check. Prints one JSON
object: scans/s, median step time (the variants alternate step by step), warm-up time (with ``--compile``: the
compilation), peak memory, FLOPs per scan (``torch.utils.flop_counter``, which does not count SDPA on CPU;
``torch._grouped_mm`` is counted with a formula registered here), MFU against the dense bf16 peak of the GPU (null on
CPU and unknown GPUs), the ours/baseline ratio, and two checks of the encoder's input stage at the benchmark's batch:
the patch embedding as one GEMM against the Conv3d it replaces, and the cached RoPE tables against recomputing them.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `callbacks` and `data_modules` are top-level packages of the source tree

from neurojepa_pl.callbacks.ema import ema_update_  # noqa: E402
from neurojepa_pl.data_modules.collate import JEPAMaskCollator  # noqa: E402
from neurojepa_pl.masks import paper_mask_generators, vjepa2_mask_generators  # noqa: E402
from neurojepa_pl.models.moe import balance_bias_update  # noqa: E402
from neurojepa_pl.modules.pretrain import JEPAPretrainModule  # noqa: E402

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets (without sparsity).
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
TINY = {"img_size": [32, 36, 32], "patch_size": 4}


def grouped_mm_flops(a_shape, b_shape, *args: Any, **kwargs: Any) -> int:
    """FLOPs of ``torch._grouped_mm`` (2 per multiply-accumulate), which FlopCounterMode has no formula for."""
    if len(a_shape) == 2 and len(b_shape) == 3:  # [T, K] x [G, K, N], groups along T (the MoE forward)
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:  # [K, T] x [T, N], groups along T (weight gradients)
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    if len(a_shape) == 3 and len(b_shape) == 3:  # [G, M, K] x [G, K, N]
        return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]
    return 2 * a_shape[-2] * a_shape[-1] * b_shape[-1]  # [G, M, K] x [K, N], groups along N


def load_module_args(config: Path, preset: str) -> tuple[dict, dict]:
    """Model and data init args of an experiment YAML, shrunk to the test size for ``preset="tiny"``."""
    cfg = yaml.safe_load(config.read_text())
    model = dict(cfg["model"]["init_args"])
    data = dict(cfg.get("data", {}).get("init_args", {}))
    if preset == "tiny":
        tiny_encoder = "vit_tiny_moe" if "moe" in model.get("encoder", "") else "vit_tiny"
        model.update(encoder=tiny_encoder, encoder_overrides=TINY, predictor="predictor_tiny", predictor_overrides=TINY)
    model.update(init_from=None, compile=False, mask_figure_every_n_steps=0, collapse_every_n_steps=0)
    return model, data


def make_batch(
    module: JEPAPretrainModule, data_args: dict, batch_size: int, device: torch.device, step: int = 0
) -> dict:
    """Brain-like random volumes (a textured ellipsoid) collated with the experiment's masks (those of global batch
    ``step``) and foreground map; the volumes are the same for every ``step``."""
    img = module.context_encoder.config["img_size"]
    grid = module.context_encoder.grid_size
    g = torch.Generator().manual_seed(0)
    axes = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in img], indexing="ij")
    inside = sum(a**2 / 0.8**2 for a in axes) < 1
    # sample keys (epoch 0, the positions of batch ``step``): the collator seeds global batch ``step``'s masks from them
    samples = [
        {
            "image": (inside * torch.rand(img, generator=g)).unsqueeze(0).float(),
            "sample_key": torch.tensor([0, step * batch_size + i]),
        }
        for i in range(batch_size)
    ]
    make = vjepa2_mask_generators if data_args.get("masking") == "vjepa2" else paper_mask_generators
    patch = img[0] // grid[0]
    collator = JEPAMaskCollator(make(grid), batch_size=batch_size, batches_per_epoch=step + 1, patch_size=patch, seed=0)
    batch = collator(samples)
    return {
        k: (
            [t.to(device) for t in v]
            if isinstance(v, list) and v and torch.is_tensor(v[0])
            else v.to(device)
            if torch.is_tensor(v)
            else v
        )
        for k, v in batch.items()
    }


class Stepper:
    """A full optimizer update outside Lightning, in the order of docs/method.md §7.

    It does what the callbacks do in a real run.
    """

    def __init__(self, module: JEPAPretrainModule, device: torch.device) -> None:
        self.module = module.to(device).train()
        self.device = device
        self.optimizer = module.configure_optimizers()
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.target = list(module.target_encoder.parameters())
        self.online = list(module.context_encoder.parameters())
        self.moe = module.context_encoder.moe_layers()

    def loss(self, batch: dict) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            return self.module.compute_loss(batch)

    def step(self, batch: dict) -> torch.Tensor:
        loss = self.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for layer in self.moe:
                layer.gate.bias.copy_(balance_bias_update(layer.gate.bias, layer.counts, 1e-4, True)[0])
                layer.counts.zero_()
        ema_update_(self.target, self.online, 0.99925)
        return loss.detach()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(steppers: dict[str, Stepper], batch: dict, warmup: int, steps: int) -> dict[str, dict]:
    """Median step time of each variant, alternating them step by step so that load drift hits all alike."""
    device = next(iter(steppers.values())).device
    warmup_s = {}
    for name, stepper in steppers.items():
        synchronize(device)
        start = time.perf_counter()
        for _ in range(warmup):
            stepper.step(batch)
        synchronize(device)
        warmup_s[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(steps):
        for name, stepper in steppers.items():
            synchronize(device)
            start = time.perf_counter()
            stepper.step(batch)
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    results = {}
    for name, stepper in steppers.items():
        peak = None
        if device.type == "cuda":  # one more step alone, to read this variant's own peak
            torch.cuda.reset_peak_memory_stats(device)
            stepper.step(batch)
            synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
        median = statistics.median(times[name])
        results[name] = {
            "step_s": median,
            "step_s_all": times[name],
            "warmup_s": warmup_s[name],
            "scans_per_s": batch["image"].shape[0] / median,
            "peak_memory_bytes": peak,
        }
    return results


def flops_per_scan(stepper: Stepper, batch: dict) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten._grouped_mm: grouped_mm_flops})
    with counter:
        stepper.loss(batch).backward()
    stepper.optimizer.zero_grad(set_to_none=True)
    for layer in stepper.moe:
        layer.counts.zero_()
    return counter.get_total_flops() / batch["image"].shape[0]


def profile_steps(stepper: Stepper, batch: dict, steps: int, path: Path) -> dict[str, float]:
    """Run ``steps`` updates under ``torch.profiler``; write the per-operator table to ``path`` and return a summary.

    The summary splits the device time (CPU time on CPU) into matrix products (GEMM / grouped GEMM kernels),
    attention kernels and everything else, as fractions of the profiled total, to show what limits the step.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = stepper.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            stepper.step(batch)
        synchronize(stepper.device)
    events = prof.key_averages()
    sort_key = "self_device_time_total" if cuda else "self_cpu_time_total"
    path.write_text(events.table(sort_by=sort_key, row_limit=60, max_name_column_width=90))
    if cuda:  # device kernels only (operator rows also carry their kernels' time, which would count it twice)
        rows = [(e.key, e.self_device_time_total) for e in events if e.device_type == DeviceType.CUDA]
    else:
        rows = [(e.key, e.self_cpu_time_total) for e in events]
    total = sum(t for _, t in rows) or 1.0

    def share(*needles: str) -> float:
        return sum(t for name, t in rows if any(n in name.lower() for n in needles)) / total

    gemm = share("gemm", "matmul", "cutlass", "xmma", "nvjet", "aten::mm", "aten::bmm", "aten::addmm", "_grouped_mm")
    attention = share("flash", "attention", "fmha")
    return {
        "profiled_steps": steps,
        "time_per_step_s": total / steps / 1e6,
        "share_gemm": gemm,
        "share_attention": attention,
        "share_other": max(0.0, 1.0 - gemm - attention),
        "table": str(path),
    }


def input_stage_checks(module: JEPAPretrainModule, batch: dict, repeats: int = 5) -> dict[str, Any]:
    """The encoder's input stage at the benchmark's batch, the way it ran before against the way it runs now.

    * patch embedding, forward + backward to the weights: ``F.conv3d`` (kernel = stride) against ``PatchEmbed3D``'s
      one GEMM over unfolded patches, same weights;
    * RoPE tables of the stacked context masks: recomputed from the ids (``token_positions`` + ``rope_tables``)
      against rows gathered from the encoder's cached ``RopeTable``.

    bf16 autocast on CUDA, fp32 on CPU; medians of ``repeats`` timed calls after one untimed call; max abs differences
    of the outputs (and of the weight gradients for the patch embedding).
    """
    from torch.nn import functional as F

    from neurojepa_pl.models.rope import rope_tables, token_positions

    encoder = module.context_encoder
    embed, images = encoder.patch_embed, batch["image"]
    device = images.device
    weights = (embed.proj.weight, embed.proj.bias)

    def timed(fn: Any) -> tuple[float, Any]:
        times, out = [], None
        for _ in range(repeats + 1):
            synchronize(device)
            start = time.perf_counter()
            out = fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:]), out

    def with_grads(forward: Any) -> Any:
        def run() -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = forward()
            return out.detach(), torch.autograd.grad(out.float().square().mean(), weights)

        return run

    def conv() -> torch.Tensor:
        return F.conv3d(images, *weights, stride=embed.proj.stride).flatten(2).transpose(1, 2)

    conv_s, (conv_out, conv_grads) = timed(with_grads(conv))
    default_impl, embed.gemm = embed.gemm, True  # time the GEMM path on every device (CPU defaults to the conv)
    try:
        gemm_s, (gemm_out, gemm_grads) = timed(with_grads(lambda: embed(images)))
    finally:
        embed.gemm = default_impl
    ids = torch.cat(batch["context_idx"])  # [M*B, Kc]
    with torch.no_grad():
        layout, axis_dim = encoder.rope.layout, encoder.rope.axis_dim
        recompute_s, (cos_old, _) = timed(
            lambda: rope_tables(token_positions(ids, encoder.grid_size, layout), axis_dim)
        )
        cached_s, (cos_new, _) = timed(lambda: encoder.rope(ids))
    return {
        "patch_embed": {
            "conv3d_fwd_bwd_s": conv_s,
            "gemm_fwd_bwd_s": gemm_s,
            "speedup_gemm_over_conv3d": conv_s / gemm_s,
            "max_abs_diff_out": float((conv_out.float() - gemm_out.float()).abs().max()),
            "max_abs_out": float(conv_out.float().abs().max()),
            "max_abs_diff_weight_grad": float((conv_grads[0] - gemm_grads[0]).abs().max()),
        },
        "rope_tables": {
            "tokens": int(ids.numel()),
            "recompute_s": recompute_s,
            "cached_gather_s": cached_s,
            "speedup_cached_over_recompute": recompute_s / cached_s,
            "max_abs_diff": float((cos_old - cos_new).abs().max()),
        },
    }


def bf16_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK.items() if key in name), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/pretrain_step.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "experiments/pretrain/neurojepa_base.yaml")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--preset",
        choices=("tiny", "paper"),
        default="tiny",
        help="tiny: the test-size model; paper: the YAML's model as written",
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 5 cpu / 10 cuda)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 cpu / 3 cuda)")
    parser.add_argument("--batch", type=int, default=None, help="scans per step (default: tiny 2, paper the YAML's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile our encoders and predictor")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="TXT",
        help="after timing, profile 3 of our steps; write the operator table here, a summary in the JSON",
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    model_args, data_args = load_module_args(args.config, args.preset)
    batch_size = args.batch or (2 if args.preset == "tiny" else int(data_args.get("batch_size", 48)))
    steps = args.steps or (5 if device.type == "cpu" else 10)
    warmup = args.warmup if args.warmup is not None else (1 if device.type == "cpu" else 3)

    ours_module = JEPAPretrainModule(**{**model_args, "batch_masks": True})
    base_module = copy.deepcopy(ours_module)  # same weights
    base_module.hparams.batch_masks = False
    for encoder in (base_module.context_encoder, base_module.target_encoder):
        for layer in encoder.moe_layers():
            layer.dispatch = "loop"
    batch = make_batch(ours_module, data_args, batch_size, device)

    ours, baseline = Stepper(ours_module, device), Stepper(base_module, device)
    with torch.no_grad():  # numerics: both variants on the same batch and weights, before any update
        loss_ours, loss_base = float(ours.loss(batch)), float(baseline.loss(batch))
    for layer in ours.moe + baseline.moe:
        layer.counts.zero_()
    flops = flops_per_scan(ours, batch)
    checks = input_stage_checks(ours_module, batch)
    if args.compile:
        for network in (ours_module.context_encoder, ours_module.target_encoder, ours_module.predictor):
            network.compile()

    timed = time_interleaved({"baseline": baseline, "ours": ours}, batch, warmup, steps)
    timed_base, timed_ours = timed["baseline"], timed["ours"]
    profile = profile_steps(ours, batch, 3, args.profile) if args.profile else None
    peak = bf16_peak(device)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "config": str(args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config),
        "preset": args.preset,
        "encoder": model_args["encoder"],
        "batch": batch_size,
        "num_masks": len(batch["context_idx"]),
        "warmup_steps": warmup,
        "timed_steps": steps,
        "precision": "bf16-autocast" if device.type == "cuda" else "fp32",
        "compile": args.compile,
        "ours": timed_ours,
        "baseline": timed_base,
        "speedup_ours_over_baseline": timed_ours["scans_per_s"] / timed_base["scans_per_s"],
        "flops_per_scan": flops,
        "flops_note": "fwd+bwd of one step; SDPA is not counted on CPU"
        if device.type == "cpu"
        else "fwd+bwd of one step",
        "mfu_ours": None if peak is None else flops * timed_ours["scans_per_s"] / peak,
        "mfu_baseline": None if peak is None else flops * timed_base["scans_per_s"] / peak,
        "bf16_peak_flops": peak,
        "loss_ours": loss_ours,
        "loss_baseline": loss_base,
        "loss_abs_diff": abs(loss_ours - loss_base),
        "profile_ours": profile,
        "input_stage": checks,
    }
    if not all(math.isfinite(v) for v in (loss_ours, loss_base)):
        raise RuntimeError(f"non-finite loss in the benchmark: ours {loss_ours}, baseline {loss_base}")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
