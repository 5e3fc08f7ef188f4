#!/usr/bin/env bash
# The GPU tests with tnorm's CUDA kernels run on the host, for a machine without a GPU: the kernels are
# compiled as C++ (shim.h, the few PTX conversions replaced by the library's host ones), each block's
# threads run as fibers (runtime.cc), and the CUDA backend (backend.cc) plans every launch with
# src/cuda/backend.c's own code (plan.c) and checks guard bytes around every allocation after it. Slow
# (minutes for the model tests) but exact: the kernels' float32 arithmetic is the same on the host
# (no fused multiply-add). The tests that call the driver themselves (graph capture) need a GPU.
#
#   tests/cuda/emulator/run.sh BUILD_DIR [GTEST_FILTER] [TEST_SOURCE...]
# BUILD_DIR: a build with the CUDA backend (its libtnorm.a and tools/libtnorm_reference.a are linked).
# GTEST_FILTER defaults to the model tests that need no driver; TEST_SOURCE to tests/cuda/test_cuda_models.cc.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
HERE="$ROOT/tests/cuda/emulator"
BUILD=$(cd "${1:?usage: run.sh BUILD_DIR [GTEST_FILTER] [TEST_SOURCE...]}" && pwd)
FILTER=${2:-'GpuModel*:SanitizedSmallModels*:SanitizedModelsBatchInvariance*:-GpuModelCapture*'}
shift $(( $# >= 2 ? 2 : $# ))
SOURCES=("$@")
[ ${#SOURCES[@]} -gt 0 ] || SOURCES=("$ROOT/tests/cuda/test_cuda_models.cc")
CUDA=${CUDA_HOME:-/usr/local/cuda}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

mkdir -p "$WORK/kernels" "$WORK/lib"
cp "$ROOT"/src/cuda/kernels/* "$WORK/kernels/"
python3 - "$WORK/kernels/row.cuh" <<'PY'
import sys
path = sys.argv[1]
text = open(path).read()
substitutions = [
    ('extern __shared__ __align__(16) unsigned char tn_dynamic_smem[];', '#define tn_dynamic_smem tn_dynamic_smem_emu'),
    ('asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));', 'f = emu_f16_to_f32(h);'),
    ('asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));', 'h = emu_f32_to_f16(f);'),
    ('asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));',
     'r = (tn_u32)emu_f32_to_f16(lo) | ((tn_u32)emu_f32_to_f16(hi) << 16);'),
]
for old, new in substitutions:
    if text.count(old) != 1:
        sys.exit('emulator: row.cuh no longer has exactly one `%s`: update tests/cuda/emulator/run.sh' % old)
    text = text.replace(old, new)
open(path, 'w').write('#include "shim.h"\n' + text)
PY

INCLUDES=(-I"$HERE" -I"$WORK/kernels" -I"$ROOT/src" -I"$ROOT/include" -I"$ROOT/tools/common" -I"$ROOT/tests/common"
          -I"$ROOT/tests/cuda" -I"$CUDA/include")
echo "emulator: compiling the kernels and the tests in $WORK"
${CC:-gcc} -std=gnu11 -O1 -w "${INCLUDES[@]}" -c "$HERE/plan.c" -o "$WORK/plan.o" &
${CXX:-g++} -std=c++17 -O1 "${INCLUDES[@]}" -c "$HERE/backend.cc" -o "$WORK/backend.o" &
${CXX:-g++} -std=c++17 -O1 "${INCLUDES[@]}" -c "$HERE/runtime.cc" -o "$WORK/runtime.o" &
objects=()
for s in "${SOURCES[@]}"; do
  o="$WORK/$(basename "$s").o"
  ${CXX:-g++} -std=c++17 -O1 "${INCLUDES[@]}" -c "$s" -o "$o" &
  objects+=("$o")
done
wait
# The driver is only linked against (its stub library): the tests that call it are filtered out.
ln -sf "$CUDA/lib64/stubs/libcuda.so" "$WORK/lib/libcuda.so.1"
${CXX:-g++} -o "$WORK/emulated_tests" "${objects[@]}" "$WORK/backend.o" "$WORK/plan.o" "$WORK/runtime.o" \
  "$BUILD/libtnorm.a" "$BUILD/tools/libtnorm_reference.a" -lgtest_main -lgtest "$CUDA/lib64/stubs/libcuda.so" \
  "$BUILD/libtnorm.a" -ldl -lm -lpthread
LD_LIBRARY_PATH="$WORK/lib" "$WORK/emulated_tests" --gtest_filter="$FILTER"
