"""Reading an array through the DLPack protocol into a tn_tensor view, without copying.

`export(obj, name, stream)` calls obj.__dlpack__(), reads the DLManagedTensor behind the capsule and
returns a View: the tn_tensor (rows x dim with a row stride) plus the capsule, which must stay
referenced until the C call has returned.

Ownership: the capsule is never renamed to "used_dltensor", so it stays the producer's. When the last
reference to it goes, the destructor the producer gave it sees the name still "dltensor" (or
"dltensor_versioned") and calls the tensor's deleter exactly once. Calling the deleter ourselves as well
would free it twice; renaming without calling it would leak.

torch tensors on the CPU or on CUDA (when the op runs on torch's current stream) are read from their own
attributes (pointer, shape, strides): about 5 us a tensor against about 20 us through a capsule. NumPy arrays are read
through their array interface instead: the same description at a fraction of the
cost (5.8 us against 15 us an array here), and it covers what numpy's export refuses (ml_dtypes'
bfloat16, read-only arrays). Every other type goes through DLPack.
"""

import ctypes
import struct
import sys

from ._lib import (TN_BF16, TN_DEVICE_CPU, TN_DEVICE_CUDA, TN_F8_E4M3, TN_F8_E5M2, TN_F16, TN_F32, TN_I8, TN_U8,
                   Device, Tensor)

# DLDeviceType values (dlpack.h)
KDL_CPU, KDL_CUDA, KDL_CUDA_HOST, KDL_CUDA_MANAGED = 1, 2, 3, 13
_DEVICE_NAMES = {1: "CPU", 2: "CUDA", 3: "CUDA pinned host", 4: "OpenCL", 7: "Vulkan", 8: "Metal", 9: "VPI",
                 10: "ROCm", 11: "ROCm host", 13: "CUDA managed", 14: "oneAPI"}

# (DLDataTypeCode, bits) -> tn_dtype; lanes must be 1. kDLFloat = 2, kDLBfloat = 4.
_DTYPES = {(2, 32): TN_F32, (2, 16): TN_F16, (4, 16): TN_BF16}
_DTYPE_SIZE = {TN_F32: 4, TN_F16: 2, TN_BF16: 2}
# What a quantized output and its scales are stored in (export(..., storage=True)): kDLInt = 0, kDLUInt = 1,
# kDLFloat8_e4m3fn = 10, kDLFloat8_e5m2 = 12 (DLPack 1.1).
_STORAGE_DTYPES = {(2, 32): TN_F32, (10, 8): TN_F8_E4M3, (12, 8): TN_F8_E5M2, (0, 8): TN_I8, (1, 8): TN_U8}
_DL_CODE_NAMES = {0: "int", 1: "uint", 2: "float", 3: "opaque handle", 4: "bfloat", 5: "complex", 6: "bool",
                  10: "float8_e4m3fn", 12: "float8_e5m2"}
_STORAGE_TEXT = "float32, float8_e4m3fn, float8_e5m2, int8 and uint8"

_FLAG_READ_ONLY = 1 << 0  # DLPACK_FLAG_BITMASK_READ_ONLY
_FLAG_IS_COPIED = 1 << 1  # DLPACK_FLAG_BITMASK_IS_COPIED


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),  # NULL: C-contiguous
        ("byte_offset", ctypes.c_uint64),
    ]


class DLManagedTensor(ctypes.Structure):
    # The deleter is a void(*)(DLManagedTensor*): kept as a plain pointer since we never call it.
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


class DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [
        ("version", DLPackVersion),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),
        ("flags", ctypes.c_uint64),
        ("dl_tensor", DLTensor),
    ]


# Private prototypes over the Python C API: setting argtypes on ctypes.pythonapi's shared function
# objects would change them for every other user in the process.
_capsule_get_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(("PyCapsule_GetName", ctypes.pythonapi))
_capsule_get_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi))


class View:
    """One operand as the library sees it. `keep` holds what owns the memory until the call returns."""

    __slots__ = ("tensor", "shape", "readonly", "copied", "keep")

    def __init__(self, tensor, shape, readonly, copied, keep):
        self.tensor = tensor
        self.shape = shape
        self.readonly = readonly
        self.copied = copied
        self.keep = keep

    @property
    def rows_dim(self):
        return self.tensor.rows, self.tensor.dim


def _is_numpy_array(obj):
    np = sys.modules.get("numpy")
    return np is not None and isinstance(obj, np.ndarray)


def _is_torch_tensor(obj):
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def library_of(obj):
    """'numpy', 'torch', 'cupy', or the top-level module of obj's type. A torch.Tensor subclass defined
    elsewhere is still torch's: its work is on torch's current stream."""
    if _is_torch_tensor(obj):
        return "torch"
    return type(obj).__module__.partition(".")[0]


def device_of(obj, name):
    """(DLDeviceType, device id) of an array, from __dlpack_device__ (a torch tensor's own device for
    CPU and CUDA tensors: the same answer, without the Python-level protocol method)."""
    if _is_torch_tensor(obj):
        dev = obj.device
        if dev.type == "cuda":
            return KDL_CUDA, dev.index
        if dev.type == "cpu":
            return KDL_CPU, 0
    if not hasattr(obj, "__dlpack__"):
        raise TypeError(f"{name}: expected an array supporting DLPack (numpy, torch, cupy, jax...), "
                        f"got {type(obj).__module__}.{type(obj).__qualname__}")
    if not hasattr(obj, "__dlpack_device__"):
        raise TypeError(f"{name}: {type(obj).__qualname__} has __dlpack__ but no __dlpack_device__")
    dev_type, dev_id = obj.__dlpack_device__()
    return int(dev_type), int(dev_id)


def _tn_device(dev_type, dev_id, name):
    if dev_type == KDL_CPU:
        return Device(TN_DEVICE_CPU, 0)
    if dev_type == KDL_CUDA:
        return _cuda_device(dev_id)
    # Pinned or managed memory is reachable from the host, but a CPU call would not wait for the work a
    # stream may still be doing on it: refuse rather than guess.
    what = _DEVICE_NAMES.get(dev_type, f"type {dev_type}")
    raise ValueError(f"{name}: is in {what} memory (DLPack device type {dev_type}); tnorm takes CPU or CUDA "
                     f"device arrays")


def _rows(shape, strides, name, heads=False):
    """(rows, dim, row_stride, heads, head_stride) of an N-d array.

    Leading dimensions collapse into rows when they can without a copy. A 3-D array whose leading two
    cannot (Q heads sliced out of a packed QKV buffer), or any 3-D array when `heads` is asked for (a
    rope needs its rows to be tokens), is a 3-D view [rows, heads, dim]."""
    n = len(shape)
    if not heads:  # the common cases, in short: a 2-D or 1-D array with contiguous rows
        if n == 2 and strides[1] == 1 and shape[1] > 0:
            r, d = shape
            return r, d, strides[0] if r > 1 else d, 1, d
        if n == 1 and shape[0] > 0 and strides[0] == 1:
            return 1, shape[0], shape[0], 1, shape[0]
    if n == 0:
        raise ValueError(f"{name}: is 0-dimensional; needs at least one dimension (1-D is one row)")
    dim = shape[-1]
    rows = 1
    for k in shape[:-1]:
        rows *= k
    if rows == 0 or dim == 0:
        return rows, dim, dim, 1, dim  # no element: strides mean nothing (the library refuses dim 0 itself)
    if dim > 1 and strides[-1] != 1:
        raise ValueError(f"{name}: its last dimension has stride {strides[-1]} elements; must be 1 "
                         f"(rows of contiguous elements)")
    if heads and n == 3:
        return _heads_layout(shape, strides)
    # Dimensions of size 1 take no part in the layout, whatever stride they report.
    lead = [(k, s) for k, s in zip(shape[:-1], strides[:-1]) if k != 1]
    if not lead:
        return rows, dim, dim, 1, dim
    for (n0, s0), (n1, s1) in zip(lead, lead[1:]):
        if s0 != s1 * n1:
            if n == 3:
                return _heads_layout(shape, strides)
            raise ValueError(f"{name}: shape {tuple(shape)} with strides {tuple(strides)} (elements) cannot be "
                             f"viewed as rows x {dim} without a copy")
    return rows, dim, lead[-1][1], 1, dim


def _heads_layout(shape, strides):
    """A 3-D [rows, heads, dim] view; strides of dimensions of size 1 are replaced by ones the library takes
    (they address nothing)."""
    rows, heads, dim = shape
    head_stride = strides[1] if heads > 1 else dim
    span = (heads - 1) * head_stride + dim
    return rows, dim, strides[0] if rows > 1 else span, heads, head_stride


def _view(data, dtype, shape, strides, device, readonly, copied, keep, name, heads=False):
    rows, dim, row_stride, n_heads, head_stride = _rows(shape, strides, name, heads)
    t = Tensor(data or None, dtype, rows, dim, row_stride, device, n_heads, head_stride)
    # torch.Size is already a tuple: no copy for the common case.
    return View(t, shape if isinstance(shape, tuple) else tuple(shape), readonly, copied, keep)


def _dtype_from_dl(code, bits, lanes, name, storage=False):
    tn = (_STORAGE_DTYPES if storage else _DTYPES).get((code, bits)) if lanes == 1 else None
    if tn is None:
        kind = _DL_CODE_NAMES.get(code, f"code {code}")
        lane_text = f"x{lanes}" if lanes != 1 else ""
        takes = _STORAGE_TEXT if storage else "float32, float16 and bfloat16"
        raise TypeError(f"{name}: unsupported dtype {kind}{bits}{lane_text}; tnorm takes {takes}")
    return tn


# The same layouts as the Structures above, read in one unpack each: a call reads three or four tensors,
# and going field by field through ctypes objects costs several microseconds per tensor.
_HEAD_VERSIONED = struct.Struct("=IIQQQ")  # version.major, version.minor, manager_ctx, deleter, flags
_TENSOR = struct.Struct("=QiiiBBHQQQ")  # data, device type and id, ndim, dtype code/bits/lanes, shape, strides, offset
assert _HEAD_VERSIONED.size == DLManagedTensorVersioned.dl_tensor.offset
assert _TENSOR.size == ctypes.sizeof(DLTensor) and DLManagedTensor.dl_tensor.offset == 0


def _read_capsule(capsule, name, heads=False, index=False, storage=False):
    kind = _capsule_get_name(capsule) if type(capsule).__name__ == "PyCapsule" else None
    if kind == b"dltensor_versioned":
        raw = ctypes.string_at(_capsule_get_pointer(capsule, kind), _HEAD_VERSIONED.size + _TENSOR.size)
        major, minor, _, _, flags = _HEAD_VERSIONED.unpack_from(raw)
        if major != 1:
            raise TypeError(f"{name}: DLPack version {major}.{minor} is not supported (asked for 1.x)")
        fields = _TENSOR.unpack_from(raw, _HEAD_VERSIONED.size)
    elif kind == b"dltensor":
        fields = _TENSOR.unpack(ctypes.string_at(_capsule_get_pointer(capsule, kind), _TENSOR.size))
        flags = 0
    else:
        raise TypeError(f"{name}: __dlpack__ did not return a DLPack capsule (got {capsule!r})")
    data, dev_type, dev_id, ndim, code, bits, lanes, shape_ptr, strides_ptr, byte_offset = fields
    if index:
        return _index_view(data + byte_offset, code, bits, lanes, ndim, shape_ptr, strides_ptr,
                           (dev_type, dev_id), capsule, name)
    dtype = _dtype_from_dl(code, bits, lanes, name, storage)
    int64s = ctypes.c_int64 * ndim
    shape = int64s.from_address(shape_ptr)[:] if ndim else []
    if strides_ptr:
        strides = int64s.from_address(strides_ptr)[:] if ndim else []
    else:  # NULL strides: C-contiguous
        strides, step = [0] * ndim, 1
        for i in reversed(range(ndim)):
            strides[i] = step
            step *= shape[i]
    device = _tn_device(dev_type, dev_id, name)
    return _view(data + byte_offset, dtype, shape, strides, device, bool(flags & _FLAG_READ_ONLY),
                 bool(flags & _FLAG_IS_COPIED), capsule, name, heads)


_CPU = Device(TN_DEVICE_CPU, 0)
_CUDA = {}  # CUDA device index -> Device, made once (a ctypes Structure costs about a microsecond)


def _cuda_device(index):
    d = _CUDA.get(index)
    if d is None:
        d = _CUDA[index] = Device(TN_DEVICE_CUDA, index)
    return d
_numpy_dtypes = None  # numpy dtype -> tn dtype, made on first use (bfloat16 when ml_dtypes is installed)


def _numpy_dtype_map():
    global _numpy_dtypes
    if _numpy_dtypes is None:  # built whole, then published: another thread never sees it half made
        np = sys.modules["numpy"]
        m = {np.dtype(np.float32): TN_F32, np.dtype(np.float16): TN_F16}
        try:
            import ml_dtypes  # numpy has no bfloat16 of its own
            m[np.dtype(ml_dtypes.bfloat16)] = TN_BF16
        except ImportError:
            pass
        _numpy_dtypes = m
    return _numpy_dtypes


def numpy_dtype_of(tn_dtype):
    """The numpy dtype of a tn dtype (KeyError for bfloat16 without ml_dtypes)."""
    return next(dt for dt, t in _numpy_dtype_map().items() if t == tn_dtype)


_numpy_storage = None  # numpy dtype -> tn storage dtype (the float8 ones when ml_dtypes is installed)


def _numpy_storage_map():
    global _numpy_storage
    if _numpy_storage is None:
        np = sys.modules["numpy"]
        m = {np.dtype(np.float32): TN_F32, np.dtype(np.int8): TN_I8, np.dtype(np.uint8): TN_U8}
        try:
            import ml_dtypes  # numpy has no float8 of its own
            m[np.dtype(ml_dtypes.float8_e4m3fn)] = TN_F8_E4M3
            m[np.dtype(ml_dtypes.float8_e5m2)] = TN_F8_E5M2
        except ImportError:
            pass
        _numpy_storage = m
    return _numpy_storage


def _numpy_view(arr, name, heads=False, storage=False):
    """A NumPy array read through its array interface."""
    dt = arr.dtype
    dtype = (_numpy_storage_map() if storage else _numpy_dtype_map()).get(dt)
    if dtype is None:
        takes = (_STORAGE_TEXT + " (float8 from ml_dtypes)" if storage else
                 "float32, float16 and bfloat16 (bfloat16 from ml_dtypes)")
        raise TypeError(f"{name}: unsupported dtype {dt}; tnorm takes {takes}")
    size = dt.itemsize
    byte_strides = arr.strides
    if any(s % size for s in byte_strides):
        raise ValueError(f"{name}: strides {byte_strides} (bytes) are not whole elements of {size} bytes")
    iface = arr.__array_interface__
    return _view(iface["data"][0], dtype, arr.shape, [s // size for s in byte_strides], _CPU,
                 iface["data"][1], False, arr, name, heads)


_torch_dtypes = None  # torch dtype -> tn dtype, made on first use
_torch_storage = None  # torch dtype -> tn storage dtype, made on first use


def _torch_storage_map(torch):
    global _torch_storage
    if _torch_storage is None:
        m = {torch.float32: TN_F32, torch.int8: TN_I8, torch.uint8: TN_U8}
        for attr, tn in (("float8_e4m3fn", TN_F8_E4M3), ("float8_e5m2", TN_F8_E5M2)):  # torch >= 2.1
            if hasattr(torch, attr):
                m[getattr(torch, attr)] = tn
        _torch_storage = m
    return _torch_storage


def _torch_view(t, name, cuda_stream, stream_owner, heads=False, storage=False):
    """A View of a torch tensor read from its own attributes, or None to leave it to DLPack.

    torch's DLPack export costs tens of microseconds a tensor (a decode step passes three or four); the
    tensor's pointer, shape and strides say the same. Left to DLPack (which refuses what tnorm cannot
    take, or orders torch's pending work on the tensor before our stream): layouts other than strided,
    devices other than CPU and CUDA, and CUDA tensors when the op does not run on torch's current stream.
    (export resolves lazily negated views first.)"""
    global _torch_dtypes
    torch = sys.modules["torch"]
    if _torch_dtypes is None:
        _torch_dtypes = {torch.float32: TN_F32, torch.float16: TN_F16, torch.bfloat16: TN_BF16}
    if t.layout != torch.strided or t.is_neg():
        return None
    dtype = (_torch_storage_map(torch) if storage else _torch_dtypes).get(t.dtype)
    if dtype is None:
        kind = str(t.dtype).rpartition(".")[2]  # "float64", as for the other array types
        takes = _STORAGE_TEXT if storage else "float32, float16 and bfloat16"
        raise TypeError(f"{name}: unsupported dtype {kind}; tnorm takes {takes}")
    if t.is_cpu:
        device = _CPU
    elif t.is_cuda and (cuda_stream is None or stream_owner == "torch"):
        device = _cuda_device(t.get_device())
    else:
        return None
    return _view(t.data_ptr(), dtype, t.shape, t.stride(), device, False, False, t, name, heads)


def dlpack_stream(stream):
    """The `stream` argument of __dlpack__ for our CUDA stream: 1 names the legacy default stream, since
    the protocol reserves 0 as ambiguous."""
    return 1 if not stream else stream


def export(obj, name, cuda_stream=None, stream_owner=None, device=None, heads=False, storage=False):
    """A View of obj. cuda_stream: the stream the op will run on (an int), when it runs on a CUDA device;
    a CUDA producer then orders its pending work on obj before that stream, as the protocol asks.
    stream_owner: the library whose current stream cuda_stream is (or None). Its own arrays are exported
    with stream=-1 (no synchronisation): their pending work is already on that stream, and torch's
    cross-stream check costs more than the rest of the export. device: obj's device_of(), when known.
    storage: obj is a quantized output or its scales, of a storage dtype (float32, fp8, int8, uint8)."""
    if _is_torch_tensor(obj):
        if obj.is_neg():
            # A lazily negated view (torch._neg_view, .conj().imag) holds its values un-negated in memory,
            # and DLPack exports the memory as it is: read, it is resolved into a copy (kept until the call
            # returns); as an output it is refused, since a result written there would be lost (`copied`).
            view = export(obj.resolve_neg(), name, cuda_stream, stream_owner, device, heads, storage)
            view.copied = True
            return view
        view = _torch_view(obj, name, cuda_stream, stream_owner, heads, storage)
        if view is not None:
            return view
    if _is_numpy_array(obj):
        # The array interface gives what a DLPack export would, at a fraction of the cost of making and
        # reading a capsule (a decode step calls with three or four small arrays), and takes what
        # numpy's export refuses: read-only arrays (inputs) and ml_dtypes' bfloat16.
        return _numpy_view(obj, name, heads, storage)
    dev_type, dev_id = device or device_of(obj, name)
    if dev_type != KDL_CPU and dev_type != KDL_CUDA:
        _tn_device(dev_type, dev_id, name)  # refuses it before asking for an export
    if _is_torch_tensor(obj) and obj.requires_grad:
        obj = obj.detach()  # torch refuses to export a tensor that requires grad; we only read or write memory
    return _read_capsule(_capsule(obj, dev_type, cuda_stream, stream_owner), name, heads, storage=storage)


def _capsule(obj, dev_type, cuda_stream, stream_owner):
    """obj.__dlpack__(), with the stream a CUDA producer must order its pending work before."""
    kwargs = {}
    if dev_type == KDL_CUDA and cuda_stream is not None:
        same = stream_owner is not None and library_of(obj) == stream_owner
        kwargs["stream"] = -1 if same else dlpack_stream(cuda_stream)
    try:
        return obj.__dlpack__(max_version=(1, 0), **kwargs)
    except TypeError:  # a producer from before DLPack 1.0 takes no max_version
        return obj.__dlpack__(**kwargs)


# ---- integer index arrays (a rope's positions) ----

class Index:
    """A 1-D run of int32 or int64 values: its address, whether they are int64, its element count, its
    (DLDeviceType, id), and what owns the memory until the call returns."""

    __slots__ = ("data", "is_i64", "count", "device", "keep")

    def __init__(self, data, is_i64, count, device, keep):
        self.data, self.is_i64, self.count, self.device, self.keep = data, is_i64, count, device, keep


def _index_view(data, code, bits, lanes, ndim, shape_ptr, strides_ptr, device, keep, name):
    if code != 0 or bits not in (32, 64) or lanes != 1:
        kind = _DL_CODE_NAMES.get(code, f"code {code}")
        raise TypeError(f"{name}: dtype {kind}{bits}; must be int32 or int64")
    int64s = ctypes.c_int64 * ndim
    shape = int64s.from_address(shape_ptr)[:] if ndim else []
    strides = int64s.from_address(strides_ptr)[:] if ndim and strides_ptr else None
    return _index_checked(data, bits == 64, shape, strides, device, keep, name)


def _index_checked(data, is_i64, shape, strides, device, keep, name):
    count = 1
    for k in shape:
        count *= k
    if strides is not None and count > 1:
        step = 1
        for k, s in zip(reversed(shape), reversed(strides)):
            if k != 1 and s != step:
                raise ValueError(f"{name}: must be contiguous (shape {tuple(shape)}, strides {tuple(strides)})")
            step *= k
    return Index(data or None, is_i64, count, device, keep)


def export_index(obj, name, cuda_stream=None, stream_owner=None):
    """An Index of an int32/int64 array (torch, numpy, or any DLPack producer)."""
    if _is_torch_tensor(obj):
        torch = sys.modules["torch"]
        if obj.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name}: dtype {str(obj.dtype).rpartition('.')[2]}; must be int32 or int64")
        dev = obj.device
        device = (KDL_CUDA, dev.index) if dev.type == "cuda" else (KDL_CPU, 0) if dev.type == "cpu" else None
        if device is not None and (dev.type == "cpu" or cuda_stream is None or stream_owner == "torch"):
            return _index_checked(obj.data_ptr(), obj.dtype == torch.int64, list(obj.shape), list(obj.stride()),
                                  device, obj, name)
    if _is_numpy_array(obj):
        np = sys.modules["numpy"]
        if obj.dtype not in (np.dtype(np.int32), np.dtype(np.int64)):
            raise TypeError(f"{name}: dtype {obj.dtype}; must be int32 or int64")
        size = obj.dtype.itemsize
        return _index_checked(obj.__array_interface__["data"][0], size == 8, list(obj.shape),
                              [s // size for s in obj.strides], (KDL_CPU, 0), obj, name)
    dev_type, _ = device_of(obj, name)
    return _read_capsule(_capsule(obj, dev_type, cuda_stream, stream_owner), name, index=True)
