#!/usr/bin/env bash
# Installs what the build and the tests need when it is missing: Debian packages (cmake, a C/C++
# compiler, cJSON, GoogleTest, pkg-config) and the Python test packages (numpy, ml_dtypes, pytest).
set -euo pipefail
need=()
command -v cmake >/dev/null || need+=(cmake)
command -v cc >/dev/null || need+=(gcc)
command -v c++ >/dev/null || need+=(g++)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v python3 >/dev/null || need+=(python3 python3-pip)
[ -f /usr/include/cjson/cJSON.h ] || need+=(libcjson-dev)
[ -f /usr/include/gtest/gtest.h ] || need+=(libgtest-dev)
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
