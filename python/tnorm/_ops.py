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

    def __init__(self, op, x):
        self.op = op
        dev_type, dev_id = device = _dlpack.device_of(x, "x")
        self.on_cuda = dev_type == _dlpack.KDL_CUDA
        self.stream = _current_stream(x, dev_id) if self.on_cuda else None
        # torch's arrays need no synchronisation with torch's own current stream (see _dlpack.export).
        self.stream_owner = "torch" if _dlpack.library_of(x) == "torch" else None
        self.x_obj = x
        self.x = self._export(x, "x", device)

    def _export(self, obj, name, device=None):
        return _dlpack.export(obj, name, self.stream, self.stream_owner, device)

    def input(self, obj, name, row_shaped=True):
        if obj is None:
            return None
        v = self._export(obj, name)
        if row_shaped:
            self._same_shape(v, name)
        return v

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
            raise ValueError(f"{self.op}: {name} has shape {v.shape}, x has shape {self.x.shape}")

    def run(self, fn, *args):
        lib = _lib.lib()
        ctx = _lib.context()
        if self.on_cuda:
            _lib.raise_for_status(lib.tn_context_set_stream(ctx, TN_DEVICE_CUDA, self.stream or None))
        _lib.raise_for_status(getattr(lib, fn)(ctx, *args))


def _ref(view):
    return None if view is None else view.tensor


def rms_norm(x, weight=None, eps=1e-6, weight_offset=0.0, mul=None, out=None):
    """y = x * rsqrt(mean(x^2) + eps) * (weight + weight_offset) [* mul], over the last dimension.

    weight: a vector of x.shape[-1] elements, of x's dtype or float32 (None: no scale; weight_offset must
    then be 0). mul: an array of x's shape multiplied in the same pass. out: written and returned (may be
    x itself); else a new array of x's type, shape and dtype.
    """
    c = _Call("rms_norm", x)
    w = c.input(weight, "weight", row_shaped=False)
    m = c.input(mul, "mul")
    y, result = c.output(out, "out")
    if m is None:
        c.run("tn_rms_norm", c.x.tensor, _ref(w), float(weight_offset), float(eps), y.tensor)
    else:
        c.run("tn_rms_norm_mul", c.x.tensor, _ref(w), float(weight_offset), m.tensor, float(eps), y.tensor)
    return result.result()


def l2_norm(x, eps=1e-6, scale=1.0, out=None):
    """y = x * rsqrt(sum(x^2) + eps) * scale, over the last dimension. out as for rms_norm."""
    c = _Call("l2_norm", x)
    y, result = c.output(out, "out")
    c.run("tn_l2_norm", c.x.tensor, float(eps), float(scale), y.tensor)
    return result.result()


def add_rms_norm(x, residual, weight, eps=1e-6, out=None, residual_out=None, *, weight_offset=0.0, mul=None):
    """s = x + residual (rounded to x's dtype); returns (rms_norm(s, weight) [* mul], s).

    weight may be None (no scale). out may be x itself and residual_out residual itself (the residual
    stream updated in place); both are written and returned, else new arrays of x's type.
    """
    c = _Call("add_rms_norm", x)
    r = c.input(residual, "residual")
    w = c.input(weight, "weight", row_shaped=False)
    m = c.input(mul, "mul")
    y, y_result = c.output(out, "out")
    s, s_result = c.output(residual_out, "residual_out")
    if m is None:
        c.run("tn_add_rms_norm", c.x.tensor, _ref(r), _ref(w), float(weight_offset), float(eps), y.tensor,
              s.tensor)
    else:
        c.run("tn_add_rms_norm_mul", c.x.tensor, _ref(r), _ref(w), float(weight_offset), m.tensor, float(eps),
              y.tensor, s.tensor)
    return y_result.result(), s_result.result()
