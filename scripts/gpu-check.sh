#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: builds tnorm for the chip, runs the GPU test suite (GPU results against
# the CPU backend and the float64 reference), compute-sanitizer memcheck and racecheck over the GPU tests,
# the command's check on the GPU, the Python binding on the GPU, the first-use compile and warm-cache
# timings, `tnorm bench --device cuda` and the binding's eager calls against torch; prints a short table
# last. Logs go to $OUT (or ./gpu-check-out).
#   bash scripts/gpu-check.sh [all|tests|bench|suite|quick]
#     all (default): tests, then bench (about 12 minutes: more than one 10-minute call of a lent machine,
#                    where it runs as two calls, `tests` then `bench`)
#     tests: build, check, GPU tests, sanitizers, the binding on the GPU
#     bench: build, first use, tnorm bench, bench-graph, the binding's decode calls (call_overhead.py and
#            compare.py --eager)
#     suite: build, and the rest of the ctest suite (unit, command, install) on this machine; CI runs it
#     quick: build, check and bench only
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
MODE=${1:-all}
case "$MODE" in all | tests | bench | suite | quick) ;; *) echo "gpu-check: unknown mode $MODE"; exit 2 ;; esac
wants() { [ "$MODE" = all ] || [[ " $* " == *" $MODE "* ]]; }
JOBS=$(nproc)
declare -a rows=()
row() { rows+=("$(printf '%-34s %s' "$1" "$2")"); }

nvidia-smi --query-gpu=name,driver_version,clocks.max.memory --format=csv,noheader > "$OUT/gpu.txt" 2>&1
echo "GPU: $(cat "$OUT/gpu.txt")"

# The build is scripts/gpu-build.sh's; its logs go to $OUT.
BUILD=build-gpu
t0=$(date +%s)
if . scripts/gpu-build.sh all > "$OUT/build.log" 2>&1; then  # "all": else it would see our arguments
  row "build" "ok ($(( $(date +%s) - t0 )) s)"
else
  tail -n 30 "$OUT/build.log"
  row "build" "FAILED"
  printf '%s\n' "${rows[@]}"
  exit 1
fi
TNORM=$BUILD/tnorm

if wants tests quick; then
  # Every kernel variant compiled for the chip, into the disk cache the check then reads.
  $TNORM kernels --arch "$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)" \
    > "$OUT/kernels.txt" 2>&1
  row "every kernel variant" "$(cat "$OUT/kernels.txt")"
  if timeout 300 $TNORM check --device cuda > "$OUT/check.txt" 2>&1; then row "tnorm check --device cuda" "all passed ($(grep -c '^cuda' "$OUT/check.txt") op x dtype rows)"
  else row "tnorm check --device cuda" "FAILED: $(grep -m1 -E 'FAIL|error' "$OUT/check.txt" || echo "stopped after $(grep -c '^cuda' "$OUT/check.txt") rows")"; fi
fi

if wants tests; then
  if [ -x $BUILD/tests/tnorm_cuda_tests ]; then
    timeout 300 $BUILD/tests/tnorm_cuda_tests --gtest_brief=1 > "$OUT/gpu_tests.txt" 2>&1
    row "GPU tests" "$(grep -E '^\[  (PASSED|FAILED)' "$OUT/gpu_tests.txt" | tr '\n' ' ')"
    if grep -q FAILED "$OUT/gpu_tests.txt"; then  # the seed and the first failures, for the summary
      failures="$(grep -m1 'test seed' "$OUT/gpu_tests.txt"; grep -m3 -A2 'Failure' "$OUT/gpu_tests.txt" | cut -c1-400)"
    fi
    san="$BUILD/tests/tnorm_cuda_tests --gtest_brief=1"
    timeout 150 compute-sanitizer --tool memcheck --error-exitcode 3 $san --gtest_filter='Sanitized*' \
      > "$OUT/memcheck.txt" 2>&1
    row "memcheck (Sanitized*)" "exit $? $(grep -E 'ERROR SUMMARY' "$OUT/memcheck.txt" | tail -1)"
    timeout 150 compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 3 $san \
      --gtest_filter='SanitizedSmall*' > "$OUT/racecheck.txt" 2>&1
    row "racecheck (SanitizedSmall*)" "exit $? $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' "$OUT/racecheck.txt" | tail -1)"
  else
    row "GPU tests" "NOT BUILT"
  fi
  # The Python binding on the GPU: against torch and HF transformers' RMSNorm classes, CUDA graphs.
  if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    TNORM_LIBRARY=$PWD/$BUILD/libtnorm.so TNORM_REQUIRE_CUDA=1 timeout 300 python3 -m pytest -q -p no:cacheprovider python/tests \
      > "$OUT/python_gpu.txt" 2>&1
    row "python binding (torch, CUDA)" "exit $? $(grep -E '[0-9]+ (passed|failed)' "$OUT/python_gpu.txt" | tail -1)"
  else
    row "python binding (torch, CUDA)" "NOT RUN (no torch with CUDA)"
  fi
fi

if wants suite; then
  # The rest of the suite (unit, command, install) on this machine: CI runs it too; here the command's
  # pytest suite is the long pole (~220 s: each of its ~700 processes initialises CUDA).
  (cd $BUILD && timeout 560 ctest -j"$JOBS" -LE gpu -E cuda_kernels_compile --timeout 550) > "$OUT/ctest.txt" 2>&1
  row "ctest (all but the GPU binary)" "$(grep -E 'tests passed|tests failed' "$OUT/ctest.txt" | tail -1)"
fi

if wants bench quick; then
  # First use: an empty disk cache, so every kernel the calls need is compiled; then a second process
  # with the cache warm must compile nothing.
  export TNORM_CACHE_DIR=$(mktemp -d /tmp/tnorm-cache.XXXXXX)
  first="--ops rms_norm --dtypes bf16 --shapes 1x4096 --iters 100"
  $TNORM bench --device cuda $first > "$OUT/first_use_cold.txt" 2>&1
  $TNORM bench --device cuda $first > "$OUT/first_use_warm.txt" 2>&1
  row "first use, cold cache" "$(grep -o 'kernels: .*' "$OUT/first_use_cold.txt")"
  row "second process, warm cache" "$(grep -o 'kernels: .*' "$OUT/first_use_warm.txt")"

  shapes=32768x4096,16384x8192,65536x2048,8192x16384,131072x128,4096x4096,1x4096,4x131072,8192x40x128
  # The norms (the elementwise ops sit at the copy ceiling and are left out for time), and the rope over
  # heads: 8192 tokens x 40 heads x 128 is the per-head goal's shape.
  ops=rms_norm,l2_norm,add_rms_norm,layer_norm,add_layer_norm,rms_norm_rope,rms_norm_rope_theta
  timeout 200 $TNORM bench --device cuda --ops $ops --dtypes bf16,f32 --shapes $shapes --csv "$OUT/bench_cuda.csv" \
    > "$OUT/bench_cuda.txt" 2>&1 || tail -n 3 "$OUT/bench_cuda.txt"
  # general.cu's kernels: add_rms_norm with an f32 residual stream, rms_norm of every head times a multiplicand.
  timeout 60 $TNORM bench --device cuda --ops add_rms_norm_f32_stream,rms_norm_gated_heads --dtypes bf16,f32 \
    --shapes 32768x4096,131072x128,8192x40x128 --csv "$OUT/bench_general.csv" \
    > "$OUT/bench_general.txt" 2>&1 || tail -n 3 "$OUT/bench_general.txt"
  timeout 60 $TNORM bench-graph --device cuda > "$OUT/bench_graph.txt" 2>&1
  cat "$OUT/bench_graph.txt"
  echo
  echo "bench (% of the device-to-device copy measured in the same run):"
  awk -F, 'FNR > 1 { printf "  %-23s %-5s %13s %9.2f us %7.1f%%\n", $2, $3, $4 "x" $5, $7, $10 }' \
    "$OUT/bench_cuda.csv" "$OUT/bench_general.csv"
  # The binding's decode calls (plain launches, Python's cost included), torch's beside them.
  if [ "$MODE" != quick ] && python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    TNORM_LIBRARY=$PWD/$BUILD/libtnorm.so timeout 120 python3 bench/call_overhead.py --device cuda --calls 20000 \
      > "$OUT/call_overhead.txt" 2>&1
    TNORM_LIBRARY=$PWD/$BUILD/libtnorm.so timeout 400 python3 bench/compare.py --eager --impls tnorm,torch,compile,triton \
      --shapes 1x4096,8x4096,32x4096 --csv "$OUT/compare_eager.csv" --png "$OUT/compare_eager.png" \
      > "$OUT/compare_eager.txt" 2>&1
    cat "$OUT/call_overhead.txt" "$OUT/compare_eager.txt"
  fi
fi
echo
echo "== gpu-check summary =="
printf '%s\n' "${rows[@]}"
[ -n "${failures:-}" ] && printf 'GPU test failures:\n%s\n' "$failures"
exit 0
