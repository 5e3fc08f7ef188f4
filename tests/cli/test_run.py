"""`tnorm run OP ...` on well-formed inputs: every op, dtype, container and a spread of shapes, checked
against a float64 reference (f32: 2e-5 relative; f16/bf16: 1 ulp of the output dtype)."""

import itertools
import os

import numpy as np
import pytest

import tnormtest as T

SHAPES = {
    "1d257": (257,),
    "1x1": (1, 1),
    "17x7": (17, 7),
    "64x4096": (64, 4096),
    "3x70000": (3, 70000),
    "0x8": (0, 8),
}

# f32 and f16 through both containers, bf16 through safetensors (.npy has no bf16).
FORMATS = ["f32-npy", "f16-npy", "f32-st", "f16-st", "bf16-st"]

# variant -> options. weight: None, "same" (x's dtype) or "f32".
VARIANTS = {
    "rms_norm": {
        "noweight": {},
        "weight": {"weight": "same"},
        "weight_f32": {"weight": "f32"},
        "weight_offset1": {"weight": "same", "weight_offset": 1.0},
        "mul": {"mul": True},
        "weight_mul": {"weight": "same", "mul": True},
        "eps_space": {"weight": "same", "eps": 1e-5, "eps_form": "space"},
        "eps_equals": {"weight": "same", "eps": 1e-5, "eps_form": "equals"},
    },
    "l2_norm": {
        "plain": {},
        "scale0.5": {"scale": 0.5},
        "eps_space": {"eps": 1e-5, "eps_form": "space"},
        "eps_equals": {"eps": 1e-5, "eps_form": "equals"},
    },
    "add_rms_norm": {
        "noweight": {},
        "weight": {"weight": "same"},
        "weight_f32": {"weight": "f32"},
        "weight_offset1": {"weight": "same", "weight_offset": 1.0},
        "weight_mul": {"weight": "same", "mul": True},
        "eps_space": {"weight": "same", "eps": 1e-5, "eps_form": "space"},
        "eps_equals": {"weight": "same", "eps": 1e-5, "eps_form": "equals"},
    },
}


def _matrix():
    for (op, variants), fmt, shape_name in itertools.product(VARIANTS.items(), FORMATS, SHAPES):
        for variant, opts in variants.items():
            if opts.get("weight") == "f32" and fmt.startswith("f32"):
                continue  # same as "weight" there
            yield pytest.param(op, variant, fmt, shape_name, id=f"{op}-{variant}-{fmt}-{shape_name}")


def _opt(args, flag, value, form="space"):
    if form == "equals":
        args.append(f"{flag}={value}")
    else:
        args += [flag, str(value)]


def run_case(tmp_path, rng, op, dtype, container, shape, opts, out_kind=None, res_out_kind=None,
             device=None, x_scale=1.0, x=None, residual=None, all_equals=False):
    """Writes random inputs, runs the command, checks every output. Returns the process."""
    ind = tmp_path / "in"
    outd = tmp_path / "out"
    ind.mkdir(exist_ok=True)
    outd.mkdir(exist_ok=True)
    dim = shape[-1]
    if x is None:
        x = T.rand_normal(rng, shape, dtype, scale=x_scale)
    weight = mul = None
    if opts.get("weight"):
        wdt = dtype if opts["weight"] == "same" else opts["weight"]
        weight = T.rand(rng, (dim,), wdt)
    if opts.get("mul"):
        mul = T.rand(rng, shape, dtype)
    if op == "add_rms_norm" and residual is None:
        residual = T.rand_normal(rng, shape, dtype, scale=x_scale)
    inputs = {"x": x, "weight": weight, "mul": mul, "residual": residual}
    inputs = {k: v for k, v in inputs.items() if v is not None}

    specs = {}
    if container == "npy":
        for k, v in inputs.items():
            p = ind / f"{k}.npy"
            T.write_npy(p, v)
            specs[k] = str(p)
    else:
        # One file holding every operand under model-like names, with metadata and an unused tensor.
        names = {k: f"model.layers.0.{k}" for k in inputs}
        entries = [("unused.bias", T.rand(rng, (3,), "f32"))] + [(names[k], v) for k, v in inputs.items()]
        p = ind / "inputs.safetensors"
        p.write_bytes(T.st_build(entries, metadata={"format": "pt"}))
        specs = {k: f"{p}:{names[k]}" for k in inputs}

    if out_kind is None:
        out_kind = "npy" if container == "npy" else "st"
    if res_out_kind is None:
        res_out_kind = out_kind

    def out_spec(stem, kind, default_name):
        if kind == "npy":
            return str(outd / f"{stem}.npy"), None
        if kind == "st":
            return str(outd / f"{stem}.safetensors"), default_name
        return str(outd / f"{stem}.safetensors") + f":{kind[3:]}", kind[3:]

    y_spec, y_name = out_spec("y", out_kind, "y")
    form = "equals" if all_equals else "space"
    args = ["run", op]
    _opt(args, "--x", specs["x"], form)
    if "weight" in specs:
        _opt(args, "--weight", specs["weight"], form)
    if "mul" in specs:
        _opt(args, "--mul", specs["mul"], form)
    if "residual" in specs:
        _opt(args, "--residual", specs["residual"], form)
    if "eps" in opts:
        _opt(args, "--eps", opts["eps"], opts.get("eps_form", form))
    if "scale" in opts:
        _opt(args, "--scale", opts["scale"], form)
    if "weight_offset" in opts:
        _opt(args, "--weight-offset", opts["weight_offset"], form)
    if device is not None:
        _opt(args, "--device", device, form)
    _opt(args, "--out", y_spec, form)
    expected_files = {os.path.basename(T.split_spec(y_spec)[0])}
    if op == "add_rms_norm":
        r_spec, r_name = out_spec("r", res_out_kind, "residual_out")
        _opt(args, "--residual-out", r_spec, form)
        expected_files.add(os.path.basename(T.split_spec(r_spec)[0]))

    proc = T.run_tnorm(args, cwd=tmp_path)
    T.assert_ok(proc)

    ref_y, ref_r = T.reference(op, x, weight=weight, mul=mul, residual=residual,
                               eps=opts.get("eps", 1e-6), scale=opts.get("scale", 1.0),
                               weight_offset=opts.get("weight_offset", 0.0))
    got, name = T.read_output(y_spec)
    ctx = "\n" + T.describe(proc)
    assert got.dtype == T.DTYPES[dtype], f"y has dtype {got.dtype}, expected {T.DTYPES[dtype]}" + ctx
    assert got.shape == x.shape, f"y has shape {got.shape}, expected {x.shape}" + ctx
    assert name == y_name, f"y's tensor is named {name!r}, expected {y_name!r}" + ctx
    T.assert_close(dtype, got, ref_y, "y")
    if op == "add_rms_norm":
        got_r, name_r = T.read_output(r_spec)
        assert name_r == r_name, f"residual-out's tensor is named {name_r!r}, expected {r_name!r}" + ctx
        # residual_out = round_to_dtype(float32(x) + float32(residual)): exactly determined.
        T.assert_bits_equal(got_r, ref_r, "residual-out")
    left = set(os.listdir(outd))
    assert left == expected_files, f"output directory holds {sorted(left)}, expected {sorted(expected_files)}"
    return proc


@pytest.mark.parametrize("op,variant,fmt,shape_name", list(_matrix()))
def test_op_matrix(tmp_path, rng, op, variant, fmt, shape_name):
    dtype, container = fmt.split("-")
    run_case(tmp_path, rng, op, dtype, container, SHAPES[shape_name], VARIANTS[op][variant])


# ---- output containers: .npy, .safetensors (tensor named "y"/"residual_out") and .safetensors:NAME ----

OUT_KINDS = ["npy", "st", "st:model.out.y"]


def _out_cases():
    for op, dtype, kind in itertools.product(["rms_norm", "l2_norm", "add_rms_norm"], ["f32", "f16", "bf16"],
                                             OUT_KINDS):
        if dtype == "bf16" and kind == "npy":
            continue  # an error: see test_errors
        yield pytest.param(op, dtype, kind, id=f"{op}-{dtype}-out_{kind}")


@pytest.mark.parametrize("op,dtype,out_kind", list(_out_cases()))
@pytest.mark.parametrize("shape", [(5, 300), (300,)], ids=["5x300", "1d300"])
def test_output_container(tmp_path, rng, op, dtype, out_kind, shape):
    container = "st" if dtype == "bf16" else "npy"
    opts = {"weight": "same"} if op != "l2_norm" else {}
    res_kind = "st:model.out.residual" if out_kind.startswith("st:") else out_kind
    run_case(tmp_path, rng, op, dtype, container, shape, opts, out_kind=out_kind, res_out_kind=res_kind)


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("y_kind,r_kind", [("npy", "st"), ("st", "npy"), ("st:out_y", "npy"),
                                          ("npy", "st:new_resid"), ("st:a", "st:b")])
def test_add_rms_norm_mixed_output_containers(tmp_path, rng, dtype, y_kind, r_kind):
    run_case(tmp_path, rng, "add_rms_norm", dtype, "npy", (9, 130), {"weight": "same"},
             out_kind=y_kind, res_out_kind=r_kind)


# ---- devices ----

@pytest.mark.parametrize("device,form", [("cpu", "space"), ("auto", "space"), ("cpu", "equals"),
                                         ("auto", "equals"), (None, "space")],
                         ids=["cpu", "auto", "cpu-equals", "auto-equals", "default"])
@pytest.mark.parametrize("op", ["rms_norm", "l2_norm", "add_rms_norm"])
def test_device(tmp_path, rng, op, device, form):
    opts = {"weight": "same"} if op != "l2_norm" else {}
    run_case(tmp_path, rng, op, "f32", "npy", (33, 1000), opts, device=device, all_equals=(form == "equals"))


def test_device_cuda_without_gpu(tmp_path, rng, gpu_present):
    if gpu_present:
        pytest.skip("nvidia-smi works here: --device cuda may legitimately succeed")
    ind = tmp_path / "in"
    outd = tmp_path / "out"
    ind.mkdir()
    outd.mkdir()
    T.write_npy(ind / "x.npy", T.rand_normal(rng, (4, 64), "f32"))
    (outd / "y.npy").write_bytes(T.KNOWN_BYTES)
    before = T.snapshot(tmp_path)
    proc = T.run_tnorm(["run", "rms_norm", "--x", ind / "x.npy", "--device", "cuda", "--out", outd / "y.npy"],
                       cwd=tmp_path)
    T.assert_error_output(proc, 1)
    added, removed, changed = T.diff_snapshots(before, T.snapshot(tmp_path))
    assert (added, removed, changed) == ([], [], []), f"files added {added}, removed {removed}, changed {changed}"


# ---- options that must have a visible effect ----

@pytest.mark.parametrize("form", ["space", "equals"])
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("op", ["rms_norm", "l2_norm", "add_rms_norm"])
def test_eps_changes_result(tmp_path, rng, op, dtype, form):
    """Inputs of magnitude ~1e-3, so that eps = 1e-5 versus the default 1e-6 changes the result a lot."""
    container = "st" if dtype == "bf16" else "npy"
    opts = {"eps": 1e-5, "eps_form": form}
    if op != "l2_norm":
        opts["weight"] = "same"
    run_case(tmp_path, rng, op, dtype, container, (17, 7), opts, x_scale=1e-3)


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("op", ["rms_norm", "l2_norm", "add_rms_norm"])
def test_default_eps_is_1e6(tmp_path, rng, op, dtype):
    run_case(tmp_path, rng, op, dtype, "npy", (17, 7), {}, x_scale=1e-3)


@pytest.mark.parametrize("op", ["rms_norm", "l2_norm", "add_rms_norm"])
def test_equals_form_for_every_option(tmp_path, rng, op):
    opts = {"l2_norm": {"scale": 0.5, "eps": 1e-5},
            "rms_norm": {"weight": "f32", "weight_offset": 1.0, "mul": True, "eps": 1e-5},
            "add_rms_norm": {"weight": "same", "weight_offset": 1.0, "eps": 1e-5}}[op]
    run_case(tmp_path, rng, op, "f16", "npy", (6, 50), opts, device="cpu", all_equals=True, x_scale=3e-3)


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("op", ["rms_norm", "l2_norm", "add_rms_norm"])
def test_zero_and_mixed_magnitude_rows(tmp_path, rng, op, dtype):
    """Rows of zeros (eps > 0: zeros out), tiny rows and large rows in one call."""
    dim = 300
    x = np.concatenate([
        np.zeros((2, dim), np.float32),
        rng.standard_normal((3, dim)).astype(np.float32) * 1e-3,
        rng.standard_normal((3, dim)).astype(np.float32) * 1e3,
        rng.standard_normal((3, dim)).astype(np.float32),
    ]).astype(T.DTYPES[dtype])
    residual = None
    if op == "add_rms_norm":
        residual = np.concatenate([np.zeros((2, dim), np.float32),
                                   rng.standard_normal((9, dim)).astype(np.float32)]).astype(T.DTYPES[dtype])
    opts = {"weight": "same"} if op != "l2_norm" else {}
    container = "st" if dtype == "bf16" else "npy"
    run_case(tmp_path, rng, op, dtype, container, x.shape, opts, x=x, residual=residual)


# ---- inputs from several containers in one call ----

def test_bf16_x_from_safetensors_with_f32_weight_from_npy(tmp_path, rng):
    ind = tmp_path / "in"
    outd = tmp_path / "out"
    ind.mkdir()
    outd.mkdir()
    x = T.rand_normal(rng, (8, 96), "bf16")
    w = T.rand(rng, (96,), "f32")
    (ind / "x.safetensors").write_bytes(T.st_build([("x", x)]))
    T.write_npy(ind / "w.npy", w)
    proc = T.run_tnorm(["run", "rms_norm", "--x", f"{ind / 'x.safetensors'}:x", "--weight", ind / "w.npy",
                        "--weight-offset", "1", "--out", f"{outd / 'y.safetensors'}:normed"], cwd=tmp_path)
    T.assert_ok(proc)
    got, name = T.read_output(str(outd / "y.safetensors"))
    assert name == "normed" and got.dtype == T.BF16 and got.shape == x.shape
    T.assert_close("bf16", got, T.reference("rms_norm", x, weight=w, weight_offset=1.0)[0])


def test_safetensors_input_with_tensors_of_other_dtypes(tmp_path, rng):
    """The file may hold other tensors of any dtype (I64, F64, BOOL...): only the named one matters."""
    ind = tmp_path / "in"
    outd = tmp_path / "out"
    ind.mkdir()
    outd.mkdir()
    x = T.rand_normal(rng, (4, 40), "f16")
    ids = np.arange(6, dtype="<i8")
    f64 = np.ones(5, dtype="<f8")
    data = T.st_build([("ids", ids), ("x", x), ("f64", f64), ("mask", "BOOL", [3], b"\x01\x00\x01")],
                      metadata={"format": "pt", "note": "mixed dtypes"})
    (ind / "m.safetensors").write_bytes(data)
    proc = T.run_tnorm(["run", "l2_norm", "--x", f"{ind / 'm.safetensors'}:x", "--out", outd / "y.npy"],
                       cwd=tmp_path)
    T.assert_ok(proc)
    got, _ = T.read_output(str(outd / "y.npy"))
    assert got.dtype == np.dtype("<f2") and got.shape == x.shape
    T.assert_close("f16", got, T.reference("l2_norm", x)[0])


def test_overwrites_existing_output(tmp_path, rng):
    """An existing --out file is replaced on success."""
    outd = tmp_path / "out"
    outd.mkdir()
    (outd / "y.npy").write_bytes(T.KNOWN_BYTES)
    run_case(tmp_path, rng, "rms_norm", "f32", "npy", (3, 16), {"weight": "same"})


@pytest.mark.parametrize("version", [(2, 0), (3, 0)], ids=["v2.0", "v3.0"])
def test_npy_header_versions(tmp_path, rng, version):
    """.npy format versions 2.0 and 3.0 (4-byte header length; 3.0 allows utf-8) are valid inputs too."""
    ind = tmp_path / "in"
    outd = tmp_path / "out"
    ind.mkdir()
    outd.mkdir()
    x = T.rand_normal(rng, (5, 24), "f16")
    (ind / "x.npy").write_bytes(T.npy_bytes("<f2", x.shape, x.tobytes(), version=version))
    proc = T.run_tnorm(["run", "l2_norm", "--x", ind / "x.npy", "--out", outd / "y.npy"], cwd=tmp_path)
    T.assert_ok(proc)
    got, _ = T.read_output(str(outd / "y.npy"))
    assert got.dtype == np.dtype("<f2") and got.shape == x.shape
    T.assert_close("f16", got, T.reference("l2_norm", x)[0])
