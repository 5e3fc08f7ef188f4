"""Quantized outputs (tnorm.h, "Quantized outputs"): the keyword arguments read into a tn_quant, the outputs
allocated with x's own library, and the tuple a call returns.

What each format stores, as returned:
  q:       fp8_e4m3 and mxfp8 float8_e4m3fn, fp8_e5m2 float8_e5m2, int8 int8 (x's shape); nvfp4 uint8, two
           E2M1 codes a byte (element 2i in the low nibble), shape [..., dim / 2].
  scales:  float32 (dynamic FP8 and INT8); uint8 UE8M0 bytes, the exponent + 127 (mxfp8, and pow2_scales);
           float8_e4m3fn (nvfp4). None for a static scale.
Layouts of the dynamic scales:
  "row":      [..., groups] (per-token scales: [..., 1]), C-contiguous.
  "column":   [rows, groups] indexed like "row" (x's leading dimensions instead of rows when x has several),
              a transposed view of a [groups, padded_rows] buffer: each group's scales are contiguous and start
              16-byte aligned (padded_rows: rows rounded up to 4 for float32, 16 for UE8M0 bytes), as DeepGEMM
              reads them (vLLM's column_major_scales). The padding is not written.
  "swizzled": (mxfp8, nvfp4) the flat [round_up(rows, 128), round_up(groups, 4)] tensor of 128 x 4 tiles that
              cuBLASLt and CUTLASS block-scaled GEMMs read; the padding is written as zeros.
NumPy's float8 dtypes come from ml_dtypes.
"""

import ctypes
import math
import numbers
import operator
import sys

from . import _dlpack
from . import _lib
from ._lib import TN_F8_E4M3, TN_F8_E5M2, TN_F32, TN_I8, TN_U8

# The storage dtype of each format's q (tnorm.h's tn_quant_format).
_Q_DTYPES = {1: TN_F8_E4M3, 2: TN_F8_E5M2, 3: TN_I8, 4: TN_F8_E4M3, 5: TN_U8}
_OWN_GROUP = {_lib.TN_QUANT_MXFP8: 32, _lib.TN_QUANT_NVFP4: 16}
_DTYPE_NAMES = {TN_F32: "float32", TN_F8_E4M3: "float8_e4m3fn", TN_F8_E5M2: "float8_e5m2", TN_I8: "int8",
                TN_U8: "uint8"}
_ITEMSIZE = {TN_F32: 4, TN_F8_E4M3: 1, TN_F8_E5M2: 1, TN_I8: 1, TN_U8: 1}


def _choose(table, value, what):
    code = table.get(value) if isinstance(value, str) else None
    if code is None:
        raise ValueError(f"{what} is {value!r}; must be one of {', '.join(repr(k) for k in table)}")
    return code


def request(op, quant, scale, group_size, quant_source, pow2_scales, scales_layout, scale_ub, scale_min,
            return_unquantized):
    """The Request of a norm's quantization keywords, or None when there is no quantized output (then none of
    the other keywords may be given: they would be ignored without a word)."""
    if quant is None:
        given = [name for name, value in (("scale", scale), ("group_size", group_size), ("scale_ub", scale_ub),
                                           ("scale_min", scale_min)) if value is not None]
        given += [name for name, value, default in (
            ("quant_source", quant_source, "rounded"), ("pow2_scales", pow2_scales, False),
            ("scales_layout", scales_layout, "row"), ("return_unquantized", return_unquantized, False))
            if value != default]
        if given:
            raise ValueError(f"{op}: {', '.join(given)} given without quant (they apply to a quantized output)")
        return None
    return Request(op, quant, scale, group_size, quant_source, pow2_scales, scales_layout, scale_ub, scale_min,
                   return_unquantized)


class Request:
    """A quantized output as asked for: its tn_quant settings (the tensors come with outputs())."""

    def __init__(self, op, quant, scale, group_size, quant_source="rounded", pow2_scales=False, scales_layout="row",
                 scale_ub=None, scale_min=None, return_unquantized=False):
        self.op = op
        self.format = _choose(_lib.QUANT_FORMATS, quant, "quant")
        self.source = _choose(_lib.QUANT_SOURCES, quant_source, "quant_source")
        self.layout = _choose(_lib.SCALES_LAYOUTS, scales_layout, "scales_layout")
        if group_size is not None:
            try:
                group_size = operator.index(group_size)
            except TypeError:
                raise TypeError(f"group_size is {group_size!r}; must be an int (32, 64 or 128) or None") from None
        block = self.format in _OWN_GROUP
        if block:
            self.scaling = _lib.TN_QUANT_SCALE_GROUP
        elif group_size is not None:
            # group_size with a static scale is passed on as asked, for the library to refuse in its words.
            self.scaling = _lib.TN_QUANT_SCALE_TENSOR if scale is not None else _lib.TN_QUANT_SCALE_GROUP
        else:
            self.scaling = _lib.TN_QUANT_SCALE_TENSOR if scale is not None else _lib.TN_QUANT_SCALE_TOKEN
        self.group_size = 0 if group_size is None else group_size
        self.scale = scale
        self.pow2_scales = bool(pow2_scales)
        self.scale_ub = scale_ub
        self.scale_min = scale_min
        self.return_unquantized = bool(return_unquantized)

    @property
    def dynamic(self):
        return self.scaling != _lib.TN_QUANT_SCALE_TENSOR

    def _group(self, dim):
        if self.scaling != _lib.TN_QUANT_SCALE_GROUP:
            return dim
        return self.group_size or _OWN_GROUP.get(self.format, 0)

    def _scales_dtype(self):
        if self.format == _lib.TN_QUANT_NVFP4:
            return TN_F8_E4M3
        return TN_U8 if self.format == _lib.TN_QUANT_MXFP8 or self.pow2_scales else TN_F32

    def outputs(self, c):
        """Allocates q and the scales for call c (an _ops._Call: x, its device and stream) and reads the static
        scale. Returns (tn_quant, q's result, the scales' result or None, what must stay referenced)."""
        qa = _lib.require("tn_quant_init", "a quantized output")(self.format)
        qa.scaling = self.scaling
        qa.group_size = self.group_size
        qa.source = self.source
        qa.pow2_scales = int(self.pow2_scales)
        qa.layout = self.layout
        if self.scale_ub is not None:
            qa.scale_ub = float(self.scale_ub)
        if self.scale_min is not None:
            qa.scale_min = float(self.scale_min)
        keep = []

        shape = tuple(c.x.shape)
        lead, dim = shape[:-1], shape[-1] if shape else 0
        rows = math.prod(lead)
        nvfp4 = self.format == _lib.TN_QUANT_NVFP4
        # Sizes rounded up: a dim the format cannot take still gives tensors of at least one element, so that the
        # library's check of dim against the group, not an empty tensor, is what refuses it.
        q_obj = _new(c, lead + (-(-dim // 2),) if nvfp4 else shape, _Q_DTYPES[self.format], "q")
        q_view = self._export(c, q_obj.target, "q")
        qa.q = ctypes.pointer(q_view.tensor)
        keep.append(q_view)

        s_obj = None
        if self.dynamic:
            group = self._group(dim)
            groups = -(-dim // group) if group > 0 else 1
            sdtype = self._scales_dtype()
            if self.layout == _lib.TN_SCALES_COLUMN_MAJOR and rows == 0:
                # groups x 0 scales are a tensor of dim 0, which the library refuses although x of no rows is a
                # valid call: validated as row-major [0, groups] instead (nothing is written either way).
                qa.layout = _lib.SCALES_LAYOUTS["row"]
                s_obj = _new(c, (groups, 0), sdtype, "scales", _column_view(rows, lead, groups))
                s_view = self._export(c, _new(c, (0, groups), sdtype, "scales").target, "scales")
            elif self.layout == _lib.TN_SCALES_COLUMN_MAJOR:
                step = 16 // _ITEMSIZE[sdtype]  # each group's column 16-byte aligned (DeepGEMM's TMA)
                padded = -(-rows // step) * step
                s_obj = _new(c, (groups, padded), sdtype, "scales", _column_view(rows, lead, groups))
                s_view = self._export(c, s_obj.target, "scales")
                s_view.tensor.dim = rows  # groups x rows, each row `padded` elements apart
            elif self.layout == _lib.TN_SCALES_SWIZZLED:
                s_obj = _new(c, (-(-rows // 128) * 128, -(-groups // 4) * 4), sdtype, "scales")
                s_view = self._export(c, s_obj.target, "scales")
            else:
                s_obj = _new(c, lead + (groups,), sdtype, "scales")
                s_view = self._export(c, s_obj.target, "scales")
            qa.scales = ctypes.pointer(s_view.tensor)
            keep.append(s_view)

        if self.scale is not None:
            scale_view = self._scale_view(c)
            qa.scale = ctypes.pointer(scale_view.tensor)
            keep.append(scale_view)
        return qa, q_obj, s_obj, keep

    def _export(self, c, obj, name):
        v = _dlpack.export(obj, name, c.stream, c.stream_owner, storage=True)
        if v.readonly or v.copied:  # a new array of x's own library is neither; anything else would lose the result
            raise ValueError(f"{self.op}: the {name} allocated for x's library cannot be written in place")
        return v

    def _scale_view(self, c):
        """The static scale (or NVFP4's global scale) as a one-element f32 tensor on x's device."""
        s = self.scale
        if isinstance(s, numbers.Real) and not hasattr(s, "__dlpack__") and not _is_array(s):
            value = float(s)
            if c.on_cuda and not (math.isfinite(value) and value > 0.0):
                # On a GPU the library cannot read the value to refuse it; here it is known, so refuse it as the
                # CPU backend does.
                raise ValueError(f"{self.op}: quant.scale is {value:g}; must be finite and > 0")
            s = _scale_array(c, value)
        elif getattr(s, "ndim", None) == 0:
            s = s.reshape(1)  # a 0-d tensor (torch.tensor(2.0)): the same element as a view
        try:
            return _dlpack.export(s, "scale", c.stream, c.stream_owner, storage=True)
        except TypeError as e:
            what = str(e).partition(";")[0]  # "scale: unsupported dtype float64", without the storage dtypes
            raise TypeError(f"{what}; scale is a Python float or a one-element float32 array on x's device") \
                from None


def _is_array(obj):
    np = sys.modules.get("numpy")
    return np is not None and isinstance(obj, np.ndarray)


def _column_view(rows, lead, groups):
    """[groups, padded] -> the [rows, groups] view of its first rows columns (x's leading shape for rows)."""
    def view(base):
        v = base[:, :rows].T
        return v if len(lead) == 1 else v.reshape(lead + (groups,))
    return view


class _New:
    """A new output: `target` is what the library writes, `result()` what the caller gets back."""

    __slots__ = ("target", "convert")

    def __init__(self, target, convert=None):
        self.target = target
        self.convert = convert

    def result(self):
        return self.convert(self.target) if self.convert else self.target


def _numpy_dtype(tn_dtype, what):
    np = sys.modules.get("numpy") or __import__("numpy")
    if tn_dtype in (TN_F8_E4M3, TN_F8_E5M2):
        try:
            import ml_dtypes
        except ImportError:
            raise ImportError(f"tnorm: {what} is {_DTYPE_NAMES[tn_dtype]}, which NumPy has only through ml_dtypes; "
                              f"install it (pip install ml_dtypes)") from None
        return np.dtype(ml_dtypes.float8_e4m3fn if tn_dtype == TN_F8_E4M3 else ml_dtypes.float8_e5m2)
    return np.dtype({TN_F32: np.float32, TN_I8: np.int8, TN_U8: np.uint8}[tn_dtype])


def _torch_dtype(torch, tn_dtype, what):
    name = _DTYPE_NAMES[tn_dtype]
    dt = getattr(torch, name, None)
    if dt is None:
        raise RuntimeError(f"tnorm: {what} is {name}, which this torch ({torch.__version__}) lacks (torch >= 2.1 "
                           f"has it)")
    return dt


def _new(c, shape, tn_dtype, what, view=None):
    """A new C-contiguous array of x's library, shape and storage dtype on x's device (as _ops allocates y),
    returned through `view` (applied after the call)."""
    x = c.x_obj
    lib = _dlpack.library_of(x)
    if lib == "numpy":
        np = sys.modules["numpy"]
        return _New(np.empty(shape, dtype=_numpy_dtype(tn_dtype, what)), view)
    if lib == "torch":
        torch = sys.modules["torch"]
        return _New(torch.empty(shape, dtype=_torch_dtype(torch, tn_dtype, what), device=x.device), view)
    if lib == "cupy":
        cupy = sys.modules["cupy"]
        with x.device:
            return _New(cupy.empty(shape, dtype=_numpy_dtype(tn_dtype, what)), view)
    xp = x.__array_namespace__() if hasattr(x, "__array_namespace__") else None
    if c.on_cuda:
        if xp is None:
            raise TypeError(f"{c.op}: cannot allocate the {what} for a {type(x).__qualname__} on CUDA")
        return _New(xp.empty(shape, dtype=_numpy_dtype(tn_dtype, what), device=x.device), view)
    np = sys.modules.get("numpy") or __import__("numpy")
    buf = np.empty(shape, dtype=_numpy_dtype(tn_dtype, what))
    if xp is None:
        return _New(buf, view)
    return _New(buf, (lambda b: xp.asarray(view(b))) if view else xp.asarray)


def _scale_array(c, value):
    """A Python float as a one-element float32 array of x's library on x's device (on CUDA a copy from the
    host each call: a CUDA graph captures the address, not the value, so pass a tensor there)."""
    x = c.x_obj
    lib = _dlpack.library_of(x)
    if lib == "torch":
        torch = sys.modules["torch"]
        return torch.full((1,), value, dtype=torch.float32, device=x.device)
    np = sys.modules.get("numpy") or __import__("numpy")
    host = np.full((1,), value, dtype=np.float32)
    if not c.on_cuda:
        return host
    if lib == "cupy":
        cupy = sys.modules["cupy"]
        with x.device:
            return cupy.asarray(host)
    raise TypeError(f"{c.op}: scale as a Python float on CUDA is made for torch and cupy arrays; pass a "
                    f"one-element float32 array on x's device")
