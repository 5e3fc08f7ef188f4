"""Refused calls: the exception type, the library's message, and nothing written (outputs poisoned with
NaN stay bit for bit as they were)."""

import numpy as np
import pytest

import numerics as N
from kinds import cpu_kinds

import tnorm


def _poisoned_like(kind, shape, dtype):
    return kind.from_numpy(N.poison(shape, dtype))


def _assert_untouched(kind, out, shape, dtype, what="out"):
    N.assert_bits_equal(kind.to_numpy(out), N.poison(shape, dtype), f"{what} after a refused call")


# Each case: (call(kind, rng, y, s) -> None, exception type, message regex). y and s: poisoned outputs
# of shape (4, 8) f32 (the shape and dtype of x in every case).
def _x(kind, rng, shape=(4, 8), dtype="f32"):
    return kind.from_numpy(N.normal(rng, shape, dtype))


def _w(kind, rng, n=8, dtype="f32"):
    return kind.from_numpy(N.uniform(rng, (n,), dtype))


CASES = {
    "weight_length": (lambda k, g, y, s: tnorm.rms_norm(_x(k, g), _w(k, g, 7), out=y),
                      ValueError, r"^rms_norm: weight has 7 elements, dim is 8$"),
    "weight_two_rows": (lambda k, g, y, s: tnorm.rms_norm(_x(k, g), k.from_numpy(N.uniform(g, (2, 8), "f32")),
                                                          out=y),
                        ValueError, r"weight is 2 x 8; must be one row"),
    "mul_rows": (lambda k, g, y, s: tnorm.rms_norm(_x(k, g), mul=_x(k, g, (3, 8)), out=y),
                 ValueError, r"^rms_norm: mul is 3 x 8, x is 4 x 8"),
    "out_rows": (lambda k, g, y, s: tnorm.l2_norm(_x(k, g, (5, 8)), out=y),
                 ValueError, r"^l2_norm: y is 4 x 8, x is 5 x 8"),
    "residual_shape": (lambda k, g, y, s: tnorm.add_rms_norm(_x(k, g), _x(k, g, (4, 9)), _w(k, g), out=y,
                                                             residual_out=s),
                       ValueError, r"^add_rms_norm: residual is 4 x 9, x is 4 x 8"),
    "residual_dtype": (lambda k, g, y, s: tnorm.add_rms_norm(_x(k, g), _x(k, g, dtype="f16"), _w(k, g), out=y,
                                                             residual_out=s),
                       ValueError, r"^add_rms_norm: residual is f16, x is f32$"),
    "weight_dtype": (lambda k, g, y, s: tnorm.rms_norm(_x(k, g), _w(k, g, dtype="f16"), out=y),
                     ValueError, r"^rms_norm: weight is f16; must be f32 or x's dtype f32$"),
    "out_dtype": (lambda k, g, y, s: tnorm.l2_norm(_x(k, g, dtype="f16"), out=y),
                  ValueError, r"^l2_norm: y is f32, x is f16$"),
    "eps_negative": (lambda k, g, y, s: tnorm.rms_norm(_x(k, g), eps=-1.0, out=y),
                     ValueError, r"eps is -1; must be finite and >= 0"),
    "eps_nan": (lambda k, g, y, s: tnorm.l2_norm(_x(k, g), eps=float("nan"), out=y),
                ValueError, r"eps is nan"),
    "scale_inf": (lambda k, g, y, s: tnorm.l2_norm(_x(k, g), scale=float("inf"), out=y),
                  ValueError, r"scale is inf; must be finite"),
    "offset_without_weight": (lambda k, g, y, s: tnorm.rms_norm(_x(k, g), weight_offset=1.0, out=y),
                              ValueError, r"weight_offset is 1 without a weight; must be 0"),
    "residual_missing": (lambda k, g, y, s: tnorm.add_rms_norm(_x(k, g), None, _w(k, g), out=y, residual_out=s),
                         ValueError, r"^add_rms_norm: residual is required$"),
    "dim_zero": (lambda k, g, y, s: tnorm.rms_norm(k.from_numpy(np.zeros((4, 0), np.float32)), out=y),
                 ValueError, r"dim 0; must be > 0"),
    "x_float64": (lambda k, g, y, s: tnorm.rms_norm(k.from_numpy(np.zeros((4, 8))), out=y),
                  TypeError, r"^x: unsupported dtype float64"),
    "x_int32": (lambda k, g, y, s: tnorm.l2_norm(k.from_numpy(np.zeros((4, 8), np.int32)), out=y),
                TypeError, r"^x: unsupported dtype int32"),
    "weight_float64": (lambda k, g, y, s: tnorm.rms_norm(_x(k, g), k.from_numpy(np.ones(8)), out=y),
                       TypeError, r"^weight: unsupported dtype float64"),
    "x_list": (lambda k, g, y, s: tnorm.rms_norm([[1.0] * 8] * 4, out=y),
               TypeError, r"^x: expected an array supporting DLPack"),
    "mul_scalar": (lambda k, g, y, s: tnorm.rms_norm(_x(k, g), mul=2.0, out=y),
                   TypeError, r"^mul: expected an array supporting DLPack"),
    "x_inner_stride": (lambda k, g, y, s: tnorm.rms_norm(_x(k, g, (4, 16))[:, ::2], out=y),
                       ValueError, r"^x: its last dimension has stride 2 elements; must be 1"),
    "x_transposed": (lambda k, g, y, s: tnorm.rms_norm(_x(k, g, (8, 4)).T, out=y),
                     ValueError, r"^x: its last dimension has stride 4 elements; must be 1"),
    "x_0d": (lambda k, g, y, s: tnorm.l2_norm(k.from_numpy(np.float32(1.0).reshape(())), out=y),
             ValueError, r"^x: is 0-dimensional"),
    "x_4d_not_collapsible": (lambda k, g, y, s: tnorm.rms_norm(_x(k, g, (2, 2, 2, 8))[:, :1], out=y),
                             ValueError, r"^x: shape \(2, 1, 2, 8\) with strides \(32, 16, 8, 1\) \(elements\) "
                                         r"cannot be viewed as rows x 8 without a copy$"),
    # A 3-D x that does not collapse is a 3-D view: rms_norm and l2_norm take it, the others refuse it.
    "x_3d_for_2d_op": (lambda k, g, y, s: tnorm.add_rms_norm(_x(k, g, (2, 4, 8))[:, :2], _x(k, g, (2, 4, 8))[:, :2],
                                                             None),
                       ValueError, r"^add_rms_norm: x is a 3-D view \(2 heads\); this op takes 2-D views"),
    "out_shape": (lambda k, g, y, s: tnorm.rms_norm(_x(k, g, (2, 2, 8)), out=y),
                  ValueError, r"^rms_norm: out has shape \(4, 8\), x has shape \(2, 2, 8\)$"),
    "residual_out_shape": (lambda k, g, y, s: tnorm.add_rms_norm(_x(k, g, (4, 8)), _x(k, g), _w(k, g), out=y,
                                                                 residual_out=k.from_numpy(
                                                                     N.poison((2, 2, 8), "f32"))),
                           ValueError, r"^add_rms_norm: residual_out has shape \(2, 2, 8\)"),
}


@pytest.mark.parametrize("kind", cpu_kinds())
@pytest.mark.parametrize("case", list(CASES))
def test_refused(rng, kind, case):
    fn, exc, pattern = CASES[case]
    y = _poisoned_like(kind, (4, 8), "f32")
    s = _poisoned_like(kind, (4, 8), "f32")
    with pytest.raises(exc, match=pattern):
        fn(kind, rng, y, s)
    _assert_untouched(kind, y, (4, 8), "f32")
    _assert_untouched(kind, s, (4, 8), "f32", "residual_out")


@pytest.mark.parametrize("kind", cpu_kinds())
def test_status_name_on_the_exception(rng, kind):
    with pytest.raises(ValueError) as info:
        tnorm.rms_norm(_x(kind, rng), _w(kind, rng, 7))
    assert info.value.status == "TN_ERR_SHAPE"


@pytest.mark.parametrize("kind", cpu_kinds())
@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm"])
def test_partial_overlap_refused(rng, kind, op):
    """An output one row off its input shares memory without being the same view: refused, nothing written."""
    buf_np = N.normal(rng, (5, 8), "f32")
    buf = kind.from_numpy(buf_np)
    x, y = buf[0:4], buf[1:5]
    with pytest.raises(ValueError, match=r"overlaps x without being the same view"):
        if op == "rms_norm":
            tnorm.rms_norm(x, out=y)
        else:
            r = kind.from_numpy(N.normal(rng, (4, 8), "f32"))
            tnorm.add_rms_norm(x, r, None, out=y, residual_out=kind.from_numpy(N.poison((4, 8), "f32")))
    N.assert_bits_equal(kind.to_numpy(buf), buf_np, "the shared buffer")


def test_read_only_output_refused(rng):
    x = N.normal(rng, (4, 8), "f32")
    y = N.poison((4, 8), "f32")
    y.flags.writeable = False
    with pytest.raises(ValueError, match=r"^rms_norm: out is read-only$"):
        tnorm.rms_norm(x, out=y)
    N.assert_bits_equal(y, N.poison((4, 8), "f32"), "read-only out")


def test_read_only_bf16_output_refused(rng):
    """bf16 NumPy arrays go through the array interface, which must see read-only too."""
    x = N.normal(rng, (4, 8), "bf16")
    y = N.poison((4, 8), "bf16")
    y.flags.writeable = False
    with pytest.raises(ValueError, match=r"out is read-only"):
        tnorm.l2_norm(x, out=y)


def test_non_native_byte_order_refused(rng):
    x = N.normal(rng, (4, 8), "f32").astype(">f4")
    with pytest.raises(TypeError, match=r"^x: unsupported dtype >f4"):
        tnorm.rms_norm(x)


class _OnDevice:
    """An array that says it lives on a DLPack device tnorm does not take."""

    def __init__(self, device_type):
        self.device_type = device_type

    def __dlpack_device__(self):
        return (self.device_type, 0)

    def __dlpack__(self, stream=None):
        raise AssertionError("must not be exported")


@pytest.mark.parametrize("device_type,name", [(3, "CUDA pinned host"), (13, "CUDA managed"), (10, "ROCm"),
                                              (99, "type 99")])
def test_unsupported_device_refused(device_type, name):
    x = _OnDevice(device_type)
    with pytest.raises(ValueError, match=rf"^x: is in {name} memory \(DLPack device type {device_type}\)"):
        tnorm.rms_norm(x)
