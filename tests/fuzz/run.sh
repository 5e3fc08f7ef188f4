#!/usr/bin/env bash
# Fuzzes the tensor-file readers: builds tests/fuzz/fuzz_{npy,safetensors}.c with libFuzzer, ASan and
# UBSan straight from the sources they need into build-fuzz/, then runs each for SECONDS seconds on a
# scratch copy of its seed corpus (tests/fuzz/corpus/). One line per target; exits 1 if any target
# crashed, leaked, ran out of memory or time, or failed to build.
#   bash tests/fuzz/run.sh [SECONDS]     (default 60; needs clang and its libFuzzer runtime)
set -uo pipefail

secs=${1:-60}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
out=$root/build-fuzz
cc=${CC:-clang}
flags=(-g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -std=c11
       -D_POSIX_C_SOURCE=200809L -I"$root/include" -I"$root/src/core" -I"$root/tools/tnorm")
# The readers and writers, and the library's dtype names and sizes (tn_dtype_size, tn_dtype_name).
sources=("$root/tools/tnorm/tensor_file.c" "$root/tools/tnorm/npy.c" "$root/tools/tnorm/safetensors.c"
         "$root/src/core/dtype.c")

mkdir -p "$out"
status=0
for target in npy safetensors; do
  bin=$out/fuzz_$target
  log=$out/fuzz_$target.log
  if ! "$cc" "${flags[@]}" "$root/tests/fuzz/fuzz_$target.c" "${sources[@]}" -o "$bin" >"$log" 2>&1; then
    echo "fuzz_$target: FAILED to build (see $log)"
    status=1
    continue
  fi
  work=$out/corpus-$target
  rm -rf "$work" "$out/$target-"*
  mkdir -p "$work"
  cp "$root/tests/fuzz/corpus/$target"/* "$work"/
  # The targets write their inputs under TMPDIR; a crash's input is kept as build-fuzz/crash-*.
  if (cd "$out" && "$bin" -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536 -timeout=20 \
        -print_final_stats=1 -artifact_prefix="$out/$target-" "$work" >>"$log" 2>&1); then
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    echo "fuzz_$target: ok, ${runs:-?} inputs in ${secs} s, corpus $(ls "$work" | wc -l) files"
  else
    found=$(ls "$out/$target-"* 2>/dev/null | head -1)
    echo "fuzz_$target: FAILED (${found:-no artifact}; log $log)"
    status=1
  fi
done
exit $status
