#!/usr/bin/env python3
"""Decode-size norm calls as an engine's step sees them: each call preceded by the GEMM that produces its
input, tnorm beside its peers, and the floor a call of that size stands on, all in one run.

A step is a cuBLAS GEMM [rows x K] x [K x dim] (bf16, torch.matmul; K = 4096 by default) writing the
norm's input, then one norm call. Eight steps, each with its own GEMM weight (so every GEMM reads its
weight from memory and pushes the norm's other operands out of L2, as the layers of a real step do) and its
own norm operands, are captured in a CUDA graph. The same eight GEMMs without the norm are a second graph.
A norm call's time is (time of the first graph - time of the second) / 8, the two replayed in turns, median
over --batches rounds. So a call is credited with overlap only where its neighbour allows it: with
programmatic dependent launch (PDL) on, a kernel may launch while the GEMM before it runs; with it off,
it starts after the GEMM ends, as after a kernel that does not allow early launch.

The floor, measured the same way in the same run: an empty kernel, and a copy of one row of dim
elements of the dtype (torch's copy_, a memcpy node in the graph).

Implementations, where installed: tnorm (its Python binding), Liger (liger_kernel), quack (quack-kernels),
FlashInfer (bench/peers/flashinfer_norm.cu built against FlashInfer's headers: bench/peers/README.md),
and torch eager. A peer's result is compared with tnorm's before it is timed ('!' marks disagreement, and
such a peer is not ranked). FlashInfer's fused add is in place (x and residual overwritten); the others
write new tensors.

--pdl both (the default) runs the cases twice in child processes, TNORM_CUDA_PDL=0 then 1 (tnorm reads it
once per process) and FlashInfer's enable_pdl off then on; Liger, quack and torch launch without PDL
either way.
"""

import argparse
import csv
import ctypes
import os
import statistics
import subprocess
import sys

from compare import import_tnorm  # the binding of this checkout, as compare.py finds it

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

OPS = ["rms_norm", "add_rms_norm", "l2_norm", "layer_norm"]
DTYPES = ["bf16", "f32"]
ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
DIMS = [2048, 4096, 8192, 16384]
IMPLS = ["tnorm", "liger", "quack", "flashinfer", "torch"]
PEERS = IMPLS[1:]
STEPS = 8
EPS = 1e-6
FLOOR_GAP_US = 0.3  # the bound for 1..64 rows: tnorm - one-row copy
FLOOR_ROWS = 64


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--dtypes", default=",".join(DTYPES), help="from bf16, f16, f32")
    p.add_argument("--rows", default=",".join(map(str, ROWS)))
    p.add_argument("--dims", default=",".join(map(str, DIMS)))
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--gemm-k", type=int, default=4096, help="K of the GEMM before each call (default 4096)")
    p.add_argument("--batches", type=int, default=9, help="timed rounds per case (median reported)")
    p.add_argument("--replays", type=int, default=16, help="graph replays per timed batch")
    p.add_argument("--pdl", choices=["on", "off", "both"], default="both")
    p.add_argument("--csv", help="write every measurement to this CSV file")
    p.add_argument("--device", type=int, default=0)
    p.add_argument("--quiet-table", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    def ints(text, flag):
        try:
            v = [int(s) for s in text.split(",") if s.strip()]
            assert v and all(n > 0 for n in v)
            return v
        except (ValueError, AssertionError):
            p.error(f"{flag}: expected positive integers, got {text!r}")

    def names(text, allowed, flag):
        v = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in v if s not in allowed]
        if bad or not v:
            p.error(f"{flag}: {', '.join(bad) or '(none)'}; choose from {', '.join(allowed)}")
        return v

    args.ops = names(args.ops, OPS, "--ops")
    args.dtypes = names(args.dtypes, ["bf16", "f16", "f32"], "--dtypes")
    args.impls = names(args.impls, IMPLS, "--impls")
    args.rows = ints(args.rows, "--rows")
    args.dims = ints(args.dims, "--dims")
    if "tnorm" not in args.impls:
        p.error("--impls must include tnorm (peers are checked against it)")
    if args.batches < 1 or args.replays < 1 or args.gemm_k < 1:
        p.error("--batches, --replays and --gemm-k must be >= 1")
    return args


def note(msg):
    print(f"decode.py: {msg}", file=sys.stderr, flush=True)


class Peers:
    """The peers' entry points that import here; a missing one is noted once and left out."""

    def __init__(self, torch, wanted):
        self.liger = self.quack = self.fi = None
        if "liger" in wanted:
            try:
                from liger_kernel.ops.rms_norm import LigerRMSNormFunction
                from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
                from liger_kernel.ops.layer_norm import LigerLayerNormFunction
                self.liger = (LigerRMSNormFunction, LigerFusedAddRMSNormFunction, LigerLayerNormFunction)
            except Exception as e:
                note(f"liger not importable ({type(e).__name__}: {e})")
        if "quack" in wanted:
            try:
                import quack.rmsnorm as qr
                self.quack = qr
            except Exception as e:
                note(f"quack not importable ({type(e).__name__}: {e})")
        if "flashinfer" in wanted:
            lib = os.environ.get("FLASHINFER_NORM_LIB", os.path.join(REPO, ".peers", "libfi_norm.so"))
            try:
                self.fi = ctypes.CDLL(lib)
                u, i, f, p = ctypes.c_uint, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
                self.fi.fi_rms_norm.argtypes = [i, p, p, p, u, u, f, i, p]
                self.fi.fi_fused_add_rms_norm.argtypes = [i, p, p, p, u, u, f, i, p]
            except OSError as e:
                note(f"FlashInfer wrapper not loadable ({e}); build it with bench/peers/setup.sh")
                self.fi = None

    def functions(self, torch, op, o, s, pdl):
        """name -> fn(): step s's call of each peer that has op."""
        F = torch.nn.functional
        x, w, b, r, y = o["x"][s], o["w"][s], o["b"][s], o["r"][s], o["y"][s]
        dim = x.shape[-1]
        fns = {}
        if op == "rms_norm":
            fns["torch"] = lambda: F.rms_norm(x, (dim,), w, eps=EPS)
            if self.liger:
                fns["liger"] = lambda: self.liger[0].apply(x, w, EPS, 0.0, "llama", False)
            if self.quack:
                fns["quack"] = lambda: self.quack.rmsnorm_fwd(x, w, eps=EPS)[0]
            if self.fi and x.dtype in FI_DTYPES:
                fns["flashinfer"] = lambda: self._fi(self.fi.fi_rms_norm, torch, x, x, w, y, pdl) or y
        elif op == "add_rms_norm":
            def torch_add():
                t = x + r
                return F.rms_norm(t, (dim,), w, eps=EPS), t
            fns["torch"] = torch_add
            if self.liger:
                fns["liger"] = lambda: self.liger[1].apply(x, r, w, EPS, 0.0, "llama", False)
            if self.quack:
                fns["quack"] = lambda: self.quack.rmsnorm_fwd(x, w, residual=r, eps=EPS)[:2]
            if self.fi and x.dtype in FI_DTYPES:
                fns["flashinfer"] = lambda: self._fi(self.fi.fi_fused_add_rms_norm, torch, x, x, r, w, pdl) or (x, r)
        elif op == "l2_norm":
            fns["torch"] = lambda: F.normalize(x, p=2.0, dim=-1, eps=EPS)
        else:
            fns["torch"] = lambda: F.layer_norm(x, (dim,), w, b, eps=EPS)
            if self.liger:
                fns["liger"] = lambda: self.liger[2].apply(x, w, b, EPS)
        return fns

    @staticmethod
    def _fi(fn, torch, like, *ptrs_and_pdl):
        *tensors, pdl = ptrs_and_pdl
        rows, dim = like.shape
        code = FI_DTYPES[like.dtype]
        err = fn(code, *[t.data_ptr() for t in tensors], rows, dim, ctypes.c_float(EPS), int(pdl),
                 ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))
        if err != 0:
            raise RuntimeError(f"FlashInfer launch failed: cudaError {err}")
        return None


FI_DTYPES = {}


class Bench:
    def __init__(self, args):
        import torch
        self.torch, self.args = torch, args
        if not torch.cuda.is_available():
            raise SystemExit("decode.py: error: torch sees no CUDA device")
        torch.cuda.set_device(args.device)
        self.dev = torch.device("cuda", args.device)
        torch.backends.cuda.matmul.allow_tf32 = False
        FI_DTYPES.update({torch.float32: 0, torch.bfloat16: 1, torch.float16: 2})
        self.tn = import_tnorm()
        if not self.tn.cuda_available():
            raise SystemExit(f"decode.py: error: {self.tn.library_path()} cannot run on CUDA here")
        self.dtypes = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
        self.pdl = os.environ.get("TNORM_CUDA_PDL", "1") != "0"
        self.peers = Peers(torch, args.impls)
        self.gen = torch.Generator(device=self.dev)
        self.gemm_cache = {}
        import triton
        import triton.language as tl

        @triton.jit
        def _empty(p):
            pass
        self.empty_kernel = _empty
        del tl

    # ---- operands ----

    def gemm(self, rows, dim):
        """The eight GEMMs' operands for (rows, dim): activations, weights and bf16 outputs."""
        key = (rows, dim)
        if key not in self.gemm_cache:
            self.gemm_cache.clear()
            torch, k = self.torch, self.args.gemm_k
            a = torch.randn((rows, k), generator=self.gen, device=self.dev).to(torch.bfloat16)
            wts = [(torch.randn((k, dim), generator=self.gen, device=self.dev) * k ** -0.5).to(torch.bfloat16)
                   for _ in range(STEPS)]
            outs = [torch.empty((rows, dim), dtype=torch.bfloat16, device=self.dev) for _ in range(STEPS)]
            self.gemm_cache[key] = (a, wts, outs)
        return self.gemm_cache[key]

    def operands(self, dtype, rows, dim):
        torch = self.torch
        a, wts, outs = self.gemm(rows, dim)

        def rand(shape, scale=1.0, shift=0.0):
            return (torch.randn(shape, generator=self.gen, device=self.dev) * scale + shift).to(dtype)

        o = {
            # bf16: the norm reads the GEMM's output, as in a model; else an input of its own dtype.
            "x": outs if dtype == torch.bfloat16 else [rand((rows, dim)) for _ in range(STEPS)],
            "w": [rand((dim,), 0.5, 1.0) for _ in range(STEPS)],
            "b": [rand((dim,), 0.1) for _ in range(STEPS)],
            "r": [rand((rows, dim)) for _ in range(STEPS)],
            "y": [torch.empty((rows, dim), dtype=dtype, device=self.dev) for _ in range(STEPS)],
            "s": [torch.empty((rows, dim), dtype=dtype, device=self.dev) for _ in range(STEPS)],
        }
        o["gemm"] = [(lambda i=i: torch.matmul(a, wts[i], out=outs[i])) for i in range(STEPS)]
        return o

    def tnorm_fn(self, op, o, s):
        tn = self.tn
        x, w, b, r, y, so = (o[k][s] for k in ("x", "w", "b", "r", "y", "s"))
        if op == "rms_norm":
            return lambda: tn.rms_norm(x, w, eps=EPS, out=y)
        if op == "add_rms_norm":
            return lambda: tn.add_rms_norm(x, r, w, eps=EPS, out=y, residual_out=so)
        if op == "l2_norm":
            return lambda: tn.l2_norm(x, eps=EPS, out=y)
        return lambda: tn.layer_norm(x, w, b, eps=EPS, out=y)

    def floor_fns(self, dtype, rows, dim):
        torch = self.torch
        src = [torch.randn((1, dim), generator=self.gen, device=self.dev).to(dtype) for _ in range(STEPS)]
        dst = [torch.empty((1, dim), dtype=dtype, device=self.dev) for _ in range(STEPS)]
        return {
            "empty": [(lambda s=s: self.empty_kernel[(1,)](dst[s])) for s in range(STEPS)],
            "copy1": [(lambda s=s: dst[s].copy_(src[s])) for s in range(STEPS)],
        }

    # ---- timing ----

    def graph(self, gemms, calls):
        """A CUDA graph of the eight steps: GEMM s, then calls[s] (if any)."""
        torch = self.torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture: compiles, autotunes, allocates
            for s in range(STEPS):
                gemms[s]()
                if calls:
                    calls[s]()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for s in range(STEPS):
                gemms[s]()
                if calls:
                    calls[s]()
        g.replay()
        return g

    def time_graphs(self, graphs):
        """name -> list of seconds per replay, one per round; the graphs take turns within a round."""
        torch = self.torch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        names = list(graphs)
        times = {n: [] for n in names}
        for b in range(self.args.batches):
            k = b % len(names)
            for n in names[k:] + names[:k]:
                start.record()
                for _ in range(self.args.replays):
                    graphs[n].replay()
                end.record()
                end.synchronize()
                times[n].append(start.elapsed_time(end) * 1e-3 / self.args.replays)
        return times

    def agreement(self, dtype, got, ref):
        torch = self.torch
        got = got if isinstance(got, tuple) else (got,)
        ref = ref if isinstance(ref, tuple) else (ref,)
        rtol = {torch.bfloat16: 2 ** -6, torch.float16: 2 ** -9, torch.float32: 1e-4}[dtype]
        worst = 0.0
        for g, e in zip(got, ref):
            g, e = g.float(), e.float()
            err = ((g - e).abs() / (rtol * e.abs() + rtol * 1e-2)).nan_to_num(nan=float("inf")).max().item()
            worst = max(worst, err)
        return worst

    def case(self, dtype_name, rows, dim):
        """Every op and implementation at (dtype, rows, dim), and the floor: microseconds per call."""
        torch = self.torch
        dtype = self.dtypes[dtype_name]
        out = {}
        o = self.operands(dtype, rows, dim)
        graphs = {"gemm": self.graph(o["gemm"], None)}
        for name, calls in self.floor_fns(dtype, rows, dim).items():
            graphs[name] = self.graph(o["gemm"], calls)
        agree = {}
        for op in self.args.ops:
            for s in range(STEPS):
                o["gemm"][s]()
            torch.cuda.synchronize()
            fns = {"tnorm": [self.tnorm_fn(op, o, s) for s in range(STEPS)]}
            peer_fns = [self.peers.functions(torch, op, o, s, self.pdl) for s in range(STEPS)]
            for name in PEERS:
                if name in self.args.impls and name in peer_fns[0]:
                    fns[name] = [f[name] for f in peer_fns]
            ref = fns["tnorm"][0]()
            ref = tuple(t.clone() for t in ref) if isinstance(ref, tuple) else ref.clone()
            for name, calls in fns.items():
                try:
                    if name != "tnorm":
                        if name == "flashinfer" and op == "add_rms_norm":
                            x0, r0 = o["x"][0].clone(), o["r"][0].clone()
                            agree[(op, name)] = self.agreement(dtype, calls[0](), ref)
                            o["x"][0].copy_(x0)
                            o["r"][0].copy_(r0)
                        else:
                            agree[(op, name)] = self.agreement(dtype, calls[0](), ref)
                    graphs[(op, name)] = self.graph(o["gemm"], calls)
                except Exception as e:
                    note(f"{name} failed on {op} {dtype_name} {rows}x{dim}: {type(e).__name__}: {e}")
                    torch.cuda.synchronize()
        times = self.time_graphs(graphs)
        base = times.pop("gemm")
        for key, t in times.items():
            diffs = [(a - g) / STEPS * 1e6 for a, g in zip(t, base)]
            out[key] = {"us": statistics.median(diffs), "diffs": diffs, "err": agree.get(key, 0.0)}
        out["gemm"] = {"us": statistics.median(base) / STEPS * 1e6, "diffs": [], "err": 0.0}
        del graphs, o
        torch.cuda.empty_cache()
        return out


def run_cases(args):
    bench = Bench(args)
    torch = bench.torch
    bench.gen.manual_seed(20261207)
    device_name = torch.cuda.get_device_name(bench.dev)
    pdl = "on" if bench.pdl else "off"
    records = []
    for dt in args.dtypes:
        for dim in args.dims:
            for rows in args.rows:
                res = bench.case(dt, rows, dim)
                for key, m in res.items():
                    op, impl = key if isinstance(key, tuple) else ("floor", key)
                    records.append({"device": device_name, "pdl": pdl, "op": op, "dtype": dt, "rows": rows,
                                    "dim": dim, "impl": impl, "us": m["us"], "err": m["err"],
                                    "spread": (max(m["diffs"]) - min(m["diffs"])) if m["diffs"] else 0.0})
                note(f"done {dt} {rows}x{dim} (PDL {pdl})")
    return records


FIELDS = ["device", "pdl", "op", "dtype", "rows", "dim", "impl", "us", "err", "spread"]


def write_csv(path, records):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in records:
            w.writerow({k: (f"{r[k]:.4f}" if isinstance(r[k], float) else r[k]) for k in FIELDS})


def read_csv(path):
    with open(path) as f:
        return [{k: (float(v) if k in ("us", "err", "spread") else int(v) if k in ("rows", "dim") else v)
                 for k, v in r.items()} for r in csv.DictReader(f)]


def report(records, args):
    """One table per PDL setting: us per call, then the verdicts the issue asks for."""
    by = {(r["pdl"], r["op"], r["dtype"], r["rows"], r["dim"], r["impl"]): r for r in records}
    device = records[0]["device"] if records else "?"
    impls = [n for n in IMPLS if n in args.impls]
    print(f"decode.py: {device}; each call after a bf16 GEMM [rows x {args.gemm_k}] x [{args.gemm_k} x dim] in a "
          f"CUDA graph of {STEPS} steps; us per call = (graph with the call - graph without) / {STEPS}, median of "
          f"{args.batches} rounds of {args.replays} replays")
    print("floor: an empty kernel and a one-row copy, timed the same way; '!': disagrees with tnorm (unranked)")
    summary = []
    for pdl in [p for p in ("off", "on") if any(r["pdl"] == p for r in records)]:
        print(f"\n== PDL {pdl} ==")
        head = (f"{'op':<13}{'dtype':<6}{'rows':>5} {'dim':>6} {'gemm':>7} {'empty':>6} {'copy1':>6} "
                + "".join(f"{n:>11}" for n in impls) + "  tnorm/best  tnorm-copy1")
        print(head)
        print("-" * len(head))
        ahead = cells = near = near_cells = 0
        worst = (0.0, None)
        for op in args.ops:
            for dt in args.dtypes:
                for dim in args.dims:
                    for rows in args.rows:
                        t = by.get((pdl, op, dt, rows, dim, "tnorm"))
                        if t is None:
                            continue
                        g = by.get((pdl, "floor", dt, rows, dim, "gemm"))
                        e = by.get((pdl, "floor", dt, rows, dim, "empty"))
                        c = by.get((pdl, "floor", dt, rows, dim, "copy1"))
                        line = f"{op:<13}{dt:<6}{rows:>5} {dim:>6} {g['us']:7.2f} {e['us']:6.2f} {c['us']:6.2f} "
                        best = None
                        for n in impls:
                            m = by.get((pdl, op, dt, rows, dim, n))
                            if m is None:
                                line += f"{'-':>11}"
                                continue
                            flag = "!" if m["err"] > 1.0 else ""
                            line += f"{m['us']:10.2f}{flag:1}"
                            if n != "tnorm" and not flag and (best is None or m["us"] < best["us"]):
                                best = m
                        ratio = t["us"] / best["us"] if best else float("nan")
                        gap = t["us"] - c["us"]
                        line += f"  {ratio:6.2f} {best['impl'] if best else '':<6}{gap:+8.2f}"
                        print(line)
                        if best:
                            cells += 1
                            ahead += ratio < 1.0
                            if ratio > worst[0]:
                                worst = (ratio, f"{op} {dt} {rows}x{dim} vs {best['impl']}")
                        if rows <= FLOOR_ROWS:
                            near_cells += 1
                            near += gap <= FLOOR_GAP_US
        summary.append(f"PDL {pdl}: tnorm faster than every peer in {ahead} of {cells} cells"
                       + (f" (worst: {worst[0]:.2f}x, {worst[1]})" if worst[1] else "")
                       + f"; within {FLOOR_GAP_US} us of the one-row copy in {near} of {near_cells} cells "
                         f"at <= {FLOOR_ROWS} rows")
    print()
    for s in summary:
        print(s)


def without_pdl(argv):
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--pdl":
            skip = True
        elif not a.startswith("--pdl="):
            out.append(a)
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.pdl == "both":
        import tempfile
        records = []
        with tempfile.TemporaryDirectory() as tmp:
            for pdl in ("off", "on"):
                path = os.path.join(tmp, f"pdl-{pdl}.csv")
                child = [sys.executable, os.path.abspath(__file__)] + without_pdl(argv or sys.argv[1:])
                child += ["--pdl", pdl, "--csv", path, "--quiet-table"]
                env = dict(os.environ, TNORM_CUDA_PDL="1" if pdl == "on" else "0")
                rc = subprocess.run(child, env=env).returncode
                if rc != 0:
                    note(f"the PDL {pdl} run failed (exit {rc})")
                    continue
                records += read_csv(path)
        if args.csv:
            write_csv(args.csv, records)
        report(records, args)
        return 0 if records else 1
    os.environ["TNORM_CUDA_PDL"] = "1" if args.pdl == "on" else "0"  # read when tnorm opens the device
    records = run_cases(args)
    if args.csv:
        write_csv(args.csv, records)
    if not args.quiet_table:
        report(records, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
