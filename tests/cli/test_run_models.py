"""`tnorm run` for what real models need: layer_norm and add_layer_norm (--bias), --casting, an f32
residual file with --residual-mode, and --l2-mode; checked against float64 references, or bit for bit
where the spec fixes every rounding."""

import numpy as np
import pytest

import tnormtest as T

F32 = np.float32


def _npy(tmp_path, name, a):
    p = tmp_path / f"{name}.npy"
    T.write_npy(p, a)
    return str(p)


def _run(tmp_path, args):
    proc = T.run_tnorm(["run", *[str(a) for a in args]], cwd=tmp_path)
    T.assert_ok(proc)
    return proc


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm"])
def test_layer_norm(tmp_path, rng, dtype, op):
    x = T.rand_normal(rng, (9, 300), dtype) + T.DTYPES[dtype].type(0.75)
    w, b = T.rand(rng, (300,), dtype), T.rand(rng, (300,), "f32")
    args = [op, "--x", _npy(tmp_path, "x", x), "--weight", _npy(tmp_path, "w", w), "--bias", _npy(tmp_path, "b", b),
            "--out", tmp_path / "y.npy"]
    s = x
    if op == "add_layer_norm":
        r = T.rand_normal(rng, (9, 300), dtype)
        args += ["--residual", _npy(tmp_path, "r", r), "--residual-out", tmp_path / "s.npy"]
        s = (x.astype(F32) + r.astype(F32)).astype(x.dtype)
    _run(tmp_path, args)
    if op == "add_layer_norm":
        T.assert_bits_equal(T.read_npy(tmp_path / "s.npy"), s, "residual-out")
    s64 = s.astype(np.float64)
    d = s64 - s64.mean(axis=1, keepdims=True)
    eps = float(F32(1e-5))  # layer_norm's default eps
    ref = d / np.sqrt((d * d).mean(axis=1, keepdims=True) + eps) * w.astype(np.float64) + b.astype(np.float64)
    got = T.read_npy(tmp_path / "y.npy").astype(np.float64)
    # x - mean and + bias cancel: an absolute floor of float32 rounding at the row's scale, beside 1 ulp.
    err = T.errors(dtype, got, ref)
    ok = (err <= 1.0) | (np.abs(got - ref) <= 1e-5 * np.max(np.abs(ref)))
    assert ok.all(), f"{int((~ok).sum())} elements out of tolerance (worst {float(err.max()):.3g})"


def test_casting_llama_bit_exact(tmp_path, rng):
    """--casting llama: w * round(x * scale) rounded again (HF LlamaRMSNorm); rows whose sum of squares is
    exact in float32, so the float32 model below is the spec's value, bit for bit."""
    x = (rng.integers(-32, 33, size=(16, 256)) / 16.0).astype(np.float16)
    w = T.rand(rng, (256,), "f16")
    xf = x.astype(np.float64)
    inv = F32(1.0) / np.sqrt(F32(np.sum(xf * xf, axis=1, keepdims=True)) / F32(256) + F32(1e-6))
    n = x.astype(F32) * inv
    llama = (n.astype(np.float16).astype(F32) * w.astype(F32)).astype(np.float16)
    exact = (n * w.astype(F32)).astype(np.float16)
    assert not np.array_equal(llama, exact), "the inputs do not tell the castings apart"
    base = ["rms_norm", "--x", _npy(tmp_path, "x", x), "--weight", _npy(tmp_path, "w", w)]
    _run(tmp_path, [*base, "--casting", "llama", "--out", tmp_path / "llama.npy"])
    _run(tmp_path, [*base, "--casting=exact", "--out", tmp_path / "exact.npy"])
    T.assert_bits_equal(T.read_npy(tmp_path / "llama.npy"), llama, "y (llama)")
    T.assert_bits_equal(T.read_npy(tmp_path / "exact.npy"), exact, "y (exact)")


@pytest.mark.parametrize("mode", ["stored", "f32"])
def test_f32_residual_file(tmp_path, rng, mode):
    """An f16 x with an f32 residual: residual-out is the float32 sum, in f32."""
    x = T.rand_normal(rng, (5, 128), "f16")
    r = T.rand_normal(rng, (5, 128), "f32")
    _run(tmp_path, ["add_rms_norm", "--x", _npy(tmp_path, "x", x), "--residual", _npy(tmp_path, "r", r),
                    "--residual-mode", mode, "--out", tmp_path / "y.npy", "--residual-out", tmp_path / "s.npy"])
    s = T.read_npy(tmp_path / "s.npy")
    assert s.dtype == np.float32
    T.assert_bits_equal(s, x.astype(F32) + r, "residual-out")
    ref, _ = T.reference("rms_norm", s)
    T.assert_close("f16", T.read_npy(tmp_path / "y.npy"), ref)


def test_l2_mode(tmp_path, rng):
    x = T.rand_normal(rng, (4, 64), "f32")
    x[2] *= F32(1e-4)
    _run(tmp_path, ["l2_norm", "--x", _npy(tmp_path, "x", x), "--eps", "0.01", "--l2-mode", "max_norm_eps",
                    "--out", tmp_path / "y.npy"])
    x64 = x.astype(np.float64)
    ref = x64 / np.maximum(np.sqrt((x64 * x64).sum(axis=1, keepdims=True)), float(F32(0.01)))
    T.assert_close("f32", T.read_npy(tmp_path / "y.npy"), ref)


@pytest.mark.parametrize("args,code,text", [
    (["rms_norm", "--casting", "bf16"], 2, "--casting: unknown value 'bf16' (exact or llama)"),
    (["rms_norm", "--bias", "B"], 1, "rms_norm: takes no --bias (layer_norm and add_layer_norm do)"),
    (["layer_norm", "--residual-mode", "f32"], 1, "layer_norm: takes no --residual-mode"),
    (["rms_norm", "--l2-mode", "max_norm_eps"], 1, "rms_norm: takes no --l2-mode (l2_norm does)"),
])
def test_refused_flags(tmp_path, rng, args, code, text):
    x = _npy(tmp_path, "x", T.rand(rng, (2, 8), "f32"))
    proc = T.run_tnorm(["run", args[0], "--x", x, "--out", tmp_path / "y.npy", *args[1:]], cwd=tmp_path)
    T.assert_error_output(proc, [code])
    assert text in proc.stderr, T.describe(proc)
    assert not (tmp_path / "y.npy").exists()
