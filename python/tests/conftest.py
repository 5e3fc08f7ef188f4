"""Shared set-up of the Python binding's tests.

TNORM_LIBRARY: the libtnorm shared library to test (default: build/libtnorm.so of this checkout, when built).
TNORM_TEST_SEED: seed of the random inputs (default: a fresh one, printed at the start and the end).
TNORM_TEST_INSTALLED=1: test the installed tnorm package instead of python/tnorm of this checkout.
"""

import os
import sys
import zlib

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON_DIR = os.path.dirname(HERE)
REPO = os.path.dirname(PYTHON_DIR)

sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tests", "common"))  # the tolerance rule, shared with tests/cli
if os.environ.get("TNORM_TEST_INSTALLED") != "1":
    sys.path.insert(0, PYTHON_DIR)

import tolerance  # noqa: E402

if not os.environ.get("TNORM_LIBRARY"):
    _built = os.path.join(REPO, "build", "libtnorm.so")
    if os.path.exists(_built):
        os.environ["TNORM_LIBRARY"] = _built


SEED = tolerance.run_seed()


def pytest_report_header(config):
    return [f"tnorm binding: TNORM_LIBRARY={os.environ.get('TNORM_LIBRARY', '(unset)')}",
            f"tnorm binding: seed {SEED} (TNORM_TEST_SEED={SEED} reproduces this run)"]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    terminalreporter.write_line(f"tnorm binding tests: seed {SEED} (TNORM_TEST_SEED={SEED} reproduces this run)")


@pytest.fixture
def rng(request):
    """Fresh random data each run (from the run's seed), independent of the order tests run in."""
    return np.random.default_rng([SEED, zlib.crc32(request.node.nodeid.encode())])
