"""Hostile use of the command's files and values: inputs that are not regular files, two outputs that
name one file, a second output that cannot be put in place, fatal signals and file size limits while
writing, option values that float32 cannot hold.

A failure must be one "tnorm: error: " line, exit 1 (2 for a usage error), and leave every file as it
was: no output replaced, none created, no temporary left behind."""

import os
import resource
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

import tnormtest as T

USAGE = 2
ERROR = 1
HANG_TIMEOUT = 15


class Dirs(T.Workdirs):
    """in/ for inputs; out/ holding y.npy, r.npy and y.safetensors with known bytes."""

    def __init__(self, tmp_path, rng):
        super().__init__(tmp_path, rng, ("y.npy", "r.npy", "y.safetensors"))

    def residual(self, shape=(4, 8), dtype="f32"):
        return self.npy("res.npy", T.rand_normal(self.rng, shape, dtype))


def run_expecting_error(d, args, codes, timeout=HANG_TIMEOUT, **kw):
    """Runs the command in d.tmp; asserts the error contract and that nothing under d.tmp changed."""
    before = T.snapshot(d.tmp)
    try:
        proc = T.run_tnorm(args, cwd=d.tmp, timeout=timeout, **kw)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the command hung (killed after {timeout} s): {' '.join(map(str, args))}")
    T.assert_error_output(proc, codes)
    added, removed, changed = T.diff_snapshots(before, T.snapshot(d.tmp))
    assert not changed, f"files changed by a failed call: {changed}\n" + T.describe(proc)
    assert not added, f"files left behind by a failed call: {added}\n" + T.describe(proc)
    assert not removed, f"files removed by a failed call: {removed}\n" + T.describe(proc)
    return proc


# --------------------------------------------------------------------------------------------------
# Inputs that are not regular files are refused at once, never read (a FIFO would block forever)
# --------------------------------------------------------------------------------------------------

def _fifo(d, name):
    p = d.ind / name
    os.mkfifo(p)
    return p


def _non_regular_args(d, kind):
    x, out = d.x(), d.outd / "y.npy"
    if kind == "fifo_x":
        return ["run", "rms_norm", "--x", _fifo(d, "f.npy"), "--out", out]
    if kind == "fifo_x_safetensors":
        return ["run", "rms_norm", "--x", f"{_fifo(d, 'f.safetensors')}:x", "--out", out]
    if kind == "fifo_weight":
        return ["run", "rms_norm", "--x", x, "--weight", _fifo(d, "w.npy"), "--out", out]
    if kind == "fifo_residual":
        return ["run", "add_rms_norm", "--x", x, "--residual", _fifo(d, "r.npy"), "--out", out,
                "--residual-out", d.outd / "r.npy"]
    if kind == "symlink_to_fifo":
        os.symlink(_fifo(d, "f.npy"), d.ind / "link.npy")
        return ["run", "rms_norm", "--x", d.ind / "link.npy", "--out", out]
    if kind == "dev_zero":
        os.symlink("/dev/zero", d.ind / "z.npy")
        return ["run", "rms_norm", "--x", d.ind / "z.npy", "--out", out]
    if kind == "dev_null":
        os.symlink("/dev/null", d.ind / "n.safetensors")
        return ["run", "rms_norm", "--x", f"{d.ind / 'n.safetensors'}:x", "--out", out]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["fifo_x", "fifo_x_safetensors", "fifo_weight", "fifo_residual",
                                  "symlink_to_fifo", "dev_zero", "dev_null"])
def test_non_regular_input_is_refused_without_blocking(tmp_path, rng, kind):
    d = Dirs(tmp_path, rng)
    proc = run_expecting_error(d, _non_regular_args(d, kind), ERROR)
    assert "not a regular file" in proc.stderr, T.describe(proc)


def test_socket_input_is_refused(tmp_path, rng):
    d = Dirs(tmp_path, rng)
    path = d.ind / "s.npy"
    if len(str(path)) >= 100:
        pytest.skip("the temporary directory's path is too long for a unix socket")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(str(path))
        proc = run_expecting_error(d, ["run", "rms_norm", "--x", path, "--out", d.outd / "y.npy"], ERROR)
    finally:
        s.close()
    assert "not a regular file" in proc.stderr, T.describe(proc)


# --------------------------------------------------------------------------------------------------
# Two outputs: all or nothing
# --------------------------------------------------------------------------------------------------

def _blocked_residual_out(d, blocker, ext):
    if blocker == "directory":
        # rename() cannot replace a non-empty directory, whoever runs the command.
        target = d.outd / f"blocked{ext}"
        target.mkdir()
        (target / "keep").write_bytes(b"keep")
        return target
    # A name longer than NAME_MAX: the temporary beside it can be created, the rename cannot.
    return d.outd / ("r" * 300 + ext)


@pytest.mark.parametrize("blocker", ["directory", "name_too_long"])
@pytest.mark.parametrize("existing", ["existing", "new"])
@pytest.mark.parametrize("ext", [".npy", ".safetensors"])
def test_second_output_failing_keeps_the_first_as_it_was(tmp_path, rng, blocker, existing, ext):
    d = Dirs(tmp_path, rng)
    out = d.outd / f"y{ext}" if existing == "existing" else d.outd / f"new{ext}"
    args = ["run", "add_rms_norm", "--x", d.x(), "--residual", d.residual(), "--out", out,
            "--residual-out", _blocked_residual_out(d, blocker, ext)]
    run_expecting_error(d, args, ERROR)


def test_first_output_failing_writes_neither(tmp_path, rng):
    d = Dirs(tmp_path, rng)
    args = ["run", "add_rms_norm", "--x", d.x(), "--residual", d.residual(),
            "--out", _blocked_residual_out(d, "name_too_long", ".npy"), "--residual-out", d.outd / "r.npy"]
    run_expecting_error(d, args, ERROR)


def test_two_outputs_replace_both(tmp_path, rng):
    d = Dirs(tmp_path, rng)
    x, r = T.rand_normal(rng, (4, 8), "f32"), T.rand_normal(rng, (4, 8), "f32")
    proc = T.run_tnorm(["run", "add_rms_norm", "--x", d.npy("x.npy", x), "--residual", d.npy("res.npy", r),
                        "--out", d.outd / "y.npy", "--residual-out", d.outd / "r.npy"], cwd=tmp_path)
    T.assert_ok(proc)
    _, ref_r = T.reference("add_rms_norm", x, residual=r)
    T.assert_bits_equal(T.read_npy(d.outd / "r.npy"), ref_r, "residual-out")
    assert T.read_npy(d.outd / "y.npy").shape == (4, 8)
    assert sorted(os.listdir(d.outd)) == ["r.npy", "y.npy", "y.safetensors"]


# --------------------------------------------------------------------------------------------------
# Two outputs that are one file
# --------------------------------------------------------------------------------------------------

def _same_outputs(d, case):
    """(--out, --residual-out), relative to d.tmp where the command runs."""
    if case == "dot_slash":
        return "out/y.npy", "./out/y.npy"
    if case == "absolute":
        return "out/y.npy", str(d.outd / "y.npy")
    if case == "dot_dot":
        return "out/y.npy", "out/../out/y.npy"
    if case == "hard_link":
        os.link(d.outd / "y.npy", d.outd / "h.npy")
        return "out/y.npy", "out/h.npy"
    if case == "symlink":
        os.symlink("y.npy", d.outd / "s.npy")
        return "out/y.npy", "out/s.npy"
    if case == "symlinked_directory":
        os.symlink("out", d.tmp / "o2")
        return "out/y.npy", "o2/y.npy"
    if case == "new_file_dot_slash":
        return "out/n.npy", "./out/n.npy"
    if case == "new_file_symlinked_directory":
        os.symlink("out", d.tmp / "o2")
        return "out/n.npy", "o2/n.npy"
    if case == "safetensors_two_tensors_new_file":
        return "out/f.safetensors:y", "out/f.safetensors:r"
    if case == "safetensors_two_tensors_existing_file":
        return "out/y.safetensors:y", "./out/y.safetensors:r"
    if case == "safetensors_default_names":
        return "out/y.safetensors", str(d.outd / "y.safetensors")
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["dot_slash", "absolute", "dot_dot", "hard_link", "symlink", "symlinked_directory",
                                  "new_file_dot_slash", "new_file_symlinked_directory",
                                  "safetensors_two_tensors_new_file", "safetensors_two_tensors_existing_file",
                                  "safetensors_default_names"])
def test_outputs_naming_one_file_are_refused(tmp_path, rng, case):
    d = Dirs(tmp_path, rng)
    out, res_out = _same_outputs(d, case)
    args = ["run", "add_rms_norm", "--x", d.x(), "--residual", d.residual(), "--out", out, "--residual-out", res_out]
    proc = run_expecting_error(d, args, ERROR)
    assert "same file" in proc.stderr, T.describe(proc)
    if "safetensors" in case:
        assert "two files" in proc.stderr, T.describe(proc)


def test_distinct_outputs_in_one_directory_are_fine(tmp_path, rng):
    d = Dirs(tmp_path, rng)
    os.symlink("out", tmp_path / "o2")
    proc = T.run_tnorm(["run", "add_rms_norm", "--x", d.x(), "--residual", d.residual(),
                        "--out", "o2/a.safetensors:y", "--residual-out", "./out/b.safetensors:r"], cwd=tmp_path)
    T.assert_ok(proc)
    assert T.read_output(str(d.outd / "a.safetensors"))[1] == "y"
    assert T.read_output(str(d.outd / "b.safetensors"))[1] == "r"


# --------------------------------------------------------------------------------------------------
# Fatal signals and the file size limit while an output is being written
# --------------------------------------------------------------------------------------------------

BIG_SHAPE = (10240, 4096)  # 160 MiB of f32: long enough to write that a signal lands mid-write


@pytest.fixture(scope="module")
def big_input(tmp_path_factory):
    d = tmp_path_factory.mktemp("big")
    p = d / "big.npy"
    T.write_npy(p, np.full(BIG_SHAPE, 0.5, dtype="<f4"))
    yield p
    p.unlink()


def _small_files(outd, known):
    """{name: bytes} for the known (small) files, {name: size} for anything else."""
    got = {}
    for name in os.listdir(outd):
        p = outd / name
        got[name] = p.read_bytes() if name in known else os.stat(p).st_size
    return got


def _interrupt_while_writing(outd, args, cwd, sig, outputs):
    """Starts the command; once it is writing its last output's temporary, stops it, sends sig and lets
    it go on. Returns the finished Popen and its stderr."""
    known = set(os.listdir(outd))
    y_size = os.stat(outd / "y.npy").st_size
    p = subprocess.Popen([T.tnorm_bin()] + [str(a) for a in args], cwd=cwd, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, errors="replace")
    try:
        deadline = time.monotonic() + 120
        while True:
            assert p.poll() is None, "the command finished before it could be interrupted: " + p.stderr.read()
            assert time.monotonic() < deadline, "the command never started writing"
            new = [n for n in os.listdir(outd) if n not in known]
            y_replaced = os.stat(outd / "y.npy").st_size != y_size
            # Writing the last output: its temporary exists and, for two outputs, the first one's
            # temporary does too or the first output is already in place.
            if len(new) >= outputs or (new and y_replaced):
                break
            time.sleep(0.0005)
        os.kill(p.pid, signal.SIGSTOP)
        os.kill(p.pid, sig)
        os.kill(p.pid, signal.SIGCONT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_fatal_signal_while_writing_leaves_no_temporary(tmp_path, rng, big_input, sig):
    d = Dirs(tmp_path, rng)
    before = _small_files(d.outd, set(os.listdir(d.outd)))
    args = ["run", "rms_norm", "--x", big_input, "--out", d.outd / "y.npy"]
    p, err = _interrupt_while_writing(d.outd, args, tmp_path, sig, outputs=1)
    assert p.returncode == -sig, f"expected death by {sig.name}, got {p.returncode}: {err}"
    assert _small_files(d.outd, set(before)) == before, "a temporary was left or an output changed"


def test_fatal_signal_between_two_outputs_changes_neither(tmp_path, rng, big_input):
    d = Dirs(tmp_path, rng)
    before = _small_files(d.outd, set(os.listdir(d.outd)))
    args = ["run", "add_rms_norm", "--x", big_input, "--residual", big_input, "--out", d.outd / "y.npy",
            "--residual-out", d.outd / "r.npy"]
    p, err = _interrupt_while_writing(d.outd, args, tmp_path, signal.SIGTERM, outputs=2)
    assert p.returncode == -signal.SIGTERM, f"expected death by SIGTERM, got {p.returncode}: {err}"
    assert _small_files(d.outd, set(before)) == before, "a temporary was left or an output changed"


def test_signal_at_any_moment_leaves_both_outputs_old_or_both_new(tmp_path, rng):
    d = Dirs(tmp_path, rng)
    x, res = d.x((1024, 1024)), d.residual((1024, 1024))
    cal = tmp_path / "expected"
    cal.mkdir()

    def args(outd):
        return ["run", "add_rms_norm", "--x", x, "--residual", res, "--out", outd / "y.npy",
                "--residual-out", outd / "r.npy"]

    start = time.monotonic()
    T.assert_ok(T.run_tnorm(args(cal), cwd=tmp_path))
    span = time.monotonic() - start
    old = {n: (d.outd / n).read_bytes() for n in os.listdir(d.outd)}
    new = dict(old, **{n: (cal / n).read_bytes() for n in ("y.npy", "r.npy")})
    outcomes = []
    for _ in range(40):
        for name, data in old.items():
            (d.outd / name).write_bytes(data)
        p = subprocess.Popen([T.tnorm_bin()] + [str(a) for a in args(d.outd)], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(float(rng.uniform(0, span * 1.2)))
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=120)
        got = {n: (d.outd / n).read_bytes() for n in os.listdir(d.outd)}
        assert rc in (0, -signal.SIGTERM), f"exit {rc}"
        assert got == old or got == new, (
            f"after exit {rc}: {sorted(n for n in got if got[n] != old.get(n))} differ from before, "
            f"{sorted(n for n in got if got[n] != new.get(n))} from a complete run")
        outcomes.append(rc)


def _limit_file_size(limit):
    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return set_limit


def test_file_size_limit_is_an_error_not_a_signal(tmp_path, rng):
    d = Dirs(tmp_path, rng)
    args = ["run", "rms_norm", "--x", d.x((256, 1024)), "--out", d.outd / "y.npy"]  # 1 MiB of output
    proc = run_expecting_error(d, args, ERROR, preexec_fn=_limit_file_size(256 << 10))
    assert "File too large" in proc.stderr, T.describe(proc)


def test_file_size_limit_on_the_second_output_changes_neither(tmp_path, rng):
    d = Dirs(tmp_path, rng)
    # y: f16, 512 KiB, fits the limit; residual-out: the f32 residual's dtype, 1 MiB, does not.
    args = ["run", "add_rms_norm", "--x", d.x((128, 2048), "f16"), "--residual", d.residual((128, 2048), "f32"),
            "--out", d.outd / "y.npy", "--residual-out", d.outd / "r.npy"]
    proc = run_expecting_error(d, args, ERROR, preexec_fn=_limit_file_size(768 << 10))
    assert "File too large" in proc.stderr, T.describe(proc)


# --------------------------------------------------------------------------------------------------
# Values the library's float parameters cannot hold
# --------------------------------------------------------------------------------------------------

FLOAT_CASES = [
    ("rms_norm", "--eps", "1e-50"),           # rounds to 0
    ("rms_norm", "--eps", "-1e-50"),          # rounds to -0
    ("rms_norm", "--eps", "1e-40"),           # subnormal
    ("rms_norm", "--eps", "1e39"),            # beyond FLT_MAX
    ("rms_norm", "--eps", "inf"),
    ("layer_norm", "--eps", "1e-46"),
    ("l2_norm", "--scale", "1e-50"),
    ("l2_norm", "--scale", "-3e-39"),
    ("l2_norm", "--scale", "1e39"),
    ("rms_norm", "--weight-offset", "1e-50"),
    ("rms_norm", "--weight-offset", "1e-44"),
    ("rms_norm", "--weight-offset", "-1e300"),
]


@pytest.mark.parametrize("op,flag,value", FLOAT_CASES)
def test_value_float32_cannot_hold_is_a_usage_error(tmp_path, rng, op, flag, value):
    d = Dirs(tmp_path, rng)
    args = ["run", op, "--x", d.x(), "--out", d.outd / "y.npy", flag, value]
    if flag == "--weight-offset":
        args += ["--weight", d.npy("w.npy", np.ones(8, "<f4"))]
    proc = run_expecting_error(d, args, USAGE)
    assert flag in proc.stderr, T.describe(proc)


@pytest.mark.parametrize("op,flag,value", [("rms_norm", "--eps", "1.2e-38"), ("rms_norm", "--weight-offset", "0"),
                                           ("rms_norm", "--weight-offset", "-0"), ("l2_norm", "--scale", "3.4e38"),
                                           ("l2_norm", "--scale", "0")])
def test_value_float32_holds_is_accepted(tmp_path, rng, op, flag, value):
    d = Dirs(tmp_path, rng)
    args = ["run", op, "--x", d.x(), "--out", d.outd / "new.npy", flag, value]
    if flag == "--weight-offset":
        args += ["--weight", d.npy("w.npy", np.ones(8, "<f4"))]
    T.assert_ok(T.run_tnorm(args, cwd=tmp_path))


def test_help_states_the_memory_needed(tmp_path):
    proc = T.run_tnorm(["--help"], cwd=tmp_path)
    T.assert_ok(proc)
    text = " ".join(proc.stdout.split()).lower()
    assert "memory" in text and "inputs whole" in text, proc.stdout


# --------------------------------------------------------------------------------------------------
# Standard streams closed at start: no file the command opens takes their numbers
# --------------------------------------------------------------------------------------------------

def _closing(*fds):
    def close():
        for fd in fds:
            os.close(fd)
    return close


def test_closed_stdout_keeps_the_table_out_of_the_csv(tmp_path):
    # Enough rows that the table (stdout, fully buffered) is flushed while the CSV is open.
    csv = tmp_path / "bench.csv"
    proc = subprocess.run([T.tnorm_bin(), "bench", "--device", "cpu", "--csv", str(csv), "--shapes",
                           "1x64,2x64,3x64,4x64", "--dtypes", "f32,f16,bf16", "--iters", "1"],
                          cwd=tmp_path, stderr=subprocess.PIPE, text=True, timeout=HANG_TIMEOUT * 8,
                          preexec_fn=_closing(1))
    assert proc.returncode == 0, proc.stderr
    lines = csv.read_text().splitlines()
    assert lines[0].startswith("device,op,dtype"), lines[:3]
    stray = [ln for ln in lines[1:] if not ln.startswith("cpu,")]
    assert len(lines) > 40 and not stray, f"{len(lines)} lines, not CSV rows: {stray[:3]}"


def test_closed_stdout_and_stderr_leave_outputs_whole(tmp_path, rng):
    d = Dirs(tmp_path, rng)
    x = T.rand_normal(rng, (4, 8), "f32")
    xp = d.npy("x.npy", x)
    out = d.outd / "new.npy"
    proc = subprocess.run([T.tnorm_bin(), "run", "rms_norm", "--x", str(xp), "--out", str(out)], cwd=tmp_path,
                          timeout=HANG_TIMEOUT, preexec_fn=_closing(1, 2))
    assert proc.returncode == 0
    assert T.read_npy(out).shape == (4, 8)  # a whole, readable .npy
