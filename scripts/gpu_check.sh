#!/usr/bin/env bash
# One device call: GPU tests and benchmarks, every log packed into $OUT/gpu_logs.tgz, a short summary printed last.
#
#   bash scripts/gpu_check.sh                       # tests kernels e2e e2e14b (about 7 minutes on an H200)
#   bash scripts/gpu_check.sh e2e14b freeswim       # any steps, in the order given
#   DEADLINE=280 bash scripts/gpu_check.sh ...      # seconds for the whole call; steps that cannot fit are skipped
#
# Steps: tests (GPU-only kernel tests), kernels (bench_kernels.py), e2e (Wan2.1-1.3B 480p), e2e14b (Wan2.1-14B
# 720p, default preset), auto (bench_auto.py: each backend kernel_backend="auto" may pick, timed at Wan shapes),
# tokenorder (bench_token_order.py: per-call gather/scatter against tile order per forward), e2ecompile (Wan2.1-1.3B with compiled blocks, dense and accelerated alike), freeswim
# (bench_freeswim.py, attention only, with FlexAttention), interp (the interpreter kernel tests, compiled this
# time), toy (toy-model training on the GPU for TOY_SECONDS; a whole call: TOY_SECONDS=420 DEADLINE=590 ... toy).
# fa4 (FlashAttention-4 / flex_flash / cuDNN BSA: their GPU tests, then bench_kernels.py --quick --block 64x64 with
# the optional backends; needs the site tree that `scripts/stage_fa4.sh receive` unpacked to /tmp/site-fa4, which
# takes two calls of about 40 and 35 MiB of carried parts on a warm machine: see that script. Without it the step
# says so and its tests skip). Once the tree is on PYTHONPATH, auto also times fa4 / flex_flash / cudnn_bsa.
# Python packages missing on the machine travel as wheels in .whl/ (installed to /tmp/site first); the lent H200
# has torch and Triton but not diffusers:  pip download --no-deps --only-binary=:all: --python-version 3.12
# --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1  (then carry ".whl"; .git/info/exclude ignores it).
# Seen on 2026-11-28 (H200, torch 2.11, Triton 3.6): tests 53 s, kernels 75 s, e2e 107 s, e2e14b 159 s.
# Every step has its own timeout so a hang cannot eat the next one; the script always exits 0 so the logs come back.
set -u
OUT="${OUT:-$(pwd)/runs/gpu_check}"
LOGS="${LOGS:-/tmp/gpu_logs}"
DEADLINE="${DEADLINE:-560}"
mkdir -p "$OUT" "$LOGS"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$LOGS/wheels.log" 2>&1 && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export DIT_ACCEL_CACHE_DIR="$LOGS/cache"          # the autotuning choices come back with the logs
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/triton_cache}"
unset TRITON_INTERPRET
PY="${PYTHON:-python3}"

step() {  # step NAME LIMIT_S COMMAND...: runs when at least 30 s of the deadline are left, capped to what is left
  local name="$1" limit="$2"; shift 2
  local left=$((DEADLINE - SECONDS - 20))
  if [ "$left" -lt 30 ]; then echo "== $name skipped: ${left}s left" | tee -a "$LOGS/status.txt"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOGS/status.txt"
  timeout --kill-after=5 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  echo "   rc=$? after $((SECONDS - t0))s" | tee -a "$LOGS/status.txt"
}

{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import torch, triton, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__, 'diffusers', diffusers.__version__)"
  "$PY" -m pip list 2>/dev/null | grep -iE "cutlass|flash|cudnn|cuda-bindings|cuda-python|protobuf|tvm|quack" || true
  git rev-parse --short HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
} >"$LOGS/env.txt" 2>&1
cat "$LOGS/env.txt"

STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(tests kernels e2e e2e14b)
for s in "${STEPS[@]}"; do
  case "$s" in
    tests) step tests 120 "$PY" -m pytest tests/kernels/test_gpu_kernels.py -q -rs --durations=8 ;;
    kernels) step kernels 270 "$PY" scripts/bench_kernels.py --out "$LOGS/bench_kernels.json" ;;
    e2e) step e2e 200 "$PY" scripts/bench_e2e.py --model wan-1.3b --steps 10 \
      --methods "${E2E_METHODS:-rettention,sla,vmoba,window,blocktopk}" --out "$LOGS/bench_e2e.json" ;;
    e2ecompile) step e2ecompile 240 "$PY" scripts/bench_e2e.py --model wan-1.3b --steps 10 --compile \
      --methods "${E2E_METHODS:-rettention,window}" --out "$LOGS/bench_e2e_compiled.json" ;;
    e2e14b) step e2e14b 200 "$PY" scripts/bench_e2e.py --model wan-14b --steps "${E2E14_STEPS:-3}" \
      --warmup-steps 1 --no-profile --methods "${E2E14_METHODS:-rettention}" --out "$LOGS/bench_e2e14b.json" ;;
    auto) step auto 150 "$PY" scripts/bench_auto.py --device cuda --dtype bfloat16 \
      --shapes 1x12x4680x128,1x12x32760x128 --densities 0.05,0.1,0.3 ;;
    tokenorder) step tokenorder 120 "$PY" scripts/bench_token_order.py --frames 21 --rows 30 --cols 52 \
      --device cuda --dtype bfloat16 ;;
    freeswim) step freeswim 240 "$PY" scripts/bench_freeswim.py --attention-only --flex --out "$LOGS/bench_freeswim.json" ;;
    interp) step interp 150 "$PY" -m pytest tests/kernels -q -rs --ignore=tests/kernels/test_gpu_kernels.py ;;
    fa4) if FA4_ENV="$(bash scripts/stage_fa4.sh env)" && [ -n "$FA4_ENV" ]; then eval "$FA4_ENV"
         else echo "== fa4: no /tmp/site-fa4 (run scripts/stage_fa4.sh receive first); tests will skip" | tee -a "$LOGS/status.txt"; fi
         step fa4 180 "$PY" -m pytest tests/kernels/test_gpu_kernels.py -q -rs -k "fa4 or flash or cudnn_bsa"
         step fa4bench 200 "$PY" scripts/bench_kernels.py --quick --block 64x64 --no-flex --extra auto \
           --out "$LOGS/bench_fa4.json" ;;
    toy) step toy $((${TOY_SECONDS:-150} * 115 / 100 + 90)) "$PY" scripts/train_toy.py --device cuda --budget gpu \
      --seconds "${TOY_SECONDS:-150}" --out "$LOGS/toy-wan" --state-dir "$LOGS/toy-state" ;;
    *) echo "unknown step $s" | tee -a "$LOGS/status.txt" ;;
  esac
done

tar czf "$OUT/gpu_logs.tgz" -C "$(dirname "$LOGS")" "$(basename "$LOGS")" 2>/dev/null
echo; echo "######## summary ($(basename "$LOGS"), ${SECONDS}s)"; cat "$LOGS/status.txt"
for s in "${STEPS[@]}"; do
  [ -f "$LOGS/$s.log" ] || continue
  echo "---- $s"
  case "$s" in
    kernels) sed -n '/^# /,$p' "$LOGS/$s.log" | cut -c1-160 ;;
    fa4) tail -n 12 "$LOGS/fa4.log" | cut -c1-200; [ -f "$LOGS/fa4bench.log" ] && grep -E '^\{' "$LOGS/fa4bench.log" \
      | cut -c1-400 | tail -n 4 ;;
    tests|interp) tail -n 12 "$LOGS/$s.log" | cut -c1-200 ;;
    *) tail -n 14 "$LOGS/$s.log" | cut -c1-200 ;;
  esac
done
exit 0
