#!/usr/bin/env bash
# Fuzzes the tensor-file readers: builds tests/fuzz/fuzz_{npy,safetensors}.c with libFuzzer, ASan and
# UBSan straight from the sources they need into build-fuzz/, then runs the two at once for SECONDS
# seconds each, on scratch copies of their seed corpora (tests/fuzz/corpus/). One line per target;
# exits 1 if any target crashed, leaked, ran out of memory or time, or failed to build.
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
targets=(npy safetensors)

# fuzz TARGET: builds and runs one target; its one-line verdict goes to build-fuzz/fuzz_TARGET.result.
fuzz() {
  local target=$1 bin=$out/fuzz_$1 log=$out/fuzz_$1.log work=$out/corpus-$1 runs found
  if ! "$cc" "${flags[@]}" "$root/tests/fuzz/fuzz_$target.c" "${sources[@]}" -o "$bin" >"$log" 2>&1; then
    echo "fuzz_$target: FAILED to build (see $log)"
    return 1
  fi
  rm -rf "$work" "$out/$target-"*
  mkdir -p "$work"
  cp "$root/tests/fuzz/corpus/$target"/* "$work"/
  # The targets write their inputs under TMPDIR; a crash's input is kept as build-fuzz/TARGET-crash-*.
  if (cd "$out" && "$bin" -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536 -timeout=20 \
        -print_final_stats=1 -artifact_prefix="$out/$target-" "$work" >>"$log" 2>&1); then
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    echo "fuzz_$target: ok, ${runs:-?} inputs in ${secs} s, corpus $(ls "$work" | wc -l) files"
  else
    found=$(ls "$out/$target-"* 2>/dev/null | head -1)
    echo "fuzz_$target: FAILED (${found:-no artifact}; log $log)"
    return 1
  fi
}

mkdir -p "$out"
for target in "${targets[@]}"; do fuzz "$target" > "$out/fuzz_$target.result" & done
status=0
wait || status=1
for target in "${targets[@]}"; do
  cat "$out/fuzz_$target.result"
  grep -q ': ok' "$out/fuzz_$target.result" || status=1
done
exit $status
