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

Calls on torch tensors take a shorter road once a call of the same kind has succeeded (see "The fast
path for torch tensors" below): what the operands are (dtype, shape, strides, device) and the options
form a key to the call's C structures, prepared by the first such call, and only the data pointers are
written before tn_op_run. The library validates every call whichever road it came by.

rms_norm, add_rms_norm, layer_norm and add_layer_norm take a quantized output (quant=...), as quantize does:
the keywords are read by _quant, and such calls always go the general way.
"""

import contextlib
import ctypes
import sys

from . import _dlpack
from . import _lib
from . import _quant
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
        if self.stream_owner == "torch" and _torch_tensor is _NotTorch:
            _enable_fast_path()
        self.heads = heads
        self.x_obj = x
        self.x = self._export(x, "x", device)
        # An x read as heads (a 3-D view whose rows cannot merge) has its other row-shaped operands read as
        # heads too: an output allocated for it is contiguous [tokens, heads, dim], which would otherwise
        # merge into tokens * heads rows and no longer match x's tokens.
        self.heads = heads or self.x.tensor.heads > 1
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


# ---- the fast path for torch tensors ----
#
# Reading three or four tensors through _dlpack, allocating with the general torch.empty and building
# tn_tensor structures cost several times what the C call itself does at decode sizes. So each op first
# builds a key from what the operands are (type, dtype, shape, strides, device and torch's negation bit
# of each tensor, or None for one not given) and the options as passed, and looks it up in this thread's
# context. A hit holds the call's tn_op_args and tn_tensor structures, filled in by the first call of that
# key, which went the general way and succeeded; all that is left to write is the data pointers, and the
# stream when torch's current one changed. Everything else in those structures follows from the key alone,
# so a tensor of another layout, dtype or device, or other options, is another key. Calls are prepared
# per thread because their structures are rewritten on every call.
#
# A call is prepared only when every torch operand was read from its own attributes (so layout, dtype and
# device were ones tnorm takes) and outputs it allocated can be allocated again the same way. The library
# validates every call (shapes, strides, dtypes, devices, overlap of the very pointers given), so an error
# that depends on the pointers is raised on either road, with the same message.


class _NotTorch:
    """Stands for torch.Tensor until a torch tensor has been seen: no argument is of exactly this type,
    so nothing is looked up before then and torch is never imported by tnorm."""


_torch_tensor = _NotTorch  # torch.Tensor, once seen
_fast_types = ()  # the operand types a prepared call takes: torch.Tensor and torch.nn.Parameter
_empty_like = None
_raw_stream = None  # torch's current stream of a CUDA device, as an int
_op_run = None  # tn_op_run without argument conversion (_lib.op_run_unchecked)
_CALLS_LIMIT = 256  # prepared calls kept per thread before they are all dropped (shapes seldom vary that much)


@contextlib.contextmanager
def general_way():
    """Every call inside goes the general way and prepares nothing: no torch tensor is recognised until the
    block ends. For the tests and benchmarks that compare the two ways; it is process-wide."""
    global _torch_tensor, _enable_fast_path
    saved = _torch_tensor, _enable_fast_path
    _torch_tensor, _enable_fast_path = _NotTorch, (lambda: None)
    try:
        yield
    finally:
        _torch_tensor, _enable_fast_path = saved


def _enable_fast_path():
    global _torch_tensor, _fast_types, _empty_like, _raw_stream
    torch = sys.modules["torch"]
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    _raw_stream = raw if raw is not None else (lambda index: torch.cuda.current_stream(index).cuda_stream)
    _empty_like = torch.empty_like
    _fast_types = (torch.Tensor, torch.nn.Parameter)
    _torch_tensor = torch.Tensor  # last: a thread that sees it set finds the rest set too


def _meta(t):
    """An operand's part of a key: None when not given."""
    if t is None:
        return None
    return type(t), t.dtype, t.shape, t.stride(), t.device, t.is_neg()


class _Prepared:
    """One prepared call: the tn_op_args (ref: its byref) and the tn_tensor of each operand given, whose
    data pointers are written on every call. alloc_y, alloc_s: make an output not given (from x, and from
    x or the residual: s_source). cuda: the CUDA device index, or None. busy: set while a call writes and
    runs it, so that a call made meanwhile on the same thread (a finaliser, a signal handler) goes the
    general way instead of overwriting the pointers."""

    __slots__ = ("args", "ref", "x", "weight", "mul", "residual", "bias", "y", "residual_out", "rope",
                 "cos_sin", "alloc_y", "alloc_s", "s_source", "cuda", "busy")

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, None)
        self.busy = False

    def run(self, ctx, x, weight=None, mul=None, residual=None, bias=None, out=None, residual_out=None,
            positions=None, cos_sin=None):
        """The call, with the operands given (None: not given). Returns y, or (y, s) for the residual ops."""
        self.busy = True
        try:
            y = self.alloc_y(x) if out is None else out
            if self.residual_out is not None:
                s = residual_out if residual_out is not None else self.alloc_s(
                    residual if self.s_source == "residual" else x)
                self.residual_out.data = s.data_ptr()
            self.x.data = x.data_ptr()
            if weight is not None:
                self.weight.data = weight.data_ptr()
            if mul is not None:
                self.mul.data = mul.data_ptr()
            if residual is not None:
                self.residual.data = residual.data_ptr()
            if bias is not None:
                self.bias.data = bias.data_ptr()
            if positions is not None:
                self.rope.positions = positions.data_ptr()
            if cos_sin is not None:
                self.cos_sin.data = cos_sin.data_ptr()
            self.y.data = y.data_ptr()
            if self.cuda is not None:
                stream = _raw_stream(self.cuda)
                if stream != ctx.cuda_stream:
                    _lib.set_cuda_stream(stream)
            status = _op_run(ctx.handle, self.ref)
        finally:
            self.busy = False
        if status:
            _lib.raise_for_status(status)
        return y if self.residual_out is None else (y, s)


def _lookup(key):
    """This thread's prepared call and context for key, or (None, None)."""
    ctx = getattr(_lib._local, "ctx", None)
    if ctx is None:
        return None, None
    try:
        p = ctx.calls.get(key)
    except TypeError:  # an option that cannot be hashed: this call goes the general way
        return None, None
    return (p, ctx) if p is not None and not p.busy else (None, None)


def _allocator(source, made):
    """A function of `source` that allocates what the general way allocated for it (`made`), or None.
    torch.empty_like is the cheaper call (no arguments to parse), taken when it gives made's layout:
    it keeps a dense source's strides, which for any other layout than C-contiguous are not made's."""
    if type(made) is not _torch_tensor:
        return None
    probe = _empty_like(source)
    if (type(probe) is _torch_tensor and probe.shape == made.shape and probe.stride() == made.stride() and
            probe.dtype == made.dtype and probe.device == made.device):
        return _empty_like
    empty, shape, dtype, device = sys.modules["torch"].empty, tuple(made.shape), made.dtype, made.device
    return lambda _source: empty(shape, dtype=dtype, device=device)


def _remember(key, c, op, inputs=(), outputs=(), eps=1e-6, scale=1.0, weight_offset=0.0, casting=0,
              residual_mode=0, l2_mode=0, rope=None):
    """Prepares the torch call that just succeeded the general way, under key. inputs: (slot, object,
    View or None) of the operands besides x; outputs: (slot, object given or None, View, the object it was
    allocated like); rope: (style, rotary_dim, theta, positions, Index) or None. Preparing never fails the
    call that has just succeeded: whatever goes wrong here leaves the key unprepared."""
    if c.x.keep is not c.x_obj:
        return
    try:
        p = _prepare(c, op, inputs, outputs, eps, scale, weight_offset, casting, residual_mode, l2_mode, rope)
    except Exception:
        return
    if p is None:
        return
    calls = _lib.context_object().calls
    if len(calls) >= _CALLS_LIMIT:
        calls.clear()
    try:
        calls[key] = p
    except TypeError:  # an option that cannot be hashed
        pass


def _prepare(c, op, inputs, outputs, eps, scale, weight_offset, casting, residual_mode, l2_mode, rope):
    """The _Prepared of a call that succeeded the general way (_remember's arguments), or None."""
    global _op_run
    p = _Prepared()
    a = p.args = _lib.OpArgs()
    a.op = op
    p.x = c.x.tensor
    a.x = ctypes.pointer(p.x)
    for slot, obj, view in inputs:
        if view is None:
            continue
        if type(obj) not in _fast_types or view.keep is not obj:  # read through DLPack: not prepared
            return None
        setattr(p, slot, view.tensor)
        if slot != "cos_sin":
            setattr(a, slot, ctypes.pointer(view.tensor))
    for slot, given, view, source in outputs:
        if given is not None:
            if type(given) not in _fast_types or view.keep is not given:
                return None
        else:
            alloc = _allocator(source, view.keep)
            if alloc is None:
                return None
            if slot == "y":
                p.alloc_y = alloc
            else:
                p.alloc_s = alloc
                p.s_source = "x" if source is c.x_obj else "residual"
        setattr(p, slot, view.tensor)
        setattr(a, slot, ctypes.pointer(view.tensor))
    # As the general way converts them: to a Python float, then ctypes to a C float.
    a.eps = float(eps)
    a.scale = float(scale)
    a.weight_offset = float(weight_offset)
    a.casting = casting
    a.residual_mode = residual_mode
    a.l2_mode = l2_mode
    if rope is not None:
        style, rotary_dim, theta, positions, index = rope
        if type(positions) not in _fast_types or index.keep is not positions:
            return None
        p.rope = a.rope  # a view of a's own memory: writing its fields writes a's
        p.rope.style = style
        p.rope.rotary_dim = rotary_dim
        p.rope.positions_i64 = int(index.is_i64)
        p.rope.theta = theta
        if p.cos_sin is not None:
            p.rope.cos_sin = ctypes.pointer(p.cos_sin)
    p.ref = ctypes.byref(a)
    p.cuda = c.device[1] if c.on_cuda else None
    if _op_run is None:  # made here, not when torch is first seen: the library is surely loaded by now
        _op_run = _lib.op_run_unchecked()
    return p


_QUANT_DOC = """
    Quantized output (CPU for now; a CUDA tensor gives RuntimeError, status TN_ERR_UNAVAILABLE):
    quant: "fp8_e4m3", "fp8_e5m2", "int8", "mxfp8" or "nvfp4". The call then returns (q, scales), scales None
    for a static scale; (q, scales, y) with return_unquantized (y in `out` when given; `out` given without
    it is written too). The residual ops append residual_out to either tuple.
    scale: the static scale of fp8_e4m3, fp8_e5m2 and int8 (q = v / scale), or nvfp4's global scale: a Python
    float, or a one-element float32 array on x's device, read when the op runs (so a captured CUDA graph
    stays valid when the value changes; a float is copied to the device on each call).
    group_size: None gives per-token scales without a scale and a per-tensor one with it; 32, 64 or 128
    gives dynamic scales per group of that many elements. mxfp8 (32) and nvfp4 (16) have their own groups.
    quant_source: "rounded" quantizes the result rounded to x's dtype (y's values), "f32" the float32 result.
    pow2_scales: dynamic FP8 and INT8 scales rounded up to powers of two, stored as UE8M0 bytes (uint8).
    scales_layout: "row", "column" ([rows, groups] view of a DeepGEMM column-major buffer) or "swizzled"
    (mxfp8, nvfp4: [round_up(rows, 128), round_up(groups, 4)] in 128 x 4 tiles); see tnorm._quant.
    scale_ub, scale_min: bounds on the dynamic scales (None: no upper bound, and 2^-126).
    """


def _no_quant_options(scale, group_size, quant_source, pow2_scales, scales_layout, scale_ub, scale_min,
                      return_unquantized):
    """Whether every quantization keyword has its default: checked before the fast path, whose key leaves
    them out (a call that gives one without quant is refused by _quant.request)."""
    return (scale is None and group_size is None and scale_ub is None and scale_min is None and not pow2_scales
            and not return_unquantized and quant_source == "rounded" and scales_layout == "row")


def _quantized(op, name, req, x, residual=None, weight=None, bias=None, mul=None, eps=1e-6, weight_offset=0.0,
               out=None, residual_out=None, casting="exact", residual_mode="stored"):
    """A call with a quantized output (req: a _quant.Request), always the general way. Returns (q, scales),
    then y with return_unquantized, then residual_out for the residual ops."""
    c = _Call(name, x)
    residual_op = op in (_lib.TN_OP_ADD_RMS_NORM, _lib.TN_OP_ADD_LAYER_NORM)
    r = c.input(residual, "residual")
    w = c.input(weight, "weight", row_shaped=False)
    b = c.input(bias, "bias", row_shaped=False)
    m = c.input(mul, "mul")
    y = y_result = None
    if out is not None or req.return_unquantized:  # y is optional beside a quantized output
        y, y_result = c.output(out, "out")
    s = s_result = None
    if residual_op:
        s_out = residual_out
        if residual_out is None and r is not None and r.tensor.dtype != c.x.tensor.dtype:
            s_out = _new_like(residual, r)  # an f32 residual stream: the new sum is f32 too
        s, s_result = c.output(s_out, "residual_out")
    a = _lib.OpArgs()
    a.op = op
    a.x = ctypes.pointer(c.x.tensor)
    a.y = _ptr(y)
    a.residual, a.residual_out, a.weight, a.bias, a.mul = _ptr(r), _ptr(s), _ptr(w), _ptr(b), _ptr(m)
    a.eps = eps
    a.scale = 1.0
    a.weight_offset = weight_offset
    a.casting = _mode(_lib.CASTINGS, casting, "casting")
    a.residual_mode = _mode(_lib.RESIDUAL_MODES, residual_mode, "residual_mode")
    qa, q_new, scales_new, keep = req.outputs(c)
    a.quant = qa
    c.run_args(a)
    del keep  # the quantized outputs' views, referenced until the call has returned
    result = [q_new.result(), scales_new.result() if scales_new is not None else None]
    if req.return_unquantized:
        result.append(y_result.result())
    if residual_op:
        result.append(s_result.result())
    return tuple(result)


def quantize(x, quant, scale=None, group_size=None, *, pow2_scales=False, scales_layout="row", scale_ub=None,
             scale_min=None):
    """(q, scales) = x quantized (x's own values; float32, float16 or bfloat16, rows of the last dimension).

    quant, scale, group_size, pow2_scales, scales_layout, scale_ub and scale_min as for rms_norm's quantized
    output; scales is None for a static scale.
    """
    req = _quant.Request("quantize", quant, scale, group_size, pow2_scales=pow2_scales,
                         scales_layout=scales_layout, scale_ub=scale_ub, scale_min=scale_min)
    return _quantized(_lib.TN_OP_QUANTIZE, "quantize", req, x)


def rms_norm(x, weight=None, eps=1e-6, weight_offset=0.0, mul=None, out=None, *, casting="exact", quant=None,
             scale=None, group_size=None, quant_source="rounded", pow2_scales=False, scales_layout="row",
             scale_ub=None, scale_min=None, return_unquantized=False):
    """y = x * rsqrt(mean(x^2) + eps) * (weight + weight_offset) [* mul], over the last dimension.

    weight: a vector of x.shape[-1] elements, of x's dtype or float32 (None: no scale; weight_offset must
    then be 0). mul: an array of x's shape multiplied in the same pass. out: written and returned (may be
    x itself); else a new array of x's type, shape and dtype. A 3-D x whose first two dimensions cannot be
    merged (heads sliced out of a packed QKV buffer) is normalised head by head where it lies.
    casting: "exact" (one rounding; HF Gemma3RMSNorm) or "llama" (the normalised x rounded to x's dtype
    before the weight multiplies it; HF LlamaRMSNorm, Qwen3RMSNorm).
    """
    if quant is not None or not _no_quant_options(scale, group_size, quant_source, pow2_scales, scales_layout,
                                                  scale_ub, scale_min, return_unquantized):
        req = _quant.request("rms_norm", quant, scale, group_size, quant_source, pow2_scales, scales_layout,
                             scale_ub, scale_min, return_unquantized)
        return _quantized(_lib.TN_OP_RMS_NORM, "rms_norm", req, x, weight=weight, mul=mul, eps=eps,
                          weight_offset=weight_offset, out=out, casting=casting)
    key = None
    if type(x) is _torch_tensor:  # the fast path (see above)
        try:
            key = ("rms_norm", x.dtype, x.shape, x.stride(), x.device, x.is_neg(), _meta(weight), _meta(mul),
                   _meta(out), eps, weight_offset, casting)
        except Exception:  # not a torch operand: the general way
            key = None
        else:
            p, ctx = _lookup(key)
            if p is not None:
                return p.run(ctx, x, weight, mul, out=out)
    c = _Call("rms_norm", x)
    w = c.input(weight, "weight", row_shaped=False)
    m = c.input(mul, "mul")
    y, result = c.output(out, "out")
    casting_code = _mode(_lib.CASTINGS, casting, "casting")
    if casting == "exact":  # the plain entry points: a little less to build per call
        if m is None:
            c.run("tn_rms_norm", c.x.tensor, _ref(w), float(weight_offset), float(eps), y.tensor)
        else:
            c.run("tn_rms_norm_mul", c.x.tensor, _ref(w), float(weight_offset), m.tensor, float(eps), y.tensor)
    else:
        a = _args(_lib.TN_OP_RMS_NORM, c, y, eps, casting, weight=w, mul=m)
        a.weight_offset = weight_offset
        c.run_args(a)
    if key is not None:  # a torch call, whose key could be made
        _remember(key, c, _lib.TN_OP_RMS_NORM, (("weight", weight, w), ("mul", mul, m)),
                  (("y", out, y, x),), eps=eps, weight_offset=weight_offset, casting=casting_code)
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
    key = None
    if type(x) is _torch_tensor:
        try:
            key = ("rms_norm_rope", x.dtype, x.shape, x.stride(), x.device, x.is_neg(),
                   # positions are read as the general way reads them (no negation bit: integers)
                   (type(positions), positions.dtype, positions.shape, positions.stride(), positions.device),
                   _meta(weight), _meta(cos_sin), _meta(out), eps, style, rotary_dim, theta, weight_offset, casting)
        except Exception:
            key = None
        else:
            p, ctx = _lookup(key)
            if p is not None:
                return p.run(ctx, x, weight=weight, out=out, positions=positions, cos_sin=cos_sin)
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
    if key is not None:  # a torch call, whose key could be made
        _remember(key, c, _lib.TN_OP_RMS_NORM, (("weight", weight, w), ("cos_sin", cos_sin, table)),
                  (("y", out, y, x),), eps=eps, weight_offset=weight_offset, casting=a.casting,
                  rope=(a.rope.style, a.rope.rotary_dim, a.rope.theta, positions, p))
    return result.result()


def l2_norm(x, eps=1e-6, scale=1.0, out=None, *, convention="rsqrt_eps", casting="exact"):
    """y = x * rsqrt(sum(x^2) + eps) * scale, over the last dimension. out as for rms_norm.

    convention "max_norm_eps": y = x / max(||x||, eps) * scale (ggml's l2_norm, torch's F.normalize).
    """
    key = None
    if type(x) is _torch_tensor:  # the fast path, as in rms_norm
        try:
            key = ("l2_norm", x.dtype, x.shape, x.stride(), x.device, x.is_neg(), _meta(out), eps, scale,
                   convention, casting)
        except Exception:
            key = None
        else:
            p, ctx = _lookup(key)
            if p is not None:
                return p.run(ctx, x, out=out)
    c = _Call("l2_norm", x)
    y, result = c.output(out, "out")
    casting_code = _mode(_lib.CASTINGS, casting, "casting")  # before the convention, as _args did
    l2_mode = _mode(_lib.L2_CONVENTIONS, convention, "convention")
    if convention == "rsqrt_eps" and casting == "exact":
        c.run("tn_l2_norm", c.x.tensor, float(eps), float(scale), y.tensor)
    else:
        a = _args(_lib.TN_OP_L2_NORM, c, y, eps, casting)
        a.scale = scale
        a.l2_mode = l2_mode
        c.run_args(a)
    if key is not None:  # a torch call, whose key could be made
        _remember(key, c, _lib.TN_OP_L2_NORM, (), (("y", out, y, x),), eps=eps, scale=scale, casting=casting_code,
                  l2_mode=l2_mode)
    return result.result()


def _add_norm(op, name, x, residual, weight, bias, eps, out, residual_out, weight_offset, mul, casting,
              residual_mode, key):
    c = _Call(name, x)
    r = c.input(residual, "residual")
    w = c.input(weight, "weight", row_shaped=False)
    b = c.input(bias, "bias", row_shaped=False)
    m = c.input(mul, "mul")
    y, y_result = c.output(out, "out")
    s_source = x
    if residual_out is None and r is not None and r.tensor.dtype != c.x.tensor.dtype:
        s_source = residual
        s_out = _new_like(residual, r)  # an f32 residual stream: the new sum is f32 too
    else:
        s_out = residual_out
    s, s_result = c.output(s_out, "residual_out")
    casting_code = _mode(_lib.CASTINGS, casting, "casting")
    mode_code = _mode(_lib.RESIDUAL_MODES, residual_mode, "residual_mode")
    if op == _lib.TN_OP_ADD_RMS_NORM and casting == "exact" and residual_mode == "stored":
        # The plain entry points: a little less to build per call.
        if m is None:
            c.run("tn_add_rms_norm", c.x.tensor, _ref(r), _ref(w), float(weight_offset), float(eps), y.tensor,
                  s.tensor)
        else:
            c.run("tn_add_rms_norm_mul", c.x.tensor, _ref(r), _ref(w), float(weight_offset), m.tensor,
                  float(eps), y.tensor, s.tensor)
    else:
        a = _args(op, c, y, eps, casting, residual=r, weight=w, bias=b, mul=m, residual_out=s)
        a.weight_offset = weight_offset
        a.residual_mode = mode_code
        c.run_args(a)
    if key is not None:  # a torch call, whose key could be made
        _remember(key, c, op, (("residual", residual, r), ("weight", weight, w), ("bias", bias, b),
                               ("mul", mul, m)),
                  (("y", out, y, x), ("residual_out", residual_out, s, s_source)), eps=eps,
                  weight_offset=weight_offset, casting=casting_code, residual_mode=mode_code)
    return y_result.result(), s_result.result()


def _new_like(obj, view):
    """A new array of obj's library, shape and dtype on obj's device."""
    out = _new_output(obj, view, _dlpack.device_of(obj, "residual")[0] == _dlpack.KDL_CUDA, "residual_out")
    return out.target


def add_rms_norm(x, residual, weight, eps=1e-6, out=None, residual_out=None, *, weight_offset=0.0, mul=None,
                 casting="exact", residual_mode="stored", quant=None, scale=None, group_size=None,
                 quant_source="rounded", pow2_scales=False, scales_layout="row", scale_ub=None, scale_min=None,
                 return_unquantized=False):
    """s = x + residual (rounded to the residual's dtype); returns (rms_norm(s, weight) [* mul], s).

    weight may be None (no scale). out may be x itself and residual_out residual itself (the residual
    stream updated in place); both are written and returned, else new arrays (residual_out of the
    residual's dtype). residual may be float32 beside a float16/bfloat16 x (an f32 residual stream).
    residual_mode: "stored" normalises s as stored (HF), "f32" the float32 sum (FlashInfer, quack).
    With quant: (q, scales, residual_out), or (q, scales, y, residual_out) with return_unquantized.
    """
    if quant is not None or not _no_quant_options(scale, group_size, quant_source, pow2_scales, scales_layout,
                                                  scale_ub, scale_min, return_unquantized):
        req = _quant.request("add_rms_norm", quant, scale, group_size, quant_source, pow2_scales, scales_layout,
                             scale_ub, scale_min, return_unquantized)
        return _quantized(_lib.TN_OP_ADD_RMS_NORM, "add_rms_norm", req, x, residual=residual, weight=weight,
                          mul=mul, eps=eps, weight_offset=weight_offset, out=out, residual_out=residual_out,
                          casting=casting, residual_mode=residual_mode)
    key = None
    if type(x) is _torch_tensor:  # the fast path, as in rms_norm
        try:
            key = ("add_rms_norm", x.dtype, x.shape, x.stride(), x.device, x.is_neg(), _meta(residual),
                   _meta(weight), _meta(mul), _meta(out), _meta(residual_out), eps, weight_offset, casting,
                   residual_mode)
        except Exception:
            key = None
        else:
            p, ctx = _lookup(key)
            if p is not None:
                return p.run(ctx, x, weight, mul, residual, out=out, residual_out=residual_out)
    return _add_norm(_lib.TN_OP_ADD_RMS_NORM, "add_rms_norm", x, residual, weight, None, eps, out, residual_out,
                     weight_offset, mul, casting, residual_mode, key)


def layer_norm(x, weight=None, bias=None, eps=1e-5, out=None, *, casting="exact", quant=None, scale=None,
               group_size=None, quant_source="rounded", pow2_scales=False, scales_layout="row", scale_ub=None,
               scale_min=None, return_unquantized=False):
    """y = (x - mean(x)) * rsqrt(var(x) + eps) * weight + bias, over the last dimension (F.layer_norm);
    weight and bias optional (vectors of x.shape[-1] elements, x's dtype or float32). quant: as rms_norm."""
    if quant is not None or not _no_quant_options(scale, group_size, quant_source, pow2_scales, scales_layout,
                                                  scale_ub, scale_min, return_unquantized):
        req = _quant.request("layer_norm", quant, scale, group_size, quant_source, pow2_scales, scales_layout,
                             scale_ub, scale_min, return_unquantized)
        return _quantized(_lib.TN_OP_LAYER_NORM, "layer_norm", req, x, weight=weight, bias=bias, eps=eps, out=out,
                          casting=casting)
    key = None
    if type(x) is _torch_tensor:
        try:
            key = ("layer_norm", x.dtype, x.shape, x.stride(), x.device, x.is_neg(), _meta(weight), _meta(bias),
                   _meta(out), eps, casting)
        except Exception:
            key = None
        else:
            p, ctx = _lookup(key)
            if p is not None:
                return p.run(ctx, x, weight=weight, bias=bias, out=out)
    c = _Call("layer_norm", x)
    w = c.input(weight, "weight", row_shaped=False)
    b = c.input(bias, "bias", row_shaped=False)
    y, result = c.output(out, "out")
    a = _args(_lib.TN_OP_LAYER_NORM, c, y, eps, casting, weight=w, bias=b)
    c.run_args(a)
    if key is not None:  # a torch call, whose key could be made
        _remember(key, c, _lib.TN_OP_LAYER_NORM, (("weight", weight, w), ("bias", bias, b)), (("y", out, y, x),),
                  eps=eps, casting=a.casting)
    return result.result()


def add_layer_norm(x, residual, weight=None, bias=None, eps=1e-5, out=None, residual_out=None, *,
                   casting="exact", residual_mode="stored", quant=None, scale=None, group_size=None,
                   quant_source="rounded", pow2_scales=False, scales_layout="row", scale_ub=None, scale_min=None,
                   return_unquantized=False):
    """s = x + residual; returns (layer_norm(s, weight, bias), s); the residual stream as in add_rms_norm.
    quant: as rms_norm, returning as add_rms_norm."""
    if quant is not None or not _no_quant_options(scale, group_size, quant_source, pow2_scales, scales_layout,
                                                  scale_ub, scale_min, return_unquantized):
        req = _quant.request("add_layer_norm", quant, scale, group_size, quant_source, pow2_scales, scales_layout,
                             scale_ub, scale_min, return_unquantized)
        return _quantized(_lib.TN_OP_ADD_LAYER_NORM, "add_layer_norm", req, x, residual=residual, weight=weight,
                          bias=bias, eps=eps, out=out, residual_out=residual_out, casting=casting,
                          residual_mode=residual_mode)
    key = None
    if type(x) is _torch_tensor:
        try:
            key = ("add_layer_norm", x.dtype, x.shape, x.stride(), x.device, x.is_neg(), _meta(residual),
                   _meta(weight), _meta(bias), _meta(out), _meta(residual_out), eps, casting, residual_mode)
        except Exception:
            key = None
        else:
            p, ctx = _lookup(key)
            if p is not None:
                return p.run(ctx, x, weight=weight, residual=residual, bias=bias, out=out,
                             residual_out=residual_out)
    return _add_norm(_lib.TN_OP_ADD_LAYER_NORM, "add_layer_norm", x, residual, weight, bias, eps, out,
                     residual_out, 0.0, None, casting, residual_mode, key)


rms_norm.__doc__ += _QUANT_DOC
add_rms_norm.__doc__ += _QUANT_DOC
layer_norm.__doc__ += _QUANT_DOC
add_layer_norm.__doc__ += _QUANT_DOC
