"""Where the package finds libtnorm (TNORM_LIBRARY, beside the package, find_library), that importing never
fails for want of it, and that `pip install` of python/ gives a working package. Each case runs in a fresh
interpreter with a controlled environment."""

import ctypes.util
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import PYTHON_DIR

import tnorm

LIBRARY = os.environ.get("TNORM_LIBRARY", "")

CALL = textwrap.dedent("""
    import numpy as np, tnorm
    print("imported")
    y = tnorm.rms_norm(np.ones((2, 4), np.float32))
    assert abs(float(y[0, 0]) - 1.0) < 1e-5, y
    print("loaded", tnorm.library_path())
""")


def _run(code, path_entry, env_extra=None, unset_library=True):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LD_LIBRARY_PATH")}
    if unset_library:
        env.pop("TNORM_LIBRARY", None)
    env["TNORM_TEST_INSTALLED"] = "1"
    env.update(env_extra or {})
    env["PYTHONPATH"] = path_entry
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=path_entry)


def _package_copy(tmp_path, with_library):
    """python/tnorm copied to tmp_path/site/tnorm, with libtnorm.so beside it or not."""
    site = tmp_path / "site"
    shutil.copytree(os.path.join(PYTHON_DIR, "tnorm"), site / "tnorm",
                    ignore=shutil.ignore_patterns("__pycache__", "libtnorm*"))
    if with_library:
        shutil.copy(LIBRARY, site / "tnorm" / "libtnorm.so")
    return str(site)


def _need_library():
    if not LIBRARY or not os.path.exists(LIBRARY):
        pytest.skip("TNORM_LIBRARY does not name a built library")


def test_explicit_path(tmp_path):
    _need_library()
    p = _run(CALL, _package_copy(tmp_path, False), {"TNORM_LIBRARY": os.path.realpath(LIBRARY)})
    assert p.returncode == 0, p.stderr
    assert f"loaded {os.path.realpath(LIBRARY)}" in p.stdout


def test_explicit_path_missing_is_final(tmp_path):
    """A TNORM_LIBRARY that does not load is an error even where another copy could be found."""
    _need_library()
    missing = str(tmp_path / "nowhere" / "libtnorm.so")
    p = _run(CALL, _package_copy(tmp_path, True), {"TNORM_LIBRARY": missing})
    assert p.returncode != 0
    assert "imported" in p.stdout, "importing must not need the library"
    assert "RuntimeError: tnorm: cannot load the shared library" in p.stderr, p.stderr
    assert missing in p.stderr


TWO_CALLS = textwrap.dedent("""
    import numpy as np, tnorm
    print("imported")
    for _ in range(2):
        try:
            tnorm.rms_norm(np.ones((1, 4), np.float32))
        except RuntimeError as e:
            print("RuntimeError", e)
""")


def test_a_library_without_the_functions(tmp_path):
    """A shared library that loads but is not (this version of) libtnorm: a RuntimeError naming what it
    lacks, not an AttributeError, and the next call says the same."""
    other = ctypes.util.find_library("m")
    if not other:
        pytest.skip("no libm to stand in for a foreign library")
    p = _run(TWO_CALLS, _package_copy(tmp_path, True), {"TNORM_LIBRARY": other})
    assert p.returncode == 0, p.stderr
    errors = [line for line in p.stdout.splitlines() if line.startswith("RuntimeError")]
    assert len(errors) == 2, p.stdout
    assert all("cannot load the shared library" in line for line in errors), p.stdout
    assert "lacks tn_version" in p.stdout, p.stdout


def test_beside_the_package(tmp_path):
    _need_library()
    site = _package_copy(tmp_path, True)
    p = _run(CALL, site)
    assert p.returncode == 0, p.stderr
    assert f"loaded {os.path.join(site, 'tnorm', 'libtnorm.so')}" in p.stdout


def test_nowhere(tmp_path):
    if ctypes.util.find_library("tnorm"):
        pytest.skip("a libtnorm is installed on this system: find_library would find it")
    p = _run(CALL, _package_copy(tmp_path, False))
    assert p.returncode != 0
    assert "imported" in p.stdout
    for place in ("TNORM_LIBRARY (unset)", "libtnorm*.so* (no match)", "find_library('tnorm') (nothing found)"):
        assert place in p.stderr, p.stderr


def test_pip_install(tmp_path):
    """pip installs python/ (here into a target directory, offline, with this interpreter's setuptools),
    shipping a libtnorm.so placed beside the package sources."""
    _need_library()
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0:
        pytest.skip("pip is not available")
    # Offline, pip builds with this interpreter's setuptools, which needs `wheel` before setuptools 70.1.
    probe = "import setuptools, importlib.util as u; " \
            "assert u.find_spec('wheel') or u.find_spec('setuptools.command.bdist_wheel')"
    if subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode != 0:
        pytest.skip("offline builds need setuptools with `wheel` (or setuptools >= 70.1) for this interpreter")
    src = tmp_path / "src"
    shutil.copytree(PYTHON_DIR, src, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info", "tests",
                                                                   "libtnorm*"))
    shutil.copy(LIBRARY, src / "tnorm" / "libtnorm.so")
    target = tmp_path / "installed"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(target), str(src)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    r = _run(CALL, str(target))
    assert r.returncode == 0, r.stderr
    assert f"loaded {target / 'tnorm' / 'libtnorm.so'}" in r.stdout


@pytest.mark.skipif(os.environ.get("TNORM_TEST_INSTALLED") != "1", reason="tests python/tnorm of the checkout")
def test_the_installed_package_is_the_one_tested():
    # run_installed.sh installs the package elsewhere; the checkout's copy must not shadow it.
    assert not os.path.abspath(tnorm.__file__).startswith(os.path.join(PYTHON_DIR, "tnorm")), tnorm.__file__
