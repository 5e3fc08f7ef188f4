"""Quantized outputs through the binding (rms_norm, add_rms_norm, layer_norm, add_layer_norm with quant=...,
and quantize), on NumPy arrays and torch CPU tensors, against a reference written here from tnorm.h's contract.

The exact check: the call also returns y (quant_source="rounded", return_unquantized=True), y is checked
against the float64 reference with the project's tolerance and must be bit for bit the plain call's y, and
q and the scales must be bit for bit the reference quantization of float(y): one float32 division v / s,
round to nearest even, saturation, the NaN rules, the dynamic scales from the amax of each row or group.
Outputs are allocated full of 0xff bytes by one call and of 0x00 bytes by another, which must give the same
bytes: an element left unwritten cannot match the reference in both. quant_source="f32" is checked by
bracketing: q lies between the quantizations of the float64 result's tolerance bounds.

torch CUDA tensors (where torch, a GPU and the library's CUDA backend are present): the backend refuses
quantized outputs with TN_ERR_UNAVAILABLE, which the binding raises as RuntimeError.
"""

import sys

import ml_dtypes
import numpy as np
import pytest

import numerics as N
from kinds import NumpyKind, TorchKind, cpu_kinds, torch_or_none

import tnorm
from tnorm import _dlpack, _lib

DTYPES = ["f32", "f16", "bf16"]
OPS = ["rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm"]
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E5M2 = np.dtype(ml_dtypes.float8_e5m2)
QMAX = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0, "int8": 127.0, "mxfp8": 448.0, "nvfp4": 6.0}
Q_DTYPES = {"fp8_e4m3": E4M3, "fp8_e5m2": E5M2, "int8": np.dtype(np.int8), "mxfp8": E4M3,
            "nvfp4": np.dtype(np.uint8)}
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


# ---- the reference: tnorm.h, "Quantized outputs" ----

def _f32(a):
    return np.asarray(a, dtype=np.float32)


def encode_fp8(v, dtype, largest):
    """FP8 bytes of float32 values: round to nearest even once (ml_dtypes), finite overflow and infinities
    saturated to +-largest, NaN as 0x7f with its sign."""
    v = _f32(v)
    nan = np.isnan(v)
    clipped = np.clip(np.where(nan, np.float32(0), v), np.float32(-largest), np.float32(largest))
    b = clipped.astype(dtype).view(np.uint8)
    return np.where(nan, np.uint8(0x7f) | (np.signbit(v).astype(np.uint8) << 7), b).astype(np.uint8)


def encode_int8(v):
    v = _f32(v)
    nan = np.isnan(v)
    r = np.rint(np.clip(np.where(nan, np.float32(0), v), np.float32(-127), np.float32(127)))
    return np.where(nan, 0, r).astype(np.int8).view(np.uint8)


def encode_e2m1(v):
    """4-bit E2M1 codes: the nearest of 0 .. 6, a tie to the even code, saturated to 6, the sign in bit 3
    (kept for values that round to zero), NaN 0."""
    v = _f32(v)
    nan = np.isnan(v)
    a = np.minimum(np.abs(np.where(nan, np.float32(0), v)).astype(np.float64), 6.0)
    d = np.abs(a[..., None] - E2M1)
    nearest = d == d.min(axis=-1, keepdims=True)
    odd = np.arange(8) % 2
    code = np.argmin(np.where(nearest, odd, 2), axis=-1).astype(np.uint8)  # the even code among the nearest
    sign = (np.signbit(v) & ~nan).astype(np.uint8) << 3
    return code | sign


def decode_e2m1(code):
    m = E2M1[code & 7]
    return np.where(code & 8, -m, m)


def encode(fmt, v):
    if fmt in ("fp8_e4m3", "mxfp8"):
        return encode_fp8(v, E4M3, 448.0)
    if fmt == "fp8_e5m2":
        return encode_fp8(v, E5M2, 57344.0)
    if fmt == "int8":
        return encode_int8(v)
    return encode_e2m1(v)


def decode(fmt, b):
    """Values of q's bytes (4-bit codes for nvfp4), as float64."""
    b = np.asarray(b, dtype=np.uint8)
    if fmt in ("fp8_e4m3", "mxfp8"):
        return b.view(E4M3).astype(np.float64)
    if fmt == "fp8_e5m2":
        return b.view(E5M2).astype(np.float64)
    if fmt == "int8":
        return b.view(np.int8).astype(np.float64)
    return decode_e2m1(b)


def pow2_ceil(s):
    """2^ceil(log2 s) within [2^-127, 2^127] (NaN and infinity: 2^127) and its UE8M0 byte."""
    s = _f32(s).astype(np.float64)
    finite = np.isfinite(s)
    m, e = np.frexp(np.where(finite, s, 1.0))
    e = np.where(m == 0.5, e - 1, e)  # an exact power of two is its own ceiling
    e = np.clip(np.where(finite, e, 127), -127, 127)
    return np.ldexp(1.0, e).astype(np.float32), (e + 127).astype(np.uint8)


def amax_groups(v, group):
    """max |v| per group of each row, NaN skipped (0 when every element is NaN), as float32."""
    rows, dim = v.shape
    a = np.abs(_f32(v)).reshape(rows, dim // group, group)
    return np.where(np.isnan(a), np.float32(0), a).max(axis=-1, initial=np.float32(0)).astype(np.float32)


def scales_from_amax(fmt, amax, pow2=False, scale=None, scale_ub=None, scale_min=None):
    """(s as float32, the stored scales' bytes or f32 values) from the amax of each row or group."""
    if fmt == "nvfp4":
        g = np.float32(scale)
        sb = encode_fp8((amax / np.float32(6)) * g, E4M3, 448.0)
        return (sb.view(E4M3).astype(np.float32) / g).astype(np.float32), sb.view(E4M3)
    with np.errstate(over="ignore"):
        s = (amax / np.float32(QMAX[fmt])).astype(np.float32)
    if scale_ub:
        s = np.minimum(s, np.float32(scale_ub))
    lo = np.float32(2.0 ** -126 if scale_min is None else scale_min)
    s = np.where(s >= lo, s, lo).astype(np.float32)
    if pow2 or fmt == "mxfp8":
        s, e = pow2_ceil(s)
        return s, e
    return s, s


def quantize_ref(fmt, v, scaling, group=None, pow2=False, scale=None, scale_ub=None, scale_min=None):
    """(q bytes, row-major scales or None) of float32 values v (rows x dim), as tnorm.h says."""
    v = _f32(v)
    rows, dim = v.shape
    if scaling == "tensor":
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return encode(fmt, v / np.float32(scale)), None
    group = dim if scaling == "token" else group
    s, stored = scales_from_amax(fmt, amax_groups(v, group), pow2, scale, scale_ub, scale_min)
    s_full = np.repeat(s, group, axis=1)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        # An infinity under an infinite scale stays itself (saturates), not inf / inf's NaN.
        q = encode(fmt, np.where(np.isinf(v) & np.isinf(s_full), v, v / s_full))
    if fmt == "nvfp4":
        q = np.where(np.repeat(stored.view(np.uint8), group, axis=1) == 0, 0, q).astype(np.uint8)
        q = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
    return q, stored


def swizzle(stored, rows, groups):
    """The 128 x 4 tiles of tnorm.h's TN_SCALES_SWIZZLED, padding zero, as [rows128, groups4] bytes."""
    rows128, groups4 = -(-rows // 128) * 128, -(-groups // 4) * 4
    out = np.zeros(rows128 * groups4, np.uint8)
    r, g = np.meshgrid(np.arange(rows), np.arange(groups), indexing="ij")
    index = ((r // 128) * (groups4 // 4) + g // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + g % 4
    out[index.reshape(-1)] = np.ascontiguousarray(stored).view(np.uint8).reshape(-1)
    return out.reshape(rows128, groups4)


def norm_ref(op, x, residual=None, weight=None, bias=None, eps=1e-6, weight_offset=0.0):
    """(y float64, residual_out of x's dtype or None)."""
    res_out = None
    if op.startswith("add_"):
        res_out = N.add_rounded(x, residual)
        s = res_out.astype(np.float64)
    else:
        s = x.astype(np.float64)
    eps = float(np.float32(eps))
    if op.endswith("rms_norm"):
        y = s / np.sqrt(np.mean(s * s, axis=-1, keepdims=True) + eps)
        if weight is not None:
            y = y * (weight.astype(np.float64) + float(np.float32(weight_offset)))
    else:
        d = s - s.mean(axis=-1, keepdims=True)
        y = d / np.sqrt(np.mean(d * d, axis=-1, keepdims=True) + eps)
        if weight is not None:
            y = y * weight.astype(np.float64)
        if bias is not None:
            y = y + bias.astype(np.float64)
    return y, res_out


def cancellation_floor(op, y64):
    """An absolute floor under the tolerance for LayerNorm (test_binding_models' rule): its results come out of
    cancellations (x - mean, then + bias), where the float32 rounding of the larger terms bounds the error."""
    return 1e-5 * float(np.max(np.abs(y64))) if op.endswith("layer_norm") else 0.0


def assert_y_close(op, y, y64):
    err = N.error_in_tolerances(N.name_of(y.dtype), y, y64)
    ok = (err <= 1.0) | (np.abs(y.astype(np.float64) - y64) <= cancellation_floor(op, y64))
    bad = np.flatnonzero(~ok)
    assert bad.size == 0, (f"y: {bad.size} of {y.size} elements out of tolerance; first at flat index {bad[0]}: got "
                           f"{float(y.reshape(-1)[bad[0]])!r}, reference {float(y64.reshape(-1)[bad[0]])!r}")


# ---- arrays of either kind, outputs allocated poisoned ----

def to_numpy(kind, a):
    """A result as NumPy (fp8 through ml_dtypes), its strides kept."""
    if isinstance(kind, NumpyKind):
        assert isinstance(a, np.ndarray), f"expected a numpy array back, got {type(a)}"
        return a
    torch = kind.torch
    assert isinstance(a, torch.Tensor) and a.device.type == kind.device, f"got {type(a)}"
    a = a.detach().cpu()
    fp8 = {torch.float8_e4m3fn: E4M3, torch.float8_e5m2: E5M2}
    if a.dtype in fp8:
        return a.view(torch.uint8).numpy().view(fp8[a.dtype])
    return kind.to_numpy(a)


def raw_bytes(a):
    return np.ascontiguousarray(a).view(np.uint8)


@pytest.fixture
def poisoned(monkeypatch):
    """poisoned(byte): every array numpy.empty / torch.empty make from then on is full of that byte."""
    real_np = np.empty
    torch = torch_or_none()
    real_torch = torch.empty if torch is not None else None
    state = {"byte": 0xff}

    def np_empty(*args, **kwargs):
        a = real_np(*args, **kwargs)
        a.reshape(-1).view(np.uint8)[...] = state["byte"]
        return a

    def torch_empty(*args, **kwargs):
        t = real_torch(*args, **kwargs)
        t.reshape(-1).view(torch.uint8).fill_(state["byte"])
        return t

    monkeypatch.setattr(np, "empty", np_empty)
    if torch is not None:
        monkeypatch.setattr(torch, "empty", torch_empty)

    def set_byte(byte):
        state["byte"] = byte
    return set_byte


def scale_arg(kind, value, form):
    """A static scale as the call takes it: a Python float, a one-element array, or a 0-d array."""
    if form == "float":
        return float(value)
    a = np.full((1,) if form == "tensor" else (), value, dtype=np.float32)
    return kind.from_numpy(a)


# ---- the configurations: (quant keywords; scaling for the reference; shape) ----

def _c(quant, scaling, group=None, rows=37, dim=384, scale=None, **kw):
    return {"quant": quant, "scaling": scaling, "group": group, "rows": rows, "dim": dim, "scale": scale, "kw": kw}


CONFIGS = {
    "e4m3-static": _c("fp8_e4m3", "tensor", scale="float"),
    "e4m3-static-tensor": _c("fp8_e4m3", "tensor", scale="tensor"),
    "e4m3-token": _c("fp8_e4m3", "token"),
    "e4m3-token-pow2-column": _c("fp8_e4m3", "token", pow2_scales=True, scales_layout="column"),
    "e4m3-token-ub-min": _c("fp8_e4m3", "token", scale_ub="low", scale_min="high"),
    "e4m3-g128": _c("fp8_e4m3", "group", 128),
    "e4m3-g64-column": _c("fp8_e4m3", "group", 64, scales_layout="column"),
    "e4m3-g128-column-pow2": _c("fp8_e4m3", "group", 128, rows=5, pow2_scales=True, scales_layout="column"),
    "e5m2-static-0d": _c("fp8_e5m2", "tensor", scale="0d"),
    "e5m2-token": _c("fp8_e5m2", "token"),
    "e5m2-g32-pow2": _c("fp8_e5m2", "group", 32, pow2_scales=True),
    "int8-static": _c("int8", "tensor", scale="float"),
    "int8-token": _c("int8", "token"),
    "int8-g64-column": _c("int8", "group", 64, scales_layout="column"),
    "mxfp8": _c("mxfp8", "group", 32),
    "mxfp8-column": _c("mxfp8", "group", 32, scales_layout="column"),
    "mxfp8-swizzled": _c("mxfp8", "group", 32, rows=130, dim=160, scales_layout="swizzled"),
    "nvfp4": _c("nvfp4", "group", 16, scale="float"),
    "nvfp4-column-tensor": _c("nvfp4", "group", 16, scale="tensor", scales_layout="column"),
    "nvfp4-swizzled": _c("nvfp4", "group", 16, rows=130, dim=160, scale="float", scales_layout="swizzled"),
}


def make_inputs(rng, op, dtype, rows, dim):
    x = N.normal(rng, (rows, dim), dtype, scale=2.0)
    if rows > 2:
        x[1] = 0  # a row of zeros: its scale is scale_min (LayerNorm: bias only)
        x[2] *= 40  # a row far larger than the others
    inputs = {"x": x, "weight": N.uniform(rng, (dim,), dtype, 0.25, 2.0)}
    if op.startswith("add_"):
        inputs["residual"] = N.normal(rng, (rows, dim), dtype)
    if op.endswith("layer_norm"):
        inputs["bias"] = N.uniform(rng, (dim,), dtype, -0.5, 0.5)
    return inputs


def call(kind, op, inputs, **kw):
    args = {k: kind.from_numpy(v) for k, v in inputs.items()}
    x = args.pop("x")
    if op.startswith("add_"):
        r = args.pop("residual")
        return getattr(tnorm, op)(x, r, **args, **kw)
    return getattr(tnorm, op)(x, **args, **kw)


def quant_keywords(kind, cfg, y_ref, y_amax):
    """The call's keywords for a configuration, static scales chosen from the float64 result (so that the
    largest values saturate), and the same as plain numbers for the reference."""
    kw = dict(cfg["kw"])
    ref = {"pow2": kw.get("pow2_scales", False)}
    if cfg["scale"] is not None:
        if cfg["quant"] == "nvfp4":
            value = float(np.float32(448.0 * 6.0 / y_amax))  # the usual global scale
        else:
            value = float(np.float32(y_amax / QMAX[cfg["quant"]] * 0.6))  # 1 / 0.6 of the range saturates
        kw["scale"] = scale_arg(kind, value, cfg["scale"])
        ref["scale"] = value
    if kw.get("scale_ub") == "low":  # bounds that bind: the large row capped, the small ones floored
        kw["scale_ub"] = ref["scale_ub"] = float(np.float32(y_amax / QMAX[cfg["quant"]] / 4))
    if kw.get("scale_min") == "high":
        kw["scale_min"] = ref["scale_min"] = float(np.float32(y_amax / QMAX[cfg["quant"]] / 64))
    if cfg["scaling"] == "group" and cfg["quant"] not in ("mxfp8", "nvfp4"):
        kw["group_size"] = cfg["group"]
    return kw, ref


def check_scales(kind, cfg, got, stored, rows, what):
    """The returned scales against the reference's row-major ones, in the configuration's layout."""
    layout = cfg["kw"].get("scales_layout", "row")
    if stored is None:
        assert got is None, f"{what}: scales {got!r} with a static scale"
        return
    sc = to_numpy(kind, got)
    assert sc.dtype == stored.dtype, f"{what}: scales dtype {sc.dtype}, expected {stored.dtype}"
    groups = stored.shape[1]
    if layout == "swizzled":
        expected = swizzle(stored, rows, groups).view(stored.dtype)
        assert sc.shape == expected.shape, f"{what}: swizzled scales shape {sc.shape}, expected {expected.shape}"
        assert sc.flags.c_contiguous
    else:
        expected = stored
        assert sc.shape == (rows, groups), f"{what}: scales shape {sc.shape}, expected {(rows, groups)}"
        if layout == "column":  # a [rows, groups] view of a [groups, padded] buffer, each column 16-byte aligned
            item = sc.dtype.itemsize
            padded = -(-rows // (16 // item)) * (16 // item)
            assert sc.strides == (item, padded * item), f"{what}: column-major strides {sc.strides}"
    bad = np.flatnonzero(raw_bytes(sc).reshape(-1) != raw_bytes(expected).reshape(-1))
    assert bad.size == 0, (f"{what}: {bad.size} of {expected.size} scale bytes differ; first at flat index "
                           f"{bad[0]}: got {raw_bytes(sc).reshape(-1)[bad[0]]:#x}, expected "
                           f"{raw_bytes(expected).reshape(-1)[bad[0]]:#x}")


def check_q(kind, cfg, got, expected, what):
    q = to_numpy(kind, got)
    assert q.dtype == Q_DTYPES[cfg["quant"]], f"{what}: q dtype {q.dtype}"
    assert q.shape == expected.shape, f"{what}: q shape {q.shape}, expected {expected.shape}"
    gb, eb = raw_bytes(q).reshape(-1), expected.reshape(-1)
    bad = np.flatnonzero(gb != eb)
    assert bad.size == 0, (f"{what}: {bad.size} of {gb.size} q bytes differ; first at flat index {bad[0]}: got "
                           f"{gb[bad[0]]:#x}, expected {eb[bad[0]]:#x}")


@pytest.mark.parametrize("kind", cpu_kinds())
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_quantized_output(rng, poisoned, kind, op, dtype, config):
    cfg = CONFIGS[config]
    rows, dim, fmt = cfg["rows"], cfg["dim"], cfg["quant"]
    inputs = make_inputs(rng, op, dtype, rows, dim)
    y64, res_ref = norm_ref(op, **inputs, eps=1e-6)
    kw, ref = quant_keywords(kind, cfg, y64, float(np.max(np.abs(y64))))
    residual_op = op.startswith("add_")
    eps = {"eps": 1e-6}

    poisoned(0xff)
    got = call(kind, op, inputs, quant=fmt, return_unquantized=True, **kw, **eps)
    assert isinstance(got, tuple) and len(got) == (4 if residual_op else 3)
    assert all(kind.is_own(a) for a in got if a is not None)
    q, sc, y = got[:3]
    y = kind.to_numpy(y)
    assert_y_close(op, y, y64)
    plain = call(kind, op, inputs, **eps)
    N.assert_bits_equal(y, kind.to_numpy(plain[0] if residual_op else plain), "y beside the quantized output")
    if residual_op:
        N.assert_bits_equal(kind.to_numpy(got[3]), res_ref, "residual_out")

    q_ref, stored = quantize_ref(fmt, y.astype(np.float32), cfg["scaling"], cfg["group"], **ref)
    check_q(kind, cfg, q, q_ref, "q")
    check_scales(kind, cfg, sc, stored, rows, "scales")

    # Without y, into outputs of the other poison: the same bytes.
    poisoned(0x00)
    again = call(kind, op, inputs, quant=fmt, **kw, **eps)
    assert len(again) == (3 if residual_op else 2)
    check_q(kind, cfg, again[0], q_ref, "q without y")
    check_scales(kind, cfg, again[1], stored, rows, "scales without y")
    if residual_op:
        N.assert_bits_equal(kind.to_numpy(again[2]), res_ref, "residual_out without y")


@pytest.mark.parametrize("kind", cpu_kinds())
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize(rng, poisoned, kind, dtype, config):
    """quantize(x): x's own values, so the reference quantizes x itself."""
    cfg = CONFIGS[config]
    rows, dim, fmt = cfg["rows"], cfg["dim"], cfg["quant"]
    x = make_inputs(rng, "rms_norm", dtype, rows, dim)["x"]
    kw, ref = quant_keywords(kind, cfg, x, float(np.max(np.abs(x.astype(np.float64)))))
    q_ref, stored = quantize_ref(fmt, x.astype(np.float32), cfg["scaling"], cfg["group"], **ref)
    for byte in (0xff, 0x00):
        poisoned(byte)
        q, sc = tnorm.quantize(kind.from_numpy(x), fmt, **kw)
        check_q(kind, cfg, q, q_ref, f"q (outputs poisoned {byte:#x})")
        check_scales(kind, cfg, sc, stored, rows, f"scales (outputs poisoned {byte:#x})")


def _bounds(op, y64):
    """float32 bounds of every value within the f32 tolerance of the float64 result (tests/common), LayerNorm's
    floor included: where the float32 result the op quantizes may lie."""
    t = np.maximum(2e-5 * np.maximum(np.abs(y64), 2.0 ** -126), cancellation_floor(op, y64))
    return _f32(y64 - t), _f32(y64 + t)


@pytest.mark.parametrize("kind", cpu_kinds())
@pytest.mark.parametrize("config", ["e4m3-token", "e4m3-static", "e5m2-g32-pow2", "int8-g64-column", "mxfp8",
                                    "nvfp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_source_f32(rng, kind, op, dtype, config):
    """quant_source="f32" quantizes the float32 result: for f32 x the same bytes as "rounded"; for f16 and
    bf16 each scale and each q lies between those of the tolerance bounds of the float64 result."""
    cfg = CONFIGS[config]
    rows, dim, fmt = cfg["rows"], cfg["dim"], cfg["quant"]
    inputs = make_inputs(rng, op, dtype, rows, dim)
    y64, _ = norm_ref(op, **inputs)
    kw, ref = quant_keywords(kind, cfg, y64, float(np.max(np.abs(y64))))
    got = call(kind, op, inputs, quant=fmt, quant_source="f32", return_unquantized=True, **kw)
    rounded = call(kind, op, inputs, quant=fmt, return_unquantized=True, **kw)
    N.assert_bits_equal(kind.to_numpy(got[2]), kind.to_numpy(rounded[2]), "y (the same whatever the source)")
    q, sc = to_numpy(kind, got[0]), got[1]
    if dtype == "f32":
        check_q(kind, cfg, got[0], raw_bytes(to_numpy(kind, rounded[0])), "q (f32 source of f32 x)")
        if sc is not None:
            N.assert_bits_equal(raw_bytes(to_numpy(kind, sc)), raw_bytes(to_numpy(kind, rounded[1])), "scales")
        return
    # The option reaches the library: over 14208 elements some codes differ from the rounded result's.
    assert np.any(raw_bytes(q) != raw_bytes(to_numpy(kind, rounded[0]))), "f32 source gave the rounded bytes"
    lo, hi = _bounds(op, y64)
    group = dim if cfg["scaling"] != "group" else cfg["group"]
    if cfg["scaling"] == "tensor":
        s = np.full((rows, dim), np.float32(ref["scale"]))
    else:
        amax_lo = amax_groups(np.where(np.sign(lo) == np.sign(hi), np.minimum(np.abs(lo), np.abs(hi)), 0), group)
        amax_hi = amax_groups(np.maximum(np.abs(lo), np.abs(hi)), group)
        s_lo, _ = scales_from_amax(fmt, amax_lo, ref["pow2"], ref.get("scale"))
        s_hi, _ = scales_from_amax(fmt, amax_hi, ref["pow2"], ref.get("scale"))
        stored = to_numpy(kind, sc)
        if fmt == "nvfp4":
            s_got = (stored.astype(np.float32) / np.float32(ref["scale"])).astype(np.float32)
        elif fmt == "mxfp8" or ref["pow2"]:
            s_got = np.ldexp(1.0, stored.astype(np.int64) - 127).astype(np.float32)
        else:
            s_got = stored.astype(np.float32)
        s_got = np.asarray(s_got).reshape(rows, dim // group)
        outside = np.flatnonzero(~((s_lo <= s_got) & (s_got <= s_hi)))
        assert outside.size == 0, (f"scales: {outside.size} outside their bounds; first at {outside[0]}: "
                                   f"{s_got.reshape(-1)[outside[0]]!r} not in [{s_lo.reshape(-1)[outside[0]]!r}, "
                                   f"{s_hi.reshape(-1)[outside[0]]!r}]")
        s = np.repeat(s_got, group, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):  # nvfp4's groups of scale 0: q is 0, within +-6
        v_lo, v_hi = decode(fmt, encode(fmt, lo / s)), decode(fmt, encode(fmt, hi / s))
    codes = raw_bytes(q)
    if fmt == "nvfp4":
        codes = np.stack([codes & 0xf, codes >> 4], axis=-1).reshape(rows, dim)
    v = decode(fmt, codes).reshape(rows, dim)
    outside = np.flatnonzero(~((v_lo <= v) & (v <= v_hi)))
    assert outside.size == 0, (f"q: {outside.size} of {v.size} outside their bounds; first at flat index "
                               f"{outside[0]}: {v.reshape(-1)[outside[0]]!r} not in "
                               f"[{v_lo.reshape(-1)[outside[0]]!r}, {v_hi.reshape(-1)[outside[0]]!r}]")


# ---- special values: NaN, infinities, saturation, zeros, subnormals ----

def _special_rows(dtype, dim):
    rows = [np.linspace(-3, 3, dim),
            np.full(dim, 0.0),
            np.full(dim, -0.0),
            np.where(np.arange(dim) == 5, np.nan, np.linspace(-1, 1, dim)),
            np.where(np.arange(dim) == 7, np.inf, np.linspace(-1, 1, dim)),
            np.where(np.arange(dim) % 9 == 0, -np.inf, np.where(np.arange(dim) % 9 == 4, np.nan, 1.0)),
            np.full(dim, np.nan),
            np.linspace(-1e-7, 1e-7, dim),  # tiny against the others: FP8 subnormals, signed zeros
            np.linspace(-6e4, 6e4, dim),  # beyond E4M3 and INT8 with a static scale of 1
            np.where(np.arange(dim) % 2 == 0, 1.0, -1.0) * 2.0 ** -20]
    return np.array(rows).astype(np.float32).astype(N.DTYPES[dtype])


@pytest.mark.parametrize("kind", cpu_kinds())
@pytest.mark.parametrize("quant,scaling,extra", [
    ("fp8_e4m3", "tensor", {"scale": 1.0}), ("fp8_e4m3", "tensor", {"scale": 2.0 ** -12}),
    ("fp8_e4m3", "token", {}), ("fp8_e4m3", "group", {"group_size": 32, "pow2_scales": True}),
    ("fp8_e4m3", "token", {"scale_ub": 1e-3}), ("fp8_e5m2", "tensor", {"scale": 1.0}),
    ("fp8_e5m2", "group", {"group_size": 64}), ("int8", "tensor", {"scale": 1.0}), ("int8", "token", {}),
    ("int8", "token", {"pow2_scales": True}), ("mxfp8", "group", {}), ("nvfp4", "group", {"scale": 1.0}),
    ("nvfp4", "group", {"scale": 2688.0})])
@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values(kind, dtype, quant, scaling, extra):
    x = _special_rows(dtype, 128)
    ref = {"pow2": extra.get("pow2_scales", False), "scale": extra.get("scale"), "scale_ub": extra.get("scale_ub")}
    group = extra.get("group_size") or {"mxfp8": 32, "nvfp4": 16}.get(quant)
    q_ref, stored = quantize_ref(quant, x.astype(np.float32), scaling, group, **ref)
    q, sc = tnorm.quantize(kind.from_numpy(x), quant, **extra)
    cfg = {"quant": quant, "kw": {}}
    check_q(kind, cfg, q, q_ref, "q")
    check_scales(kind, cfg, sc, stored, x.shape[0], "scales")


def _midpoints(fmt):
    """The values halfway between neighbouring finite values of a format: where rounding decides."""
    if fmt == "int8":
        return np.arange(-127, 127) + 0.5
    vals = np.arange(256, dtype=np.uint8).view(E4M3 if fmt == "fp8_e4m3" else E5M2).astype(np.float64)
    vals = np.unique(vals[np.isfinite(vals)])
    return (vals[:-1] + vals[1:]) / 2


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "int8"])
def test_division_not_reciprocal(fmt):
    """v / s is one float32 division: values whose quotient lands on a rounding tie, where multiplying by a
    rounded 1 / s would round the other way for some of them."""
    for scale in (0.3, 7.0, 1.7, 0.0123):
        s = np.float32(scale)
        x = _f32(_midpoints(fmt) * np.float64(s))[None, :]
        q, none = tnorm.quantize(x, fmt, scale)
        expected = encode(fmt, x / s)
        N.assert_bits_equal(raw_bytes(q), expected, f"q with scale {scale}")
        if scale == 1.7:  # the case discriminates: a reciprocal gives other bytes there
            assert np.any(encode(fmt, x * (np.float32(1) / s)) != expected)


# ---- shapes, outputs and options ----

@pytest.mark.parametrize("kind", cpu_kinds())
def test_shapes_follow_x(rng, kind):
    """q takes x's shape (nvfp4: dim / 2), the scales x's leading shape; 1-D x is one row; x of no rows."""
    x3 = N.normal(rng, (2, 3, 64), "bf16")
    q, sc = tnorm.rms_norm(kind.from_numpy(x3), quant="fp8_e4m3", group_size=32)
    assert tuple(q.shape) == (2, 3, 64) and tuple(sc.shape) == (2, 3, 2)
    q, sc = tnorm.quantize(kind.from_numpy(x3), "nvfp4", 1.0)
    assert tuple(q.shape) == (2, 3, 32) and tuple(sc.shape) == (2, 3, 4)
    q, sc = tnorm.quantize(kind.from_numpy(x3), "int8", group_size=32, scales_layout="column")
    assert tuple(sc.shape) == (2, 3, 2)
    ref_q, ref_s = quantize_ref("int8", x3.reshape(6, 64).astype(np.float32), "group", 32)
    check_q(kind, {"quant": "int8"}, q, ref_q.reshape(2, 3, 64), "q of a 3-D x")
    N.assert_bits_equal(to_numpy(kind, sc).reshape(6, 2), ref_s, "column-major scales of a 3-D x")
    x1 = N.normal(rng, (64,), "f32")
    q, sc = tnorm.quantize(kind.from_numpy(x1), "fp8_e4m3")
    assert tuple(q.shape) == (64,) and tuple(sc.shape) == (1,)
    for layout in ("row", "column"):
        q, sc = tnorm.rms_norm(kind.from_numpy(np.zeros((0, 64), np.float32)), quant="fp8_e4m3", group_size=32,
                               scales_layout=layout)
        assert tuple(q.shape) == (0, 64) and tuple(sc.shape) == (0, 2)
    q, sc = tnorm.quantize(kind.from_numpy(np.zeros((0, 64), np.float32)), "mxfp8", scales_layout="swizzled")
    assert tuple(sc.shape) == (0, 4)


@pytest.mark.parametrize("kind", cpu_kinds())
def test_strided_x_and_out(rng, kind):
    """Strided rows of x read in place; y written into `out` when given, returned only when asked for."""
    buf = N.normal(rng, (6, 96), "f16")
    x = kind.from_numpy(buf)[:, 16:80]
    out = kind.from_numpy(N.poison((6, 64), "f16"))
    q, sc = tnorm.rms_norm(x, quant="fp8_e4m3", out=out)
    y = kind.to_numpy(out)
    N.assert_bits_equal(y, kind.to_numpy(tnorm.rms_norm(x)), "out beside the quantized output")
    q_ref, s_ref = quantize_ref("fp8_e4m3", y.astype(np.float32), "token")
    check_q(kind, {"quant": "fp8_e4m3"}, q, q_ref, "q of strided x")
    N.assert_bits_equal(to_numpy(kind, sc), s_ref, "scales of strided x")
    _, _, y2 = tnorm.rms_norm(x, quant="fp8_e4m3", out=out, return_unquantized=True)
    assert y2 is out


@pytest.mark.parametrize("kind", cpu_kinds())
def test_mul_and_casting_pass_through(rng, kind):
    """rms_norm's other options reach the quantized call: y is the plain call's, q its quantization."""
    x, w, m = N.normal(rng, (9, 128), "bf16"), N.uniform(rng, (128,), "bf16"), N.uniform(rng, (9, 128), "bf16")
    X, W, M = kind.from_numpy(x), kind.from_numpy(w), kind.from_numpy(m)
    for kw in ({"mul": M}, {"casting": "llama"}, {"weight_offset": 1.0}):
        q, sc, y = tnorm.rms_norm(X, W, quant="int8", group_size=64, return_unquantized=True, **kw)
        N.assert_bits_equal(kind.to_numpy(y), kind.to_numpy(tnorm.rms_norm(X, W, **kw)), f"y with {list(kw)}")
        q_ref, s_ref = quantize_ref("int8", kind.to_numpy(y).astype(np.float32), "group", 64)
        check_q(kind, {"quant": "int8"}, q, q_ref, f"q with {list(kw)}")
    r = N.normal(rng, (9, 128), "f32")  # an f32 residual stream beside bf16 activations
    q, sc, y, s = tnorm.add_rms_norm(X, kind.from_numpy(r), W, quant="fp8_e4m3", residual_mode="f32",
                                     return_unquantized=True)
    y_plain, s_plain = tnorm.add_rms_norm(X, kind.from_numpy(r), W, residual_mode="f32")
    N.assert_bits_equal(kind.to_numpy(y), kind.to_numpy(y_plain), "y of an f32 residual stream")
    N.assert_bits_equal(kind.to_numpy(s), kind.to_numpy(s_plain), "residual_out of an f32 residual stream")
    assert kind.to_numpy(s).dtype == np.float32


def test_static_scale_read_when_the_op_runs(rng):
    """A scale tensor is read at run time: changing its value changes q, with no other argument changed."""
    x = N.normal(rng, (4, 64), "f32")
    scale = np.array([0.5], np.float32)
    q1, none = tnorm.quantize(x, "fp8_e4m3", scale)
    scale[0] = 0.25
    q2, _ = tnorm.quantize(x, "fp8_e4m3", scale)
    assert none is None
    N.assert_bits_equal(raw_bytes(q1), encode_fp8(x / np.float32(0.5), E4M3, 448.0), "q with scale 0.5")
    N.assert_bits_equal(raw_bytes(q2), encode_fp8(x / np.float32(0.25), E4M3, 448.0), "q with scale 0.25")


# ---- refusals: the binding's error classes with the library's message; nothing written ----

def _x(kind, rng, shape=(4, 64), dtype="f32"):
    return kind.from_numpy(N.normal(rng, shape, dtype))


ERRORS = {
    "format": (lambda k, g, o: tnorm.rms_norm(_x(k, g), quant="fp4", out=o), ValueError, None,
               r"^quant is 'fp4'; must be one of 'fp8_e4m3', 'fp8_e5m2', 'int8', 'mxfp8', 'nvfp4'$"),
    "group16": (lambda k, g, o: tnorm.rms_norm(_x(k, g), quant="fp8_e4m3", group_size=16, out=o), ValueError,
                "TN_ERR_VALUE", r"^rms_norm: group_size is 16; fp8_e4m3 groups are 32, 64 or 128 elements$"),
    "group_float": (lambda k, g, o: tnorm.rms_norm(_x(k, g), quant="int8", group_size=64.0, out=o), TypeError,
                    None, r"^group_size is 64.0; must be an int"),
    "mxfp8_group64": (lambda k, g, o: tnorm.layer_norm(_x(k, g), quant="mxfp8", group_size=64, out=o), ValueError,
                      "TN_ERR_VALUE", r"^layer_norm: mxfp8 groups are 32 elements; group_size is 64 \(0 means 32\)$"),
    "scale_zero": (lambda k, g, o: tnorm.rms_norm(_x(k, g), quant="fp8_e4m3", scale=0.0, out=o), ValueError,
                   "TN_ERR_VALUE", r"^rms_norm: quant.scale is 0; must be finite and > 0$"),
    "scale_negative": (lambda k, g, o: tnorm.add_rms_norm(_x(k, g), _x(k, g), None, quant="int8", scale=-1.5, out=o),
                       ValueError, "TN_ERR_VALUE", r"^add_rms_norm: quant.scale is -1.5; must be finite and > 0$"),
    "scale_nan": (lambda k, g, o: tnorm.rms_norm(_x(k, g), quant="fp8_e5m2", scale=float("nan"), out=o),
                  ValueError, "TN_ERR_VALUE", r"^rms_norm: quant.scale is nan; must be finite and > 0$"),
    "scale_tensor_negative": (lambda k, g, o: tnorm.rms_norm(_x(k, g), quant="fp8_e4m3",
                                                             scale=k.from_numpy(np.array([-2.0], np.float32)), out=o),
                              ValueError, "TN_ERR_VALUE", r"^rms_norm: quant.scale is -2; must be finite and > 0$"),
    "scale_two_elements": (lambda k, g, o: tnorm.rms_norm(_x(k, g), quant="fp8_e4m3",
                                                          scale=k.from_numpy(np.ones(2, np.float32)), out=o),
                           ValueError, "TN_ERR_SHAPE",
                           r"^rms_norm: quant.scale is 1 x 2; must be 1 x 1 \(one float\)$"),
    "scale_f16": (lambda k, g, o: tnorm.rms_norm(_x(k, g), quant="fp8_e4m3",
                                                 scale=k.from_numpy(np.ones(1, np.float16)), out=o),
                  TypeError, None, r"^scale: unsupported dtype float16; scale is a Python float or a one-element "
                                   r"float32 array"),
    "scale_int8": (lambda k, g, o: tnorm.rms_norm(_x(k, g), quant="fp8_e4m3",
                                                  scale=k.from_numpy(np.ones(1, np.int8)), out=o),
                   ValueError, "TN_ERR_DTYPE", r"^rms_norm: quant.scale is i8; must be f32$"),
    "nvfp4_no_scale": (lambda k, g, o: tnorm.rms_norm(_x(k, g), quant="nvfp4", out=o), ValueError, "TN_ERR_NULL",
                       r"^rms_norm: quant.scale is required \(NVFP4's global scale\)$"),
    "mxfp8_scale": (lambda k, g, o: tnorm.rms_norm(_x(k, g), quant="mxfp8", scale=1.0, out=o), ValueError,
                    "TN_ERR_OPERAND", r"^rms_norm: quant.scale given with dynamic mxfp8 scales"),
    "static_group": (lambda k, g, o: tnorm.rms_norm(_x(k, g), quant="fp8_e4m3", scale=1.0, group_size=64, out=o),
                     ValueError, "TN_ERR_VALUE", r"^rms_norm: group_size is 64 with per-tensor scaling"),
    "static_pow2": (lambda k, g, o: tnorm.rms_norm(_x(k, g), quant="int8", scale=1.0, pow2_scales=True, out=o),
                    ValueError, "TN_ERR_VALUE", r"^rms_norm: pow2_scales applies to dynamic FP8, INT8 and MXFP8"),
    "nvfp4_pow2": (lambda k, g, o: tnorm.rms_norm(_x(k, g), quant="nvfp4", scale=1.0, pow2_scales=True, out=o),
                   ValueError, "TN_ERR_VALUE", r"^rms_norm: pow2_scales applies to dynamic FP8, INT8 and MXFP8"),
    "static_column": (lambda k, g, o: tnorm.rms_norm(_x(k, g), quant="fp8_e4m3", scale=1.0, scales_layout="column",
                                                     out=o),
                      ValueError, "TN_ERR_VALUE", r"^rms_norm: a static scale has no scales layout"),
    "fp8_swizzled": (lambda k, g, o: tnorm.rms_norm(_x(k, g), quant="fp8_e4m3", scales_layout="swizzled", out=o),
                     ValueError, "TN_ERR_VALUE", r"^rms_norm: the swizzled scales layout is MXFP8's and NVFP4's$"),
    "dim_not_group": (lambda k, g, o: tnorm.rms_norm(_x(k, g), quant="fp8_e4m3", group_size=128, out=o),
                      ValueError, "TN_ERR_SHAPE", r"^rms_norm: dim 64 is not a multiple of fp8_e4m3's group of 128"),
    "scale_ub_negative": (lambda k, g, o: tnorm.rms_norm(_x(k, g), quant="fp8_e4m3", scale_ub=-1.0, out=o),
                          ValueError, "TN_ERR_VALUE", r"^rms_norm: quant.scale_ub is -1; must be finite and > 0"),
    "scale_min_zero": (lambda k, g, o: tnorm.rms_norm(_x(k, g), quant="fp8_e4m3", scale_min=0.0, out=o),
                       ValueError, "TN_ERR_VALUE", r"^rms_norm: quant.scale_min is 0; must be finite and > 0"),
    "ub_below_min": (lambda k, g, o: tnorm.rms_norm(_x(k, g), quant="int8", scale_ub=1e-3, scale_min=1e-2, out=o),
                     ValueError, "TN_ERR_VALUE", r"^rms_norm: quant.scale_ub 0.001 is below quant.scale_min 0.01$"),
    "source": (lambda k, g, o: tnorm.rms_norm(_x(k, g), quant="int8", quant_source="bf16", out=o), ValueError, None,
               r"^quant_source is 'bf16'; must be one of 'rounded', 'f32'$"),
    "layout": (lambda k, g, o: tnorm.rms_norm(_x(k, g), quant="int8", scales_layout="col", out=o), ValueError, None,
               r"^scales_layout is 'col'; must be one of 'row', 'column', 'swizzled'$"),
    "scale_without_quant": (lambda k, g, o: tnorm.rms_norm(_x(k, g), scale=1.0, out=o), ValueError, None,
                            r"^rms_norm: scale given without quant"),
    "options_without_quant": (lambda k, g, o: tnorm.add_layer_norm(_x(k, g), _x(k, g), group_size=64,
                                                                   return_unquantized=True, out=o),
                              ValueError, None, r"^add_layer_norm: group_size, return_unquantized given without quant"),
    "residual_missing": (lambda k, g, o: tnorm.add_rms_norm(_x(k, g), None, None, quant="int8", out=o), ValueError,
                         "TN_ERR_NULL", r"^add_rms_norm: residual is required$"),
    "heads": (lambda k, g, o: tnorm.rms_norm(_x(k, g, (2, 4, 64))[:, :2], quant="int8"), ValueError, "TN_ERR_SHAPE",
              r"^rms_norm: a quantized output takes 2-D views; x has 2 heads$"),
    "quantize_float64": (lambda k, g, o: tnorm.quantize(k.from_numpy(np.zeros((4, 64))), "int8"), TypeError, None,
                         r"^x: unsupported dtype float64"),
    "out_dtype": (lambda k, g, o: tnorm.rms_norm(_x(k, g, dtype="f16"), quant="int8", out=o), ValueError,
                  "TN_ERR_DTYPE", r"^rms_norm: y is f32, x is f16$"),
}


@pytest.mark.parametrize("kind", cpu_kinds())
@pytest.mark.parametrize("case", list(ERRORS))
def test_refused(rng, kind, case):
    fn, exc, status, pattern = ERRORS[case]
    out = kind.from_numpy(N.poison((4, 64), "f32"))
    with pytest.raises(exc, match=pattern) as info:
        fn(kind, rng, out)
    assert getattr(info.value, "status", None) == status
    N.assert_bits_equal(kind.to_numpy(out), N.poison((4, 64), "f32"), "out after a refused call")


def test_float8_needs_ml_dtypes(rng, monkeypatch):
    """NumPy has float8 only through ml_dtypes: without it, a clear ImportError; int8 needs none."""
    x = N.normal(rng, (4, 64), "f32")
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # import ml_dtypes now raises ImportError
    monkeypatch.setattr(_dlpack, "_numpy_storage", None)  # rebuilt without ml_dtypes; the cached map comes back
    with pytest.raises(ImportError, match=r"^tnorm: q is float8_e4m3fn, which NumPy has only through ml_dtypes; "
                                          r"install it \(pip install ml_dtypes\)$"):
        tnorm.rms_norm(x, quant="fp8_e4m3")
    with pytest.raises(ImportError, match=r"scales is float8_e4m3fn"):
        tnorm.quantize(x, "nvfp4", 1.0)
    q, sc = tnorm.quantize(x, "int8")
    assert q.dtype == np.int8 and sc.dtype == np.float32


# ---- torch ----

torch = torch_or_none()
needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")


@needs_torch
def test_torch_dtypes_and_fast_path(rng):
    """torch outputs in torch's dtypes; a quantized call after a prepared plain one (the fast path, whose key
    holds no quantization keywords) still quantizes, and a keyword without quant is still refused."""
    x = torch.from_numpy(N.normal(rng, (8, 64), "f32")).to(torch.bfloat16)
    w = torch.ones(64, dtype=torch.bfloat16)
    for _ in range(2):
        tnorm.rms_norm(x, w)  # prepared by the first, taken by the second
    q, sc = tnorm.rms_norm(x, w, quant="fp8_e4m3")
    assert q.dtype == torch.float8_e4m3fn and sc.dtype == torch.float32 and tuple(sc.shape) == (8, 1)
    with pytest.raises(ValueError, match=r"^rms_norm: scale given without quant"):
        tnorm.rms_norm(x, w, scale=1.0)
    expected = {("fp8_e5m2", False): (torch.float8_e5m2, torch.float32), ("int8", True): (torch.int8, torch.uint8),
                ("mxfp8", False): (torch.float8_e4m3fn, torch.uint8), ("nvfp4", False): (torch.uint8,
                                                                                          torch.float8_e4m3fn)}
    for (fmt, pow2), (qd, sd) in expected.items():
        kw = {"scale": torch.tensor(2.0)} if fmt == "nvfp4" else {"pow2_scales": pow2}
        q, sc = tnorm.quantize(x, fmt, **kw)
        assert q.dtype == qd and sc.dtype == sd, (fmt, q.dtype, sc.dtype)
    q, sc = tnorm.quantize(x, "fp8_e4m3", group_size=32, scales_layout="column")
    assert tuple(sc.shape) == (8, 2) and sc.stride() == (1, 8)


def _cuda_reason():
    if torch is None:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    try:
        if _lib.lib().tn_device_available(_lib.context(), _lib.TN_DEVICE_CUDA) != 0:
            return "libtnorm cannot run on CUDA here: " + _lib.lib().tn_context_last_error(_lib.context()).decode()
    except RuntimeError as e:
        return str(e)
    return None


@pytest.mark.skipif(_cuda_reason() is not None, reason=str(_cuda_reason()))
@pytest.mark.parametrize("op", OPS + ["quantize"])
@pytest.mark.parametrize("quant", ["fp8_e4m3", "int8", "mxfp8", "nvfp4"])
def test_cuda_refuses_quantized_outputs(rng, op, quant):
    """The CUDA backend has no quantized outputs yet: RuntimeError, TN_ERR_UNAVAILABLE, the library's message;
    y given beside them is not written."""
    cuda = TorchKind("cuda")
    inputs = make_inputs(rng, "add_layer_norm" if op.startswith("add_") else "layer_norm", "bf16", 4, 64)
    if not op.endswith("layer_norm"):
        inputs.pop("bias")
    kw = {"scale": torch.tensor([2.0], device="cuda")} if quant == "nvfp4" else {}
    out = cuda.from_numpy(N.poison((4, 64), "bf16"))
    with pytest.raises(RuntimeError, match=rf"^{op}: quantized outputs \({quant}\) run on the CPU backend only") as e:
        if op == "quantize":
            tnorm.quantize(cuda.from_numpy(inputs["x"]), quant, **kw)
        else:
            call(cuda, op, inputs, quant=quant, out=out, **kw)
    assert e.value.status == "TN_ERR_UNAVAILABLE"
    cuda.synchronize()
    N.assert_bits_equal(cuda.to_numpy(out), N.poison((4, 64), "bf16"), "out after a refused call")


@pytest.mark.skipif(_cuda_reason() is not None, reason=str(_cuda_reason()))
def test_cuda_scale_checks():
    """A Python float scale on CUDA is checked by the binding (a GPU cannot report it), with the library's
    words; a scale tensor on another device than x is refused by the library."""
    x = torch.ones((4, 64), dtype=torch.float16, device="cuda")
    with pytest.raises(ValueError, match=r"^rms_norm: quant.scale is -1; must be finite and > 0$"):
        tnorm.rms_norm(x, quant="fp8_e4m3", scale=-1.0)
    with pytest.raises(RuntimeError, match=r"^quantize: quant.scale is on device") as e:
        tnorm.quantize(x.cpu(), "fp8_e4m3", torch.tensor([1.0], device="cuda"))
    assert e.value.status == "TN_ERR_DEVICE"
