"""Malformed calls and files. Each must give: the contract's exit status (1, or 2 for a usage error), no
signal, exactly one stderr line starting "tnorm: error: ", pre-existing outputs left byte-for-byte as they
were, and no new (temporary) file anywhere, in particular in the output's directory."""

import struct

import numpy as np
import pytest

import tnormtest as T

USAGE = 2
ERROR = 1


class Ctx(T.Workdirs):
    """in/ for inputs; out/ holding y.npy, y.safetensors, r.npy and y.txt with known bytes."""

    def __init__(self, tmp_path, rng):
        super().__init__(tmp_path, rng, ("y.npy", "y.safetensors", "r.npy", "y.txt"))
        self.out = self.outd / "y.npy"
        self.out_st = self.outd / "y.safetensors"
        self.res_out = self.outd / "r.npy"
        self.out_txt = self.outd / "y.txt"

    def rms(self, x, *extra):
        return ["run", "rms_norm", "--x", x, "--out", self.out, *extra]


CASES = {}


def case(name, codes):
    def deco(fn):
        assert name not in CASES
        CASES[name] = (fn, codes)
        return fn
    return deco


F32_4x8 = np.arange(32, dtype="<f4").tobytes()


# ---- .npy files ----

@case("npy_truncated_in_header", ERROR)
def _(c):
    full = T.npy_bytes("<f4", (4, 8), F32_4x8)
    return c.rms(c.raw("x.npy", full[:30]))


@case("npy_truncated_in_data", ERROR)
def _(c):
    full = T.npy_bytes("<f4", (4, 8), F32_4x8)
    return c.rms(c.raw("x.npy", full[:-50]))


@case("npy_garbage_header", ERROR)
def _(c):
    return c.rms(c.raw("x.npy", T.npy_bytes("<f4", (4, 8), F32_4x8, header_text="this is not a dict {{{ ]")))


@case("npy_header_without_shape", ERROR)
def _(c):
    return c.rms(c.raw("x.npy", T.npy_bytes("<f4", (4, 8), F32_4x8,
                                             header_text="{'descr': '<f4', 'fortran_order': False, }")))


@case("npy_bad_magic", ERROR)
def _(c):
    data = bytearray(T.npy_bytes("<f4", (4, 8), F32_4x8))
    data[1:6] = b"NUMPX"
    return c.rms(c.raw("x.npy", bytes(data)))


@case("npy_header_length_past_eof", ERROR)
def _(c):
    data = bytearray(T.npy_bytes("<f4", (4, 8), F32_4x8))
    data[8:10] = struct.pack("<H", 60000)
    return c.rms(c.raw("x.npy", bytes(data)))


@case("npy_big_endian", ERROR)
def _(c):
    return c.rms(c.npy("x.npy", np.arange(32, dtype=">f4").reshape(4, 8)))


@case("npy_int32", ERROR)
def _(c):
    return c.rms(c.npy("x.npy", np.arange(32, dtype="<i4").reshape(4, 8)))


@case("npy_float64", ERROR)
def _(c):
    return c.rms(c.npy("x.npy", np.arange(32, dtype="<f8").reshape(4, 8)))


@case("npy_complex64", ERROR)
def _(c):
    return c.rms(c.npy("x.npy", np.arange(32, dtype="<c8").reshape(4, 8)))


@case("npy_3d", ERROR)
def _(c):
    return c.rms(c.npy("x.npy", np.ones((2, 4, 8), dtype="<f4")))


@case("npy_0d_scalar", ERROR)
def _(c):
    return c.rms(c.raw("x.npy", T.npy_bytes("<f4", (), b"\x00\x00\x80\x3f")))


@case("npy_fortran_order", ERROR)
def _(c):
    return c.rms(c.raw("x.npy", T.npy_bytes("<f4", (4, 8), F32_4x8, fortran=True)))


@case("npy_data_shorter_than_header", ERROR)
def _(c):
    return c.rms(c.raw("x.npy", T.npy_bytes("<f4", (4, 8), F32_4x8[:-4])))


@case("npy_data_longer_than_header", ERROR)
def _(c):
    return c.rms(c.raw("x.npy", T.npy_bytes("<f4", (4, 8), F32_4x8 + b"\x00\x00\x80\x3f")))


@case("npy_big_endian_f16", ERROR)
def _(c):
    return c.rms(c.raw("x.npy", T.npy_bytes(">f2", (4, 8), np.arange(32, dtype=">f2").tobytes())))


@case("npy_shape_product_overflows", ERROR)
def _(c):
    return c.rms(c.raw("x.npy", T.npy_bytes("<f4", (1 << 62, 1 << 62), F32_4x8)))


@case("npy_dim_zero", ERROR)
def _(c):
    return c.rms(c.raw("x.npy", T.npy_bytes("<f4", (4, 0), b"")))


@case("npy_1d_empty", ERROR)
def _(c):
    return c.rms(c.raw("x.npy", T.npy_bytes("<f4", (0,), b"")))


@case("empty_file", ERROR)
def _(c):
    return c.rms(c.raw("x.npy", b""))


@case("nonexistent_file", ERROR)
def _(c):
    return c.rms(c.ind / "does_not_exist.npy")


@case("directory_as_input", ERROR)
def _(c):
    d = c.ind / "dir.npy"
    d.mkdir()
    return c.rms(d)


# ---- .safetensors files ----

def _x_header(**over):
    h = {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 128]}
    h.update(over)
    return {"x": h}


def _st(c, data, tensor="x"):
    return f"{c.raw('x.safetensors', data)}:{tensor}"


@case("st_header_length_past_eof", ERROR)
def _(c):
    return c.rms(_st(c, T.st_raw(_x_header(), F32_4x8, header_len=4096)))


@case("st_header_length_2pow63", ERROR)
def _(c):
    return c.rms(_st(c, T.st_raw(_x_header(), F32_4x8, header_len=1 << 63)))


@case("st_header_length_2pow64_minus_1", ERROR)
def _(c):
    return c.rms(_st(c, T.st_raw(_x_header(), F32_4x8, header_len=(1 << 64) - 1)))


@case("st_header_length_zero", ERROR)
def _(c):
    return c.rms(_st(c, T.st_raw(b"", F32_4x8, align=0)))


@case("st_negative_offsets", ERROR)
def _(c):
    return c.rms(_st(c, T.st_raw(_x_header(data_offsets=[-128, 0]), F32_4x8)))


@case("st_file_shorter_than_length_field", ERROR)
def _(c):
    return c.rms(_st(c, b"\x10\x00\x00"))


@case("st_empty_file", ERROR)
def _(c):
    return c.rms(_st(c, b""))


@case("st_json_garbage", ERROR)
def _(c):
    return c.rms(_st(c, T.st_raw('{"x": {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 128]', F32_4x8)))


@case("st_header_not_utf8", ERROR)
def _(c):
    return c.rms(_st(c, T.st_raw(b'{"x\xff\xfe": 1}', F32_4x8)))


@case("st_json_not_object", ERROR)
def _(c):
    return c.rms(_st(c, T.st_raw("[1, 2, 3]", F32_4x8)))


@case("st_tensor_entry_not_object", ERROR)
def _(c):
    return c.rms(_st(c, T.st_raw({"x": 5}, F32_4x8)))


@case("st_missing_tensor", ERROR)
def _(c):
    return c.rms(_st(c, T.st_raw(_x_header(), F32_4x8), tensor="not_there"))


@case("st_missing_data_offsets", ERROR)
def _(c):
    return c.rms(_st(c, T.st_raw({"x": {"dtype": "F32", "shape": [4, 8]}}, F32_4x8)))


@case("st_dtype_i32", ERROR)
def _(c):
    return c.rms(_st(c, T.st_raw(_x_header(dtype="I32"), F32_4x8)))


@case("st_dtype_f64", ERROR)
def _(c):
    return c.rms(_st(c, T.st_raw(_x_header(dtype="F64", shape=[2, 8]), F32_4x8)))


@case("st_dtype_unknown_string", ERROR)
def _(c):
    return c.rms(_st(c, T.st_raw(_x_header(dtype="F33"), F32_4x8)))


@case("st_offsets_past_end", ERROR)
def _(c):
    return c.rms(_st(c, T.st_raw(_x_header(data_offsets=[64, 192]), F32_4x8)))


@case("st_offsets_reversed", ERROR)
def _(c):
    return c.rms(_st(c, T.st_raw(_x_header(data_offsets=[128, 0]), F32_4x8)))


@case("st_size_mismatch", ERROR)
def _(c):
    return c.rms(_st(c, T.st_raw(_x_header(data_offsets=[0, 64]), F32_4x8[:64])))


@case("st_negative_shape", ERROR)
def _(c):
    return c.rms(_st(c, T.st_raw(_x_header(shape=[-4, -8]), F32_4x8)))


@case("st_shape_product_overflows", ERROR)
def _(c):
    return c.rms(_st(c, T.st_raw(_x_header(shape=[1 << 62, 1 << 62]), F32_4x8)))


@case("st_shape_not_a_list", ERROR)
def _(c):
    return c.rms(_st(c, T.st_raw(_x_header(shape="4x8"), F32_4x8)))


@case("st_3d", ERROR)
def _(c):
    return c.rms(_st(c, T.st_raw(_x_header(shape=[2, 2, 8]), F32_4x8)))


@case("st_spec_without_tensor", ERROR)
def _(c):
    p = c.raw("x.safetensors", T.st_build([("x", np.ones((4, 8), "<f4"))]))
    return c.rms(p)


# ---- operands that do not fit ----

@case("weight_wrong_length", ERROR)
def _(c):
    return c.rms(c.x(), "--weight", c.npy("w.npy", np.ones(9, "<f4")))


@case("weight_2d_two_rows", ERROR)
def _(c):
    return c.rms(c.x(), "--weight", c.npy("w.npy", np.ones((2, 8), "<f4")))


@case("weight_f16_with_f32_x", ERROR)
def _(c):
    return c.rms(c.x(), "--weight", c.npy("w.npy", np.ones(8, "<f2")))


@case("weight_bf16_with_f16_x", ERROR)
def _(c):
    w = f"{c.raw('w.safetensors', T.st_build([('w', np.ones(8, np.float32).astype(T.BF16))]))}:w"
    return c.rms(c.x(dtype="f16"), "--weight", w)


@case("mul_wrong_shape", ERROR)
def _(c):
    return c.rms(c.x(), "--mul", c.npy("m.npy", np.ones((4, 9), "<f4")))


@case("mul_wrong_dtype", ERROR)
def _(c):
    return c.rms(c.x(), "--mul", c.npy("m.npy", np.ones((4, 8), "<f2")))


@case("residual_wrong_shape", ERROR)
def _(c):
    return ["run", "add_rms_norm", "--x", c.x(), "--residual", c.npy("r.npy", np.ones((3, 8), "<f4")),
            "--out", c.out, "--residual-out", c.res_out]


@case("residual_wrong_dtype", ERROR)
def _(c):
    return ["run", "add_rms_norm", "--x", c.x(), "--residual", c.npy("r.npy", np.ones((4, 8), "<f2")),
            "--out", c.out, "--residual-out", c.res_out]


@case("residual_missing_for_add_rms_norm", USAGE)  # --residual is a required flag of add_rms_norm
def _(c):
    return ["run", "add_rms_norm", "--x", c.x(), "--out", c.out, "--residual-out", c.res_out]


@case("residual_given_to_rms_norm", ERROR)
def _(c):
    return c.rms(c.x(), "--residual", c.npy("r.npy", np.ones((4, 8), "<f4")))


@case("mul_given_to_l2_norm", ERROR)
def _(c):
    return ["run", "l2_norm", "--x", c.x(), "--mul", c.npy("m.npy", np.ones((4, 8), "<f4")), "--out", c.out]


@case("mul_given_to_layer_norm", ERROR)
def _(c):
    return ["run", "layer_norm", "--x", c.x(), "--mul", c.npy("m.npy", np.ones((4, 8), "<f4")), "--out", c.out]


# ---- option values ----

@case("eps_negative", ERROR)
def _(c):
    return c.rms(c.x(), "--eps", "-1e-6")


@case("eps_negative_equals_form", ERROR)
def _(c):
    return c.rms(c.x(), "--eps=-1")


# "nan"/"inf" parse as floats but are out of range; a parser may also call them "not a number": 1 or 2.
@case("eps_nan", {ERROR, USAGE})
def _(c):
    return c.rms(c.x(), "--eps", "nan")


@case("eps_inf", {ERROR, USAGE})
def _(c):
    return c.rms(c.x(), "--eps", "inf")


@case("scale_nan", {ERROR, USAGE})
def _(c):
    return ["run", "l2_norm", "--x", c.x(), "--scale", "nan", "--out", c.out]


@case("eps_abc", USAGE)
def _(c):
    return c.rms(c.x(), "--eps", "abc")


@case("eps_abc_equals_form", USAGE)
def _(c):
    return c.rms(c.x(), "--eps=abc")


@case("eps_trailing_garbage", USAGE)
def _(c):
    return c.rms(c.x(), "--eps", "1e-5x")


@case("eps_empty", USAGE)
def _(c):
    return c.rms(c.x(), "--eps=")


@case("scale_not_a_number", USAGE)
def _(c):
    return ["run", "l2_norm", "--x", c.x(), "--scale", "half", "--out", c.out]


@case("weight_offset_not_a_number", USAGE)
def _(c):
    return c.rms(c.x(), "--weight", c.npy("w.npy", np.ones(8, "<f4")), "--weight-offset", "one")


# ---- usage ----

@case("unknown_flag", USAGE)
def _(c):
    return c.rms(c.x(), "--frobnicate", "3")


@case("unknown_op", USAGE)
def _(c):
    return ["run", "group_norm", "--x", c.x(), "--out", c.out]


@case("run_without_op", USAGE)
def _(c):
    return ["run"]


@case("unknown_command", USAGE)
def _(c):
    return ["frobnicate"]


@case("missing_x", USAGE)
def _(c):
    return ["run", "rms_norm", "--out", c.out]


@case("missing_out", USAGE)
def _(c):
    return ["run", "rms_norm", "--x", c.x()]


@case("flag_without_value", USAGE)
def _(c):
    return ["run", "rms_norm", "--x", c.x(), "--out"]


@case("unknown_device", USAGE)
def _(c):
    return c.rms(c.x(), "--device", "tpu")


@case("unknown_device_equals_form", USAGE)
def _(c):
    return c.rms(c.x(), "--device=gpu0")


# ---- outputs ----

@case("bf16_x_with_npy_out", ERROR)
def _(c):
    x = f"{c.raw('x.safetensors', T.st_build([('x', np.ones((4, 8), np.float32).astype(T.BF16))]))}:x"
    return c.rms(x)


@case("bf16_residual_out_npy", ERROR)
def _(c):
    st = c.raw("in.safetensors", T.st_build([("x", np.ones((4, 8), np.float32).astype(T.BF16)),
                                             ("r", np.ones((4, 8), np.float32).astype(T.BF16))]))
    return ["run", "add_rms_norm", "--x", f"{st}:x", "--residual", f"{st}:r", "--out", c.out_st,
            "--residual-out", c.res_out]


@case("out_in_nonexistent_directory", ERROR)
def _(c):
    return ["run", "rms_norm", "--x", c.x(), "--out", c.outd / "no_such_dir" / "y.npy"]


@case("residual_out_in_nonexistent_directory", ERROR)
def _(c):
    return ["run", "add_rms_norm", "--x", c.x(), "--residual", c.npy("r.npy", np.ones((4, 8), "<f4")),
            "--out", c.out, "--residual-out", c.outd / "no_such_dir" / "r.npy"]


@case("out_is_a_directory", ERROR)
def _(c):
    d = c.outd / "d.npy"
    d.mkdir()
    return ["run", "rms_norm", "--x", c.x(), "--out", d]


@case("out_unknown_extension_txt", {ERROR, USAGE})
def _(c):
    return ["run", "rms_norm", "--x", c.x(), "--out", c.out_txt]


@case("residual_out_unknown_extension_txt", {ERROR, USAGE})
def _(c):
    return ["run", "add_rms_norm", "--x", c.x(), "--residual", c.npy("r.npy", np.ones((4, 8), "<f4")),
            "--out", c.out, "--residual-out", c.out_txt]


@case("unknown_device_l2_norm", USAGE)
def _(c):
    return ["run", "l2_norm", "--x", c.x(), "--device", "CUDA:banana", "--out", c.out]


@pytest.mark.parametrize("name", list(CASES))
def test_error(tmp_path, rng, name):
    fn, codes = CASES[name]
    c = Ctx(tmp_path, rng)
    args = fn(c)
    before = T.snapshot(tmp_path)
    proc = T.run_tnorm(args, cwd=tmp_path)
    T.assert_error_output(proc, codes)
    added, removed, changed = T.diff_snapshots(before, T.snapshot(tmp_path))
    assert not changed, f"files changed by a failed call: {changed}\n" + T.describe(proc)
    assert not added, f"files left behind by a failed call: {added}\n" + T.describe(proc)
    assert not removed, f"files removed by a failed call: {removed}\n" + T.describe(proc)


def test_there_are_enough_cases():
    assert len(CASES) >= 30
