#!/usr/bin/env python3
"""tnorm (through its Python binding) against its peers on a CUDA GPU: torch eager, torch.compile of the
textbook float32 expressions, and a plain Triton kernel (bench/compare_triton.py).

Every implementation runs on the same tensors. Successive calls rotate over copies of the operands (1 GiB
in all, as `tnorm bench` does, at most 8192 copies: even a 1 x 4096 step rotates over 128 MiB) so that
they run from memory rather than the 50-60 MB L2 cache.
A batch of calls is captured once into a CUDA graph and replayed between two CUDA events, so the Python
cost of a call is not timed (--eager times plain launches instead); the time per call is the median over
batches, and the implementations' batches take turns (round b times each one's batch b, starting from a
different one each round), so that a drift of the device over a case weighs on all of them alike. Each
figure is also given as a % of a device-to-device copy ceiling measured in the same run (torch
dst.copy_(src) of 512 MiB, bytes read + written), with the bytes an op must move: x and y (add_rms_norm:
x, residual, y, residual_out) and the weight once. Before timing, each peer's result is
compared with tnorm's (a loose tolerance: they round differently), so that no peer is timed doing
something else; a '!' marks a disagreement.

Needs torch with CUDA, and triton and matplotlib for their parts; torch.compile may take minutes the
first time. The binding is imported from python/ of this checkout when tnorm is not installed, and
TNORM_LIBRARY defaults to build/libtnorm.so (or build-gpu/libtnorm.so) of this checkout.
"""

import argparse
import csv
import math
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

OPS = ["rms_norm", "l2_norm", "add_rms_norm"]
DTYPES = ["bf16", "f32"]
SHAPES = ["32768x4096", "16384x8192", "65536x2048", "8192x16384", "131072x128", "4096x4096",
          "1x4096", "8x4096", "32x4096"]
QUICK_SHAPES = ["32768x4096", "4096x4096", "1x4096", "32x4096"]
IMPLS = ["tnorm", "torch", "compile", "triton"]
EPS = 1e-6
COPY_BYTES = 512 << 20
ROTATION_BYTES = 1 << 30
MAX_COPIES = 8192
BATCH_SECONDS = 0.02  # each timed batch lasts about this long
MAX_BATCH_CALLS = 20000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--quick", action="store_true", help=f"only the shapes {', '.join(QUICK_SHAPES)}")
    p.add_argument("--shapes", help="comma-separated ROWSxDIM list (default: all, or --quick's)")
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated, from " + ", ".join(OPS))
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated, from bf16, f16, f32")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated, from " + ", ".join(IMPLS))
    p.add_argument("--batches", type=int, default=7, help="timed batches per measurement (median reported)")
    p.add_argument("--eager", action="store_true", help="time plain Python launches instead of CUDA-graph replays")
    p.add_argument("--csv", help="also write every measurement to this CSV file")
    p.add_argument("--png", default="compare.png", help="bar chart of %% of the copy ceiling (default compare.png; "
                                                         "'' for none)")
    p.add_argument("--device", type=int, default=0, help="CUDA device index")
    args = p.parse_args(argv)
    args.ops = _choices(p, args.ops, OPS, "--ops")
    args.dtypes = _choices(p, args.dtypes, ["bf16", "f16", "f32"], "--dtypes")
    args.impls = _choices(p, args.impls, IMPLS, "--impls")
    if "tnorm" not in args.impls:
        p.error("--impls must include tnorm (the others are checked and ranked against it)")
    shapes = args.shapes.split(",") if args.shapes else QUICK_SHAPES if args.quick else SHAPES
    try:
        args.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in shapes]
        assert all(len(s) == 2 and s[0] > 0 and s[1] > 0 for s in args.shapes)
    except (ValueError, AssertionError):
        p.error(f"--shapes: expected ROWSxDIM,..., got {','.join(shapes)!r}")
    if args.batches < 1:
        p.error("--batches must be >= 1")
    return args


def _choices(parser, text, allowed, flag):
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        parser.error(f"{flag}: {', '.join(bad) or '(none)'}; choose from {', '.join(allowed)}")
    return values


def import_tnorm():
    if not os.environ.get("TNORM_LIBRARY"):
        for d in ("build", "build-gpu"):
            lib = os.path.join(REPO, d, "libtnorm.so")
            if os.path.exists(lib):
                os.environ["TNORM_LIBRARY"] = lib
                break
    try:
        import tnorm
    except ImportError:
        sys.path.insert(0, os.path.join(REPO, "python"))
        import tnorm
    return tnorm


class Bench:
    """Everything that needs torch, made once torch is imported."""

    def __init__(self, args):
        import torch
        self.torch = torch
        self.F = torch.nn.functional
        self.args = args
        if not torch.cuda.is_available():
            raise SystemExit("compare.py: error: torch sees no CUDA device")
        torch.cuda.set_device(args.device)
        self.dev = torch.device("cuda", args.device)
        self.tnorm = import_tnorm()
        if not self.tnorm.cuda_available():
            raise SystemExit(f"compare.py: error: {self.tnorm.library_path()} cannot run on CUDA here")
        self.dtypes = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
        self.triton = None
        if "triton" in args.impls:
            try:
                sys.path.insert(0, HERE)
                import compare_triton
                self.triton = compare_triton
            except ImportError as e:
                print(f"compare.py: triton is not importable ({e}); its column stays empty", file=sys.stderr)
        self.compiled = {}
        if "compile" in args.impls:
            cfg = torch._dynamo.config
            for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                         "accumulated_recompile_limit"):
                if hasattr(cfg, name):  # one compiled variant per shape and dtype: many more than the default 8
                    setattr(cfg, name, max(getattr(cfg, name), 1024))
            self.compiled = {op: torch.compile(fn, dynamic=False) for op, fn in textbook_functions(torch).items()}

    # ---- the ceiling ----

    def copy_ceiling(self):
        torch = self.torch
        src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=self.dev)
        dst = torch.empty_like(src)
        src.fill_(1)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best = 0.0
        for i in range(12):
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            if i >= 2:  # two rounds of warm-up
                best = max(best, 2.0 * COPY_BYTES / (start.elapsed_time(end) * 1e-3))
        del src, dst
        torch.cuda.empty_cache()
        return best

    # ---- one case ----

    def operands(self, op, dtype, rows, dim):
        """Copies of the operands, each copy a slice of one buffer per operand."""
        torch = self.torch
        es = torch.empty((), dtype=dtype).element_size()
        row_operands = 4 if op == "add_rms_norm" else 2
        set_bytes = rows * dim * es * row_operands
        copies = min(MAX_COPIES, ROTATION_BYTES // set_bytes + 1)
        gen = torch.Generator(device=self.dev)
        gen.manual_seed(rows * 1_000_003 + dim)

        def buffer(random):
            t = torch.empty((copies, rows, dim), dtype=dtype, device=self.dev)
            if random:
                t.copy_(torch.randn((copies, rows, dim), generator=gen, device=self.dev, dtype=torch.float32))
            return [t[i] for i in range(copies)]

        o = {"x": buffer(True), "y": buffer(False), "copies": copies}
        o["w"] = (torch.rand(dim, generator=gen, device=self.dev) * 2).to(dtype)
        if op == "add_rms_norm":
            o["r"], o["s"] = buffer(True), buffer(False)
        o["bytes"] = set_bytes + (dim * es if op != "l2_norm" else 0)
        return o

    def implementations(self, op, o):
        """name -> fn(i): one call on copy i, returning its result(s)."""
        F, tn = self.F, self.tnorm
        x, y, w = o["x"], o["y"], o["w"]
        r, s = o.get("r"), o.get("s")
        dim = x[0].shape[-1]
        fns = {}
        if op == "rms_norm":
            fns["tnorm"] = lambda i: tn.rms_norm(x[i], w, eps=EPS, out=y[i])
            fns["torch"] = lambda i: F.rms_norm(x[i], (dim,), w, eps=EPS)
        elif op == "l2_norm":
            fns["tnorm"] = lambda i: tn.l2_norm(x[i], eps=EPS, out=y[i])
            fns["torch"] = lambda i: F.normalize(x[i], p=2.0, dim=-1, eps=EPS)
        else:
            fns["tnorm"] = lambda i: tn.add_rms_norm(x[i], r[i], w, eps=EPS, out=y[i], residual_out=s[i])

            def torch_add(i):
                t = x[i] + r[i]
                return F.rms_norm(t, (dim,), w, eps=EPS), t
            fns["torch"] = torch_add
        if op in self.compiled:
            f = self.compiled[op]
            fns["compile"] = (lambda i: f(x[i], w)) if op != "l2_norm" else (lambda i: f(x[i]))
            if op == "add_rms_norm":
                fns["compile"] = lambda i: f(x[i], r[i], w)
        if self.triton is not None:
            t = self.triton
            if op == "rms_norm":
                fns["triton"] = lambda i: t.rms_norm(x[i], w, EPS, y[i])
            elif op == "l2_norm":
                fns["triton"] = lambda i: t.l2_norm(x[i], EPS, y[i])
            else:
                fns["triton"] = lambda i: t.add_rms_norm(x[i], r[i], w, EPS, y[i], s[i])
        return {k: v for k, v in fns.items() if k in self.args.impls}

    def agreement(self, dtype, got, ref):
        """Worst |got - ref| / (rtol |ref| + atol) over the results (<= 1: agree)."""
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

    def timer(self, fn, copies):
        """A function timing one batch of calls of fn (seconds per call), and how it times ('graph' or
        'eager'): warmed up, its batch size chosen and, unless --eager, captured into a CUDA graph."""
        torch = self.torch
        ring = [None] * copies  # results of the last `copies` calls stay alive: allocating peers rotate too

        def run(n, first=0):
            for k in range(first, first + n):
                ring[k % copies] = fn(k % copies)

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def eager_batch(n, first=0):
            start.record()
            run(n, first)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e-3 / n

        run(copies)  # warm-up: compiled, loaded, every copy touched
        per_call = eager_batch(copies)
        n = copies * max(1, math.ceil(BATCH_SECONDS / (per_call * copies)))
        n = min(n, max(copies, MAX_BATCH_CALLS // copies * copies))
        if not self.args.eager:
            try:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    run(copies)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    run(n)
                graph.replay()  # the first replay uploads the graph: not timed

                def graph_batch():
                    start.record()
                    graph.replay()
                    end.record()
                    end.synchronize()
                    return start.elapsed_time(end) * 1e-3 / n
                return graph_batch, "graph"
            except Exception as e:  # a peer that cannot be captured is timed as launched
                print(f"compare.py: graph capture failed ({type(e).__name__}: {e}); timing launches",
                      file=sys.stderr)
                torch.cuda.synchronize()
        batches = iter(range(1, 1 << 30))
        return (lambda: eager_batch(n, next(batches) * n)), "eager"

    def case(self, op, dtype_name, rows, dim):
        torch = self.torch
        dtype = self.dtypes[dtype_name]
        o = self.operands(op, dtype, rows, dim)
        fns = self.implementations(op, o)
        ref = fns["tnorm"](0)
        ref = tuple(t.clone() for t in ref) if isinstance(ref, tuple) else ref.clone()
        timers, results = {}, {}

        def failed(name, e):  # an implementation that fails is left out of the case, the run goes on
            print(f"compare.py: {name} failed on {op} {dtype_name} {rows}x{dim}: {type(e).__name__}: {e}",
                  file=sys.stderr)
            torch.cuda.synchronize()

        for name, fn in fns.items():
            try:
                err = 0.0 if name == "tnorm" else self.agreement(dtype, fn(0), ref)
                timers[name] = self.timer(fn, o["copies"])
            except Exception as e:
                failed(name, e)
                continue
            results[name] = {"mode": timers[name][1], "err": err, "bytes": o["bytes"]}
        # Interleaved: batch b of every implementation, in an order that turns each round, then batch b + 1,
        # so that a drift of the device over the run (clocks, temperature) weighs on all alike.
        times = {name: [] for name in timers}
        names = list(timers)
        for b in range(self.args.batches):
            k = b % len(names)
            for name in names[k:] + names[:k]:
                if name not in timers:
                    continue
                try:
                    times[name].append(timers[name][0]())
                except Exception as e:
                    failed(name, e)
                    del timers[name], results[name]
        for name in timers:
            results[name]["seconds"] = statistics.median(times[name])
            results[name]["batches"] = times[name]
        del timers
        del o, fns, ref
        torch.cuda.empty_cache()
        return results


def textbook_functions(torch):
    """The float32 expressions a model's code writes, for torch.compile."""

    def rms_norm(x, w):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS) * w.float()).to(x.dtype)

    def l2_norm(x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + EPS)).to(x.dtype)

    def add_rms_norm(x, r, w):
        s = (x.float() + r.float()).to(x.dtype)
        sf = s.float()
        return (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + EPS) * w.float()).to(x.dtype), s

    return {"rms_norm": rms_norm, "l2_norm": l2_norm, "add_rms_norm": add_rms_norm}


def print_table(rows, impls, ceiling, device_name, args):
    print(f"compare.py: {device_name}; copy ceiling {ceiling * 1e-9:.1f} GB/s (device-to-device copy of "
          f"{COPY_BYTES >> 20} MiB, read + write); time per call from CUDA events "
          f"({'plain launches' if args.eager else 'CUDA-graph replays'}), median of {args.batches} batches")
    print("each cell: microseconds per call, % of the copy ceiling ('!': result disagrees with tnorm's; "
          "'e': timed as launched, graph capture failed)\n")
    head = f"{'op':<13} {'dtype':<5} {'shape':>11}  " + "".join(f"{n:>17}" for n in impls) + "   tnorm vs best peer"
    print(head)
    print("-" * len(head))
    for r in rows:
        cells = []
        for n in impls:
            m = r["results"].get(n)
            if m is None:
                cells.append(f"{'-':>17}")
                continue
            flag = ("!" if m["err"] > 1.0 else "") + ("e" if m["mode"] != ("eager" if args.eager else "graph") else "")
            cells.append(f"{m['seconds'] * 1e6:8.1f} {m['pct']:5.1f}%{flag:<2}".rjust(17))
        t = r["results"].get("tnorm")
        peers = {n: m for n, m in r["results"].items() if n != "tnorm" and m["err"] <= 1.0}
        if t is not None and peers:
            best = min(peers, key=lambda n: peers[n]["seconds"])
            verdict = f"{peers[best]['seconds'] / t['seconds']:6.3f}x {paired_verdict(t, peers[best]):<6} ({best})"
        else:
            verdict = "-"
        print(f"{r['op']:<13} {r['dtype']:<5} {r['rows']:>5}x{r['dim']:<5}  " + "".join(cells) + "   " + verdict)
    print("\ntnorm vs best peer: the best agreeing peer's median time / tnorm's (above 1: tnorm is faster); "
          "'ahead' or 'behind' when\nevery round agrees (each round's batch of the peer against tnorm's batch of "
          "the same round), else 'level'")


def paired_verdict(tnorm, peer):
    """'ahead' when tnorm's batch was faster than the peer's in every round (the batches of a round run
    back to back: bench.case), 'behind' when slower in every one, else 'level'."""
    ratios = [p / t for t, p in zip(tnorm["batches"], peer["batches"])]
    return "ahead" if min(ratios) > 1.0 else "behind" if max(ratios) < 1.0 else "level"


def write_csv(path, rows, impls, ceiling, device_name, args):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["device", "op", "dtype", "rows", "dim", "impl", "time_us", "gbps", "pct_ceiling",
                    "ceiling_gbps", "timing", "agrees", "err_in_tolerances"])
        for r in rows:
            for n in impls:
                m = r["results"].get(n)
                if m is None:
                    continue
                w.writerow([device_name, r["op"], r["dtype"], r["rows"], r["dim"], n, f"{m['seconds'] * 1e6:.3f}",
                            f"{m['gbps']:.1f}", f"{m['pct']:.2f}", f"{ceiling * 1e-9:.1f}", m["mode"],
                            int(m["err"] <= 1.0), f"{m['err']:.3g}"])


def write_png(path, rows, impls, ceiling, device_name, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(op, dt) for op in args.ops for dt in args.dtypes]
    cols = len(args.dtypes)
    fig, axes = plt.subplots(len(args.ops), cols, figsize=(6.5 * cols, 3.6 * len(args.ops)), squeeze=False)
    width = 0.8 / len(impls)
    for idx, (op, dt) in enumerate(panels):
        ax = axes[idx // cols][idx % cols]
        case_rows = [r for r in rows if r["op"] == op and r["dtype"] == dt]
        labels = [f"{r['rows']}x{r['dim']}" for r in case_rows]
        for k, n in enumerate(impls):
            vals = [r["results"][n]["pct"] if n in r["results"] else 0.0 for r in case_rows]
            ax.bar([i + (k - (len(impls) - 1) / 2) * width for i in range(len(case_rows))], vals, width, label=n)
        ax.set_xticks(range(len(case_rows)))
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("% of copy ceiling")
        ax.set_title(f"{op} {dt}")
        ax.axhline(100.0, color="grey", linewidth=0.8, linestyle="--")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{device_name}: % of the device-to-device copy ceiling ({ceiling * 1e-9:.0f} GB/s); "
                 f"{'plain launches' if args.eager else 'CUDA-graph replays'}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    bench = Bench(args)  # torch and the rest are imported only now, so --help works without them
    torch = bench.torch
    device_name = torch.cuda.get_device_name(bench.dev)
    ceiling = bench.copy_ceiling()
    rows = []
    for op in args.ops:
        for dt in args.dtypes:
            for (nrows, dim) in args.shapes:
                results = bench.case(op, dt, nrows, dim)
                for m in results.values():
                    m["gbps"] = m["bytes"] / m["seconds"] * 1e-9
                    m["pct"] = 100.0 * m["bytes"] / m["seconds"] / ceiling
                rows.append({"op": op, "dtype": dt, "rows": nrows, "dim": dim, "results": results})
                print(f"  done {op} {dt} {nrows}x{dim}", file=sys.stderr, flush=True)
    impls = [n for n in IMPLS if n in args.impls]
    print_table(rows, impls, ceiling, device_name, args)
    if args.csv:
        write_csv(args.csv, rows, impls, ceiling, device_name, args)
    if args.png:
        write_png(args.png, rows, impls, ceiling, device_name, args)
        print(f"chart: {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
