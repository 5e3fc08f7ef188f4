#!/usr/bin/env bash
# On a machine with network: fills .peers/ (ignored by git) with what bench/peers/setup.sh installs on the
# GPU machine: the peers' wheels for its Python 3.12, and FlashInfer's headers from a checkout of it.
#   bash bench/peers/fetch.sh PATH_TO_FLASHINFER_CHECKOUT
set -eu
cd "$(dirname "$0")/../.."
mkdir -p .peers/wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .peers/wheels liger-kernel==0.8.5
if [ $# -ge 1 ]; then
  rm -rf .peers/flashinfer && mkdir -p .peers/flashinfer
  git -C "$1" archive HEAD include | tar -x -C .peers/flashinfer
  git -C "$1" rev-parse HEAD > .peers/flashinfer/COMMIT
fi
du -sh .peers
