#!/usr/bin/env bash
# The binding's tests against the package as pip installs it: `pip install ./python` into a private
# directory (under the build tree), then pytest python/tests importing that copy (TNORM_TEST_INSTALLED=1),
# over the shared library named by TNORM_LIBRARY.
#   run_installed.sh PYTHON TARGET_DIR
set -euo pipefail
python=$1
target=$2
here="$(cd "$(dirname "$0")" && pwd)"
rm -rf "$target"
# PyPI for the build backend (setuptools) when it is not installed; the package itself is pure Python.
"$python" -m pip install -q --disable-pip-version-check --target "$target" "$here/.." ||
  "$python" -m pip install -q --disable-pip-version-check --no-build-isolation --target "$target" "$here/.."
PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" TNORM_TEST_INSTALLED=1 exec "$python" -m pytest -q -p no:cacheprovider "$here"
