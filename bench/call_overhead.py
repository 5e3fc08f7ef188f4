#!/usr/bin/env python3
"""Where the time of one small call from Python goes: a decode-sized rms_norm (1 x 4096, bf16, with a
weight) through tnorm's binding, torch's F.rms_norm beside it, and each stage of the binding's call on its
own (the output's allocation, reading the operands, the stream, the C call with its arguments ready).

Each line is the mean over many back-to-back calls (plain launches, no graph), with the device drained
before and after, so the GPU's queue never fills: at these sizes a call costs what the host spends on it.

    python3 bench/call_overhead.py [--device cuda|cpu] [--calls N] [--shape 1x4096] [--dtype bf16]
"""

import argparse
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
    w = torch.randn(dim, dtype=dtype, device=dev)
    y = torch.empty_like(x)
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
        print(f"  {label:<52} {us:8.2f} us")
        return us

    # The C call with every argument ready: what the library itself costs per call.
    tnorm.rms_norm(x, w, out=y)  # loads the library, makes the context, compiles the kernel
    lib, ctx = _lib.lib(), _lib.context()
    stream = _ops._current_stream(x, x.get_device()) if cuda else None
    xv = _dlpack.export(x, "x", stream, "torch")
    wv = _dlpack.export(w, "weight", stream, "torch")
    yv = _dlpack.export(y, "out", stream, "torch")
    X, W, Y = ctypes.byref(xv.tensor), ctypes.byref(wv.tensor), ctypes.byref(yv.tensor)

    print(f"call_overhead: rms_norm {args.shape} {args.dtype} on {torch.cuda.get_device_name() if cuda else 'the CPU'}"
          f", mean of {args.calls} calls")
    timed("torch F.rms_norm", lambda: F.rms_norm(x, (dim,), w, 1e-6))
    timed("tnorm.rms_norm (allocates y)", lambda: tnorm.rms_norm(x, w))
    timed("tnorm.rms_norm(out=y)", lambda: tnorm.rms_norm(x, w, out=y))
    timed("  torch.empty like x", lambda: torch.empty((rows, dim), dtype=dtype, device=dev))
    timed("  reading x, w, y (_dlpack.export x3)",
          lambda: (_dlpack.export(x, "x", stream, "torch"), _dlpack.export(w, "w", stream, "torch"),
                   _dlpack.export(y, "y", stream, "torch")))
    if cuda:
        timed("  current stream", lambda: _ops._current_stream(x, x.get_device()))
        timed("  tn_context_set_stream", lambda: lib.tn_context_set_stream(ctx, 1, stream or None))
    timed("  C call tn_rms_norm, arguments ready", lambda: lib.tn_rms_norm(ctx, X, W, 0.0, 1e-6, Y))


if __name__ == "__main__":
    main()
