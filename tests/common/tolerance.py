"""The project's tolerance rule for results checked against a float64 reference, and the tests' seed:
written once for the command's tests (tests/cli) and the Python binding's (python/tests).

A result passes when it is within 1 ulp of the output dtype at the float64 value (f16, bf16; subnormal
spacing below the normal range), or within 2e-5 relative (f32). NaN must meet NaN, Inf the same Inf.
"""

import os
import random

import numpy as np

_MANTISSA_BITS = {"f32": 23, "f16": 10, "bf16": 7}
_MIN_EXPONENT = {"f32": -126, "f16": -14, "bf16": -126}


def ulp(dtype_name, value):
    """One unit in the last place of dtype at |value|."""
    a = np.abs(np.asarray(value, dtype=np.float64))
    _, e = np.frexp(a)  # a = m * 2^e, m in [0.5, 1): ilogb(a) = e - 1
    e = np.where(a > 0, e - 1, _MIN_EXPONENT[dtype_name])
    e = np.maximum(e, _MIN_EXPONENT[dtype_name])
    return np.ldexp(1.0, e - _MANTISSA_BITS[dtype_name])


def error_in_tolerances(dtype_name, got, ref):
    """|got - ref| in units of the tolerance, elementwise (<= 1 passes)."""
    g = np.asarray(got).astype(np.float64)
    r = np.asarray(ref, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(g - r)
        if dtype_name == "f32":
            err = diff / (2e-5 * np.maximum(np.abs(r), 2.0 ** -126))
        else:
            err = diff / ulp(dtype_name, r)
    err = np.where(np.isnan(g) & np.isnan(r), 0.0, err)
    err = np.where(np.isnan(g) ^ np.isnan(r), np.inf, err)
    err = np.where(np.isinf(g) & np.isinf(r) & (np.sign(g) == np.sign(r)), 0.0, err)
    return err


def run_seed():
    """The run's seed: TNORM_TEST_SEED when set (decimal or 0x...), else a fresh one."""
    env = os.environ.get("TNORM_TEST_SEED", "").strip()
    if env:
        return int(env, 0)
    return random.SystemRandom().randrange(1 << 32)
