"""Helpers for the black-box tests of the `tnorm` command.

Everything here is independent of the command's own code: tensor files are written and read by hand
(.npy through numpy, .safetensors by a small writer/reader of our own so that malformed variants are easy
to build), and the reference is float64 numpy following the contract's semantics.
"""

import json
import os
import stat
import struct
import subprocess
import zlib

import ml_dtypes
import numpy as np

import tolerance  # tests/common, put on the path by conftest.py

BF16 = np.dtype(ml_dtypes.bfloat16)
F8_E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
F8_E5M2 = np.dtype(ml_dtypes.float8_e5m2)

# dtype name (as the tests call it) -> numpy dtype, safetensors dtype string
DTYPES = {
    "f32": np.dtype("<f4"),
    "f16": np.dtype("<f2"),
    "bf16": BF16,
}
ST_NAME = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
ST_DTYPE = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": BF16, "F8_E4M3": F8_E4M3, "F8_E5M2": F8_E5M2,
            "I8": np.dtype("i1"), "U8": np.dtype("u1")}

ERROR_PREFIX = "tnorm: error: "
KNOWN_BYTES = b"tnorm-test: pre-existing output, must stay byte-for-byte untouched\n\x00\x01\x02\xff" * 7

RUN_TIMEOUT = 120


# --------------------------------------------------------------------------------------------------
# Running the command
# --------------------------------------------------------------------------------------------------

def tnorm_bin():
    return os.environ.get("TNORM_BIN", "")


def run_tnorm(args, cwd=None, timeout=RUN_TIMEOUT, **popen_kwargs):
    """Runs TNORM_BIN with args (a list of str); returns subprocess.CompletedProcess (text mode).
    popen_kwargs go to subprocess.run (e.g. preexec_fn)."""
    cmd = [tnorm_bin()] + [str(a) for a in args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, timeout=timeout, text=True, errors="replace",
                          **popen_kwargs)


def describe(proc):
    """A readable account of a finished process, for assertion messages."""
    rc = proc.returncode
    what = f"killed by signal {-rc}" if rc < 0 else f"exit {rc}"
    return (f"command: {' '.join(proc.args)}\n{what}\n"
            f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}")


def assert_ok(proc):
    assert proc.returncode == 0, "expected exit 0\n" + describe(proc)


def assert_error_output(proc, codes):
    """Exit status in codes, no signal, exactly one stderr line starting with the error prefix."""
    if isinstance(codes, int):
        codes = {codes}
    rc = proc.returncode
    assert rc >= 0, f"crashed: killed by signal {-rc}\n" + describe(proc)
    assert rc in codes, f"expected exit status in {sorted(codes)}, got {rc}\n" + describe(proc)
    err = proc.stderr
    lines = err.splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}\n" + describe(proc)
    assert err.endswith("\n"), "the stderr line should end with a newline\n" + describe(proc)
    assert lines[0].startswith(ERROR_PREFIX), f"stderr line must start with {ERROR_PREFIX!r}\n" + describe(proc)
    assert len(lines[0]) > len(ERROR_PREFIX), "the error line says nothing after the prefix\n" + describe(proc)


def snapshot(root):
    """{relative path: bytes (regular files), None (directories), ("symlink", target) or ("special", mode)}
    of everything under root. Symbolic links are not followed and FIFOs, sockets and devices not opened."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                value = ("symlink", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                value = None
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as fh:
                    value = fh.read()
            else:
                value = ("special", stat.S_IFMT(st.st_mode))
            out[os.path.relpath(p, root)] = value
    return out


def diff_snapshots(before, after):
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    return added, removed, changed


# --------------------------------------------------------------------------------------------------
# Random data
# --------------------------------------------------------------------------------------------------

class Workdirs:
    """A test's working directories: in/ for inputs, out/ holding pre-existing outputs (the names given)
    with known bytes, which a failed call must leave as they were."""

    def __init__(self, tmp_path, rng, outputs):
        self.tmp = tmp_path
        self.rng = rng
        self.ind = tmp_path / "in"
        self.outd = tmp_path / "out"
        self.ind.mkdir()
        self.outd.mkdir()
        for name in outputs:
            (self.outd / name).write_bytes(KNOWN_BYTES)

    def raw(self, name, data):
        p = self.ind / name
        p.write_bytes(data)
        return p

    def npy(self, name, arr):
        p = self.ind / name
        write_npy(p, arr)
        return p

    def x(self, shape=(4, 8), dtype="f32"):
        return self.npy("x.npy", rand_normal(self.rng, shape, dtype))


def seeded_rng(seed, nodeid):
    """A generator that depends on the run's seed and on the test, not on the order tests run in."""
    return np.random.default_rng([seed, zlib.crc32(nodeid.encode())])


def rand(rng, shape, dtype, low=-2.0, high=2.0):
    """Random values of dtype (a key of DTYPES), as an array of that dtype."""
    v = rng.uniform(low, high, size=shape).astype(np.float32)
    return v.astype(DTYPES[dtype])


def rand_normal(rng, shape, dtype, scale=1.0):
    v = (rng.standard_normal(size=shape) * scale).astype(np.float32)
    return v.astype(DTYPES[dtype])


# --------------------------------------------------------------------------------------------------
# .npy
# --------------------------------------------------------------------------------------------------

def write_npy(path, arr):
    np.save(path, np.ascontiguousarray(arr), allow_pickle=False)


def npy_bytes(descr, shape, data, fortran=False, version=(1, 0), header_text=None):
    """Builds a .npy file by hand (for malformed variants). header_text overrides the dict text."""
    if header_text is None:
        header_text = "{'descr': '%s', 'fortran_order': %s, 'shape': %s, }" % (
            descr, "True" if fortran else "False", repr(tuple(shape)))
    h = header_text.encode("latin1")
    magic = b"\x93NUMPY" + bytes(version)
    lenfmt = "<H" if version[0] == 1 else "<I"
    pre = len(magic) + struct.calcsize(lenfmt)
    total = pre + len(h) + 1
    pad = (64 - total % 64) % 64
    h = h + b" " * pad + b"\n"
    return magic + struct.pack(lenfmt, len(h)) + h + data


def read_npy(path):
    with open(path, "rb") as f:
        assert f.read(6) == b"\x93NUMPY", f"{path}: not a .npy file"
    arr = np.load(path, allow_pickle=False)
    return arr


# --------------------------------------------------------------------------------------------------
# .safetensors
# --------------------------------------------------------------------------------------------------

def st_build(tensors, metadata=None, align=8):
    """Bytes of a valid safetensors file. tensors: list of (name, array) or (name, st_dtype, shape, bytes)."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    blobs = []
    off = 0
    for t in tensors:
        if len(t) == 2:
            name, arr = t
            arr = np.ascontiguousarray(arr)
            st_dtype = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", BF16: "BF16",
                        np.dtype("<i4"): "I32", np.dtype("<i8"): "I64", np.dtype("<f8"): "F64",
                        F8_E4M3: "F8_E4M3", F8_E5M2: "F8_E5M2", np.dtype("i1"): "I8", np.dtype("u1"): "U8"}[arr.dtype]
            shape = list(arr.shape)
            data = arr.tobytes()
        else:
            name, st_dtype, shape, data = t
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    return st_raw(header, b"".join(blobs), align=align)


def st_raw(header, data, header_len=None, align=8):
    """Bytes of a safetensors-like file: header (a dict, or str/bytes taken as the JSON text verbatim),
    padded with spaces to `align`, then data. header_len overrides the 8-byte length field."""
    if isinstance(header, (dict, list)):
        h = json.dumps(header, separators=(",", ":")).encode()
    elif isinstance(header, str):
        h = header.encode()
    else:
        h = header
    if align:
        h = h + b" " * ((align - (8 + len(h)) % align) % align)
    n = len(h) if header_len is None else header_len
    return struct.pack("<Q", n) + h + data


def st_read(path):
    """Parses a safetensors file strictly; returns (tensors {name: array}, metadata or None)."""
    with open(path, "rb") as f:
        raw = f.read()
    assert len(raw) >= 8, f"{path}: {len(raw)} bytes, shorter than the header length field"
    (n,) = struct.unpack("<Q", raw[:8])
    assert 8 + n <= len(raw), f"{path}: header length {n} runs past the end ({len(raw)} bytes)"
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    assert isinstance(header, dict), f"{path}: header is not a JSON object"
    data = raw[8 + n:]
    metadata = header.pop("__metadata__", None)
    tensors = {}
    spans = []
    for name, info in header.items():
        assert set(info) == {"dtype", "shape", "data_offsets"}, f"{path}: tensor {name!r} has keys {sorted(info)}"
        dt = ST_DTYPE.get(info["dtype"])
        assert dt is not None, f"{path}: tensor {name!r} has dtype {info['dtype']!r}"
        shape = tuple(info["shape"])
        assert all(isinstance(d, int) and d >= 0 for d in shape), f"{path}: bad shape {shape}"
        b, e = info["data_offsets"]
        assert 0 <= b <= e <= len(data), f"{path}: offsets {b, e} outside data of {len(data)} bytes"
        count = int(np.prod(shape, dtype=np.int64))
        assert e - b == count * dt.itemsize, f"{path}: {name!r} has {e - b} bytes, shape {shape} needs {count * dt.itemsize}"
        tensors[name] = np.frombuffer(data[b:e], dtype=dt).reshape(shape)
        spans.append((b, e))
    # Like the reference implementation: the tensors cover the data buffer exactly, without holes.
    spans.sort()
    pos = 0
    for b, e in spans:
        assert b == pos, f"{path}: hole or overlap in the data buffer at byte {pos}"
        pos = e
    assert pos == len(data), f"{path}: {len(data) - pos} trailing bytes after the last tensor"
    return tensors, metadata


def split_spec(spec):
    """'a.safetensors:NAME' -> ('a.safetensors', 'NAME'); anything else -> (spec, None)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head.endswith(".safetensors"):
        return head, tail
    return spec, None


def read_output(spec):
    """Reads an output the command wrote: 'a.npy', 'a.safetensors' or 'a.safetensors:NAME'.
    Returns (array, tensor name or None for .npy). Checks a safetensors file holds exactly one tensor."""
    path, _ = split_spec(spec)
    if path.endswith(".safetensors"):
        tensors, _ = st_read(path)
        assert len(tensors) == 1, f"{path}: expected exactly one tensor, found {sorted(tensors)}"
        (got_name, arr), = tensors.items()
        return arr, got_name
    assert path.endswith(".npy"), path
    return read_npy(path), None


# --------------------------------------------------------------------------------------------------
# Reference and comparison
# --------------------------------------------------------------------------------------------------

def as2d(a):
    return a.reshape(1, -1) if a.ndim == 1 else a


def reference(op, x, weight=None, mul=None, residual=None, eps=1e-6, scale=1.0, weight_offset=0.0):
    """float64 reference of the contract. Inputs are arrays of their own dtypes (x's shape: 1-D or 2-D).
    Returns (y float64 of x's shape, residual_out of x's dtype or None)."""
    shape = x.shape
    dt = x.dtype
    eps = float(np.float32(eps))
    scale = float(np.float32(scale))
    weight_offset = float(np.float32(weight_offset))
    res_out = None
    if op == "add_rms_norm":
        s = (x.astype(np.float32) + residual.astype(np.float32)).astype(dt)  # float32 sum, rounded once
        res_out = s
        s64 = as2d(s.astype(np.float64))
    else:
        s64 = as2d(x.astype(np.float64))
    dim = s64.shape[1]
    ss = np.sum(s64 * s64, axis=1, keepdims=True)
    if op == "l2_norm":
        y = s64 / np.sqrt(ss + eps) * scale
    else:
        y = s64 / np.sqrt(ss / dim + eps)
        if weight is not None:
            y = y * (weight.astype(np.float64).reshape(1, -1) + weight_offset)
        if mul is not None:
            y = y * as2d(mul.astype(np.float64))
    return y.reshape(shape), res_out


# The tolerance rule, shared with the Python binding's tests.
ulp_at = tolerance.ulp
errors = tolerance.error_in_tolerances


def assert_close(dtype_name, got, ref, what="y"):
    assert got.shape == ref.shape, f"{what}: shape {got.shape}, expected {ref.shape}"
    if got.size == 0:
        return
    err = errors(dtype_name, got, ref)
    worst = int(np.argmax(err))
    bad = int(np.count_nonzero(~(err <= 1.0)))
    assert bad == 0, (
        f"{what}: {bad} of {got.size} elements out of tolerance ({dtype_name}); worst at flat index {worst}: "
        f"got {float(got.reshape(-1)[worst])!r}, reference {float(np.asarray(ref).reshape(-1)[worst])!r}, "
        f"error {float(err.reshape(-1)[worst]):.3g} x tolerance")


def assert_bits_equal(got, expected, what):
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype}, expected {expected.dtype}"
    assert got.shape == expected.shape, f"{what}: shape {got.shape}, expected {expected.shape}"
    g = got.view(np.uint32 if got.dtype.itemsize == 4 else np.uint16)
    e = expected.view(np.uint32 if expected.dtype.itemsize == 4 else np.uint16)
    bad = np.flatnonzero(g.reshape(-1) != e.reshape(-1))
    assert bad.size == 0, (
        f"{what}: {bad.size} of {got.size} elements differ; first at flat index {bad[0]}: "
        f"got {float(got.reshape(-1)[bad[0]])!r}, expected {float(expected.reshape(-1)[bad[0]])!r}")
