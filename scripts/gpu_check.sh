#!/usr/bin/env bash
# One device call: GPU kernel tests, the kernel benchmark (and the end-to-end one when present), logs under $OUT.
#
#   run(command="bash scripts/gpu_check.sh", timeout_s=600)      # from the repository root on the GPU machine
#
# Budget: about 8 minutes in all; each step has its own timeout so a hang cannot eat the next one. Every step's
# exit status goes to $OUT/status.txt; the script itself always exits 0 so the logs come back.
set -u
OUT="${OUT:-$(pwd)/runs/gpu_check}"
mkdir -p "$OUT"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
export DIT_ACCEL_CACHE_DIR="$OUT/cache"          # the autotuning choices come back with the logs
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/triton_cache}"
unset TRITON_INTERPRET
PY="${PYTHON:-python}"
QUICK="${QUICK:-0}"                             # QUICK=1: the benchmark's --quick sweep only

step() {  # step NAME TIMEOUT_S COMMAND...
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/status.txt"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc after $((SECONDS - t0))s" | tee -a "$OUT/status.txt"
  tail -n 25 "$OUT/$name.log"
}

{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git rev-parse --short HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. the GPU-only tests: compiled kernels at realistic sizes in bf16, TMA path, CUDA graphs, autotune cache
step pytest_gpu 150 "$PY" -m pytest tests/kernels/test_gpu_kernels.py -q -x -rs --durations=10
# 2. the kernel benchmark (ours vs cuDNN / flash / FlexAttention, pattern building)
if [ "$QUICK" = "1" ]; then
  step bench_kernels 300 "$PY" scripts/bench_kernels.py --quick --out "$OUT/bench_kernels.json"
else
  step bench_kernels 330 "$PY" scripts/bench_kernels.py --out "$OUT/bench_kernels.json"
fi
# 3. the interpreter tests, compiled this time (every kernel variant against the references)
step pytest_kernels 110 "$PY" -m pytest tests/kernels -q -rs --durations=10 --ignore=tests/kernels/test_gpu_kernels.py
# 4. end to end, when the script exists and time is left
if [ -f scripts/bench_e2e.py ] && [ "$SECONDS" -lt 480 ]; then
  step bench_e2e $((570 - SECONDS)) "$PY" scripts/bench_e2e.py --out "$OUT/bench_e2e.json"
fi
ls -la "$OUT" "$OUT/cache" 2>/dev/null
exit 0
