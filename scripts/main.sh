#!/usr/bin/env bash
# Builds the library and the tnorm command, then runs the main job: `tnorm check` (every op, dtype and
# a spread of shapes against a float64 reference, on every available device) and `tnorm bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)" --target tnorm_cli
./build/tnorm check
./build/tnorm bench --shapes 1x4096,64x4096,4096x4096,131072x128 --ops rms_norm,add_rms_norm --dtypes f32,bf16
