#!/usr/bin/env bash
# On the GPU machine: configures (once) and builds tnorm for the chip into build-gpu/, with the GPU tests.
# Sourced (". scripts/gpu-build.sh [targets...]") by gpu-check.sh and ab-bench.sh.
cd "$(dirname "${BASH_SOURCE[0]}")/.." || return 1 2>/dev/null || exit 1
gpu_targets=()
for t in "$@"; do gpu_targets+=(--target "$t"); done
cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DTNORM_CUDA=ON -DTNORM_GPU_TESTS=ON \
  > /tmp/tnorm-configure.log 2>&1 &&
  cmake --build build-gpu -j"$(nproc)" "${gpu_targets[@]}" > /tmp/tnorm-build.log 2>&1 ||
  { tail -n 30 /tmp/tnorm-configure.log /tmp/tnorm-build.log; false; }
