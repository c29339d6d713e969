"""Collect the figures of one ``benchmarks/gpu_session.sh`` run into one JSON object (printed).

    python benchmarks/gpu_summary.py runs/gpu_session > runs/gpu_session/summary.json

Reads the stages' outputs in that folder (``compile.out``, ``eager.out``: ``pretrain_step.py``; ``recompiles.out``,
``ddp.out``, ``fsdp2.out``: ``fit_step.py``; ``fit_throughput.out``; ``gpu_tests.out``; ``env.json``;
``stages.tsv``). A stage that failed or was skipped gives null figures; its ``.err`` file says why.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

GB = 1e9
STEP_GOAL_SCANS_PER_S = 400.0
MFU_GOAL = 0.30
MEMORY_GOAL_GB = 31.0
FIT_SHARE_GOAL = 0.9


def load(out: Path, name: str) -> dict[str, Any] | None:
    """The last JSON object a stage printed at the start of a line (``NAME.out``; ``env.json`` for ``env``), or None."""
    path = out / ("env.json" if name == "env" else f"{name}.out")
    if not path.exists():
        return None
    text, decoder, found = path.read_text(), json.JSONDecoder(), None
    offsets = [0] if text.startswith("{") else []
    offsets += [i + 1 for i, ch in enumerate(text) if ch == "\n" and text[i + 1 : i + 2] == "{"]
    for offset in offsets:
        try:
            value, _ = decoder.raw_decode(text, offset)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            found = value
    return found


def gigabytes(value: float | None) -> float | None:
    return None if value is None else value / GB


def step_figures(r: dict[str, Any] | None) -> dict[str, Any] | None:
    """Headline figures of a ``pretrain_step.py`` run."""
    if r is None:
        return None
    ours, base = r["ours"], r["baseline"]
    return {
        "scans_per_s": ours["scans_per_s"],
        "step_s": ours["step_s"],
        "mfu": r["mfu_ours"],
        "peak_memory_gb": gigabytes(ours["peak_memory_bytes"]),
        "warmup_s": ours["warmup_s"],
        # the warm-up steps' excess over timed steps: compilation (and first-call autotuning)
        "compile_s_estimate": ours["warmup_s"] - r["warmup_steps"] * ours["step_s"],
        "baseline_scans_per_s": base["scans_per_s"],
        "baseline_mfu": r["mfu_baseline"],
        "speedup_over_baseline": r["speedup_ours_over_baseline"],
        "loss_abs_diff": r["loss_abs_diff"],
        "flops_per_scan": r["flops_per_scan"],
        "input_stage": r.get("input_stage"),
        "profile": r.get("profile_ours"),
    }


def loop_figures(r: dict[str, Any] | None) -> dict[str, Any] | None:
    """Headline figures of a ``fit_step.py`` run."""
    if r is None:
        return None
    keys = (
        "strategy",
        "compiled_networks",
        "scans_per_s",
        "step_s",
        "mfu",
        "first_step_s",
        "warmup_excess_s",
        "dynamo_frames_first_step",
        "dynamo_frames_after_first_step",
        "losses",
    )
    figures = {k: r.get(k) for k in keys}
    figures["peak_memory_gb"] = gigabytes(r.get("peak_memory_bytes"))
    return figures


def summarize(out: Path) -> dict[str, Any]:
    stages = {}
    tsv = out / "stages.tsv"
    for line in tsv.read_text().splitlines() if tsv.exists() else []:
        name, rc, seconds = line.split("\t")
        stages[name] = {"rc": rc, "seconds": int(seconds)}
    env_path = out / "env.json"
    summary: dict[str, Any] = {"env": load(out, "env") if env_path.exists() else None}
    summary["stages"] = stages
    summary["compiled_step"] = step_figures(load(out, "compile"))
    summary["eager_step"] = step_figures(load(out, "eager"))
    recompiles = loop_figures(load(out, "recompiles"))
    log = out / "recompiles.err"
    if recompiles is not None and log.exists():
        recompiles["recompile_log_lines"] = log.read_text().count("Recompiling function")
    summary["recompiles"] = recompiles
    ddp, fsdp2 = loop_figures(load(out, "ddp")), loop_figures(load(out, "fsdp2"))
    summary["ddp"], summary["fsdp2"] = ddp, fsdp2
    if ddp and fsdp2:
        pairs = list(zip(ddp["losses"], fsdp2["losses"]))
        summary["fsdp2_minus_ddp_max_abs_loss"] = max(abs(a - b) for a, b in pairs) if pairs else None
    summary["fit_throughput"] = load(out, "fit_throughput")
    tests = out / "gpu_tests.out"
    lines = tests.read_text().strip().splitlines() if tests.exists() else []
    summary["gpu_tests"] = lines[-1] if lines else None

    step = summary["compiled_step"]
    fit = summary["fit_throughput"] or {}
    fit_rate = fit.get("fit_scans_per_s") or fit.get("scans_per_s")
    summary["goals"] = {
        "compiled_step_at_least_400_scans_per_s": None
        if step is None
        else step["scans_per_s"] >= STEP_GOAL_SCANS_PER_S,
        "compiled_step_at_least_30pct_mfu": None if step is None or step["mfu"] is None else step["mfu"] >= MFU_GOAL,
        "peak_memory_at_most_31_gb": None
        if step is None or step["peak_memory_gb"] is None
        else step["peak_memory_gb"] <= MEMORY_GOAL_GB,
        "fit_at_least_90pct_of_step": None
        if step is None or not fit_rate
        else fit_rate >= FIT_SHARE_GOAL * step["scans_per_s"],
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python benchmarks/gpu_summary.py OUT_DIR (the folder gpu_session.sh wrote)", file=sys.stderr)
        return 2
    print(json.dumps(summarize(Path(args[0])), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
