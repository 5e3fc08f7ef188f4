"""Finding and loading libtnorm, its prototypes, statuses as Python exceptions, per-thread contexts.

Nothing here runs at import time: the library is looked for on the first call, so `import tnorm`
works on a machine without it and the failure names every place that was searched.
"""

import atexit
import ctypes
import ctypes.util
import glob
import os
import threading
import weakref

# ---- the C structures (mirrors of include/tnorm.h; enums are C ints) ----

TN_F32, TN_F16, TN_BF16 = 0, 1, 2
# Storage of quantized outputs and their scales only: no op computes in them.
TN_F8_E4M3, TN_F8_E5M2, TN_I8, TN_U8 = 3, 4, 5, 6
TN_DEVICE_CPU, TN_DEVICE_CUDA = 0, 1


class Device(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("index", ctypes.c_int)]


class Tensor(ctypes.Structure):
    """tn_tensor: rows x dim elements, row r at element r * row_stride from data."""
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("dtype", ctypes.c_int),
        ("rows", ctypes.c_int64),
        ("dim", ctypes.c_int64),
        ("row_stride", ctypes.c_int64),
        ("device", Device),
        ("heads", ctypes.c_int64),  # 0 or 1: a 2-D view
        ("head_stride", ctypes.c_int64),
    ]


class Rope(ctypes.Structure):
    """tn_rope: the rotation fused after rms_norm."""
    _fields_ = [
        ("style", ctypes.c_int),
        ("rotary_dim", ctypes.c_int64),
        ("positions", ctypes.c_void_p),
        ("positions_i64", ctypes.c_int),
        ("theta", ctypes.c_float),
        ("cos_sin", ctypes.POINTER(Tensor)),
    ]


class Quant(ctypes.Structure):
    """tn_quant: a quantized output, its scaling and its tensors."""
    _fields_ = [
        ("format", ctypes.c_int),
        ("scaling", ctypes.c_int),
        ("group_size", ctypes.c_int64),
        ("source", ctypes.c_int),
        ("pow2_scales", ctypes.c_int),
        ("layout", ctypes.c_int),
        ("scale_ub", ctypes.c_float),
        ("scale_min", ctypes.c_float),
        ("q", ctypes.POINTER(Tensor)),
        ("scale", ctypes.POINTER(Tensor)),
        ("scales", ctypes.POINTER(Tensor)),
    ]


class OpArgs(ctypes.Structure):
    """tn_op_args: one descriptor for every op (tn_op_run)."""
    _fields_ = [
        ("op", ctypes.c_int),
        ("x", ctypes.POINTER(Tensor)),
        ("weight", ctypes.POINTER(Tensor)),
        ("mul", ctypes.POINTER(Tensor)),
        ("residual", ctypes.POINTER(Tensor)),
        ("y", ctypes.POINTER(Tensor)),
        ("residual_out", ctypes.POINTER(Tensor)),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
        ("weight_offset", ctypes.c_float),
        ("bias", ctypes.POINTER(Tensor)),
        ("casting", ctypes.c_int),
        ("residual_mode", ctypes.c_int),
        ("l2_mode", ctypes.c_int),
        ("rope", Rope),
        ("quant", Quant),
    ]


# tn_op, and the modes' enumerators, by the names the Python functions take
TN_OP_RMS_NORM, TN_OP_L2_NORM, TN_OP_ADD_RMS_NORM, TN_OP_LAYER_NORM, TN_OP_ADD_LAYER_NORM = 0, 1, 2, 6, 7
TN_OP_QUANTIZE = 8
CASTINGS = {"exact": 0, "llama": 1}
RESIDUAL_MODES = {"stored": 0, "f32": 1}
L2_CONVENTIONS = {"rsqrt_eps": 0, "max_norm_eps": 1}
ROPE_STYLES = {"neox": 1, "gptj": 2}
QUANT_FORMATS = {"fp8_e4m3": 1, "fp8_e5m2": 2, "int8": 3, "mxfp8": 4, "nvfp4": 5}
TN_QUANT_MXFP8, TN_QUANT_NVFP4 = 4, 5
TN_QUANT_SCALE_TENSOR, TN_QUANT_SCALE_TOKEN, TN_QUANT_SCALE_GROUP = 0, 1, 2
QUANT_SOURCES = {"rounded": 0, "f32": 1}
SCALES_LAYOUTS = {"row": 0, "column": 1, "swizzled": 2}
TN_SCALES_COLUMN_MAJOR, TN_SCALES_SWIZZLED = 1, 2


# ---- statuses -> exceptions ----

# Everything the caller got wrong (shapes, strides, dtypes that do not agree, scalars, overlap) is a
# ValueError; the binding itself refuses unsupported dtypes with TypeError before calling the library.
# What depends on the machine (device, backend, memory) is a RuntimeError.
_VALUE_ERRORS = {1, 2, 3, 4, 5, 6, 7}  # NULL, SHAPE, DTYPE, VALUE, OVERLAP, OVERFLOW, OPERAND

_PTR = ctypes.c_void_p
_T = ctypes.POINTER(Tensor)
_F = ctypes.c_float
_PROTOTYPES = {
    "tn_version": (ctypes.c_char_p, []),
    "tn_status_name": (ctypes.c_char_p, [ctypes.c_int]),
    "tn_context_create": (ctypes.c_int, [ctypes.POINTER(_PTR)]),
    "tn_context_destroy": (None, [_PTR]),
    "tn_context_last_error": (ctypes.c_char_p, [_PTR]),
    "tn_context_set_stream": (ctypes.c_int, [_PTR, ctypes.c_int, _PTR]),
    "tn_device_available": (ctypes.c_int, [_PTR, ctypes.c_int]),
    "tn_rms_norm": (ctypes.c_int, [_PTR, _T, _T, _F, _F, _T]),
    "tn_rms_norm_mul": (ctypes.c_int, [_PTR, _T, _T, _F, _T, _F, _T]),
    "tn_l2_norm": (ctypes.c_int, [_PTR, _T, _F, _F, _T]),
    "tn_add_rms_norm": (ctypes.c_int, [_PTR, _T, _T, _T, _F, _F, _T, _T]),
    "tn_add_rms_norm_mul": (ctypes.c_int, [_PTR, _T, _T, _T, _F, _T, _F, _T, _T]),
    "tn_op_run": (ctypes.c_int, [_PTR, ctypes.POINTER(OpArgs)]),
}
# Entry points of later libraries, set up when present: a library without them still runs every op that
# needs none of them, and a call that does says which library is too old (require()).
_OPTIONAL_PROTOTYPES = {
    "tn_quant_init": (Quant, [ctypes.c_int]),
}

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

_load_lock = threading.Lock()
_lib = None
_lib_path = None


def _candidates():
    """Where the library may be, in order, as (description, path or None)."""
    env = os.environ.get("TNORM_LIBRARY")
    if env:
        # An explicit choice is final: never fall back to another copy behind the user's back.
        return [(f"TNORM_LIBRARY={env}", env)]
    found = [("TNORM_LIBRARY (unset)", None)]
    beside = sorted(glob.glob(os.path.join(_PACKAGE_DIR, "libtnorm*.so*")))
    pattern = os.path.join(_PACKAGE_DIR, "libtnorm*.so*")
    found += [(f"{p} (beside the package)", p) for p in beside] or [(f"{pattern} (no match)", None)]
    name = ctypes.util.find_library("tnorm")
    found.append((f"ctypes.util.find_library('tnorm') -> {name}" if name else
                   "ctypes.util.find_library('tnorm') (nothing found)", name))
    return found


def _load():
    tried = []
    for what, path in _candidates():
        if path is None:
            tried.append(what)
            continue
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            tried.append(f"{what}: {e}")
            if what.startswith("TNORM_LIBRARY="):
                break
            continue
        missing = [name for name in _PROTOTYPES if not hasattr(lib, name)]
        if missing:  # an older or foreign library: say which, and look no further when it was named
            tried.append(f"{what}: {path} lacks {', '.join(missing)} (a libtnorm older than this package?)")
            if what.startswith("TNORM_LIBRARY="):
                break
            continue
        for name, (restype, argtypes) in _PROTOTYPES.items():
            fn = getattr(lib, name)
            fn.restype = restype
            fn.argtypes = argtypes
        for name, (restype, argtypes) in _OPTIONAL_PROTOTYPES.items():
            if hasattr(lib, name):
                fn = getattr(lib, name)
                fn.restype = restype
                fn.argtypes = argtypes
        return lib, path
    raise RuntimeError("tnorm: cannot load the shared library libtnorm; looked at:\n  " + "\n  ".join(tried) +
                       "\nBuild it (cmake --build build) and set TNORM_LIBRARY to build/libtnorm.so, or copy "
                       "libtnorm.so into the tnorm package directory.")


def lib():
    """The loaded library (loaded on first use; RuntimeError naming where it looked when absent)."""
    global _lib, _lib_path
    if _lib is None:
        with _load_lock:
            if _lib is None:
                loaded, path = _load()
                _lib_path = path  # first: a thread that sees _lib set also sees its path
                _lib = loaded
    return _lib


def require(name, what):
    """The loaded library's entry point `name`; RuntimeError saying that `what` needs a newer library when
    it lacks it (an older libtnorm would ignore the fields this package fills in for it)."""
    fn = getattr(lib(), name, None)
    if fn is None:
        raise RuntimeError(f"tnorm: {what} needs a libtnorm with {name}; {_lib_path} lacks it (a libtnorm older "
                           f"than this package?)")
    return fn


def library_path():
    lib()
    return _lib_path


def library_version():
    return lib().tn_version().decode()


def cuda_available():
    """Whether the loaded library can run ops on CUDA devices here (built with CUDA, driver and GPU found)."""
    return lib().tn_device_available(context(), TN_DEVICE_CUDA) == 0


# ---- one context per thread ----

class _Context:
    """A tn_context owned by one thread; destroyed when that thread's locals go, or at exit."""

    def __init__(self):
        handle = _PTR()
        st = lib().tn_context_create(ctypes.byref(handle))
        if st != 0:
            raise RuntimeError(f"tnorm: tn_context_create failed: {lib().tn_status_name(st).decode()}")
        self.handle = handle
        self.cuda_stream = None  # the stream last set for CUDA on this context (None: never set)
        # Calls prepared for this context's thread (_ops' fast path for torch tensors): their argument
        # structures are rewritten on every call, so no other thread may share them.
        self.calls = {}
        self.thread = weakref.ref(threading.current_thread())
        with _registry_lock:
            _registry.add(self)

    def destroy(self):
        with _registry_lock:
            if self.handle is None:
                return
            handle, self.handle = self.handle, None
            self.calls = {}  # so the next call misses and goes the general way, which makes a new context
            _registry.discard(self)
        _lib.tn_context_destroy(handle)

    def __del__(self):
        try:
            self.destroy()
        except Exception:  # interpreter shutdown: module state may already be gone
            pass


# Weak, so that a finished thread's context goes with its thread-local storage. Re-entrant, because a
# collection that runs __del__ may start while this thread holds it.
_registry_lock = threading.RLock()
_registry = weakref.WeakSet()
_local = threading.local()


def context_object():
    """This thread's _Context, created on first use."""
    ctx = getattr(_local, "ctx", None)
    if ctx is None or ctx.handle is None:  # none yet, or destroyed by the exit-time cleanup
        ctx = _Context()
        _local.ctx = ctx
    return ctx


def context():
    """This thread's context handle, created on first use."""
    return context_object().handle


def set_cuda_stream(stream):
    """Queues this thread's later CUDA calls on `stream` (an int; 0: the legacy default stream). The
    context is this binding's own, so the stream last set is remembered and not set again."""
    ctx = context_object()
    if ctx.cuda_stream != stream:
        raise_for_status(lib().tn_context_set_stream(ctx.handle, TN_DEVICE_CUDA, stream or None))
        ctx.cuda_stream = stream


@atexit.register
def _destroy_contexts_at_exit():
    # A daemon thread may still be inside a call on its context: leave those to the OS.
    with _registry_lock:
        contexts = list(_registry)
    me = threading.current_thread()
    for c in contexts:
        t = c.thread()
        if t is None or t is me or not t.is_alive():
            c.destroy()


def _forget_contexts_after_fork():
    # The child has none of the parent's CPU worker threads: destroying (joining) them would hang, so
    # the child starts afresh and leaves the parent's contexts alone.
    # The lock is replaced, not taken: another thread of the parent may have held it at the fork.
    global _local, _registry_lock
    _registry_lock = threading.RLock()
    for c in list(_registry):
        c.handle = None
        c.calls = {}
    _registry.clear()
    _local = threading.local()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_contexts_after_fork)


def op_run_unchecked():
    """tn_op_run as a function object of its own without argtypes, for callers that pass the context's
    c_void_p and a ctypes.byref of an OpArgs themselves: ctypes then converts nothing (about a third of a
    microsecond less a call). The shared lib().tn_op_run keeps its checked prototype."""
    library = lib()
    fn = library._FuncPtr(("tn_op_run", library))
    fn.restype = ctypes.c_int
    return fn


def raise_for_status(status):
    """Raises the exception for a failed call on this thread's context, with the library's message."""
    if status == 0:
        return
    message = lib().tn_context_last_error(context()).decode(errors="replace")
    name = lib().tn_status_name(status).decode()
    exc = (ValueError if status in _VALUE_ERRORS else RuntimeError)(message or name)
    exc.status = name
    raise exc
