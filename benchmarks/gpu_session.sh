#!/usr/bin/env bash
# One GPU session gives every GPU figure of benchmarks/README.md: each stage under its own time limit, all of them
# under one budget (BUDGET seconds, default 540 = 9 minutes), in the order of their value:
#   compile        the paper pretraining step, torch.compile (ours vs the reference-structured baseline, same run):
#                  scans/s, MFU against 989 TFLOP/s dense bf16, peak memory, compile time (warm-up), input-stage checks
#   eager          the same without compilation, with a profile of our step
#   gpu_tests      the tests marked `gpu`
#   recompiles     a short real Lightning run (benchmarks/fit_step.py, the YAML's compile: auto) under
#                  TORCH_LOGS=recompiles: Dynamo frames traced after the first step, recompile log lines
#   ddp, fsdp2     the same run, eager, under DDPStrategy and under ModelParallelStrategy (FSDP2) on one GPU:
#                  scans/s, peak memory, and the per-step losses compared
#   fit_throughput benchmarks/fit_throughput.py --preset paper (`neurojepa fit` end to end), when that script exists
# Then summary.json (benchmarks/gpu_summary.py): every figure, the device, driver, torch / CUDA / Lightning versions,
# and the issue's goals.
#
# Usage:  bash benchmarks/gpu_session.sh              (results in $OUT, else runs/gpu_session)
#         bash benchmarks/gpu_session.sh --prepare    (on the development machine, once: see below)
#
# The device image has torch, Lightning and torchmetrics but not MONAI, nibabel or jsonargparse. `--prepare` copies
# those pure-Python distributions (files and metadata, without their test suites) from this interpreter into
# .whl/site (git-ignored); bring that folder along (the device tool's `carry: [".whl"]`) and the session puts it on
# PYTHONPATH. Pure-Python wheels in .whl/*.whl are installed instead when present.
set -u
PY=${PY:-python3}
export PYTHONUNBUFFERED=1

if [ "${1:-}" = "--prepare" ]; then
  exec "$PY" - <<'EOF'
import importlib.metadata as md
import shutil
from pathlib import Path

dest = Path(".whl/site")
total = 0
for name in ("monai", "nibabel", "jsonargparse", "docstring_parser", "typeshed_client"):
    dist = md.distribution(name)
    root = Path(dist.locate_file(""))
    for file in dist.files or []:
        parts = Path(file).parts
        if ".." in parts or "tests" in parts or "__pycache__" in parts or file.suffix == ".pyc":
            continue
        target = dest / file
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / file, target)
        total += target.stat().st_size
    print(f"{name} {dist.version}")
print(f"{dest}: {total / 2**20:.1f} MiB")
EOF
fi

OUT=${OUT:-runs/gpu_session}
BUDGET=${BUDGET:-540}
mkdir -p "$OUT"
T0=$(date +%s)
if [ -d .whl/site ]; then
  export PYTHONPATH="$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install --no-deps --no-index --quiet .whl/*.whl || echo "[gpu_session] wheel install failed" >&2
fi
$PY - > "$OUT/env.json" 2> "$OUT/env.err" <<'EOF'
import json, subprocess
import torch
env = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
try:
    import lightning
    env["lightning"] = lightning.__version__
except ImportError as error:
    env["lightning"] = f"missing: {error}"
for name in ("monai", "nibabel", "jsonargparse"):
    try:
        env[name] = __import__(name).__version__
    except ImportError:
        env[name] = None
query = "name,driver_version,memory.total,clocks.max.sm"
try:
    smi = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True)
    env["nvidia_smi"] = dict(zip(query.split(","), (v.strip() for v in smi.stdout.split(","))))
except (OSError, subprocess.SubprocessError) as error:
    env["nvidia_smi"] = f"unavailable: {error}"
if torch.cuda.is_available():
    env["device"] = torch.cuda.get_device_name(0)
print(json.dumps(env, indent=2))
EOF
: > "$OUT/stages.tsv"

stage() {  # stage NAME SECONDS COMMAND...: stdout to NAME.out, stderr to NAME.err, a row in stages.tsv
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  if [ "$left" -lt 45 ]; then
    printf '%s\tskipped\t0\n' "$name" >> "$OUT/stages.tsv"
    echo "[gpu_session] $name skipped: ${left}s of the ${BUDGET}s budget left"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start rc
  start=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" >> "$OUT/stages.tsv"
  echo "[gpu_session] $name rc=$rc $(( $(date +%s) - start ))s (limit ${limit}s)"
}

# PRESET=tiny DEVICE=cpu runs the whole session as a CPU smoke test of the script (no figures worth keeping).
PAPER=(--preset "${PRESET:-paper}" --device "${DEVICE:-cuda}")
stage compile "${COMPILE_LIMIT:-210}" $PY benchmarks/pretrain_step.py "${PAPER[@]}" --compile --warmup 2 --steps 6
# The end-to-end goal next (two compilations: ~300 s), before the figures already known from earlier sessions.
if [ -f benchmarks/fit_throughput.py ]; then
  stage fit_throughput 300 $PY benchmarks/fit_throughput.py --preset paper
fi
stage eager 110 $PY benchmarks/pretrain_step.py "${PAPER[@]}" --warmup 2 --steps 6 --profile "$OUT/profile_eager.txt"
# Only the files that hold gpu tests: the image lacks CPU-side dependencies (scikit-survival, ...) that other test
# files import at collection.
stage gpu_tests 120 $PY -m pytest -m gpu -q -p no:cacheprovider tests/modules/test_pretrain.py \
  tests/modules/test_fsdp2.py tests/models/test_moe.py tests/models/test_vit3d.py tests/data_modules/test_gpu_augment.py
stage recompiles 150 env TORCH_LOGS=recompiles $PY benchmarks/fit_step.py "${PAPER[@]}" --strategy single --warmup 2 \
  --steps 8
stage ddp 75 $PY benchmarks/fit_step.py "${PAPER[@]}" --strategy ddp --compile off --warmup 2 --steps 8
stage fsdp2 75 $PY benchmarks/fit_step.py "${PAPER[@]}" --strategy fsdp2 --compile off --warmup 2 --steps 8

$PY benchmarks/gpu_summary.py "$OUT" > "$OUT/summary.json" 2> "$OUT/summary.err"
cat "$OUT/stages.tsv"
$PY -c 'import json, sys; s = json.load(open(sys.argv[1])); [print(k, json.dumps(s[k])[:400]) for k in ("env", "goals", "compiled_step", "eager_step", "recompiles", "ddp", "fsdp2", "fsdp2_minus_ddp_max_abs_loss", "fit_throughput", "gpu_tests") if k in s]' "$OUT/summary.json" \
  || tail -n 20 "$OUT/summary.err"
echo "[gpu_session] total $(( $(date +%s) - T0 ))s of ${BUDGET}s"
