#!/usr/bin/env bash
# Installs what the build and the tests need when it is missing: Debian packages (cmake, a C/C++
# compiler, GoogleTest, pkg-config) and the Python test packages (numpy, ml_dtypes, pytest);
# with --fuzz, clang and its libFuzzer runtime (tests/fuzz/run.sh).
set -euo pipefail
need=()
command -v cmake >/dev/null || need+=(cmake)
command -v cc >/dev/null || need+=(gcc)
command -v c++ >/dev/null || need+=(g++)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v python3 >/dev/null || need+=(python3 python3-pip)
[ -f /usr/include/gtest/gtest.h ] || need+=(libgtest-dev)
if [ "${1:-}" = "--fuzz" ]; then
  command -v clang >/dev/null || need+=(clang)
  ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1 || need+=(libclang-rt-14-dev)
fi
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ "${1:-}" = "--test" ] && ! python3 -c 'import numpy, ml_dtypes, pytest' 2>/dev/null; then
  python3 -m pip install -q numpy ml_dtypes pytest 2>/dev/null ||
    python3 -m pip install -q --break-system-packages numpy ml_dtypes pytest
fi
