"""`tnorm check`, `tnorm bench`, `tnorm --help` and `tnorm` alone."""

import csv
import io
import math
import re

import tnormtest as T

OPS = ["rms_norm", "l2_norm", "add_rms_norm"]
DTYPES = ["f32", "f16", "bf16"]


def test_check_passes_and_prints_table(tmp_path):
    proc = T.run_tnorm(["check"], cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, "tnorm check reported a mismatch or failed\n" + T.describe(proc)
    out = proc.stdout
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) >= 9, "expected a table with a line per op/dtype at least\n" + T.describe(proc)
    for op in OPS:
        assert re.search(rf"\b{op}\b", out), f"check's table does not mention {op}\n" + T.describe(proc)
    for dt in DTYPES:
        assert re.search(rf"\b{dt}\b", out), f"check's table does not mention {dt}\n" + T.describe(proc)
    # Every op meets every dtype on some line of the table.
    for op in OPS:
        for dt in DTYPES:
            assert any(re.search(rf"\b{op}\b", ln) and re.search(rf"\b{dt}\b", ln) for ln in lines), (
                f"no line of check's table shows {op} with {dt}\n" + T.describe(proc))
    assert "cpu" in out.lower(), "check's table does not name the cpu device\n" + T.describe(proc)
    # The quantized outputs: every format, on the CPU, through quantize and the norms.
    for fmt in ["fp8", "e5m2", "int8", "mxfp8", "nvfp4"]:
        for op in ["quantize", "rms_norm"]:
            assert any(ln.startswith("cpu") and f"{op} {fmt}" in ln and " ok" in ln for ln in lines), (
                f"no passing cpu line of check's table for {op} {fmt}\n" + T.describe(proc))
    assert not list(tmp_path.iterdir()), "check left files in its working directory"


QUICK = ["--shapes", "64x256", "--iters", "3", "--ops", "rms_norm", "--dtypes", "f32"]


def _parse_csv(path):
    text = path.read_text()
    rows = list(csv.reader(io.StringIO(text)))
    rows = [r for r in rows if any(f.strip() for f in r)]
    assert len(rows) >= 2, f"{path}: expected a header line and at least one measurement:\n{text}"
    return rows[0], rows[1:], text


def _number(s):
    try:
        v = float(s.strip().rstrip("%"))
    except ValueError:
        return None
    return v


def test_bench_cpu_csv(tmp_path):
    csv_path = tmp_path / "bench.csv"
    proc = T.run_tnorm(["bench", "--device", "cpu", "--csv", csv_path, *QUICK], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, T.describe(proc)
    assert "GB/s" in proc.stdout, "bench should print GB/s\n" + T.describe(proc)
    header, rows, text = _parse_csv(csv_path)
    header = [h.strip() for h in header]
    assert all(header), f"empty column name in the CSV header {header}"
    assert all(_number(h) is None for h in header), f"the CSV's first line is not a header: {header}"
    for r in rows:
        assert len(r) == len(header), f"row {r} has {len(r)} fields, the header {len(header)}:\n{text}"
    numeric = [i for i in range(len(header)) if all(_number(r[i]) is not None for r in rows)]
    assert len(numeric) >= 3, f"expected at least 3 numeric columns (time, GB/s, %): {header}\n{text}"
    for i in numeric:
        for r in rows:
            v = _number(r[i])
            assert math.isfinite(v) and v > 0, (
                f"column {header[i]!r}: value {r[i]!r} is not a positive number:\n{text}")
    names = " ".join(header).lower()
    assert re.search(r"time|sec|_us|_ns|_ms|\bus\b|\bms\b|\bns\b|lat", names), f"no time column in {header}"
    assert re.search(r"gb", names), f"no GB/s column in {header}"
    assert re.search(r"%|pct|percent|ceil|frac|eff|roof|peak", names), f"no ceiling-percentage column in {header}"
    # The measurement asked for is there.
    assert any("rms_norm" in ",".join(r) for r in rows), f"no rms_norm measurement in the CSV:\n{text}"


def test_bench_cpu_f32_stream_and_gated_heads(tmp_path):
    """The bench's cases of the general kernels: add_rms_norm with an f32 residual stream (bytes counted at
    4 a residual element) and rms_norm of every head times a multiplicand."""
    csv_path = tmp_path / "bench.csv"
    ops = ["add_rms_norm_f32_stream", "rms_norm_gated_heads"]
    proc = T.run_tnorm(["bench", "--device", "cpu", "--csv", csv_path, "--shapes", "64x4x128", "--iters", "3",
                        "--ops", ",".join(ops), "--dtypes", "bf16"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, T.describe(proc)
    header, rows, text = _parse_csv(csv_path)
    col = {h.strip(): i for i, h in enumerate(header)}
    assert sorted(r[col["op"]] for r in rows) == ops, text
    for r in rows:
        assert r[col["dtype"]] == "bf16" and int(r[col["rows"]]) == 256 and int(r[col["dim"]]) == 128, text
        assert float(r[col["pct_ceiling"]]) > 0, text
    # GB/s over time: the f32 stream moves x and y (2 bytes) and the residual in and out (4 bytes each).
    f32_stream = next(r for r in rows if r[col["op"]] == "add_rms_norm_f32_stream")
    moved = float(f32_stream[col["gbps"]]) * 1e9 * float(f32_stream[col["time_us"]]) * 1e-6
    assert abs(moved - (256 * 128 * (2 + 2 + 4 + 4) + 128 * 2)) < 0.01 * moved, text


def test_bench_cpu_quantized_outputs(tmp_path):
    """The quantized bench ops write q and the scales instead of y; GB/s counts x, the weight (and the
    residual in and out), q and the scales."""
    csv_path = tmp_path / "bench.csv"
    ops = ["rms_norm+fp8_token", "rms_norm+fp8_group128", "add_rms_norm+nvfp4", "quantize+fp8_token",
           "rms_norm+mxfp8"]
    proc = T.run_tnorm(["bench", "--device", "cpu", "--csv", csv_path, "--shapes", "64x256", "--iters", "3",
                        "--ops", ",".join(ops), "--dtypes", "bf16"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, T.describe(proc)
    header, rows, text = _parse_csv(csv_path)
    col = {h.strip(): i for i, h in enumerate(header)}
    assert sorted(r[col["op"]] for r in rows) == sorted(ops), text
    x, w = 64 * 256 * 2, 256 * 2
    expected = {
        "rms_norm+fp8_token": x + w + 64 * 256 + 64 * 4,             # q, one f32 scale a row
        "rms_norm+fp8_group128": x + w + 64 * 256 + 2 * 64 * 4,      # two f32 scales a row, column-major
        "add_rms_norm+nvfp4": 3 * x + w + 64 * 128 + 128 * 16,       # residual in and out; swizzled E4M3 tile
        "quantize+fp8_token": x + 64 * 256 + 64 * 4,                 # no weight
        "rms_norm+mxfp8": x + w + 64 * 256 + 128 * 8,                # a 128-row swizzled UE8M0 tile
    }
    for r in rows:
        moved = float(r[col["gbps"]]) * 1e9 * float(r[col["time_us"]]) * 1e-6
        want = expected[r[col["op"]]]
        assert abs(moved - want) < 0.01 * want, f"{r[col['op']]}: {moved:.0f} bytes, expected {want}\n{text}"


def test_bench_quantize_needs_a_format(tmp_path):
    proc = T.run_tnorm(["bench", "--device", "cpu", "--ops", "quantize", "--shapes", "8x64"], cwd=tmp_path)
    T.assert_error_output(proc, 2)
    assert "quantize+fp8_token" in proc.stderr, T.describe(proc)


def test_bench_cpu_prints_without_csv(tmp_path):
    proc = T.run_tnorm(["bench", "--device", "cpu", *QUICK], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, T.describe(proc)
    assert "GB/s" in proc.stdout and "rms_norm" in proc.stdout, T.describe(proc)
    assert not list(tmp_path.iterdir()), "bench without --csv left files behind"


def test_help_exits_0(tmp_path):
    proc = T.run_tnorm(["--help"], cwd=tmp_path)
    assert proc.returncode == 0, T.describe(proc)
    text = proc.stdout + proc.stderr
    for word in ["run", "check", "bench"]:
        assert word in text, f"--help does not mention {word}\n" + T.describe(proc)
    for op in OPS:
        assert op in text, f"--help does not mention {op}\n" + T.describe(proc)
    assert "%%" not in text, "--help shows a printf escape ('%%') literally\n" + T.describe(proc)


def test_no_arguments_exits_2(tmp_path):
    proc = T.run_tnorm([], cwd=tmp_path)
    assert proc.returncode == 2, T.describe(proc)


def test_no_arguments_one_error_line(tmp_path):
    # A usage error like any other: exactly one "tnorm: error: " line on stderr.
    proc = T.run_tnorm([], cwd=tmp_path)
    T.assert_error_output(proc, 2)


def test_bench_unknown_device_is_usage_error(tmp_path):
    proc = T.run_tnorm(["bench", "--device", "tpu", *QUICK], cwd=tmp_path)
    T.assert_error_output(proc, 2)


def test_check_unknown_device_is_usage_error(tmp_path):
    proc = T.run_tnorm(["check", "--device", "tpu"], cwd=tmp_path)
    T.assert_error_output(proc, 2)


def test_bench_csv_into_missing_directory(tmp_path):
    proc = T.run_tnorm(["bench", "--device", "cpu", "--csv", tmp_path / "no_such_dir" / "b.csv", *QUICK],
                       cwd=tmp_path, timeout=120)
    T.assert_error_output(proc, 1)
    assert not list(tmp_path.iterdir()), "a failed bench left files behind"


def test_bench_graph_fuses_the_decode_step(tmp_path):
    # A decode step of 3 layers: each add -> rms_norm -> mul becomes one add_rms_norm with the multiplicand.
    proc = T.run_tnorm(["bench-graph", "--device", "cpu", "--layers", "3", "--steps", "2", "--dim", "256"],
                       cwd=tmp_path)
    assert proc.returncode == 0, T.describe(proc)
    rows = [ln for ln in proc.stdout.splitlines() if re.match(r"\s*\d+\s+\d", ln)]
    assert [ln.split()[0] for ln in rows] == ["1", "8", "64"], T.describe(proc)
    for ln in rows:
        assert "9 ops -> 3 (add + rms_norm: 3, norm + mul: 3)" in ln, T.describe(proc)
        times = [float(f) for f in ln.split()[1:4]]
        assert all(t > 0 for t in times), T.describe(proc)


def test_bench_graph_usage_errors(tmp_path):
    for args in (["--layers", "0"], ["--dim", "x"], ["--bogus"], ["extra"]):
        proc = T.run_tnorm(["bench-graph", "--device", "cpu"] + args, cwd=tmp_path)
        assert proc.returncode == 2, f"{args}\n" + T.describe(proc)
        assert proc.stderr.startswith("tnorm: error: ") and proc.stderr.count("\n") == 1, T.describe(proc)
