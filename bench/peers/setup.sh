#!/usr/bin/env bash
# On the GPU machine: makes the peers in .peers/ (bench/peers/README.md) importable by the benchmarks.
# Installs .peers/wheels/*.whl into .peers/site (add it to PYTHONPATH) and builds .peers/libfi_norm.so from
# bench/peers/flashinfer_norm.cu and FlashInfer's headers in .peers/flashinfer/include. Prints what it set up.
set -u
cd "$(dirname "$0")/../.."
P=.peers
[ -d $P ] || { echo "peers: no $P/ (see bench/peers/README.md)"; exit 0; }
if ls $P/wheels/*.whl > /dev/null 2>&1; then
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $P/site \
      $P/wheels/*.whl > $P/pip.log 2>&1; then
    echo "peers: installed $(cd $P/wheels && ls *.whl | sed 's/-py3.*//;s/-cp3.*//' | tr '\n' ' ')into $P/site"
  else
    echo "peers: pip failed: $(tail -n 2 $P/pip.log)"
  fi
fi
if [ -d $P/flashinfer/include ]; then
  arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
  [ "$arch" = 90 ] && arch=90a
  if nvcc -std=c++17 -O3 -arch=sm_$arch -shared -Xcompiler -fPIC -I$P/flashinfer/include \
      -o $P/libfi_norm.so bench/peers/flashinfer_norm.cu > $P/flashinfer-build.log 2>&1; then
    echo "peers: built $P/libfi_norm.so (FlashInfer $(cut -c1-12 $P/flashinfer/COMMIT 2>/dev/null), sm_$arch)"
  else
    echo "peers: FlashInfer wrapper did not build: $(grep -m1 error $P/flashinfer-build.log)"
  fi
fi
