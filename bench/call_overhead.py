#!/usr/bin/env python3
"""Where the time of one small call from Python goes: decode-sized rms_norm, add_rms_norm and l2_norm
(1 x 4096, bf16, with a weight) through tnorm's binding on torch tensors, torch's F.rms_norm beside them,
and each stage of a call on its own.

A call on torch tensors goes one of two ways (tnorm/_ops.py): the general way (operands read one by one,
the output allocated with torch.empty, the C structures built afresh), which the first call of a kind
takes and prepares, and the fast path every later call of that kind takes (a key from the operands'
dtype, shape, strides and device, one dictionary look-up, the data pointers written, tn_op_run). Both are
timed: the general way by turning the fast path off for its lines.

Each line is the mean over many back-to-back calls (plain launches, no graph), with the device drained
before and after, so the GPU's queue never fills: at these sizes a call costs what the host spends on it.

    python3 bench/call_overhead.py [--device cuda|cpu] [--calls N] [--shape 1x4096] [--dtype bf16]
"""

import argparse
import contextlib
import ctypes
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--calls", type=int, default=20000)
    p.add_argument("--shape", default="1x4096")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    args = p.parse_args()

    import torch
    import torch.nn.functional as F
    try:
        import tnorm
    except ImportError:
        sys.path.insert(0, os.path.join(REPO, "python"))
        import tnorm
    from tnorm import _dlpack, _lib, _ops

    for build in ("build", "build-gpu"):
        so = os.path.join(REPO, build, "libtnorm.so")
        if "TNORM_LIBRARY" not in os.environ and os.path.exists(so):
            os.environ["TNORM_LIBRARY"] = so

    rows, dim = (int(v) for v in args.shape.split("x"))
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[args.dtype]
    dev = torch.device(args.device)
    x = torch.randn(rows, dim, dtype=dtype, device=dev)
    r = torch.randn(rows, dim, dtype=dtype, device=dev)
    w = torch.randn(dim, dtype=dtype, device=dev)
    y = torch.empty_like(x)
    s = torch.empty_like(x)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def timed(label, fn):
        for _ in range(200):
            fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(args.calls):
            fn()
        sync()
        us = (time.perf_counter() - t0) / args.calls * 1e6
        print(f"  {label:<56} {us:8.2f} us")
        return us

    # Loads the library, makes the context, compiles the kernels, prepares the fast path's calls.
    for _ in range(2):
        tnorm.rms_norm(x, w), tnorm.rms_norm(x, w, out=y), tnorm.add_rms_norm(x, r, w), tnorm.l2_norm(x)
    lib, ctx = _lib.lib(), _lib.context()
    stream = _ops._current_stream(x, x.get_device()) if cuda else None

    print(f"call_overhead: {args.shape} {args.dtype} on {torch.cuda.get_device_name() if cuda else 'the CPU'}"
          f", mean of {args.calls} calls")
    print("whole calls")
    timed("torch F.rms_norm(x, (dim,), w, eps)", lambda: F.rms_norm(x, (dim,), w, 1e-6))
    timed("torch x + r, then F.rms_norm (add_rms_norm's work)", lambda: F.rms_norm(x + r, (dim,), w, 1e-6))
    timed("torch F.normalize(x, dim=-1) (l2_norm's work)", lambda: F.normalize(x, dim=-1))
    timed("tnorm.rms_norm(x, w)", lambda: tnorm.rms_norm(x, w))
    timed("tnorm.rms_norm(x, w, out=y)", lambda: tnorm.rms_norm(x, w, out=y))
    timed("tnorm.add_rms_norm(x, r, w)", lambda: tnorm.add_rms_norm(x, r, w))
    timed("tnorm.add_rms_norm(x, r, w, out=y, residual_out=s)",
          lambda: tnorm.add_rms_norm(x, r, w, out=y, residual_out=s))
    timed("tnorm.l2_norm(x)", lambda: tnorm.l2_norm(x))
    fast = hasattr(_ops, "_torch_tensor")  # a tnorm from before the fast path has only the general way
    if not fast:
        print("(this tnorm has no fast path: the calls above went the general way)")
    with _ops.general_way() if fast else contextlib.nullcontext():
        timed("general way: tnorm.rms_norm(x, w)", lambda: tnorm.rms_norm(x, w))
        timed("general way: tnorm.rms_norm(x, w, out=y)", lambda: tnorm.rms_norm(x, w, out=y))
        timed("general way: tnorm.add_rms_norm(x, r, w)", lambda: tnorm.add_rms_norm(x, r, w))
        timed("general way: tnorm.l2_norm(x)", lambda: tnorm.l2_norm(x))

    # The fast path of tnorm.rms_norm(x, w), stage by stage, as _ops.rms_norm does it.
    if fast:
        fast_path_stages(timed, torch, _lib, _ops, ctx, x, w, y, cuda)

    # The general way's stages, as before the fast path.
    print("general way of tnorm.rms_norm(x, w), by stage")
    xv = _dlpack.export(x, "x", stream, "torch")
    wv = _dlpack.export(w, "weight", stream, "torch")
    yv = _dlpack.export(y, "out", stream, "torch")
    X, W, Y = ctypes.byref(xv.tensor), ctypes.byref(wv.tensor), ctypes.byref(yv.tensor)
    timed("  torch.empty like x", lambda: torch.empty((rows, dim), dtype=dtype, device=dev))
    timed("  reading x, w, y (_dlpack.export x3)",
          lambda: (_dlpack.export(x, "x", stream, "torch"), _dlpack.export(w, "w", stream, "torch"),
                   _dlpack.export(y, "y", stream, "torch")))
    if cuda:
        timed("  current stream", lambda: _ops._current_stream(x, x.get_device()))
        timed("  tn_context_set_stream", lambda: lib.tn_context_set_stream(ctx, 1, stream or None))
    timed("  C call tn_rms_norm, arguments ready", lambda: lib.tn_rms_norm(ctx, X, W, 0.0, 1e-6, Y))


def fast_path_stages(timed, torch, _lib, _ops, ctx, x, w, y, cuda):
    print("fast path of tnorm.rms_norm(x, w), by stage")
    calls = _lib._local.ctx.calls

    meta = _ops._meta

    def key():
        return ("rms_norm", x.dtype, x.shape, x.stride(), x.device, x.is_neg(), meta(w), meta(None), meta(None),
                1e-6, 0.0, "exact")

    prepared = calls[key()]
    run, handle, ref = _ops._op_run, ctx, prepared.ref

    def pointers():
        prepared.x.data = x.data_ptr()
        prepared.weight.data = w.data_ptr()
        prepared.y.data = y.data_ptr()

    timed("  key: x's and w's dtype, shape, strides, device", key)
    timed("  key and look-up", lambda: _ops._lookup(key()))
    timed("  torch.empty_like(x)", lambda: torch.empty_like(x))
    timed("  three data pointers written", pointers)
    if cuda:
        timed("  current stream (torch._C._cuda_getCurrentRawStream)", lambda: _ops._raw_stream(x.get_device()))
    pointers()
    timed("  C call tn_op_run, prepared (no argument conversion)", lambda: run(handle, ref))


if __name__ == "__main__":
    main()
