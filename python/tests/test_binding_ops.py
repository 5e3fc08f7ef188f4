"""The ops through the binding on host arrays (NumPy; torch CPU tensors when torch is installed), against
the float64 reference: every op and option, the three dtypes, weights of x's dtype and f32, in place,
strided views, 1-D and 3-D inputs, and a spread of dims."""

import numpy as np
import pytest

import numerics as N
from kinds import cpu_kinds

import tnorm

DTYPES = ["f32", "f16", "bf16"]
DIMS = [1, 7, 128, 4096, 5120]
ROWS = 3

RMS_VARIANTS = {
    "noweight": {},
    "weight": {"weight": "same"},
    "weight_f32": {"weight": "f32"},
    "weight_offset1": {"weight": "same", "weight_offset": 1.0},
    "weight_f32_offset1": {"weight": "f32", "weight_offset": 1.0},
    "mul": {"mul": True},
    "weight_mul": {"weight": "same", "mul": True},
    "eps1e-5": {"weight": "same", "eps": 1e-5, "x_scale": 1e-3},
}
L2_VARIANTS = {
    "plain": {},
    "scale0.5": {"scale": 0.5},
    "eps1e-5": {"eps": 1e-5, "x_scale": 1e-3},
}
ADD_VARIANTS = {
    "noweight": {},
    "weight": {"weight": "same"},
    "weight_f32": {"weight": "f32"},
    "weight_offset1": {"weight": "same", "weight_offset": 1.0},
    "weight_mul": {"weight": "same", "mul": True},
    "eps1e-5": {"weight": "same", "eps": 1e-5, "x_scale": 1e-3},
}
VARIANTS = {"rms_norm": RMS_VARIANTS, "l2_norm": L2_VARIANTS, "add_rms_norm": ADD_VARIANTS}


def _matrix():
    for op, variants in VARIANTS.items():
        for variant, opts in variants.items():
            for dtype in DTYPES:
                if dtype == "f32" and opts.get("weight") == "f32":
                    continue  # the same as "weight" there
                for dim in DIMS:
                    yield pytest.param(op, variant, dtype, dim, id=f"{op}-{variant}-{dtype}-{dim}")


def make_inputs(rng, op, dtype, shape, opts):
    """NumPy operands for one case (weight: None, x's dtype or f32)."""
    dim = shape[-1]
    inputs = {"x": N.normal(rng, shape, dtype, scale=opts.get("x_scale", 1.0))}
    if opts.get("weight"):
        inputs["weight"] = N.uniform(rng, (dim,), dtype if opts["weight"] == "same" else "f32")
    if opts.get("mul"):
        inputs["mul"] = N.uniform(rng, shape, dtype)
    if op == "add_rms_norm":
        inputs["residual"] = N.normal(rng, shape, dtype, scale=opts.get("x_scale", 1.0))
    return inputs


def scalars(op, opts):
    out = {}
    if "eps" in opts:
        out["eps"] = opts["eps"]
    if op == "l2_norm" and "scale" in opts:
        out["scale"] = opts["scale"]
    if op != "l2_norm" and "weight_offset" in opts:
        out["weight_offset"] = opts["weight_offset"]
    return out


def call(kind, op, inputs, scalar_args, **outputs):
    """Runs op on kind's arrays; returns the results as given back (not converted)."""
    k = {name: kind.from_numpy(v) for name, v in inputs.items()}
    if op == "rms_norm":
        return tnorm.rms_norm(k["x"], k.get("weight"), mul=k.get("mul"), **scalar_args, **outputs)
    if op == "l2_norm":
        return tnorm.l2_norm(k["x"], **scalar_args, **outputs)
    return tnorm.add_rms_norm(k["x"], k["residual"], k.get("weight"), mul=k.get("mul"), **scalar_args, **outputs)


def check(kind, op, inputs, scalar_args, got):
    ref_y, ref_r = N.reference(op, inputs["x"], weight=inputs.get("weight"), mul=inputs.get("mul"),
                               residual=inputs.get("residual"), **scalar_args)
    x = inputs["x"]
    if op == "add_rms_norm":
        y, r = got
        assert kind.is_own(r), f"residual_out came back as {type(r)}"
        r = kind.to_numpy(r)
        # residual_out = round(f32(x) + f32(residual)) to x's dtype: exactly determined.
        N.assert_bits_equal(r, ref_r, "residual_out")
    else:
        y = got
    assert kind.is_own(y), f"y came back as {type(y)}"
    y = kind.to_numpy(y)
    assert y.dtype == x.dtype and y.shape == x.shape, f"y is {y.dtype} {y.shape}, x is {x.dtype} {x.shape}"
    N.assert_close(y, ref_y)


@pytest.mark.parametrize("kind", cpu_kinds())
@pytest.mark.parametrize("op,variant,dtype,dim", list(_matrix()))
def test_op_matrix(rng, kind, op, variant, dtype, dim):
    opts = VARIANTS[op][variant]
    inputs = make_inputs(rng, op, dtype, (ROWS, dim), opts)
    s = scalars(op, opts)
    check(kind, op, inputs, s, call(kind, op, inputs, s))


# ---- layouts ----

@pytest.mark.parametrize("kind", cpu_kinds())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["rms_norm", "l2_norm", "add_rms_norm"])
@pytest.mark.parametrize("shape", [(300,), (2, 3, 64), (2, 1, 3, 17), (0, 8), (4, 0, 8)],
                         ids=["1d", "3d", "4d_with_1", "0rows", "0rows_3d"])
def test_shapes(rng, kind, op, dtype, shape):
    opts = {"weight": "same"} if op != "l2_norm" else {}
    inputs = make_inputs(rng, op, dtype, shape, opts)
    check(kind, op, inputs, {}, call(kind, op, inputs, {}))


@pytest.mark.parametrize("kind", cpu_kinds())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["rms_norm", "l2_norm"])
def test_in_place(rng, kind, dtype, op):
    opts = {"weight": "same", "mul": True} if op == "rms_norm" else {"scale": 2.0}
    inputs = make_inputs(rng, op, dtype, (5, 130), opts)
    k = {name: kind.from_numpy(v) for name, v in inputs.items()}
    if op == "rms_norm":
        got = tnorm.rms_norm(k["x"], k["weight"], mul=k["mul"], out=k["x"])
    else:
        got = tnorm.l2_norm(k["x"], scale=2.0, out=k["x"])
    assert got is k["x"]
    ref, _ = N.reference(op, inputs["x"], weight=inputs.get("weight"), mul=inputs.get("mul"),
                         **scalars(op, opts))
    N.assert_close(kind.to_numpy(k["x"]), ref)


@pytest.mark.parametrize("kind", cpu_kinds())
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_in_place(rng, kind, dtype):
    """The residual stream updated in place: out=x, residual_out=residual."""
    inputs = make_inputs(rng, "add_rms_norm", dtype, (6, 96), {"weight": "f32"})
    x, r, w = (kind.from_numpy(inputs[n]) for n in ("x", "residual", "weight"))
    y, s = tnorm.add_rms_norm(x, r, w, out=x, residual_out=r)
    assert y is x and s is r
    ref_y, ref_r = N.reference("add_rms_norm", inputs["x"], weight=inputs["weight"], residual=inputs["residual"])
    N.assert_close(kind.to_numpy(x), ref_y)
    N.assert_bits_equal(kind.to_numpy(r), ref_r, "residual_out")


def _strided_views(kind, rng, dtype, rows, dim, layout):
    """(NumPy copy of the view's values, the view in kind, the parent in kind, parent's NumPy copy)."""
    if layout == "columns":  # x[:, 5:5 + dim] of a wider array: rows start dim + 13 elements apart
        parent = N.normal(rng, (rows, dim + 13), dtype)
        sl = (slice(None), slice(5, 5 + dim))
    elif layout == "every_other_row":
        parent = N.normal(rng, (2 * rows, dim), dtype)
        sl = (slice(None, None, 2), slice(None))
    else:  # both
        parent = N.normal(rng, (2 * rows, dim + 3), dtype)
        sl = (slice(1, None, 2), slice(0, dim))
    kparent = kind.from_numpy(parent)
    return parent[sl].copy(), kparent[sl], kparent, parent, sl


@pytest.mark.parametrize("kind", cpu_kinds())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["columns", "every_other_row", "both"])
@pytest.mark.parametrize("op", ["rms_norm", "l2_norm", "add_rms_norm"])
def test_strided_views(rng, kind, dtype, layout, op):
    """Strided inputs and outputs are used in place: values outside the output view stay as they were."""
    rows, dim = 7, 130
    x_np, x, _, _, _ = _strided_views(kind, rng, dtype, rows, dim, layout)
    _, y_view, y_parent, y_parent_np, sl = _strided_views(kind, rng, dtype, rows, dim, layout)
    w_np = N.uniform(rng, (dim,), dtype)
    w = kind.from_numpy(w_np)
    if op == "add_rms_norm":
        r_np, r, _, _, _ = _strided_views(kind, rng, dtype, rows, dim, layout)
        _, s_view, s_parent, s_parent_np, _ = _strided_views(kind, rng, dtype, rows, dim, layout)
        got_y, got_s = tnorm.add_rms_norm(x, r, w, out=y_view, residual_out=s_view)
        assert got_y is y_view and got_s is s_view
        ref_y, ref_r = N.reference(op, x_np, weight=w_np, residual=r_np)
        s_after = kind.to_numpy(s_parent)
        N.assert_bits_equal(s_after[sl], ref_r, "residual_out")
        outside = np.ones(s_after.shape, bool)
        outside[sl] = False
        N.assert_bits_equal(s_after[outside], s_parent_np[outside], "residual_out's parent outside the view")
    elif op == "rms_norm":
        assert tnorm.rms_norm(x, w, out=y_view) is y_view
        ref_y, _ = N.reference(op, x_np, weight=w_np)
    else:
        assert tnorm.l2_norm(x, out=y_view) is y_view
        ref_y, _ = N.reference(op, x_np)
    y_after = kind.to_numpy(y_parent)
    N.assert_close(y_after[sl], ref_y)
    outside = np.ones(y_after.shape, bool)
    outside[sl] = False
    N.assert_bits_equal(y_after[outside], y_parent_np[outside], "out's parent outside the view")
    # And with the output allocated: a new contiguous array of the view's shape.
    if op == "add_rms_norm":
        fresh = tnorm.add_rms_norm(x, r, w)[0]
    elif op == "rms_norm":
        fresh = tnorm.rms_norm(x, w)
    else:
        fresh = tnorm.l2_norm(x)
    N.assert_close(kind.to_numpy(fresh), ref_y)


@pytest.mark.parametrize("kind", cpu_kinds())
def test_3d_strided_rows_collapse_without_copy(rng, kind):
    """(2, 3, W)[:, :, :dim]: the leading dims collapse into 6 rows W apart, written in place."""
    dim = 40
    parent_np = N.normal(rng, (2, 3, dim + 8), "f32")
    parent = kind.from_numpy(parent_np)
    view = parent[:, :, :dim]
    ref, _ = N.reference("rms_norm", parent_np[:, :, :dim])
    assert tnorm.rms_norm(view, out=view) is view
    after = kind.to_numpy(parent)
    N.assert_close(after[:, :, :dim], ref)
    N.assert_bits_equal(after[:, :, dim:], parent_np[:, :, dim:], "padding columns")


@pytest.mark.parametrize("dtype", DTYPES)
def test_read_only_inputs(rng, dtype):
    """Read-only NumPy inputs are fine (they are only read)."""
    x = N.normal(rng, (4, 33), dtype)
    w = N.uniform(rng, (33,), dtype)
    x.flags.writeable = False
    w.flags.writeable = False
    N.assert_close(tnorm.rms_norm(x, w), N.reference("rms_norm", x, weight=w)[0])


def test_weight_may_be_one_row(rng):
    x = N.normal(rng, (4, 16), "f16")
    w = N.uniform(rng, (1, 16), "f16")
    N.assert_close(tnorm.rms_norm(x, w), N.reference("rms_norm", x, weight=w.reshape(-1))[0])


def test_mixed_libraries_on_the_host(rng):
    """Operands of different array types on the same device are fine; the result follows x's type."""
    torch = pytest.importorskip("torch")
    x = N.normal(rng, (3, 64), "f32")
    w = N.uniform(rng, (64,), "f32")
    y = tnorm.rms_norm(torch.from_numpy(x), w)
    assert isinstance(y, torch.Tensor)
    N.assert_close(y.numpy(), N.reference("rms_norm", x, weight=w)[0])


def test_torch_tensor_requiring_grad_is_read(rng):
    torch = pytest.importorskip("torch")
    x = N.normal(rng, (3, 64), "f32")
    w = torch.nn.Parameter(torch.from_numpy(N.uniform(rng, (64,), "f32")))
    y = tnorm.rms_norm(torch.from_numpy(x), w)
    N.assert_close(y.numpy(), N.reference("rms_norm", x, weight=w.detach().numpy())[0])


def test_torch_negated_views_read_as_their_values(rng):
    """A lazily negated torch view (torch._neg_view, .conj().imag) keeps its values un-negated in memory;
    read, it counts as the values it shows; as an output it is refused, and nothing is written."""
    torch = pytest.importorskip("torch")
    x = N.normal(rng, (5, 64), "f32")
    r = N.normal(rng, (5, 64), "f32")
    w = N.uniform(rng, (64,), "f32")
    neg = lambda a: torch._neg_view(torch.from_numpy(a.copy()))
    assert neg(x).is_neg()
    N.assert_close(tnorm.rms_norm(neg(x), neg(w)).numpy(), N.reference("rms_norm", -x, weight=-w)[0])
    N.assert_close(tnorm.l2_norm(neg(x)).numpy(), N.reference("l2_norm", -x)[0])
    y, s = tnorm.add_rms_norm(neg(x), neg(r), torch.from_numpy(w))
    ref_y, ref_s = N.reference("add_rms_norm", -x, weight=w, residual=-r)
    N.assert_close(y.numpy(), ref_y)
    N.assert_close(s.numpy(), ref_s, "residual_out")
    # The imaginary part of a conjugate: a negated view of a float tensor.
    c = torch.complex(torch.from_numpy(x), torch.from_numpy(r))
    im = c.conj().imag
    assert im.is_neg()
    N.assert_close(tnorm.rms_norm(im).numpy(), N.reference("rms_norm", -r)[0])
    # Written: refused, the output untouched, in place or not.
    out = torch._neg_view(torch.full((5, 64), float("nan")))
    with pytest.raises(ValueError, match="out"):
        tnorm.rms_norm(torch.from_numpy(x), out=out)
    assert torch.isnan(out).all()
    inplace = neg(x)
    before = inplace.resolve_neg().clone()
    with pytest.raises(ValueError, match="out"):
        tnorm.rms_norm(inplace, out=inplace)
    assert torch.equal(inplace.resolve_neg(), before)
