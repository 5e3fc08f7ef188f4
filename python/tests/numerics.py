"""float64 references of the ops and the project's tolerance rule, for the binding's tests.

The reference follows tnorm.h: inputs read exactly, scalars taken as float32 (as the C API does), the
sum x + residual of add_rms_norm rounded once to x's dtype. A result passes when it is within 1 ulp of
the output dtype of the float64 value (f16, bf16), or within 2e-5 relative (f32): the rule of the
command's tests (tests/cli).
"""

import ml_dtypes
import numpy as np

import tolerance

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = {"f32": np.dtype(np.float32), "f16": np.dtype(np.float16), "bf16": BF16}


def name_of(dtype):
    return {v: k for k, v in DTYPES.items()}[np.dtype(dtype)]


def normal(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(size=shape) * scale).astype(np.float32).astype(DTYPES[dtype])


def uniform(rng, shape, dtype, low=-2.0, high=2.0):
    return rng.uniform(low, high, size=shape).astype(np.float32).astype(DTYPES[dtype])


def _f32(v):
    return float(np.float32(v))


def add_rounded(x, residual):
    """x + residual in float32, rounded once to x's dtype (exactly what residual_out must hold)."""
    return (x.astype(np.float32) + residual.astype(np.float32)).astype(x.dtype)


def reference(op, x, weight=None, mul=None, residual=None, eps=1e-6, scale=1.0, weight_offset=0.0):
    """(y as float64 of x's shape, residual_out of x's dtype or None). Reductions over the last axis."""
    res_out = None
    if op == "add_rms_norm":
        res_out = add_rounded(x, residual)
        s = res_out.astype(np.float64)
    else:
        s = x.astype(np.float64)
    ss = np.sum(s * s, axis=-1, keepdims=True)
    if op == "l2_norm":
        return s / np.sqrt(ss + _f32(eps)) * _f32(scale), None
    y = s / np.sqrt(ss / s.shape[-1] + _f32(eps))
    if weight is not None:
        y = y * (weight.astype(np.float64) + _f32(weight_offset))
    if mul is not None:
        y = y * mul.astype(np.float64)
    return y, res_out


# The tolerance rule, shared with the command's tests (tests/common/tolerance.py).
ulp = tolerance.ulp
error_in_tolerances = tolerance.error_in_tolerances


def assert_close(got, ref, what="y"):
    """got: an array of the output dtype; ref: float64."""
    got = np.asarray(got)
    dtype_name = name_of(got.dtype)
    assert got.shape == ref.shape, f"{what}: shape {got.shape}, expected {ref.shape}"
    if got.size == 0:
        return
    err = error_in_tolerances(dtype_name, got, ref)
    bad = int(np.count_nonzero(~(err <= 1.0)))
    worst = int(np.argmax(np.where(np.isnan(err), np.inf, err)))
    assert bad == 0, (
        f"{what}: {bad} of {got.size} elements out of tolerance ({dtype_name}); worst at flat index {worst}: "
        f"got {float(got.reshape(-1)[worst])!r}, reference {float(ref.reshape(-1)[worst])!r}, "
        f"{float(err.reshape(-1)[worst]):.3g} x tolerance")


def bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint32 if a.dtype.itemsize == 4 else np.uint16)


def assert_bits_equal(got, expected, what):
    got = np.asarray(got)
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype}, expected {expected.dtype}"
    assert got.shape == expected.shape, f"{what}: shape {got.shape}, expected {expected.shape}"
    bad = np.flatnonzero(bits(got).reshape(-1) != bits(expected).reshape(-1))
    assert bad.size == 0, (f"{what}: {bad.size} of {got.size} elements differ; first at flat index {bad[0]}: "
                           f"got {float(got.reshape(-1)[bad[0]])!r}, expected {float(expected.reshape(-1)[bad[0]])!r}")


def poison(shape, dtype):
    """A buffer of NaNs, to show that a refused call wrote nothing."""
    return np.full(shape, np.nan, dtype=np.float32).astype(DTYPES[dtype] if isinstance(dtype, str) else dtype)
