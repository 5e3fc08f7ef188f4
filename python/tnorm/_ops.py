"""The ops: operands read through DLPack, outputs allocated with the caller's own library, one C call.

Outputs, when not given, are new C-contiguous arrays of x's shape and dtype, made by x's library:
numpy.empty, torch.empty (on x's device), cupy.empty (on x's device). For any other library (jax, ...)
the result is computed into a NumPy buffer and handed back through the library's array namespace
(`xp.asarray`) when x is in host memory; on a CUDA device `xp.empty(shape, dtype=x.dtype,
device=x.device)` is written in place, so immutable arrays (jax) take the result as a fresh buffer that
nothing else references yet. A library with neither needs `out=`.

On a CUDA device the op is queued on the caller's current stream: torch's current stream for a torch
tensor, cupy's for a cupy array, else the legacy default stream. It returns without waiting, like the
library's own ops.
"""

import ctypes
import sys

from . import _dlpack
from . import _lib
from ._lib import TN_DEVICE_CUDA


def _current_stream(x, dev_id):
    """The stream the caller's library is working on for x's device, as an int (0: legacy default)."""
    lib = _dlpack.library_of(x)
    if lib == "torch":
        torch = sys.modules["torch"]
        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # what torch.compile's code calls: fast
        return raw(dev_id) if raw is not None else torch.cuda.current_stream(dev_id).cuda_stream
    if lib == "cupy":
        cupy = sys.modules["cupy"]
        with cupy.cuda.Device(dev_id):
            return cupy.cuda.get_current_stream().ptr
    return 0


class _Output:
    """An output operand: `target` is written by the call, `result()` is what the caller gets back."""

    def __init__(self, target, convert=None):
        self.target = target
        self.convert = convert

    def result(self):
        return self.convert(self.target) if self.convert else self.target


def _new_output(x, xv, on_cuda, name):
    shape = xv.shape
    lib = _dlpack.library_of(x)
    if lib == "numpy":
        import numpy as np
        return _Output(np.empty(shape, dtype=x.dtype))
    if lib == "torch":
        torch = sys.modules["torch"]
        return _Output(torch.empty(shape, dtype=x.dtype, device=x.device))
    if lib == "cupy":
        cupy = sys.modules["cupy"]
        with x.device:
            return _Output(cupy.empty(shape, dtype=x.dtype))
    xp = x.__array_namespace__() if hasattr(x, "__array_namespace__") else None
    if on_cuda:
        if xp is None:
            raise TypeError(f"{name}: cannot allocate a CUDA result for a {type(x).__qualname__}; pass {name}=")
        return _Output(xp.empty(shape, dtype=x.dtype, device=x.device))
    import numpy as np
    buf = np.empty(shape, dtype=_dlpack.numpy_dtype_of(xv.tensor.dtype))
    return _Output(buf, xp.asarray if xp is not None else None)


class _Call:
    """The operands of one call, all read with the stream the op will run on."""

    def __init__(self, op, x, heads=False):
        self.op = op
        dev_type, dev_id = device = _dlpack.device_of(x, "x")
        self.on_cuda = dev_type == _dlpack.KDL_CUDA
        self.device = device
        self.stream = _current_stream(x, dev_id) if self.on_cuda else None
        # torch's arrays need no synchronisation with torch's own current stream (see _dlpack.export).
        self.stream_owner = "torch" if _dlpack.library_of(x) == "torch" else None
        self.heads = heads
        self.x_obj = x
        self.x = self._export(x, "x", device)
        self.keep = []

    def _export(self, obj, name, device=None):
        return _dlpack.export(obj, name, self.stream, self.stream_owner, device, self.heads)

    def input(self, obj, name, row_shaped=True):
        if obj is None:
            return None
        v = _dlpack.export(obj, name, self.stream, self.stream_owner, None, self.heads and row_shaped)
        if row_shaped:
            self._same_shape(v, name)
        return v

    def positions(self, obj, name="positions"):
        p = _dlpack.export_index(obj, name, self.stream, self.stream_owner)
        if tuple(p.device) != tuple(self.device):
            raise ValueError(f"{self.op}: {name} is on device {p.device}, x on {self.device} (DLPack device "
                             f"type and id); they must be on the same device")
        if p.count != self.x.tensor.rows:
            raise ValueError(f"{self.op}: {name} has {p.count} elements; must be one per row of x "
                             f"({self.x.tensor.rows})")
        self.keep.append(p)
        return p

    def output(self, obj, name):
        out = _Output(obj) if obj is not None else _new_output(self.x_obj, self.x, self.on_cuda, name)
        v = self._export(out.target, name)
        if v.readonly:
            raise ValueError(f"{self.op}: {name} is read-only")
        if v.copied:
            raise ValueError(f"{self.op}: {name} was exported as a copy, so a result written there would be lost")
        self._same_shape(v, name)
        return v, out

    def _same_shape(self, v, name):
        # rows x dim disagreements are left to the library, whose message says what it saw; here only
        # shapes that flatten alike but differ (an output (6, 8) for an x (2, 3, 8)).
        if v.rows_dim == self.x.rows_dim and v.shape != self.x.shape:
            raise ValueError(f"{self.op}: {name} has shape {tuple(v.shape)}, x has shape {tuple(self.x.shape)}")

    def run(self, fn, *args):
        lib = _lib.lib()
        if self.on_cuda:
            _lib.set_cuda_stream(self.stream)
        _lib.raise_for_status(getattr(lib, fn)(_lib.context(), *args))

    def run_args(self, args):
        """tn_op_run with a filled tn_op_args."""
        self.run("tn_op_run", ctypes.byref(args))


def _ref(view):
    return None if view is None else view.tensor


def _ptr(view):
    return None if view is None else ctypes.pointer(view.tensor)


def _mode(table, value, what):
    code = table.get(value)
    if code is None:
        raise ValueError(f"{what} is {value!r}; must be one of {', '.join(repr(k) for k in table)}")
    return code


def _args(op, c, y, eps, casting, **operands):
    a = _lib.OpArgs()
    a.op = op
    a.x = ctypes.pointer(c.x.tensor)
    a.y = ctypes.pointer(y.tensor)
    a.eps = eps
    a.scale = 1.0
    a.casting = _mode(_lib.CASTINGS, casting, "casting")
    for name, view in operands.items():
        if view is not None:
            setattr(a, name, ctypes.pointer(view.tensor))
    return a


def rms_norm(x, weight=None, eps=1e-6, weight_offset=0.0, mul=None, out=None, *, casting="exact"):
    """y = x * rsqrt(mean(x^2) + eps) * (weight + weight_offset) [* mul], over the last dimension.

    weight: a vector of x.shape[-1] elements, of x's dtype or float32 (None: no scale; weight_offset must
    then be 0). mul: an array of x's shape multiplied in the same pass. out: written and returned (may be
    x itself); else a new array of x's type, shape and dtype. A 3-D x whose first two dimensions cannot be
    merged (heads sliced out of a packed QKV buffer) is normalised head by head where it lies.
    casting: "exact" (one rounding; HF Gemma3RMSNorm) or "llama" (the normalised x rounded to x's dtype
    before the weight multiplies it; HF LlamaRMSNorm, Qwen3RMSNorm).
    """
    c = _Call("rms_norm", x)
    w = c.input(weight, "weight", row_shaped=False)
    m = c.input(mul, "mul")
    y, result = c.output(out, "out")
    if casting == "exact":  # the plain entry points: a little less to build per call
        if m is None:
            c.run("tn_rms_norm", c.x.tensor, _ref(w), float(weight_offset), float(eps), y.tensor)
        else:
            c.run("tn_rms_norm_mul", c.x.tensor, _ref(w), float(weight_offset), m.tensor, float(eps), y.tensor)
    else:
        a = _args(_lib.TN_OP_RMS_NORM, c, y, eps, casting, weight=w, mul=m)
        a.weight_offset = weight_offset
        c.run_args(a)
    return result.result()


def rms_norm_rope(x, positions, weight=None, eps=1e-6, *, style="neox", rotary_dim=None, theta=10000.0,
                  cos_sin=None, weight_offset=0.0, casting="exact", out=None):
    """rms_norm of every head of x, then a rotary position embedding on its first rotary_dim elements.

    x: [tokens, heads, head_dim] (any strides with contiguous heads: Q or K inside a packed QKV buffer, in
    place with out=x) or [rows, head_dim] (each row one head). positions: one int32/int64 per token, on
    x's device. style: "neox" (halves: HF rotate_half) or "gptj" (interleaved pairs). rotary_dim: the
    elements rotated (None: all). cos_sin: a [positions, rotary_dim] table (cosines, then sines; float32
    or x's dtype), else cos and sin are computed from theta. casting "llama" rounds as HF's
    q * cos + rotate_half(q) * sin does in x's dtype.
    """
    c = _Call("rms_norm_rope", x, heads=True)
    w = c.input(weight, "weight", row_shaped=False)
    table = c.input(cos_sin, "cos_sin", row_shaped=False)
    p = c.positions(positions)
    y, result = c.output(out, "out")
    a = _args(_lib.TN_OP_RMS_NORM, c, y, eps, casting, weight=w)
    a.weight_offset = weight_offset
    a.rope.style = _mode(_lib.ROPE_STYLES, style, "style")
    a.rope.rotary_dim = 0 if rotary_dim is None else int(rotary_dim)
    a.rope.positions = p.data
    a.rope.positions_i64 = int(p.is_i64)
    a.rope.theta = float(theta)
    if table is not None:
        a.rope.cos_sin = ctypes.pointer(table.tensor)
    c.run_args(a)
    return result.result()


def l2_norm(x, eps=1e-6, scale=1.0, out=None, *, convention="rsqrt_eps", casting="exact"):
    """y = x * rsqrt(sum(x^2) + eps) * scale, over the last dimension. out as for rms_norm.

    convention "max_norm_eps": y = x / max(||x||, eps) * scale (ggml's l2_norm, torch's F.normalize).
    """
    c = _Call("l2_norm", x)
    y, result = c.output(out, "out")
    if convention == "rsqrt_eps" and casting == "exact":
        c.run("tn_l2_norm", c.x.tensor, float(eps), float(scale), y.tensor)
    else:
        a = _args(_lib.TN_OP_L2_NORM, c, y, eps, casting)
        a.scale = scale
        a.l2_mode = _mode(_lib.L2_CONVENTIONS, convention, "convention")
        c.run_args(a)
    return result.result()


def _add_norm(op, name, x, residual, weight, bias, eps, out, residual_out, weight_offset, mul, casting,
              residual_mode):
    c = _Call(name, x)
    r = c.input(residual, "residual")
    w = c.input(weight, "weight", row_shaped=False)
    b = c.input(bias, "bias", row_shaped=False)
    m = c.input(mul, "mul")
    y, y_result = c.output(out, "out")
    if residual_out is None and r is not None and r.tensor.dtype != c.x.tensor.dtype:
        residual_out = _new_like(residual, r)  # an f32 residual stream: the new sum is f32 too
    s, s_result = c.output(residual_out, "residual_out")
    if op == _lib.TN_OP_ADD_RMS_NORM and casting == "exact" and residual_mode == "stored":
        # The plain entry points: a little less to build per call.
        if m is None:
            c.run("tn_add_rms_norm", c.x.tensor, _ref(r), _ref(w), float(weight_offset), float(eps), y.tensor,
                  s.tensor)
        else:
            c.run("tn_add_rms_norm_mul", c.x.tensor, _ref(r), _ref(w), float(weight_offset), m.tensor,
                  float(eps), y.tensor, s.tensor)
        return y_result.result(), s_result.result()
    a = _args(op, c, y, eps, casting, residual=r, weight=w, bias=b, mul=m, residual_out=s)
    a.weight_offset = weight_offset
    a.residual_mode = _mode(_lib.RESIDUAL_MODES, residual_mode, "residual_mode")
    c.run_args(a)
    return y_result.result(), s_result.result()


def _new_like(obj, view):
    """A new array of obj's library, shape and dtype on obj's device."""
    out = _new_output(obj, view, _dlpack.device_of(obj, "residual")[0] == _dlpack.KDL_CUDA, "residual_out")
    return out.target


def add_rms_norm(x, residual, weight, eps=1e-6, out=None, residual_out=None, *, weight_offset=0.0, mul=None,
                 casting="exact", residual_mode="stored"):
    """s = x + residual (rounded to the residual's dtype); returns (rms_norm(s, weight) [* mul], s).

    weight may be None (no scale). out may be x itself and residual_out residual itself (the residual
    stream updated in place); both are written and returned, else new arrays (residual_out of the
    residual's dtype). residual may be float32 beside a float16/bfloat16 x (an f32 residual stream).
    residual_mode: "stored" normalises s as stored (HF), "f32" the float32 sum (FlashInfer, quack).
    """
    return _add_norm(_lib.TN_OP_ADD_RMS_NORM, "add_rms_norm", x, residual, weight, None, eps, out, residual_out,
                     weight_offset, mul, casting, residual_mode)


def layer_norm(x, weight=None, bias=None, eps=1e-5, out=None, *, casting="exact"):
    """y = (x - mean(x)) * rsqrt(var(x) + eps) * weight + bias, over the last dimension (F.layer_norm);
    weight and bias optional (vectors of x.shape[-1] elements, x's dtype or float32)."""
    c = _Call("layer_norm", x)
    w = c.input(weight, "weight", row_shaped=False)
    b = c.input(bias, "bias", row_shaped=False)
    y, result = c.output(out, "out")
    c.run_args(_args(_lib.TN_OP_LAYER_NORM, c, y, eps, casting, weight=w, bias=b))
    return result.result()


def add_layer_norm(x, residual, weight=None, bias=None, eps=1e-5, out=None, residual_out=None, *,
                   casting="exact", residual_mode="stored"):
    """s = x + residual; returns (layer_norm(s, weight, bias), s); the residual stream as in add_rms_norm."""
    return _add_norm(_lib.TN_OP_ADD_LAYER_NORM, "add_layer_norm", x, residual, weight, bias, eps, out,
                     residual_out, 0.0, None, casting, residual_mode)
