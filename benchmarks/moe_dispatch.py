"""Forward+backward time of one paper-size MoE layer: grouped dispatch (torch._grouped_mm) vs the per-expert loop.

Both run in the same process on the same input; prints one JSON line:
{device, torch, tokens, dtype, ms_loop, ms_grouped, speedup, max_abs_diff, max_abs_diff_grad}.

    python benchmarks/moe_dispatch.py --device cpu
    python benchmarks/moe_dispatch.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext

import torch

from neurojepa_pl.models.moe import MoEConfig, MoEFeedForward

PAPER_CUDA_TOKENS = 48 * 3 * 144  # batch 48 x 3 context masks x 144 kept tokens
CPU_TOKENS = 2048


def _step(
    layer: MoEFeedForward, x: torch.Tensor, grad_out: torch.Tensor, autocast
) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    with autocast():
        out = layer(x)
    out.backward(grad_out.to(out.dtype))
    return out.detach().float(), x.grad.float()


def _time(layer, x, grad_out, autocast, repeats: int, warmup: int) -> float:
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        _step(layer, x, grad_out, autocast)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        layer.zero_grad(set_to_none=True)
        _step(layer, x, grad_out, autocast)
    sync()
    return (time.perf_counter() - start) / repeats * 1e3


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--tokens", type=int, default=None, help=f"tokens T (default {PAPER_CUDA_TOKENS} on cuda, {CPU_TOKENS} on cpu)"
    )
    parser.add_argument(
        "--dtype",
        choices=("bf16", "fp32"),
        default=None,
        help="bf16 = autocast (default on cuda); fp32 (default on cpu)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed iterations (default 20 on cuda, 3 on cpu)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    tokens = args.tokens or (PAPER_CUDA_TOKENS if cuda else CPU_TOKENS)
    dtype = args.dtype or ("bf16" if cuda else "fp32")
    repeats = args.repeats or (20 if cuda else 3)

    torch.manual_seed(args.seed)
    layer = MoEFeedForward(768, MoEConfig(), dispatch="grouped").to(args.device)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    x = torch.randn(tokens, 768, device=args.device, generator=gen)
    grad_out = torch.randn(tokens, 768, device=args.device, generator=gen)
    autocast = (lambda: torch.autocast(args.device, dtype=torch.bfloat16)) if dtype == "bf16" else nullcontext

    out_g, grad_g = _step(layer, x, grad_out, autocast)
    layer.dispatch = "loop"
    out_l, grad_l = _step(layer, x, grad_out, autocast)
    ms_loop = _time(layer, x, grad_out, autocast, repeats, args.warmup)
    layer.dispatch = "grouped"
    ms_grouped = _time(layer, x, grad_out, autocast, repeats, args.warmup)
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "tokens": tokens,
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "ms_loop": round(ms_loop, 3),
        "ms_grouped": round(ms_grouped, 3),
        "speedup": round(ms_loop / ms_grouped, 3),
        "max_abs_diff": (out_g - out_l).abs().max().item(),
        "max_abs_diff_grad": (grad_g - grad_l).abs().max().item(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
