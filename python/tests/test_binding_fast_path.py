"""The fast path for torch tensors (tnorm/_ops.py): a call whose key (the operands' dtype, shape, strides,
device and the options) was prepared by an earlier call writes only the data pointers and runs.

These tests would fail if a prepared call were reused for a call it does not describe: the same op is
called with other strides, dtypes, shapes, devices, operands and options in turn, each time on fresh
tensors, and every result must be the general way's bit for bit (the fast path turned off) and within the
tolerance of a float64 NumPy reference. Outputs given are filled with NaN first, so an element left
unwritten shows. Errors raised after a prepared success must be the general way's, message included.
"""

import contextlib
import os
import threading
import time

import numpy as np
import pytest

import numerics as N
from kinds import TorchKind

torch = pytest.importorskip("torch", reason="torch is not installed: the fast path is for torch tensors")

import tnorm  # noqa: E402
from tnorm import _lib, _ops  # noqa: E402


def _devices():
    params = [pytest.param("cpu", id="cpu")]
    reason = None
    if not torch.cuda.is_available():
        reason = "torch sees no CUDA device"
    else:
        try:
            if not tnorm.cuda_available():
                reason = "libtnorm cannot run on CUDA here"
        except RuntimeError as e:
            reason = str(e)
    params.append(pytest.param("cuda", id="cuda", marks=[pytest.mark.skip(reason=reason)] if reason else []))
    return params


DEVICES = _devices()
TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


# ---- helpers ----

general_way = _ops.general_way  # every call inside goes the general way (and prepares nothing)


class _GeneralWayTaken(AssertionError):
    pass


@contextlib.contextmanager
def fast_path_only():
    """Fails any call inside that goes the general way (which starts with a _Call)."""
    saved = _ops._Call

    def refuse(*args, **kwargs):
        raise _GeneralWayTaken(f"went the general way: {args[0] if args else ''}")

    _ops._Call = refuse
    try:
        yield
    finally:
        _ops._Call = saved


def prepared_calls():
    return _lib._local.ctx.calls


def to_torch(a, device):
    return TorchKind(device).from_numpy(a)


def to_numpy(t):
    return TorchKind(t.device.type).to_numpy(t)


def nan_like(t):
    return torch.full_like(t, float("nan"))


def strided_rows(rng, rows, dim, dtype, device, pad=16):
    """rows x dim inside a wider buffer: row stride dim + pad. Returns (tensor, its values in NumPy)."""
    buf = to_torch(N.normal(rng, (rows, dim + pad), dtype), device)
    t = buf[:, pad // 2:pad // 2 + dim]
    assert t.stride() == (dim + pad, 1)
    return t, to_numpy(t)


def heads_view(rng, tokens, heads, dim, dtype, device):
    """[tokens, heads, dim] as Q inside a packed [tokens, 3 * heads * dim] buffer (its leading dimensions
    do not merge)."""
    buf = to_torch(N.normal(rng, (tokens, 3 * heads * dim), dtype), device)
    t = buf[:, :heads * dim].view(tokens, heads, dim)
    return t, to_numpy(t)


def _copy(t):
    """A copy of t with t's strides, type and requires_grad."""
    c = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    with torch.no_grad():
        c.copy_(t)
    if type(t) is torch.nn.Parameter:
        return torch.nn.Parameter(c, requires_grad=t.requires_grad)
    assert type(t) is torch.Tensor
    return c


def _clone_all(values, memo):
    """Copies of every tensor in values (a tuple or dict), each laid out as the original, the same tensor
    copied once: out=x stays in place on the copies."""
    def one(v):
        if isinstance(v, torch.Tensor):
            if id(v) not in memo:
                memo[id(v)] = _copy(v)
            return memo[id(v)]
        return v
    if isinstance(values, dict):
        return {k: one(v) for k, v in values.items()}
    return tuple(one(v) for v in values)


def _as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


def run_and_compare(fn, args, kwargs, expect_fast=True):
    """fn(*args, **kwargs) the general way on copies, then as called (the fast path when expect_fast,
    which is checked); the results must agree bit for bit. Returns the results of the call under test."""
    memo = {}
    g_args, g_kwargs = _clone_all(args, memo), _clone_all(kwargs, memo)
    with general_way():
        expected = _as_tuple(fn(*g_args, **g_kwargs))
    with fast_path_only() if expect_fast else contextlib.nullcontext():
        got = _as_tuple(fn(*args, **kwargs))
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device, (a, b)
        assert a.stride() == b.stride(), (a.stride(), b.stride())
        N.assert_bits_equal(to_numpy(a), to_numpy(b), f"result {i}")
        # Finite inputs give finite results: a NaN left is an element of a poisoned output never written.
        assert not torch.isnan(a).any(), f"result {i}: {int(torch.isnan(a).sum())} elements not written"
    return got





class DLPackOnly:
    """An array of no library tnorm knows: only the DLPack protocol, over a torch tensor."""

    def __init__(self, t):
        self.t = t

    def __dlpack__(self, **kwargs):
        return self.t.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.t.__dlpack_device__()

# ---- the same op, with every part of the key changing in turn ----

def _rms_variants(rng, device):
    """(name, builder): builder() -> (args, kwargs, reference y float64 or None, fast?). Each builder makes
    fresh tensors (new data, new pointers) of the same kind on every call."""
    T = lambda a: to_torch(a, device)  # noqa: E731

    def plain(dtype="bf16", wdtype=None, rows=3, dim=64, **options):
        def build():
            x = N.normal(rng, (rows, dim), dtype)
            w = N.uniform(rng, dim, wdtype or dtype)
            eps, off = options.get("eps", 1e-6), options.get("weight_offset", 0.0)
            ref = N.reference("rms_norm", x, weight=w, eps=eps, weight_offset=off)[0]
            return (T(x), T(w)), dict(options), ref, True
        return build

    def no_weight():
        x = N.normal(rng, (3, 64), "bf16")
        return (T(x),), {}, N.reference("rms_norm", x)[0], True

    def strided():
        x, xn = strided_rows(rng, 3, 64, "bf16", device)
        w = N.uniform(rng, 64, "bf16")
        return (x, T(w)), {}, N.reference("rms_norm", xn, weight=w)[0], True

    def three_d():
        x = N.normal(rng, (2, 3, 64), "bf16")
        w = N.uniform(rng, 64, "bf16")
        return (T(x), T(w)), {}, N.reference("rms_norm", x, weight=w)[0], True

    def heads():  # the same shape as three_d, other strides, in place
        x, xn = heads_view(rng, 2, 3, 64, "bf16", device)
        w = N.uniform(rng, 64, "bf16")
        return (x, T(w)), {"out": x}, N.reference("rms_norm", xn, weight=w)[0], True

    def heads_allocated():  # the same, y allocated: [tokens, heads, dim], read as heads like x
        x, xn = heads_view(rng, 2, 3, 64, "bf16", device)
        w = N.uniform(rng, 64, "bf16")
        return (x, T(w)), {}, N.reference("rms_norm", xn, weight=w)[0], True

    def with_mul():
        x, m = N.normal(rng, (3, 64), "bf16"), N.normal(rng, (3, 64), "bf16")
        w = N.uniform(rng, 64, "bf16")
        return (T(x), T(w)), {"mul": T(m)}, N.reference("rms_norm", x, weight=w, mul=m)[0], True

    def out_given():
        x = N.normal(rng, (3, 64), "bf16")
        w = N.uniform(rng, 64, "bf16")
        tx = T(x)
        return (tx, T(w)), {"out": nan_like(tx)}, N.reference("rms_norm", x, weight=w)[0], True

    def out_strided():  # out's strides differ from x's
        x = N.normal(rng, (3, 64), "bf16")
        w = N.uniform(rng, 64, "bf16")
        out, _ = strided_rows(rng, 3, 64, "bf16", device)
        out.fill_(float("nan"))
        return (T(x), T(w)), {"out": out}, N.reference("rms_norm", x, weight=w)[0], True

    def in_place():
        x = N.normal(rng, (3, 64), "bf16")
        w = N.uniform(rng, 64, "bf16")
        tx = T(x)
        return (tx, T(w)), {"out": tx}, N.reference("rms_norm", x, weight=w)[0], True

    def llama():
        x = N.normal(rng, (3, 64), "bf16")
        w = N.uniform(rng, 64, "bf16")
        return (T(x), T(w)), {"casting": "llama"}, None, True

    def parameter_weight():
        x = N.normal(rng, (3, 64), "bf16")
        w = N.uniform(rng, 64, "bf16")
        p = torch.nn.Parameter(T(w), requires_grad=True)
        return (T(x), p), {}, N.reference("rms_norm", x, weight=w)[0], True

    def numpy_weight():  # another library's operand (NumPy; on CUDA a bare DLPack producer): the general way
        x = N.normal(rng, (3, 64), "f32")
        w = N.uniform(rng, 64, "f32")
        other = w if device == "cpu" else DLPackOnly(T(w))
        return (T(x), other), {}, N.reference("rms_norm", x, weight=w)[0], False

    def one_row():
        x = N.normal(rng, (1, 64), "bf16")
        w = N.uniform(rng, 64, "bf16")
        return (T(x), T(w)), {}, N.reference("rms_norm", x, weight=w)[0], True

    def one_row_odd_stride():  # a row of 1: its stride addresses nothing
        x = N.normal(rng, (1, 64), "bf16")
        w = N.uniform(rng, 64, "bf16")
        tx = T(x).as_strided((1, 64), (7, 1))
        return (tx, T(w)), {}, N.reference("rms_norm", x, weight=w)[0], True

    variants = [
        ("bf16", plain()), ("f16", plain("f16")), ("f32", plain("f32")), ("bf16 x, f32 weight", plain(wdtype="f32")),
        ("other dim", plain(dim=128)), ("other rows", plain(rows=5)), ("eps", plain(eps=1e-2)),
        ("weight_offset", plain(weight_offset=1.0)), ("no weight", no_weight), ("strided rows", strided),
        ("3-D", three_d), ("3-D heads view", heads), ("3-D heads view, y allocated", heads_allocated), ("mul", with_mul), ("out", out_given),
        ("strided out", out_strided), ("in place", in_place), ("llama", llama), ("parameter", parameter_weight),
        ("numpy weight", numpy_weight), ("one row", one_row), ("one row, odd stride", one_row_odd_stride),
    ]
    return variants


def _check_variants(variants, fn, rounds=3, seed=0):
    """Each variant once the general way (to prepare it), then `rounds` times in shuffled orders, on fresh
    tensors each time, compared with the general way and the reference."""
    order = np.random.default_rng(seed)
    for _ in range(2):  # the first torch call of a process only turns the fast path on
        for name, build in variants:  # on tensors of their own: the calls under test get fresh ones
            args, kwargs, _, _ = build()
            fn(*args, **kwargs)
    for _ in range(rounds):
        for i in order.permutation(len(variants)):
            name, build = variants[i]
            args, kwargs, ref, fast = build()
            try:
                got = run_and_compare(fn, args, kwargs, expect_fast=fast)
            except AssertionError as e:
                raise AssertionError(f"variant {name!r}: {e}") from e
            if ref is not None:
                refs = ref if isinstance(ref, tuple) else (ref,)
                for j, r in enumerate(refs):
                    if r is None:
                        continue
                    g = to_numpy(got[j])
                    if r.dtype == np.float64:
                        N.assert_close(g, r, f"{name}: result {j}")
                    else:
                        N.assert_bits_equal(g, r, f"{name}: result {j}")


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_keys_kept_apart(rng, device):
    _check_variants(_rms_variants(rng, device), tnorm.rms_norm, seed=int(rng.integers(1 << 31)))


@pytest.mark.parametrize("device", DEVICES)
def test_add_rms_norm_keys_kept_apart(rng, device):
    T = lambda a: to_torch(a, device)  # noqa: E731

    def plain(dtype="bf16", rdtype=None, rows=3, dim=64, given=False, in_place=False, **options):
        def build():
            x = N.normal(rng, (rows, dim), dtype)
            r = N.normal(rng, (rows, dim), rdtype or dtype)
            w = N.uniform(rng, dim, dtype)
            tx, tr = T(x), T(r)
            kwargs = dict(options)
            if given:
                kwargs.update(out=nan_like(tx), residual_out=nan_like(tr))
            if in_place:
                kwargs.update(out=tx, residual_out=tr)
            ref = None
            if rdtype is None and not options:
                y, s = N.reference("add_rms_norm", x, weight=w, residual=r)
                ref = (y, s)
            return (tx, tr, T(w)), kwargs, ref, True
        return build

    def strided():
        x, xn = strided_rows(rng, 3, 64, "bf16", device)
        r, rn = strided_rows(rng, 3, 64, "bf16", device, pad=32)
        w = N.uniform(rng, 64, "bf16")
        y, s = N.reference("add_rms_norm", xn, weight=w, residual=rn)
        return (x, r, T(w)), {}, (y, s), True

    def no_weight():
        x, r = N.normal(rng, (3, 64), "f16"), N.normal(rng, (3, 64), "f16")
        return (T(x), T(r), None), {}, N.reference("add_rms_norm", x, residual=r), True

    variants = [
        ("bf16", plain()), ("f16", plain("f16")), ("f32", plain("f32")), ("f32 residual stream", plain(rdtype="f32")),
        ("other dim", plain(dim=256)), ("outputs given", plain(given=True)), ("in place", plain(in_place=True)),
        ("residual_mode f32", plain(residual_mode="f32")), ("llama", plain(casting="llama")),
        ("eps", plain(eps=1e-3)), ("strided", strided), ("no weight", no_weight),
    ]
    _check_variants(variants, tnorm.add_rms_norm, seed=int(rng.integers(1 << 31)))


@pytest.mark.parametrize("device", DEVICES)
def test_l2_norm_keys_kept_apart(rng, device):
    T = lambda a: to_torch(a, device)  # noqa: E731

    def plain(dtype="bf16", shape=(3, 64), given=False, **options):
        def build():
            x = N.normal(rng, shape, dtype)
            tx = T(x)
            kwargs = dict(options)
            if given:
                kwargs["out"] = nan_like(tx)
            ref = None
            if options.get("convention", "rsqrt_eps") == "rsqrt_eps" and options.get("casting", "exact") == "exact":
                ref = N.reference("l2_norm", x, eps=options.get("eps", 1e-6), scale=options.get("scale", 1.0))[0]
            return (tx,), kwargs, ref, True
        return build

    def heads():
        x, xn = heads_view(rng, 2, 4, 64, "bf16", device)
        return (x,), {"out": x}, N.reference("l2_norm", xn)[0], True

    def heads_allocated():
        x, xn = heads_view(rng, 2, 4, 64, "bf16", device)
        return (x,), {}, N.reference("l2_norm", xn)[0], True

    variants = [
        ("bf16", plain()), ("f16", plain("f16")), ("f32", plain("f32")), ("1-D", plain(shape=(64,))),
        ("3-D", plain(shape=(2, 4, 64))), ("heads view", heads), ("heads view, y allocated", heads_allocated), ("scale", plain(scale=3.0)),
        ("eps", plain(eps=0.5)), ("max_norm_eps", plain(convention="max_norm_eps")), ("given", plain(given=True)),
        ("llama", plain(casting="llama")),
    ]
    _check_variants(variants, tnorm.l2_norm, seed=int(rng.integers(1 << 31)))


def _layer_norm_ref(x, w, b, eps):
    xf = x.astype(np.float64)
    mean = xf.mean(axis=-1, keepdims=True)
    y = (xf - mean) / np.sqrt(((xf - mean) ** 2).mean(axis=-1, keepdims=True) + float(np.float32(eps)))
    if w is not None:
        y = y * w.astype(np.float64)
    if b is not None:
        y = y + b.astype(np.float64)
    return y


@pytest.mark.parametrize("device", DEVICES)
def test_layer_norms_keys_kept_apart(rng, device):
    """layer_norm and add_layer_norm: bit for bit with the general way; layer_norm's f32 results near a
    float64 reference."""
    T = lambda a: to_torch(a, device)  # noqa: E731

    def ln(dtype="f32", weight=True, bias=True, given=False):
        def build():
            x = N.normal(rng, (3, 96), dtype) + N.DTYPES[dtype].type(0.5)
            w = N.uniform(rng, 96, dtype) if weight else None
            b = N.uniform(rng, 96, dtype) if bias else None
            tx = T(x)
            kwargs = {"out": nan_like(tx)} if given else {}
            return (tx, None if w is None else T(w), None if b is None else T(b)), kwargs, None, True
        return build

    variants = [("f32", ln()), ("bf16", ln("bf16")), ("no bias", ln(bias=False)), ("no weight", ln(weight=False)),
                ("given", ln(given=True))]
    _check_variants(variants, tnorm.layer_norm, seed=int(rng.integers(1 << 31)))
    x, w, b = N.normal(rng, (5, 96), "f32"), N.uniform(rng, 96, "f32"), N.uniform(rng, 96, "f32")
    for _ in range(2):
        y = to_numpy(tnorm.layer_norm(T(x), T(w), T(b)))
        ref = _layer_norm_ref(x, w, b, 1e-5)
        assert np.allclose(y, ref, rtol=1e-5, atol=1e-5 * np.max(np.abs(ref)))

    def add_ln(dtype="bf16", given=False):
        def build():
            x, r = N.normal(rng, (3, 96), dtype), N.normal(rng, (3, 96), dtype)
            tx, tr = T(x), T(r)
            kwargs = {"out": nan_like(tx), "residual_out": nan_like(tr)} if given else {}
            return (tx, tr, T(N.uniform(rng, 96, dtype)), T(N.uniform(rng, 96, dtype))), kwargs, None, True
        return build

    _check_variants([("bf16", add_ln()), ("f32", add_ln("f32")), ("given", add_ln(given=True))],
                    tnorm.add_layer_norm, seed=int(rng.integers(1 << 31)))


@pytest.mark.parametrize("device", DEVICES)
def test_rope_keys_kept_apart(rng, device):
    """rms_norm_rope: positions, tables, styles and layouts in turn, in place and not."""
    T = lambda a: to_torch(a, device)  # noqa: E731

    def rope(packed=False, table=False, style="neox", rotary_dim=None, pos_dtype=np.int64, in_place=False,
             theta=10000.0):
        def build():
            if packed:
                x, _ = heads_view(rng, 5, 4, 64, "bf16", device)
            else:
                x = T(N.normal(rng, (5, 4, 64), "bf16"))
            positions = T(rng.integers(0, 50, size=5).astype(pos_dtype))
            kwargs = {"style": style, "rotary_dim": rotary_dim, "theta": theta}
            if table:
                kwargs["cos_sin"] = T(N.uniform(rng, (50, rotary_dim or 64), "f32", -1.0, 1.0))
            if in_place:
                kwargs["out"] = x
            return (x, positions, T(N.uniform(rng, 64, "bf16"))), kwargs, None, True
        return build

    variants = [
        ("plain", rope()), ("packed", rope(packed=True)), ("packed in place", rope(packed=True, in_place=True)),
        ("table", rope(table=True)), ("gptj", rope(style="gptj")), ("rotary 32", rope(rotary_dim=32)),
        ("table rotary 32", rope(table=True, rotary_dim=32)), ("int32 positions", rope(pos_dtype=np.int32)),
        ("theta", rope(theta=500.0)),
    ]
    _check_variants(variants, tnorm.rms_norm_rope, seed=int(rng.integers(1 << 31)))


# ---- devices, errors, threads and the cache's bounds ----

@pytest.mark.parametrize("device", [d for d in DEVICES if d.values[0] == "cuda"] or
                         [pytest.param("cuda", marks=pytest.mark.skip(reason="no CUDA"))])
def test_same_key_but_the_device(rng, device):
    """A CPU and a CUDA tensor of the same dtype, shape and strides are two keys."""
    x, w = N.normal(rng, (4, 64), "bf16"), N.uniform(rng, 64, "bf16")
    ref = N.reference("rms_norm", x, weight=w)[0]
    for _ in range(3):
        for dev in ("cpu", "cuda"):
            y = tnorm.rms_norm(to_torch(x, dev), to_torch(w, dev))
            assert y.device.type == dev
            N.assert_close(to_numpy(y), ref, f"on {dev}")
    with pytest.raises((ValueError, RuntimeError)) as general:  # operands on two devices
        with general_way():
            tnorm.rms_norm(to_torch(x, "cpu"), to_torch(w, "cuda"))
    for _ in range(2):
        with pytest.raises((ValueError, RuntimeError)) as fast:
            tnorm.rms_norm(to_torch(x, "cpu"), to_torch(w, "cuda"))
        assert type(fast.value) is type(general.value) and str(fast.value) == str(general.value)


@pytest.mark.parametrize("device", DEVICES)
def test_errors_after_a_prepared_success(rng, device):
    """Errors that depend on the pointers (overlap) come from the library on the fast path too, with the
    general way's type and message; errors of another key are the general way's; and after an error the
    same key still runs (and still on the fast path)."""
    T = lambda a: to_torch(a, device)  # noqa: E731
    w = T(N.uniform(rng, 64, "f32"))
    buf = T(N.normal(rng, (2 * 4 * 64,), "f32"))
    x = buf[:4 * 64].view(4, 64)
    overlapping = buf[64:5 * 64].view(4, 64)  # rows 1..4 of buf: x's last three rows
    for _ in range(2):
        tnorm.rms_norm(x, w, out=torch.empty_like(x))  # prepares (x, w, out of x's layout)
    with general_way():
        with pytest.raises(ValueError) as general:
            tnorm.rms_norm(x, w, out=overlapping)
    before = to_numpy(buf).copy()
    with fast_path_only():
        with pytest.raises(ValueError) as fast:
            tnorm.rms_norm(x, w, out=overlapping)
    assert str(fast.value) == str(general.value) and fast.value.status == general.value.status
    assert np.array_equal(to_numpy(buf), before), "a refused call wrote"
    with fast_path_only():  # the same key right after the error: prepared, not busy
        y = tnorm.rms_norm(x, w, out=nan_like(x))
    N.assert_close(to_numpy(y), N.reference("rms_norm", to_numpy(x), weight=to_numpy(w))[0])

    # Another key's errors, after the success: the general way's messages.
    cases = [
        (lambda: tnorm.rms_norm(x, T(N.uniform(rng, 32, "f32"))), ValueError),  # weight of the wrong length
        (lambda: tnorm.rms_norm(x.double(), w), TypeError),
        (lambda: tnorm.rms_norm(x, w, out=torch.empty(4, 64, dtype=torch.float16, device=device)), ValueError),
        (lambda: tnorm.rms_norm(x, w, casting="bogus"), ValueError),
        (lambda: tnorm.rms_norm(x, None, weight_offset=1.0), ValueError),
        (lambda: tnorm.add_rms_norm(x, x[:3], w), ValueError),
        (lambda: tnorm.l2_norm(x, convention="bogus"), ValueError),
        (lambda: tnorm.rms_norm(x, w, out=torch.empty(2, 2, 64, device=device)), ValueError),
        (lambda: tnorm.rms_norm(x.t(), w[:4]), ValueError),
    ]
    for call, exc in cases:
        with general_way():
            with pytest.raises(exc) as general:
                call()
        for _ in range(2):
            with pytest.raises(exc) as fast:
                call()
            assert str(fast.value) == str(general.value)


def test_value_dependent_error_after_a_prepared_success(rng):
    """On the CPU a position outside the cos/sin table is refused by the library, which reads the positions:
    after the same key succeeded, the fast path raises the general way's error and writes nothing."""
    x = to_torch(N.normal(rng, (3, 2, 64), "f32"), "cpu")
    table = to_torch(N.uniform(rng, (4, 64), "f32"), "cpu")
    good = torch.tensor([0, 1, 3], dtype=torch.int32)
    bad = torch.tensor([0, 4, 1], dtype=torch.int32)
    for _ in range(2):
        tnorm.rms_norm_rope(x, good, cos_sin=table, out=nan_like(x))
    with general_way():
        with pytest.raises(ValueError) as general:
            tnorm.rms_norm_rope(x, bad, cos_sin=table, out=nan_like(x))
    out = nan_like(x)
    with fast_path_only():
        with pytest.raises(ValueError) as fast:
            tnorm.rms_norm_rope(x, bad, cos_sin=table, out=out)
    assert str(fast.value) == str(general.value)
    assert torch.isnan(out).all(), "a refused call wrote"


def test_neg_views_and_sparse_tensors_are_not_prepared(rng):
    """What the general way does not read from a tensor's own attributes (a negated view, a sparse tensor)
    never takes the fast path, even when its dtype, shape and strides match a prepared call."""
    x = to_torch(N.normal(rng, (2, 64), "f32"), "cpu")
    w = to_torch(N.uniform(rng, 64, "f32"), "cpu")
    for _ in range(2):
        tnorm.rms_norm(x, w)
    neg = torch._neg_view(x)
    assert neg.is_neg() and neg.shape == x.shape and neg.stride() == x.stride()
    with pytest.raises(_GeneralWayTaken):
        with fast_path_only():
            tnorm.rms_norm(neg, w)
    with pytest.raises(_GeneralWayTaken):
        with fast_path_only():
            tnorm.rms_norm(x, torch._neg_view(w))
    with pytest.raises(BufferError):
        tnorm.rms_norm(x.to_sparse(), w)


def test_subclasses_go_the_general_way(rng):
    class Mine(torch.Tensor):
        pass

    x = to_torch(N.normal(rng, (2, 64), "f32"), "cpu")
    w = to_torch(N.uniform(rng, 64, "f32"), "cpu")
    ref = N.reference("rms_norm", to_numpy(x), weight=to_numpy(w))[0]
    for _ in range(3):
        N.assert_close(to_numpy(tnorm.rms_norm(x.as_subclass(Mine), w)), ref)
        N.assert_close(to_numpy(tnorm.rms_norm(x, w.as_subclass(Mine))), ref)
    with pytest.raises(_GeneralWayTaken):
        with fast_path_only():
            tnorm.rms_norm(x, w.as_subclass(Mine))


@pytest.mark.parametrize("device", DEVICES)
def test_threads_keep_their_own_calls(rng, device):
    """Threads calling with the same key at once, each on its own data: every call gets its own thread's
    results (the prepared structures are per thread; the library runs without the GIL, so a shared
    structure would be rewritten by one thread while another's call reads it)."""
    T = lambda a: to_torch(a, device)  # noqa: E731
    n_threads, n_calls, shape = 4, 150, (16, 2048)
    data = []
    for _ in range(n_threads):
        x, r, w = N.normal(rng, shape, "f32"), N.normal(rng, shape, "f32"), N.uniform(rng, shape[1], "f32")
        data.append(((T(x), T(r), T(w)), N.reference("add_rms_norm", x, weight=w, residual=r)))
    expected = []
    for (x, r, w), (ref_y, ref_s) in data:
        y, s = tnorm.add_rms_norm(x, r, w)
        N.assert_close(to_numpy(y), ref_y, "y before the threads")
        N.assert_bits_equal(to_numpy(s), ref_s, "residual_out before the threads")
        expected.append((y, s))
    errors, prepared = [], []
    barrier = threading.Barrier(n_threads)

    def work(i):
        try:
            (x, r, w), (want_y, want_s) = data[i][0], expected[i]
            barrier.wait()
            for k in range(n_calls):
                y, s = tnorm.add_rms_norm(x, r, w)
                if device == "cuda":
                    torch.cuda.current_stream().synchronize()
                assert torch.equal(y, want_y) and torch.equal(s, want_s), f"thread {i}, call {k}: another's result"
            mine = [p for key, p in prepared_calls().items() if key[0] == "add_rms_norm" and key[2] == shape]
            assert len(mine) == 1, f"thread {i}: {len(mine)} prepared calls of the key"
            prepared.append(mine[0])
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    assert len({id(p) for p in prepared}) == n_threads, "threads share a prepared call"


def test_a_busy_prepared_call_is_not_reused(rng):
    """A call made while the prepared call of its key is being written (a finaliser or signal handler on the
    same thread) goes the general way, with its own structures, and is right."""
    x = to_torch(N.normal(rng, (2, 64), "f32"), "cpu")
    w = to_torch(N.uniform(rng, 64, "f32"), "cpu")
    for _ in range(2):
        tnorm.rms_norm(x, w)
    (key, prepared), = [(k, p) for k, p in prepared_calls().items() if k[0] == "rms_norm" and k[2] == x.shape
                        and k[1] == torch.float32 and k[6] is not None and k[9:] == (1e-6, 0.0, "exact")]
    prepared.busy = True
    try:
        x2 = to_torch(N.normal(rng, (2, 64), "f32"), "cpu")
        with pytest.raises(_GeneralWayTaken):
            with fast_path_only():
                tnorm.rms_norm(x2, w)
        y = tnorm.rms_norm(x2, w)
        N.assert_close(to_numpy(y), N.reference("rms_norm", to_numpy(x2), weight=to_numpy(w))[0])
        assert prepared_calls()[key] is not prepared  # the general way prepared a new one
    finally:
        prepared.busy = False


def test_prepared_calls_are_bounded(rng):
    w = to_torch(N.uniform(rng, 512, "f32"), "cpu")
    for dim in range(1, 2 * _ops._CALLS_LIMIT + 10):
        x = to_torch(N.normal(rng, (1, dim), "f32"), "cpu")
        tnorm.l2_norm(x)
        tnorm.l2_norm(x)
        assert len(prepared_calls()) <= _ops._CALLS_LIMIT
    x = to_torch(N.normal(rng, (3, 512), "f32"), "cpu")
    for _ in range(3):
        N.assert_close(to_numpy(tnorm.rms_norm(x, w)), N.reference("rms_norm", to_numpy(x), weight=to_numpy(w))[0])


def test_outputs_are_new_and_contiguous(rng):
    """An allocated output is a new tensor each call, C-contiguous, of x's dtype and device, whatever x's
    layout (empty_like is taken only where it gives that layout)."""
    w = to_torch(N.uniform(rng, 64, "bf16"), "cpu")
    layouts = [
        to_torch(N.normal(rng, (3, 64), "bf16"), "cpu"),
        strided_rows(rng, 3, 64, "bf16", "cpu")[0],
        to_torch(N.normal(rng, (2, 1, 64), "bf16"), "cpu").as_strided((2, 1, 64), (64, 5, 1)),
    ]
    for x in layouts:
        results = [tnorm.rms_norm(x, w) for _ in range(3)]
        for y in results:
            assert y.is_contiguous() and y.stride() == torch.empty(x.shape).stride(), (x.stride(), y.stride())
            assert y.dtype == x.dtype and y.shape == x.shape
        assert len({y.data_ptr() for y in results}) == 3
        s = tnorm.add_rms_norm(x, x.clone(), w)[1]
        assert s.is_contiguous() and s.stride() == torch.empty(x.shape).stride()


def test_scalars_equal_in_value_share_a_key(rng):
    """eps given as an int, a NumPy float or a float: equal values are one key and the same float32; an
    unhashable option goes the general way."""
    x = to_torch(N.normal(rng, (2, 64), "f32"), "cpu")
    expected = tnorm.l2_norm(x, eps=1.0)
    for eps in (1, np.float64(1.0), 1.0, np.float32(1.0), True):
        N.assert_bits_equal(to_numpy(tnorm.l2_norm(x, eps=eps)), to_numpy(expected), f"eps {eps!r}")
    other = tnorm.l2_norm(x, eps=2)
    assert not np.array_equal(to_numpy(other), to_numpy(expected))
    N.assert_bits_equal(to_numpy(tnorm.l2_norm(x, eps=np.array(2.0))), to_numpy(other), "eps as a 0-d array")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork here")
def test_forked_child_prepares_its_own(rng):
    """A child forked after the parent prepared a call starts with no context and no prepared calls: its
    calls make their own (the parent's structures and context belong to the parent)."""
    x = to_torch(N.normal(rng, (2, 64), "f32"), "cpu")
    w = to_torch(N.uniform(rng, 64, "f32"), "cpu")
    for _ in range(2):
        expected = tnorm.rms_norm(x, w)
    parent_calls = prepared_calls()
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status only
        code = 1
        try:
            results = [tnorm.rms_norm(x, w) for _ in range(3)]
            ok = all(torch.equal(y, expected) for y in results)
            code = 0 if ok and prepared_calls() is not parent_calls and len(prepared_calls()) == 1 else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child did not finish")
        time.sleep(0.01)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child status {status}"
    N.assert_bits_equal(to_numpy(tnorm.rms_norm(x, w)), to_numpy(expected), "in the parent after the fork")
