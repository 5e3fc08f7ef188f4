#!/usr/bin/env bash
# The CPU test suite under AddressSanitizer + UndefinedBehaviorSanitizer (the unit tests, the command's
# tests and its check), and the threads test under ThreadSanitizer, each in a build of its own without
# the CUDA backend. Any report fails the run: undefined behaviour aborts, leaks fail the process.
#   bash scripts/sanitize.sh [address|thread|all]     (default all)
# Each part ends with ctest's summary line.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-all}
case "$MODE" in address | thread | all) ;; *) echo "sanitize: unknown mode $MODE (address, thread or all)"; exit 2 ;; esac
bash scripts/deps.sh --test
JOBS=$(nproc)
configure() {  # build dir, sanitizers
  # -O1 -g: a quarter of -O2's compile time here, and every report points at its line. Stores stream
  # from 64 KiB of output on, so that the short rows the tests keep (TNORM_TEST_MAX_DIM) take that path.
  cmake -S . -B "$1" -DCMAKE_BUILD_TYPE=Debug -DCMAKE_C_FLAGS_DEBUG="-O1 -g -DTN_CPU_STREAM_MIN_BYTES=65536" \
    -DCMAKE_CXX_FLAGS_DEBUG="-O1" \
    -DTNORM_CUDA=OFF -DTNORM_BUILD_TESTS=ON -DTNORM_SANITIZE="$2" -DPython3_EXECUTABLE="$(command -v python3)" >/dev/null
}
status=0

if [ "$MODE" != thread ]; then
  configure build-asan "address,undefined"
  cmake --build build-asan -j"$JOBS"
  # The Python binding and the installed example load the library into programs built without the
  # sanitizers' runtime, which must come first; `tnorm check` and `bench` (the checks, cli_commands) run
  # the kernels the unit tests run, and the largest calls only repeat, many times slower, paths that the
  # shorter rows take here.
  # allocator_may_return_null: the tests ask for impossible sizes and expect TN_ERR_NO_MEMORY back.
  (cd build-asan && ASAN_OPTIONS=detect_leaks=1:strict_string_checks=1:allocator_may_return_null=1 \
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 TNORM_TEST_MAX_DIM=4200 \
    ctest --output-on-failure -j"$JOBS" -E '^(python_binding|install_and_example|check_selected|check_generic|cli_commands)$|LargeCalls') || status=1
fi

if [ "$MODE" != address ]; then
  configure build-tsan thread
  cmake --build build-tsan -j"$JOBS" --target tnorm_thread_tests
  (cd build-tsan && TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 \
    ctest --output-on-failure -j"$JOBS" -R '^Threads\.') || status=1
fi
exit $status
