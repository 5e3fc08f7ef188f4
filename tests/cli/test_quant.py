"""`tnorm run ... --quant`: quantized outputs checked byte for byte against a numpy model of the spec
(quantref.py): with --quant-source rounded, q and the scales are exactly the quantization of the y the
command also writes (float32 division v / s, round half to even, saturation); the files' dtypes and
metadata; and the calls that must fail without writing anything."""

import itertools

import numpy as np
import pytest

import quantref as Q
import tnormtest as T

USAGE = 2
ERROR = 1

# name -> (the flags after --quant FORMAT, quantref.quantize's keywords). Static and global scales are
# files the test writes: {scale}.
CONFIGS = {
    "fp8_e4m3-token": ("fp8_e4m3", [], {}),
    "fp8_e4m3-tensor": ("fp8_e4m3", ["--scales", "tensor", "--scale", "{scale}"], {"scaling": "tensor"}),
    "fp8_e5m2-group64": ("fp8_e5m2", ["--scales", "group64"], {"scaling": "group", "group": 64}),
    "fp8_e4m3-group128-column": ("fp8_e4m3", ["--scales", "group128", "--scales-layout", "column"],
                                 {"scaling": "group", "group": 128, "layout": "column"}),
    "fp8_e4m3-group128-pow2": ("fp8_e4m3", ["--scales", "group128", "--pow2-scales"],
                               {"scaling": "group", "group": 128, "pow2": True}),
    "int8-token": ("int8", [], {}),
    "int8-group32-pow2-column": ("int8", ["--scales", "group32", "--pow2-scales", "--scales-layout", "column"],
                                 {"scaling": "group", "group": 32, "pow2": True, "layout": "column"}),
    "mxfp8": ("mxfp8", [], {}),
    "mxfp8-swizzled": ("mxfp8", ["--scales-layout", "swizzled"], {"layout": "swizzled"}),
    "nvfp4": ("nvfp4", ["--scale", "{scale}"], {}),
    "nvfp4-swizzled": ("nvfp4", ["--scale", "{scale}", "--scales-layout", "swizzled"], {"layout": "swizzled"}),
}
STATIC_SCALE = {"fp8_e4m3": 0.011, "fp8_e5m2": 0.011, "int8": 0.035, "mxfp8": None, "nvfp4": 500.0}
OPS = ["rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm", "quantize"]
Q_DTYPE = {"fp8_e4m3": T.F8_E4M3, "mxfp8": T.F8_E4M3, "fp8_e5m2": T.F8_E5M2, "int8": np.dtype("i1"),
           "nvfp4": np.dtype("u1")}


def scales_dtype(fmt, kw):
    if fmt == "nvfp4":
        return T.F8_E4M3
    return np.dtype("u1") if fmt == "mxfp8" or kw.get("pow2") else np.dtype("<f4")


def as_bytes(a):
    return np.ascontiguousarray(a).view(np.uint8)


class QuantRun:
    """Inputs written to in/, the command run into out/, outputs read back."""

    def __init__(self, tmp_path, rng, op, dtype, shape, x=None):
        self.tmp, self.rng, self.op, self.dtype = tmp_path, rng, op, dtype
        self.ind, self.outd = tmp_path / "in", tmp_path / "out"
        self.ind.mkdir(exist_ok=True)
        self.outd.mkdir(exist_ok=True)
        # Rows of three magnitudes, so that dynamic scales differ from row to row.
        mags = np.array([1.0, 1e-3, 30.0], np.float32)[np.arange(shape[0]) % 3] if len(shape) == 2 else 1.0
        if x is None:
            base = T.rand_normal(rng, shape, "f32").astype(np.float32)
            x = (base * (mags[:, None] if len(shape) == 2 else 1.0)).astype(T.DTYPES[dtype])
        self.x = x
        dim = shape[-1]
        self.inputs = {"x": x}
        if op != "quantize":
            self.inputs["weight"] = T.rand(rng, (dim,), dtype, 0.5, 1.5)
        if op in ("layer_norm", "add_layer_norm"):
            self.inputs["bias"] = T.rand(rng, (dim,), dtype)
        if op in ("add_rms_norm", "add_layer_norm"):
            self.inputs["residual"] = T.rand_normal(rng, shape, dtype)
        # f32 and f16 through .npy, bf16 through one .safetensors file.
        self.specs = {}
        if dtype == "bf16":
            p = self.ind / "inputs.safetensors"
            p.write_bytes(T.st_build(list(self.inputs.items())))
            self.specs = {k: f"{p}:{k}" for k in self.inputs}
        else:
            for k, v in self.inputs.items():
                T.write_npy(self.ind / f"{k}.npy", v)
                self.specs[k] = str(self.ind / f"{k}.npy")

    def operand_args(self):
        args = ["run", self.op]
        for k, spec in self.specs.items():
            args += [f"--{k}", spec]
        return args

    def scale_file(self, value, name="scale.npy"):
        p = self.ind / name
        T.write_npy(p, np.array([value], np.float32))
        return str(p)

    def run(self, args):
        return T.run_tnorm(self.operand_args() + [str(a) for a in args], cwd=self.tmp)

    def plain_y(self):
        """The op's y from a run without --quant (quantize: x)."""
        if self.op == "quantize":
            return self.x
        ext = "safetensors" if self.dtype == "bf16" else "npy"
        extra = ["--residual-out", self.outd / f"plain_r.{ext}"] if self.op.startswith("add_") else []
        out = self.outd / f"plain_y.{ext}"
        T.assert_ok(self.run(["--out", out] + extra))
        return T.read_output(str(out))[0]


def _flags(config, run):
    fmt, flags, kw = CONFIGS[config]
    value = STATIC_SCALE[fmt]
    return fmt, [f.format(scale=run.scale_file(value)) if "{scale}" in f else f for f in flags], dict(kw), value


def _matrix():
    # Every op and format in bf16; f32 and f16 through rms_norm and quantize.
    for op, config in itertools.product(OPS, CONFIGS):
        yield pytest.param(op, config, "bf16", id=f"{op}-{config}-bf16")
    for op, config, dtype in itertools.product(["rms_norm", "quantize"], CONFIGS, ["f32", "f16"]):
        yield pytest.param(op, config, dtype, id=f"{op}-{config}-{dtype}")


@pytest.mark.parametrize("op,config,dtype", list(_matrix()))
def test_quant_bytes_match_the_model(tmp_path, rng, op, config, dtype):
    r = QuantRun(tmp_path, rng, op, dtype, (37, 256))
    fmt, flags, kw, value = _flags(config, r)
    dynamic = kw.get("scaling") != "tensor"
    y_ext = "safetensors" if dtype == "bf16" else "npy"
    args = ["--quant", fmt, *flags, "--out", r.outd / "q.safetensors"]
    if dynamic:
        args += ["--scales-out", r.outd / "s.safetensors"]
    if op != "quantize":
        args += ["--y-out", r.outd / f"y.{y_ext}"]
    if op.startswith("add_"):
        args += ["--residual-out", r.outd / f"r.{y_ext}"]
    proc = r.run(args)
    T.assert_ok(proc)

    y = r.plain_y()
    if op != "quantize":
        got_y, _ = T.read_output(str(r.outd / f"y.{y_ext}"))
        T.assert_bits_equal(got_y, y, "--y-out (against a run without --quant)")
    if op.startswith("add_"):
        T.assert_bits_equal(T.read_output(str(r.outd / f"r.{y_ext}"))[0],
                            T.read_output(str(r.outd / f"plain_r.{y_ext}"))[0], "--residual-out")
    q, name = T.read_output(str(r.outd / "q.safetensors"))
    assert name == "q" and q.dtype == Q_DTYPE[fmt], f"q is {name!r} of {q.dtype}\n" + T.describe(proc)
    ref_q, ref_s = Q.quantize(fmt, y.astype(np.float32), scale=value, **kw)
    assert q.shape == ref_q.shape, f"q has shape {q.shape}, expected {ref_q.shape}"
    bad = np.argwhere(as_bytes(q) != ref_q)
    assert bad.size == 0, (f"{len(bad)} q bytes differ; first at {tuple(bad[0])}: 0x{as_bytes(q)[tuple(bad[0])]:02x}, "
                           f"expected 0x{ref_q[tuple(bad[0])]:02x}")
    if dynamic:
        s, name = T.read_output(str(r.outd / "s.safetensors"))
        assert name == "scales" and s.dtype == scales_dtype(fmt, kw), f"scales are {name!r} of {s.dtype}"
        assert s.shape == ref_s.shape, f"scales have shape {s.shape}, expected {ref_s.shape}"
        assert np.array_equal(as_bytes(s), as_bytes(ref_s)), "scales differ from the model's"
    expected = {"q.safetensors", "s.safetensors", f"plain_y.{y_ext}", f"y.{y_ext}", f"r.{y_ext}",
                f"plain_r.{y_ext}"}
    assert set(p.name for p in r.outd.iterdir()) <= expected


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8", "nvfp4"])
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_quant_source_f32_is_within_a_code_of_rounded(tmp_path, rng, fmt, dtype):
    """--quant-source f32 quantizes the float32 result, which y (rounded to f16/bf16) is within half an ulp
    of: each code is the rounded y's or its neighbour, and some differ (the sources are not the same)."""
    r = QuantRun(tmp_path, rng, "rms_norm", dtype, (64, 512))
    outs = {}
    for source in ("rounded", "f32"):
        args = ["--quant", fmt, "--quant-source", source, "--out", r.outd / f"q_{source}.safetensors",
                "--scales-out", r.outd / f"s_{source}.safetensors"]
        if fmt == "nvfp4":
            args += ["--scale", r.scale_file(500.0)]
        T.assert_ok(r.run(args))
        outs[source] = as_bytes(T.read_output(str(r.outd / f"q_{source}.safetensors"))[0])
    unpack = Q.unpack_nvfp4 if fmt == "nvfp4" else (lambda a: a)
    a, b = unpack(outs["rounded"]), unpack(outs["f32"])
    dist = np.abs(Q.rank(fmt, a) - Q.rank(fmt, b))
    assert dist.max() <= 1, f"codes {int(dist.max())} apart between the two sources"
    assert dist.any(), "--quant-source f32 gave the rounded source's bytes"


def test_special_values(tmp_path, rng):
    """NaN, infinities, values beyond every format's range, float32 subnormals, zero rows and ties."""
    x = np.zeros((6, 64), np.float32)
    x[0, :8] = [np.nan, -np.nan, np.inf, -np.inf, 1e30, -1e30, 1e-40, -1e-40]
    x[0, 8:] = rng.standard_normal(56)
    x[1, :] = rng.standard_normal(64) * 1e-30       # a tiny row: its scale hits the floor
    x[3, :] = np.arange(64, dtype=np.float32) - 32  # exact ties after the division
    x[4, :] = [np.nan] * 64                         # amax skips NaN: the floor again
    x[5, :] = rng.standard_normal(64) * 60000
    for fmt, extra, kw in [("fp8_e4m3", [], {}), ("fp8_e5m2", [], {}), ("int8", [], {}),
                           ("int8", ["--scales", "group32", "--pow2-scales"], {"scaling": "group", "group": 32,
                                                                               "pow2": True}),
                           ("fp8_e4m3", ["--scales", "tensor", "--scale", "S"], {"scaling": "tensor"}),
                           ("mxfp8", [], {}), ("nvfp4", ["--scale", "S"], {})]:
        r = QuantRun(tmp_path, rng, "quantize", "f32", x.shape, x=x)
        value = 0.5 if fmt != "nvfp4" else 448.0 * 6 / 60000
        extra = [r.scale_file(value) if e == "S" else e for e in extra]
        args = ["--quant", fmt, *extra, "--out", r.outd / "q.safetensors"]
        if kw.get("scaling") != "tensor":
            args += ["--scales-out", r.outd / "s.safetensors"]
        T.assert_ok(r.run(args))
        ref_q, ref_s = Q.quantize(fmt, x, scale=value, **kw)
        got = as_bytes(T.read_output(str(r.outd / "q.safetensors"))[0])
        assert np.array_equal(got, ref_q), f"{fmt} {extra}: q differs at {np.argwhere(got != ref_q)[:4].tolist()}"
        if ref_s is not None:
            s = as_bytes(T.read_output(str(r.outd / "s.safetensors"))[0])
            assert np.array_equal(s, as_bytes(ref_s)), f"{fmt} {extra}: scales differ"


@pytest.mark.parametrize("layout", ["row", "column", "swizzled"])
@pytest.mark.parametrize("rows", [0, 1, 130])
def test_rows_and_layouts(tmp_path, rng, rows, layout):
    """No rows (a column-major scales file of groups x 0 included), one row, and rows past one swizzled tile."""
    r = QuantRun(tmp_path, rng, "rms_norm", "f32", (rows, 64))
    args = ["--quant", "mxfp8", "--scales-layout", layout, "--out", r.outd / "q.safetensors",
            "--scales-out", r.outd / "s.safetensors", "--y-out", r.outd / "y.npy"]
    T.assert_ok(r.run(args))
    y = T.read_npy(r.outd / "y.npy")
    ref_q, ref_s = Q.quantize("mxfp8", y.reshape(rows, 64), layout=layout)
    q = T.read_output(str(r.outd / "q.safetensors"))[0]
    s = T.read_output(str(r.outd / "s.safetensors"))[0]
    assert q.shape == (rows, 64) and np.array_equal(as_bytes(q), ref_q)
    assert s.shape == ref_s.shape and np.array_equal(s, ref_s), f"scales {s.shape}, expected {ref_s.shape}"


def test_one_dimensional_x(tmp_path, rng):
    r = QuantRun(tmp_path, rng, "quantize", "f32", (96,))
    T.assert_ok(r.run(["--quant", "int8", "--scales", "group32", "--out", r.outd / "q.npy",
                       "--scales-out", r.outd / "s.npy"]))
    ref_q, ref_s = Q.quantize("int8", r.x.reshape(1, 96), scaling="group", group=32)
    q, s = T.read_npy(r.outd / "q.npy"), T.read_npy(r.outd / "s.npy")
    assert q.shape == (96,) and q.dtype == np.dtype("i1") and np.array_equal(q.view(np.uint8), ref_q[0])
    assert s.shape == (1, 3) and np.array_equal(s, ref_s)


# ---- files: dtypes, .npy's one-byte integers, the safetensors metadata, scalar scale files ----

def test_npy_holds_int8_and_uint8(tmp_path, rng):
    """INT8 q as '|i1', NVFP4's packed q and UE8M0 scales as '|u1' (numpy reads them back as int8, uint8)."""
    r = QuantRun(tmp_path, rng, "rms_norm", "f16", (8, 64))
    T.assert_ok(r.run(["--quant", "int8", "--pow2-scales", "--out", r.outd / "q.npy",
                       "--scales-out", r.outd / "s.npy"]))
    assert b"'descr': '|i1'" in (r.outd / "q.npy").read_bytes()[:128]
    assert T.read_npy(r.outd / "q.npy").dtype == np.dtype("i1")
    assert T.read_npy(r.outd / "s.npy").dtype == np.dtype("u1")
    T.assert_ok(r.run(["--quant", "nvfp4", "--scale", r.scale_file(100.0), "--out", r.outd / "q4.npy",
                       "--scales-out", r.outd / "s4.safetensors"]))
    q4 = T.read_npy(r.outd / "q4.npy")
    assert q4.dtype == np.dtype("u1") and q4.shape == (8, 32)


def _st_metadata(path):
    return T.st_read(path)[1]


def test_safetensors_dtypes_and_metadata(tmp_path, rng):
    r = QuantRun(tmp_path, rng, "rms_norm", "bf16", (4, 64))
    T.assert_ok(r.run(["--quant", "nvfp4", "--scale", r.scale_file(300.0), "--scales-layout", "swizzled",
                       "--out", r.outd / "q.safetensors", "--scales-out", r.outd / "s.safetensors"]))
    meta = _st_metadata(r.outd / "q.safetensors")
    assert meta["format"] == "nvfp4" and meta["packing"] == "e2m1x2, low nibble first", meta
    q = T.read_output(str(r.outd / "q.safetensors"))[0]
    assert q.dtype == np.dtype("u1") and q.shape == (4, 32)
    s = T.read_output(str(r.outd / "s.safetensors"))[0]
    assert s.dtype == T.F8_E4M3 and s.shape == (128, 4)
    assert _st_metadata(r.outd / "s.safetensors")["format"] == "e4m3"

    T.assert_ok(r.run(["--quant", "mxfp8", "--out", r.outd / "m.safetensors:act", "--scales-out",
                       r.outd / "ms.safetensors:act_scale"]))
    q, name = T.read_output(str(r.outd / "m.safetensors"))
    assert name == "act" and q.dtype == T.F8_E4M3
    s, name = T.read_output(str(r.outd / "ms.safetensors"))
    assert name == "act_scale" and s.dtype == np.dtype("u1")
    meta = _st_metadata(r.outd / "ms.safetensors")
    assert meta["format"] == "ue8m0" and meta["group_size"] == "32", meta

    T.assert_ok(r.run(["--quant", "fp8_e5m2", "--scales", "group64", "--out", r.outd / "e.safetensors",
                       "--scales-out", r.outd / "es.safetensors"]))
    assert T.read_output(str(r.outd / "e.safetensors"))[0].dtype == T.F8_E5M2
    assert _st_metadata(r.outd / "es.safetensors")["format"] == "f32"


@pytest.mark.parametrize("container", ["npy-0d", "npy-1", "npy-1x1", "st-0d", "st-1"])
def test_scale_file_shapes(tmp_path, rng, container):
    """The scale is one f32 in any of the shapes checkpoints use, a scalar (shape ()) included."""
    r = QuantRun(tmp_path, rng, "quantize", "f32", (5, 32))
    value = np.float32(0.0625)
    kind, shape = container.split("-")
    arr = {"0d": np.array(value), "1": np.array([value]), "1x1": np.array([[value]])}[shape]
    if kind == "npy":
        p = r.ind / "s.npy"
        T.write_npy(p, arr)
        spec = str(p)
    else:
        p = r.ind / "s.safetensors"
        p.write_bytes(T.st_build([("input_scale", "F32", list(arr.shape), arr.tobytes())]))
        spec = f"{p}:input_scale"
    T.assert_ok(r.run(["--quant", "fp8_e4m3", "--scales", "tensor", "--scale", spec, "--out",
                       r.outd / "q.safetensors"]))
    ref_q, _ = Q.quantize("fp8_e4m3", r.x, scaling="tensor", scale=value)
    assert np.array_equal(as_bytes(T.read_output(str(r.outd / "q.safetensors"))[0]), ref_q)


def test_quantized_x_is_read_then_refused_by_the_op(tmp_path):
    """An F8_E4M3 or I8 tensor loads (the readers know the dtypes); no op computes in it."""
    ind = tmp_path / "in"
    ind.mkdir()
    for st_dtype in ("F8_E4M3", "I8"):
        p = ind / f"{st_dtype}.safetensors"
        p.write_bytes(T.st_build([("x", st_dtype, [2, 8], bytes(16))]))
        proc = T.run_tnorm(["run", "rms_norm", "--x", f"{p}:x", "--out", tmp_path / "y.safetensors"], cwd=tmp_path)
        T.assert_error_output(proc, ERROR)
        assert "ops compute in f32, f16 or bf16" in proc.stderr, T.describe(proc)
    assert not (tmp_path / "y.safetensors").exists()


# ---- errors: one line, a non-zero exit, and nothing written ----

ERRORS = {
    # name: (exit status, the flags after the operands, a word the message must hold)
    "unknown_format": (USAGE, ["--quant", "fp4"], "fp4"),
    "unknown_scales": (USAGE, ["--quant", "int8", "--scales", "group16"], "group16"),
    "unknown_layout": (USAGE, ["--quant", "int8", "--scales-layout", "diagonal"], "diagonal"),
    "unknown_source": (USAGE, ["--quant", "int8", "--quant-source", "f16"], "f16"),
    "scale_negative": (ERROR, ["--quant", "fp8_e4m3", "--scales", "tensor", "--scale", "{neg}"], "> 0"),
    "scale_zero": (ERROR, ["--quant", "fp8_e4m3", "--scales", "tensor", "--scale", "{zero}"], "> 0"),
    "scale_inf": (ERROR, ["--quant", "int8", "--scales", "tensor", "--scale", "{inf}"], "finite"),
    "scale_nan": (ERROR, ["--quant", "fp8_e5m2", "--scales", "tensor", "--scale", "{nan}"], "finite"),
    "global_scale_zero": (ERROR, ["--quant", "nvfp4", "--scale", "{zero}", "--scales-st"], "> 0"),
    "scale_two_elements": (ERROR, ["--quant", "fp8_e4m3", "--scales", "tensor", "--scale", "{two}"], "one f32"),
    "scale_f16": (ERROR, ["--quant", "fp8_e4m3", "--scales", "tensor", "--scale", "{f16}"], "f32"),
    "scale_a_number": (ERROR, ["--quant", "fp8_e4m3", "--scales", "tensor", "--scale", "0.5"], "file"),
    "scale_missing_file": (ERROR, ["--quant", "int8", "--scales", "tensor", "--scale", "{missing}"], "cannot open"),
    "scale_required_static": (USAGE, ["--quant", "fp8_e4m3", "--scales", "tensor"], "--scale"),
    "scale_required_nvfp4": (USAGE, ["--quant", "nvfp4"], "global"),
    "scale_with_dynamic": (ERROR, ["--quant", "fp8_e4m3", "--scale", "{good}"], "dynamic"),
    "scales_out_required": (USAGE, ["--quant", "int8", "--no-scales-out"], "--scales-out"),
    "scales_out_with_static": (ERROR, ["--quant", "int8", "--scales", "tensor", "--scale", "{good}",
                                       "--force-scales-out"], "static"),
    "dim_not_multiple_of_group": (ERROR, ["--quant", "int8", "--scales", "group128"], "multiple"),
    "dim_not_multiple_of_block": (ERROR, ["--quant", "mxfp8", "--x-dim", "48"], "multiple"),
    "scales_for_block_format": (ERROR, ["--quant", "mxfp8", "--scales", "group32"], "own"),
    "pow2_with_nvfp4": (ERROR, ["--quant", "nvfp4", "--scale", "{good}", "--pow2-scales"], "pow2"),
    "swizzled_for_fp8": (ERROR, ["--quant", "fp8_e4m3", "--scales-layout", "swizzled"], "swizzled"),
    "quant_flag_without_quant": (ERROR, ["--scales", "group64"], "--quant"),
    "fp8_q_into_npy": (ERROR, ["--quant", "fp8_e4m3", "--out-npy"], "safetensors"),
    "nvfp4_scales_into_npy": (ERROR, ["--quant", "nvfp4", "--scale", "{good}"], "safetensors"),
    "bf16_y_out_into_npy": (ERROR, ["--quant", "int8", "--x-bf16", "--y-out", "{outd}/y.npy"], "bf16"),
    "q_and_scales_one_file": (ERROR, ["--quant", "int8", "--same-files"], "same file"),
    "scales_out_missing_directory": (ERROR, ["--quant", "int8", "--scales-into-missing-dir"], "directory"),
    "y_out_missing_directory": (ERROR, ["--quant", "int8", "--y-out", "{outd}/nodir/y.npy"], "directory"),
    "l2_norm_quant": (ERROR, ["--op", "l2_norm", "--quant", "int8"], "takes no --quant"),
    "quantize_without_quant": (USAGE, ["--op", "quantize"], "--quant"),
    "quantize_with_weight": (ERROR, ["--op", "quantize", "--quant", "int8", "--weight", "{w}"], "weight"),
    "quantize_with_y_out": (ERROR, ["--op", "quantize", "--quant", "int8", "--y-out", "{outd}/y.npy"], "y-out"),
}


def _error_args(c, flags):
    """The command line of an error case, its placeholders and pseudo-flags expanded (by default rms_norm of a
    4 x 64 f32 x, q into q.safetensors, the scales into s.npy)."""
    ind, outd = c.ind, c.outd
    op, dim, dtype = "rms_norm", 64, "f32"
    scales_out, out, force_scales_out = outd / "s.npy", outd / "q.safetensors", False
    files = {"neg": -1.0, "zero": 0.0, "inf": np.inf, "nan": np.nan, "good": 0.25}
    rest = []
    it = iter(flags)
    for f in it:
        if f == "--op":
            op = next(it)
        elif f == "--x-dim":
            dim = int(next(it))
        elif f == "--x-bf16":
            dtype = "bf16"
        elif f == "--no-scales-out":
            scales_out = None
        elif f == "--scales-st":
            scales_out = outd / "s.safetensors"
        elif f == "--force-scales-out":
            force_scales_out = True
        elif f == "--out-npy":
            out = outd / "q.npy"
        elif f == "--same-files":
            out, scales_out = outd / "q.safetensors", outd / "q.safetensors"
        elif f == "--scales-into-missing-dir":
            scales_out = outd / "nodir" / "s.npy"
        else:
            rest.append(f)
    x = T.rand_normal(c.rng, (4, dim), dtype)
    if dtype == "bf16":
        (ind / "x.safetensors").write_bytes(T.st_build([("x", x)]))
        x_spec = f"{ind / 'x.safetensors'}:x"
    else:
        x_spec = str(c.npy("x.npy", x))
    for name, v in files.items():
        c.npy(f"{name}.npy", np.array([v], np.float32))
    c.npy("two.npy", np.array([1, 2], np.float32))
    c.npy("f16.npy", np.array([1], np.float16))
    c.npy("w.npy", np.ones(dim, np.float32))
    subst = {k: str(ind / f"{k}.npy") for k in list(files) + ["two", "f16", "w"]}
    subst.update(missing=str(ind / "missing.npy"), outd=str(outd))
    rest = [a.format(**subst) for a in rest]
    args = ["run", op, "--x", x_spec, "--out", out] + rest
    # Dynamic scales need --scales-out; a static scale takes none unless the case says so.
    if scales_out is not None and ("tensor" not in rest or force_scales_out):
        args += ["--scales-out", scales_out]
    return args


@pytest.mark.parametrize("name", list(ERRORS))
def test_quant_error(tmp_path, rng, name):
    codes, flags, word = ERRORS[name]
    c = T.Workdirs(tmp_path, rng, ("q.safetensors", "s.npy", "q.npy", "y.npy"))
    args = _error_args(c, flags)
    before = T.snapshot(tmp_path)
    proc = T.run_tnorm(args, cwd=tmp_path)
    T.assert_error_output(proc, codes)
    assert word in proc.stderr, f"the message does not say {word!r}\n" + T.describe(proc)
    added, removed, changed = T.diff_snapshots(before, T.snapshot(tmp_path))
    assert (added, removed, changed) == ([], [], []), (
        f"a failed call added {added}, removed {removed}, changed {changed}\n" + T.describe(proc))


def test_all_outputs_or_none_when_the_last_cannot_be_written(tmp_path, rng):
    """q, the scales, y and residual_out are committed together: a y-out that cannot be replaced (a
    directory where its file should go) leaves the other three as they were."""
    r = QuantRun(tmp_path, rng, "add_rms_norm", "f32", (4, 64))
    for name in ("q.safetensors", "s.npy", "r.npy"):
        (r.outd / name).write_bytes(T.KNOWN_BYTES)
    (r.outd / "y.npy").mkdir()
    before = T.snapshot(tmp_path)
    proc = r.run(["--quant", "int8", "--out", r.outd / "q.safetensors", "--scales-out", r.outd / "s.npy",
                  "--residual-out", r.outd / "r.npy", "--y-out", r.outd / "y.npy"])
    T.assert_error_output(proc, ERROR)
    assert T.diff_snapshots(before, T.snapshot(tmp_path)) == ([], [], []), T.describe(proc)
