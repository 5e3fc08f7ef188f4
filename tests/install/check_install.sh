#!/usr/bin/env bash
# Installs the build into a temporary prefix, then builds examples/normalize.c against it twice:
# with pkg-config (shared library) and with the CMake package config, and runs both.
set -euo pipefail
build=$1
src=$2
prefix=$(mktemp -d)
trap 'rm -rf "$prefix"' EXIT
cmake --install "$build" --prefix "$prefix" >/dev/null
libdir=$(ls -d "$prefix"/lib*/pkgconfig | head -n1)
libdir=${libdir%/pkgconfig}
for f in include/tnorm.h; do test -f "$prefix/$f" || { echo "missing $f"; exit 1; }; done
test -f "$libdir/libtnorm.a" && test -e "$libdir/libtnorm.so" && test -f "$libdir/cmake/tnorm/tnormConfig.cmake"

export PKG_CONFIG_PATH="$libdir/pkgconfig"
cc -std=c11 -Wall -Werror "$src/examples/normalize.c" $(pkg-config --cflags --libs tnorm) -lm -o "$prefix/normalize"
LD_LIBRARY_PATH="$libdir" "$prefix/normalize"

mkdir -p "$prefix/consumer"
cat > "$prefix/consumer/CMakeLists.txt" <<CMAKE
cmake_minimum_required(VERSION 3.20)
project(consumer C)
find_package(tnorm REQUIRED)
add_executable(normalize_static "$src/examples/normalize.c")
target_link_libraries(normalize_static PRIVATE tnorm::tnorm_static m)
CMAKE
cmake -S "$prefix/consumer" -B "$prefix/consumer/build" -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
cmake --build "$prefix/consumer/build" >/dev/null
"$prefix/consumer/build/normalize_static"
echo "install, pkg-config and CMake package: ok"
