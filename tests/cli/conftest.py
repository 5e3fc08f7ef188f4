"""Shared set-up of the `tnorm` command's black-box tests.

TNORM_BIN: path of the command (required; the whole run stops at once without it).
TNORM_TEST_SEED: seed of the random inputs (default: a fresh one, printed at the start and the end).
"""

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "common"))

import tnormtest  # noqa: E402
import tolerance  # noqa: E402


SEED = tolerance.run_seed()


def pytest_report_header(config):
    return [f"tnorm: TNORM_BIN={tnormtest.tnorm_bin() or '(unset)'}",
            f"tnorm: seed {SEED} (TNORM_TEST_SEED={SEED} reproduces this run)"]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    terminalreporter.write_line(f"tnorm tests: seed {SEED} (TNORM_TEST_SEED={SEED} reproduces this run)")


def _check_binary():
    path = tnormtest.tnorm_bin()
    if not path:
        return "TNORM_BIN is not set: point it at the tnorm command to test (e.g. build/tnorm)"
    if not os.path.isfile(path):
        return f"TNORM_BIN={path!r}: no such file"
    if not os.access(path, os.X_OK):
        return f"TNORM_BIN={path!r}: not executable"
    return None


@pytest.fixture(scope="session", autouse=True)
def tnorm_binary():
    problem = _check_binary()
    if problem:
        pytest.exit(f"tnorm CLI tests cannot run: {problem}", returncode=3)
    return tnormtest.tnorm_bin()


@pytest.fixture
def rng(request):
    """Fresh random data each run (from the run's seed), independent of test order."""
    return tnormtest.seeded_rng(SEED, request.node.nodeid)


def _gpu_works():
    try:
        p = subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return p.returncode == 0 and b"GPU" in p.stdout


@pytest.fixture(scope="session")
def gpu_present():
    return _gpu_works()
