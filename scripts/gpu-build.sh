#!/usr/bin/env bash
# On the GPU machine: configures (once) and builds tnorm for the chip into build-gpu/, with the GPU tests;
# cJSON from the system, else from the Debian packages carried in .debs/ (unpacked, not installed).
# Source it (". scripts/gpu-build.sh [targets...]") to keep LD_LIBRARY_PATH for the built binaries.
cd "$(dirname "${BASH_SOURCE[0]}")/.." || return 1 2>/dev/null || exit 1
gpu_cmake_extra=()
if [ ! -f /usr/include/cjson/cJSON.h ] && ls .debs/libcjson*.deb >/dev/null 2>&1; then
  mkdir -p /tmp/tnorm-cjson
  for f in .debs/libcjson*.deb; do dpkg -x "$f" /tmp/tnorm-cjson; done
  gpu_lib=/tmp/tnorm-cjson/usr/lib/x86_64-linux-gnu
  gpu_cmake_extra=(-DCJSON_LIBRARY=$gpu_lib/libcjson.so.1 -DCJSON_INCLUDE_DIR=/tmp/tnorm-cjson/usr/include)
  export LD_LIBRARY_PATH=$gpu_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
gpu_targets=()
for t in "$@"; do gpu_targets+=(--target "$t"); done
cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DTNORM_CUDA=ON -DTNORM_GPU_TESTS=ON "${gpu_cmake_extra[@]}" \
  > /tmp/tnorm-configure.log 2>&1 &&
  cmake --build build-gpu -j"$(nproc)" "${gpu_targets[@]}" > /tmp/tnorm-build.log 2>&1 ||
  { tail -n 30 /tmp/tnorm-configure.log /tmp/tnorm-build.log; false; }
