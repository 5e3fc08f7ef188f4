"""What real models need, through the binding on the CPU (NumPy arrays): layer_norm, the casting modes, an
f32 residual stream and its residual modes, l2_norm's max(norm, eps) convention, and rms_norm + rope on the
heads of a packed QKV buffer.

Two kinds of check:
- against float64 references of each formula, on fresh random rows, with the project's tolerance rule;
- bit for bit against a float32 op-by-op model of the reference implementation (HF's LlamaRMSNorm and
  apply_rotary_pos_emb, Gemma3RMSNorm), on rows built so that every sum of squares is exact in float32
  whatever the summation order (small multiples of 1/16, dims that are powers of two): then the row's
  scale is the same float32 in any implementation, and every later rounding must agree exactly.
"""

import numpy as np
import pytest

import numerics as N
import tnorm

DTYPES = ["f32", "f16", "bf16"]
F32 = np.float32


def _bits(a):
    return a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


def _within(dtype, got, ref, floor):
    """Tolerance rule, with an absolute floor for results that come out of a cancellation (x - mean,
    a*c - b*s): there the float32 rounding of the larger terms bounds the error, not the result's ulp."""
    g = got.astype(np.float64)
    tol = N.error_in_tolerances(dtype, g, ref)
    ok = (tol <= 1.0) | (np.abs(g - ref) <= floor)
    bad = int((~ok).sum())
    assert bad == 0, f"{bad} of {g.size} elements out of tolerance (worst {float(np.max(tol)):.3g})"


def _exact_rows(rng, shape, dtype):
    """Values k / 16 with |k| <= 32: exact in every dtype, squares multiples of 2^-8, and a row's sum of
    squares (at most 2^14 for 4096 elements) exact in float32 in any order."""
    return (rng.integers(-32, 33, size=shape) / 16.0).astype(N.DTYPES[dtype])


def _scale_f32(x, eps):
    """The row's float32 scale 1 / sqrt(mean(x^2) + eps) for rows whose sum of squares is exact."""
    xf = x.astype(np.float64)
    ss = F32(np.sum(xf * xf, axis=-1, keepdims=True))  # exact, so any order gives it
    mean = ss / F32(x.shape[-1])
    return F32(1.0) / np.sqrt(mean + F32(eps))


# ---- layer_norm ----

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", ["none", "weight", "weight_bias", "bias_f32"])
def test_layer_norm_against_float64(rng, dtype, affine):
    x = N.normal(rng, (37, 1000), dtype) + N.DTYPES[dtype].type(0.5)  # a mean to remove
    w = N.normal(rng, 1000, "f32" if affine == "bias_f32" else dtype) if affine != "none" else None
    b = N.normal(rng, 1000, "f32" if affine == "bias_f32" else dtype) if "bias" in affine else None
    y = tnorm.layer_norm(x, w, b, eps=1e-5)
    xf = x.astype(np.float64)
    mean = xf.mean(axis=-1, keepdims=True)
    ref = (xf - mean) / np.sqrt(((xf - mean) ** 2).mean(axis=-1, keepdims=True) + float(F32(1e-5)))
    if w is not None:
        ref = ref * w.astype(np.float64)
    if b is not None:
        ref = ref + b.astype(np.float64)
    _within(dtype, y, ref, 1e-5 * np.max(np.abs(ref)))


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_layer_norm_constant_row_and_add(rng, dtype):
    """A constant row has variance 0: y = bias (eps > 0). add_layer_norm returns the rounded sum too."""
    x = N.normal(rng, (4, 256), dtype)
    x[1] = N.DTYPES[dtype].type(3.0)
    b = N.normal(rng, 256, dtype)
    y = tnorm.layer_norm(x, None, b)
    assert np.array_equal(_bits(y[1]), _bits(b)), "a constant row must give the bias"
    r = N.normal(rng, (4, 256), dtype)
    y2, s = tnorm.add_layer_norm(x, r, None, b)
    assert np.array_equal(_bits(s), _bits(N.add_rounded(x, r)))
    assert np.array_equal(_bits(y2), _bits(tnorm.layer_norm(s, None, b)))


# ---- casting ----

@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("wdtype", ["same", "f32"])
def test_casting_bit_exact(rng, dtype, wdtype):
    """llama: w * (x * scale).to(dtype), the weight product rounded again (HF LlamaRMSNorm, Qwen3RMSNorm);
    exact: (x * scale * w).to(dtype), one rounding (Gemma3RMSNorm with w -> 1 + w, F.rms_norm)."""
    dt = N.DTYPES[dtype]
    x = _exact_rows(rng, (64, 1024), dtype)
    w = N.normal(rng, 1024, dtype if wdtype == "same" else "f32")
    inv = _scale_f32(x, 1e-6)
    n = x.astype(F32) * inv
    llama = (n.astype(dt).astype(F32) * w.astype(F32)).astype(dt)
    exact = (n * w.astype(F32)).astype(dt)
    assert not np.array_equal(_bits(llama), _bits(exact)), "the inputs do not tell the two castings apart"
    got_llama = tnorm.rms_norm(x, w, casting="llama")
    got_exact = tnorm.rms_norm(x, w, casting="exact")
    assert np.array_equal(_bits(got_llama), _bits(llama)), "llama casting differs from HF LlamaRMSNorm's model"
    assert np.array_equal(_bits(got_exact), _bits(exact)), "exact casting differs from the one-rounding model"


def test_casting_refused_values(rng):
    x = N.normal(rng, (2, 8), "f32")
    with pytest.raises(ValueError, match="casting is 'bf16'"):
        tnorm.rms_norm(x, casting="bf16")


# ---- residual stream ----

@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("mode", ["stored", "f32"])
def test_f32_residual_stream(rng, dtype, mode):
    """x in bf16/f16, the residual in f32: the sum stays f32 (exact float32 addition), y is x's dtype."""
    x = N.normal(rng, (16, 512), dtype)
    r = N.normal(rng, (16, 512), "f32")
    w = N.normal(rng, 512, dtype)
    y, s = tnorm.add_rms_norm(x, r, w, residual_mode=mode)
    assert s.dtype == np.float32 and y.dtype == N.DTYPES[dtype]
    expected_sum = x.astype(F32) + r
    assert np.array_equal(_bits(s), _bits(expected_sum)), "residual_out must be the float32 sum"
    ref, _ = N.reference("rms_norm", expected_sum, weight=w)
    _within(dtype, y, ref, 0.0)


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_residual_modes_differ(rng, dtype):
    """With a bf16 residual, "stored" normalises the rounded sum and "f32" the float32 one."""
    x = N.normal(rng, (32, 512), dtype)
    r = N.normal(rng, (32, 512), dtype)
    stored_y, stored_s = tnorm.add_rms_norm(x, r, None, residual_mode="stored")
    f32_y, f32_s = tnorm.add_rms_norm(x, r, None, residual_mode="f32")
    assert np.array_equal(_bits(stored_s), _bits(f32_s)), "residual_out is the rounded sum in both modes"
    ref_stored, _ = N.reference("rms_norm", stored_s)
    ref_f32, _ = N.reference("rms_norm", x.astype(F32) + r.astype(F32))
    _within(dtype, stored_y, ref_stored, 0.0)
    _within(dtype, f32_y, ref_f32, 0.0)
    assert not np.array_equal(_bits(stored_y), _bits(f32_y)), "the two modes gave the same bits"


# ---- l2 conventions ----

@pytest.mark.parametrize("dtype", DTYPES)
def test_l2_max_norm_eps(rng, dtype):
    """x / max(||x||, eps): a row whose norm is below eps is divided by eps instead."""
    x = N.normal(rng, (8, 128), dtype)
    x[3] = (x[3].astype(F32) * F32(1e-4)).astype(N.DTYPES[dtype])
    eps = 1e-2
    y = tnorm.l2_norm(x, eps=eps, convention="max_norm_eps")
    xf = x.astype(np.float64)
    ref = xf / np.maximum(np.sqrt((xf * xf).sum(axis=-1, keepdims=True)), float(F32(eps)))
    assert np.linalg.norm(xf[3]) < eps
    _within(dtype, y, ref, 0.0)
    plain = tnorm.l2_norm(x, eps=eps)
    assert not np.array_equal(_bits(plain[3]), _bits(y[3])), "the conventions must differ on the small row"


# ---- rms_norm + rope on a packed QKV buffer ----

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def _freqs(rotary, theta):
    i = np.arange(rotary // 2, dtype=np.float64)
    return (1.0 / np.power(float(F32(theta)), 2.0 * i / rotary)).astype(F32)


def _cos_sin(positions, rotary, theta):
    angle = positions.astype(F32)[:, None] * _freqs(rotary, theta)[None, :]  # float32 products
    return np.cos(angle.astype(np.float64)).astype(F32), np.sin(angle.astype(np.float64)).astype(F32)


def _rotate(n, c, s, rotary, style):
    """a' = a c - b s, b' = b c + a s on the pairs of the first rotary elements (float64)."""
    out = n.copy()
    h = rotary // 2
    if style == "neox":
        ia, ib = np.arange(h), np.arange(h) + h
    else:
        ia, ib = 2 * np.arange(h), 2 * np.arange(h) + 1
    a, b = n[..., ia], n[..., ib]
    c, s = c[:, None, :], s[:, None, :]
    out[..., ia] = a * c - b * s
    out[..., ib] = b * c + a * s
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("source", ["table_f32", "table_x", "theta"])
@pytest.mark.parametrize("rotary", [128, 64])
def test_rope_on_packed_qkv(rng, dtype, style, source, rotary):
    """Q and K normalised and rotated in place inside one [tokens, (32 + 8 + 8) x 128] buffer (a GQA config),
    each with its own weight; V untouched."""
    tokens, theta = 7, 1e6
    qkv = N.normal(rng, (tokens, (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM), dtype)
    before = qkv.copy()
    q = qkv[:, :Q_HEADS * HEAD_DIM].reshape(tokens, Q_HEADS, HEAD_DIM)
    k = qkv[:, Q_HEADS * HEAD_DIM:(Q_HEADS + KV_HEADS) * HEAD_DIM].reshape(tokens, KV_HEADS, HEAD_DIM)
    assert np.shares_memory(q, qkv) and np.shares_memory(k, qkv)
    positions = rng.integers(0, 4000, size=tokens).astype(np.int32 if source == "theta" else np.int64)
    wq, wk = N.normal(rng, HEAD_DIM, dtype), N.normal(rng, HEAD_DIM, dtype)
    table = None
    c, s = _cos_sin(positions, rotary, theta)
    if source != "theta":
        table = np.zeros((4000, rotary), dtype=F32)
        tc, ts = _cos_sin(np.arange(4000), rotary, theta)
        table[:, :rotary // 2], table[:, rotary // 2:] = tc, ts
        table = table.astype(N.DTYPES[dtype] if source == "table_x" else F32)
        c = table[positions, :rotary // 2].astype(np.float64)
        s = table[positions, rotary // 2:].astype(np.float64)
    refs = {}
    for name, view, w in (("q", q, wq), ("k", k, wk)):
        n, _ = N.reference("rms_norm", view.copy(), weight=w)
        refs[name] = _rotate(n, c.astype(np.float64), s.astype(np.float64), rotary, style)
        kw = dict(style=style, rotary_dim=rotary, theta=theta, cos_sin=table, out=view)
        got = tnorm.rms_norm_rope(view, positions, w, **kw)
        assert got is view
    for name, view in (("q", q), ("k", k)):
        _within(dtype, view, refs[name], 1e-6 * np.max(np.abs(refs[name])))
    v0 = (Q_HEADS + KV_HEADS) * HEAD_DIM
    assert np.array_equal(_bits(qkv[:, v0:]), _bits(before[:, v0:])), "V changed"


@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_rope_llama_casting_bit_exact(rng, style):
    """Qwen3's q path in bf16: q_norm (LlamaRMSNorm-style roundings), then q * cos + rotate_half(q) * sin with
    HF's bf16 cos/sin, every product and the sum rounded to bf16 as torch does, modelled in float32 ops."""
    bf = N.BF16
    tokens, heads, dim = 5, 4, 128
    x = _exact_rows(rng, (tokens, heads, dim), "bf16")
    w = N.normal(rng, dim, "bf16")
    positions = rng.integers(0, 100, size=tokens).astype(np.int64)
    tc, ts = _cos_sin(np.arange(100), dim, 1e6)
    table = np.concatenate([tc, ts], axis=1).astype(bf)
    inv = _scale_f32(x, 1e-6)
    n = ((x.astype(F32) * inv).astype(bf).astype(F32) * w.astype(F32)).astype(bf).astype(F32)
    c = table[positions, :dim // 2].astype(F32)[:, None, :]
    s = table[positions, dim // 2:].astype(F32)[:, None, :]
    h = dim // 2
    ia, ib = (np.arange(h), np.arange(h) + h) if style == "neox" else (2 * np.arange(h), 2 * np.arange(h) + 1)
    a, b = n[..., ia], n[..., ib]
    r = lambda v: v.astype(bf).astype(F32)  # noqa: E731 -- torch's rounding of each bf16 op
    expected = n.astype(bf)
    expected[..., ia] = (r(r(a * c) + r((-b) * s))).astype(bf)
    expected[..., ib] = (r(r(b * c) + r(a * s))).astype(bf)
    got = tnorm.rms_norm_rope(x, positions, w, style=style, cos_sin=table, casting="llama")
    assert np.array_equal(_bits(got), _bits(expected)), (
        f"{int((_bits(got) != _bits(expected)).sum())} of {got.size} elements differ from HF's bf16 rope")


def test_rope_refusals(rng):
    x = N.normal(rng, (3, 2, 64), "f32")
    pos = np.arange(3, dtype=np.int32)
    with pytest.raises(ValueError, match="rotary_dim is 63"):
        tnorm.rms_norm_rope(x, pos, rotary_dim=63)
    with pytest.raises(ValueError, match="positions has 2 elements"):
        tnorm.rms_norm_rope(x, pos[:2])
    with pytest.raises(TypeError, match="int32 or int64"):
        tnorm.rms_norm_rope(x, pos.astype(np.float32))
    table = np.zeros((2, 64), dtype=np.float32)
    with pytest.raises(ValueError, match="position"):  # position 2 is outside a 2-row table
        tnorm.rms_norm_rope(x, pos, cos_sin=table)


class _OnlyDLPack:
    """An array seen only through the DLPack protocol (as a library other than numpy and torch is)."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kwargs):
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


def test_rope_through_dlpack_capsules(rng):
    """x (Q heads of a packed buffer) and the positions read from DLPack capsules: the same result as from
    the arrays themselves."""
    qkv = N.normal(rng, (6, 3 * 4 * 64), "f32")
    q = qkv[:, :4 * 64].reshape(6, 4, 64)
    positions = rng.integers(0, 100, size=6).astype(np.int64)
    w = N.normal(rng, 64, "f32")
    expected = tnorm.rms_norm_rope(q, positions, w, theta=500.0)
    packed = np.ascontiguousarray(q)  # [tokens, heads, dim] that would flatten into rows: kept 3-D
    tnorm.rms_norm_rope(_OnlyDLPack(q), _OnlyDLPack(positions), w, theta=500.0, out=_OnlyDLPack(q))
    assert np.array_equal(_bits(q), _bits(expected)), "in place through capsules differs"
    got = tnorm.rms_norm_rope(_OnlyDLPack(packed), _OnlyDLPack(positions), w, theta=500.0, out=np.empty_like(packed))
    assert np.array_equal(_bits(got), _bits(expected)), "a contiguous [tokens, heads, dim] through capsules differs"


# ---- heads views with outputs the binding allocates ----

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["rms_norm", "l2_norm"])
def test_heads_view_with_allocated_output(rng, dtype, op):
    """Q sliced out of a packed QKV buffer (rows that cannot merge) without out=: the result is a new
    [tokens, heads, dim] array, every element written, V and K untouched."""
    tokens, q_heads, kv_heads, dim = 5, 4, 2, 64
    qkv = N.normal(rng, (tokens, q_heads + 2 * kv_heads, dim), dtype)
    before = qkv.copy()
    q = qkv[:, :q_heads, :]
    w = N.normal(rng, dim, dtype)
    y = tnorm.rms_norm(q, w, eps=1e-6) if op == "rms_norm" else tnorm.l2_norm(q, eps=1e-6)
    assert y.shape == q.shape and y.dtype == q.dtype
    ref, _ = N.reference(op, q, weight=w if op == "rms_norm" else None, eps=1e-6)
    N.assert_close(y, ref)
    N.assert_bits_equal(qkv, before, "the QKV buffer")
