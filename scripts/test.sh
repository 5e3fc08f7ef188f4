#!/usr/bin/env bash
# Builds everything and runs every test (unit tests, the command's tests, install + example).
# Its last line is ctest's summary.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh --test
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DTNORM_BUILD_TESTS=ON -DPython3_EXECUTABLE="$(command -v python3)" >/dev/null
cmake --build build -j"$(nproc)"
cd build && ctest --output-on-failure -j"$(nproc)"
