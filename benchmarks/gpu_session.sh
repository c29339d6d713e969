#!/usr/bin/env bash
# One GPU session's checks, in the order of their value, each under its own time limit so that one slow stage
# cannot starve the others (the GPU figures in benchmarks/README.md were taken with it):
#   1. the paper-configuration pretraining step, eager, with a profile of our step (issue 8's figures);
#   2. the same with torch.compile (encoders + predictor);
#   3. the tests marked `gpu`.
# Usage: OUT=DIR bash benchmarks/gpu_session.sh
# Results in DIR (7 files): env.txt, eager.out / compile.out (the JSON), eager.err / compile.err, profile_eager.txt,
# gpu_tests.out.
# The device image has torch, Lightning and torchmetrics but not MONAI or nibabel: pure-Python wheels are installed
# from .gpu_check/wheels when that folder is present (`pip download monai nibabel --no-deps -d .gpu_check/wheels`).
set -u
OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
if [ -d .gpu_check/wheels ]; then
  $PY -m pip install --no-deps --no-index --quiet .gpu_check/wheels/*.whl || echo "wheel install failed" >&2
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$OUT/env.txt" 2>&1

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local start
  start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"
  echo "[gpu_session] $name rc=$? $(( $(date +%s) - start ))s"
}

summary() {  # the headline numbers of one benchmark JSON
  $PY -c '
import json, sys
r = json.load(open(sys.argv[1]))
keys = ("compile", "speedup_ours_over_baseline", "mfu_ours", "loss_abs_diff", "profile_ours")
print({k: r[k] for k in keys})
print({v: (r[v]["scans_per_s"], r[v]["step_s"], r[v]["peak_memory_bytes"]) for v in ("ours", "baseline")})
' "$1"
}

stage eager 150 $PY benchmarks/pretrain_step.py --preset paper --device cuda --profile "$OUT/profile_eager.txt"
stage compile "${COMPILE_LIMIT:-270}" $PY benchmarks/pretrain_step.py --preset paper --device cuda --compile \
  --warmup 2 --steps 6
# Only the files that hold gpu tests: the image lacks CPU-side dependencies (jsonargparse, scikit-survival) that
# other test files import at collection.
stage gpu_tests 120 $PY -m pytest -m gpu -q -p no:cacheprovider tests/modules/test_pretrain.py \
  tests/models/test_moe.py tests/models/test_vit3d.py tests/data_modules/test_gpu_augment.py
cat "$OUT/gpu_tests.err" >> "$OUT/gpu_tests.out"
rm -f "$OUT/gpu_tests.err"

cat "$OUT/env.txt"
for name in eager compile; do
  summary "$OUT/$name.out" || tail -n 5 "$OUT/$name.err"
done
tail -n 5 "$OUT/gpu_tests.out"
