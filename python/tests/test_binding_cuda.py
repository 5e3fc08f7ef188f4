"""The binding on CUDA tensors (torch; cupy and jax where installed): against torch float64 math, against
Hugging Face's RMSNorm modules, strided views, the caller's stream, and CUDA graph capture.

Skipped as a whole, with the reason, where torch, a CUDA device or the library's CUDA backend is missing.
"""

import os

import numpy as np
import pytest

import numerics as N
from kinds import TorchKind

torch = pytest.importorskip("torch", reason="torch is not installed: the CUDA tests need it")
if not torch.cuda.is_available():
    pytest.skip("torch sees no CUDA device", allow_module_level=True)

import tnorm  # noqa: E402
from tnorm import _lib  # noqa: E402


def _cuda_unavailable_reason():
    try:
        if _lib.lib().tn_device_available(_lib.context(), _lib.TN_DEVICE_CUDA) == 0:
            return None
        return _lib.lib().tn_context_last_error(_lib.context()).decode()
    except RuntimeError as e:  # the library itself is missing
        return str(e)


_REASON = _cuda_unavailable_reason()
if _REASON is not None:
    if os.environ.get("TNORM_REQUIRE_CUDA") == "1":  # gpu-check: a GPU is there, so this is a failure
        pytest.fail(f"libtnorm cannot run on CUDA: {_REASON}", pytrace=False)
    pytest.skip(f"libtnorm cannot run on CUDA here: {_REASON}", allow_module_level=True)

CUDA = TorchKind("cuda")
TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
DTYPES = ["f32", "f16", "bf16"]


def _f32(v):
    return float(np.float32(v))


def torch_reference(op, x, weight=None, mul=None, residual=None, eps=1e-6, scale=1.0, weight_offset=0.0):
    """The contract in torch float64 on the GPU: (y float64, residual_out of x's dtype or None)."""
    res_out = None
    if op == "add_rms_norm":
        res_out = (x.float() + residual.float()).to(x.dtype)
        s = res_out.double()
    else:
        s = x.double()
    ss = (s * s).sum(-1, keepdim=True)
    if op == "l2_norm":
        return s / torch.sqrt(ss + _f32(eps)) * _f32(scale), None
    y = s / torch.sqrt(ss / s.shape[-1] + _f32(eps))
    if weight is not None:
        y = y * (weight.double() + _f32(weight_offset))
    if mul is not None:
        y = y * mul.double()
    return y, res_out


def randn(shape, dtype, scale=1.0, generator=None):
    return (torch.randn(shape, device="cuda", generator=generator) * scale).to(TORCH_DTYPES[dtype])


def rand_weight(n, dtype, generator=None):
    return (torch.rand(n, device="cuda", generator=generator) * 4 - 2).to(TORCH_DTYPES[dtype])


@pytest.fixture
def gen(rng):
    g = torch.Generator(device="cuda")
    g.manual_seed(int(rng.integers(1 << 62)))
    return g


def assert_close_to(got, ref64, what="y"):
    N.assert_close(CUDA.to_numpy(got), ref64.cpu().numpy(), what)


VARIANTS = {
    "rms_norm": {"noweight": {}, "weight": {"weight": "same"}, "weight_f32_offset1": {"weight": "f32",
                                                                                       "weight_offset": 1.0},
                 "weight_mul": {"weight": "same", "mul": True}},
    "l2_norm": {"plain": {}, "scale0.5": {"scale": 0.5}},
    "add_rms_norm": {"weight": {"weight": "same"}, "weight_f32": {"weight": "f32"},
                     "weight_offset1_mul": {"weight": "same", "weight_offset": 1.0, "mul": True}},
}


def _matrix():
    for op, variants in VARIANTS.items():
        for variant in variants:
            for dtype in DTYPES:
                for dim in [1, 7, 128, 4096, 5120, 16384]:
                    yield pytest.param(op, variant, dtype, dim, id=f"{op}-{variant}-{dtype}-{dim}")


def run_case(op, opts, x, weight, mul, residual, **outputs):
    kw = {}
    if op != "l2_norm" and "weight_offset" in opts:
        kw["weight_offset"] = opts["weight_offset"]
    if op == "l2_norm" and "scale" in opts:
        kw["scale"] = opts["scale"]
    if op == "rms_norm":
        return tnorm.rms_norm(x, weight, mul=mul, **kw, **outputs), kw
    if op == "l2_norm":
        return tnorm.l2_norm(x, **kw, **outputs), kw
    return tnorm.add_rms_norm(x, residual, weight, mul=mul, **kw, **outputs), kw


@pytest.mark.parametrize("op,variant,dtype,dim", list(_matrix()))
def test_against_torch_float64(gen, op, variant, dtype, dim):
    opts = VARIANTS[op][variant]
    rows = 37
    x = randn((rows, dim), dtype, generator=gen)
    weight = rand_weight(dim, dtype if opts.get("weight") == "same" else "f32", gen) if opts.get("weight") else None
    mul = randn((rows, dim), dtype, generator=gen) if opts.get("mul") else None
    residual = randn((rows, dim), dtype, generator=gen) if op == "add_rms_norm" else None
    got, kw = run_case(op, opts, x, weight, mul, residual)
    torch.cuda.synchronize()
    ref_y, ref_r = torch_reference(op, x, weight=weight, mul=mul, residual=residual, **kw)
    if op == "add_rms_norm":
        y, s = got
        assert s.device == x.device and s.dtype == x.dtype
        N.assert_bits_equal(CUDA.to_numpy(s), CUDA.to_numpy(ref_r), "residual_out")
    else:
        y = got
    assert isinstance(y, torch.Tensor) and y.device == x.device and y.dtype == x.dtype and y.shape == x.shape
    assert_close_to(y, ref_y)


# ---- Hugging Face's RMSNorm modules ----

def _hf_module(name):
    import importlib
    module_path, cls = {
        "llama": ("transformers.models.llama.modeling_llama", "LlamaRMSNorm"),
        "qwen3": ("transformers.models.qwen3.modeling_qwen3", "Qwen3RMSNorm"),
        "gemma3": ("transformers.models.gemma3.modeling_gemma3", "Gemma3RMSNorm"),
    }[name]
    try:
        return getattr(importlib.import_module(module_path), cls)
    except Exception as e:  # transformers missing, or a version without this model
        pytest.skip(f"{module_path}.{cls} is not importable: {e}")


def assert_near(dtype, got, expected, what, ulps=1):
    """bf16/f16: at most `ulps` ulps apart (at the larger magnitude of the two); f32: the project's 2e-5
    relative (float32 results differ in their last bits with the summation order and rsqrt's own error)."""
    g = CUDA.to_numpy(got).astype(np.float64)
    e = CUDA.to_numpy(expected).astype(np.float64)
    if dtype == "f32":
        err = N.error_in_tolerances("f32", g, e)
    else:
        err = np.abs(g - e) / N.ulp(dtype, np.maximum(np.abs(g), np.abs(e)))
    bad = int((~(err <= ulps)).sum())
    assert bad == 0, f"{what}: {bad} of {g.size} elements out of tolerance; worst {float(np.max(err)):.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [128, 4096, 5120])
@pytest.mark.parametrize("model", ["llama", "qwen3"])
def test_hf_round_then_scale(gen, model, dim, dtype):
    """Llama and Qwen3 round the normalised x to the input dtype before multiplying by the weight; tnorm
    rounds once, at the end. The two stay within 1 ulp of each other."""
    module = _hf_module(model)(dim, eps=1e-6).to(device="cuda", dtype=TORCH_DTYPES[dtype])
    with torch.no_grad():
        module.weight.copy_(rand_weight(dim, dtype, gen))
        x = randn((64, dim), dtype, generator=gen)
        expected = module(x)
    got = tnorm.rms_norm(x, module.weight, eps=1e-6)
    torch.cuda.synchronize()
    assert_near(dtype, got, expected, model)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [128, 4096, 5120])
def test_hf_gemma3(gen, dim, dtype):
    """Gemma3 computes x * rsqrt(mean(x^2) + eps) * (1 + w) in float32 and rounds once, as tnorm does with
    weight_offset=1. The results agree to the bit except where the float32 value before the last rounding
    differs in its last bits (another summation order, torch's approximate rsqrt) and sits on a rounding
    boundary of the output dtype: those elements are 1 ulp apart and rare (on an H100, 10 to 75 in a
    million for bf16 and f16)."""
    module = _hf_module("gemma3")(dim, eps=1e-6).to(device="cuda", dtype=TORCH_DTYPES[dtype])
    with torch.no_grad():
        module.weight.copy_(rand_weight(dim, dtype, gen) * 0.5)
        x = randn((64, dim), dtype, generator=gen)
        expected = module(x)
    got = tnorm.rms_norm(x, module.weight, weight_offset=1.0, eps=1e-6)
    torch.cuda.synchronize()
    assert_near(dtype, got, expected, "gemma3")
    g, e = CUDA.to_numpy(got), CUDA.to_numpy(expected)
    if dtype != "f32":
        differ = int((N.bits(g) != N.bits(e)).sum())
        assert differ <= g.size // 1000, f"{differ} of {g.size} elements differ from Gemma3RMSNorm's bits"


# ---- layouts, streams, graphs, errors ----

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["columns", "every_other_row", "3d_padded"])
def test_strided_views(gen, dtype, layout):
    dim = 4096
    if layout == "columns":
        parent_shape, sl = (9, dim + 64), (slice(None), slice(0, dim))
    elif layout == "every_other_row":
        parent_shape, sl = (18, dim), (slice(None, None, 2), slice(None))
    else:
        parent_shape, sl = (3, 3, dim + 8), (slice(None), slice(None), slice(0, dim))
    x_parent = randn(parent_shape, dtype, generator=gen)
    r_parent = randn(parent_shape, dtype, generator=gen)
    y_parent = torch.full(parent_shape, float("nan"), device="cuda", dtype=TORCH_DTYPES[dtype])
    s_parent = torch.full(parent_shape, float("nan"), device="cuda", dtype=TORCH_DTYPES[dtype])
    w = rand_weight(dim, dtype, gen)
    x, r, y, s = x_parent[sl], r_parent[sl], y_parent[sl], s_parent[sl]
    ptrs = (x.data_ptr(), y.data_ptr())
    got_y, got_s = tnorm.add_rms_norm(x, r, w, out=y, residual_out=s)
    assert got_y is y and got_s is s and (x.data_ptr(), y.data_ptr()) == ptrs
    torch.cuda.synchronize()
    ref_y, ref_s = torch_reference("add_rms_norm", x, weight=w, residual=r)
    assert_close_to(y, ref_y)
    N.assert_bits_equal(CUDA.to_numpy(s), CUDA.to_numpy(ref_s), "residual_out")
    untouched = torch.ones(parent_shape, dtype=torch.bool, device="cuda")
    untouched[sl] = False
    assert torch.isnan(y_parent[untouched]).all() and torch.isnan(s_parent[untouched]).all()
    # rms_norm and l2_norm on the same views, results allocated.
    assert_close_to(tnorm.rms_norm(x, w), torch_reference("rms_norm", x, weight=w)[0])
    assert_close_to(tnorm.l2_norm(x), torch_reference("l2_norm", x)[0])


def test_in_place_on_cuda(gen):
    x = randn((16, 2048), "bf16", generator=gen)
    r = randn((16, 2048), "bf16", generator=gen)
    w = rand_weight(2048, "bf16", gen)
    ref_y, ref_s = torch_reference("add_rms_norm", x, weight=w, residual=r)
    y, s = tnorm.add_rms_norm(x, r, w, out=x, residual_out=r)
    assert y is x and s is r
    torch.cuda.synchronize()
    assert_close_to(x, ref_y)
    N.assert_bits_equal(CUDA.to_numpy(r), CUDA.to_numpy(ref_s), "residual_out")


def test_runs_on_the_current_stream(gen):
    """On a side stream, x is written by a copy queued behind a long sleep: the op reads the copied values
    only if it was queued on that same stream."""
    src = randn((64, 4096), "bf16", generator=gen)
    w = rand_weight(4096, "bf16", gen)
    x = torch.zeros_like(src)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # about 0.1 s of GPU cycles
        x.copy_(src)
        y = tnorm.rms_norm(x, w)
    side.synchronize()
    assert_close_to(y, torch_reference("rms_norm", src, weight=w)[0])


def test_cuda_graph_capture(gen):
    """Captured into a torch CUDA graph, then replayed on new contents of the same buffers."""
    x = randn((32, 4096), "bf16", generator=gen)
    r = randn((32, 4096), "bf16", generator=gen)
    w = rand_weight(4096, "bf16", gen)
    y = torch.empty_like(x)
    s = torch.empty_like(x)
    z = torch.empty_like(x)

    def step():
        tnorm.add_rms_norm(x, r, w, out=y, residual_out=s)
        tnorm.l2_norm(y, scale=2.0, out=z)

    # Warm up on a side stream, as torch asks before a capture (the kernels get compiled and loaded here).
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(2):
        x.copy_(randn((32, 4096), "bf16", generator=gen))
        r.copy_(randn((32, 4096), "bf16", generator=gen))
        z.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref_y, ref_s = torch_reference("add_rms_norm", x, weight=w, residual=r)
        assert_close_to(y, ref_y)
        N.assert_bits_equal(CUDA.to_numpy(s), CUDA.to_numpy(ref_s), "residual_out")
        assert_close_to(z, torch_reference("l2_norm", y, scale=2.0)[0])


def test_errors_on_cuda(gen):
    x = randn((4, 64), "f16", generator=gen)
    y = torch.full_like(x, float("nan"))
    with pytest.raises(ValueError, match=r"^rms_norm: weight has 63 elements, dim is 64$"):
        tnorm.rms_norm(x, rand_weight(63, "f16", gen), out=y)
    with pytest.raises(RuntimeError, match=r"weight is on device"):
        tnorm.rms_norm(x, torch.ones(64, dtype=torch.float16), out=y)
    with pytest.raises(ValueError, match=r"stride 2 elements"):
        tnorm.rms_norm(randn((4, 128), "f16", generator=gen)[:, ::2], out=y)
    with pytest.raises(TypeError, match=r"unsupported dtype float64"):
        tnorm.l2_norm(x.double())
    torch.cuda.synchronize()
    assert torch.isnan(y).all(), "a refused call wrote its output"


def test_second_device(gen):
    if torch.cuda.device_count() < 2:
        pytest.skip("one CUDA device")
    with torch.cuda.device(1):
        x = torch.randn((8, 256), device="cuda:1").to(torch.bfloat16)
        y = tnorm.rms_norm(x)
        assert y.device == x.device
        torch.cuda.synchronize(1)
    assert_close_to(y.to("cuda:0"), torch_reference("rms_norm", x)[0].to("cuda:0"))


def test_cupy_arrays(rng):
    cupy = pytest.importorskip("cupy")
    x_np = N.normal(rng, (8, 1024), "f16")
    w_np = N.uniform(rng, (1024,), "f32")
    y = tnorm.rms_norm(cupy.asarray(x_np), cupy.asarray(w_np))
    assert isinstance(y, cupy.ndarray)
    N.assert_close(cupy.asnumpy(y), N.reference("rms_norm", x_np, weight=w_np)[0])


def test_jax_arrays_on_cuda(rng):
    jax = pytest.importorskip("jax")
    try:
        gpu = jax.devices("gpu")[0]
    except RuntimeError as e:
        pytest.skip(f"jax sees no GPU: {e}")
    x_np = N.normal(rng, (8, 1024), "bf16")
    x = jax.device_put(x_np, gpu)
    y = tnorm.l2_norm(x)
    assert isinstance(y, jax.Array)
    N.assert_close(np.asarray(y), N.reference("l2_norm", x_np)[0])


# ---- casting modes and the rope, against HF's own classes, bit for bit ----
#
# torch on CUDA takes rsqrt from the hardware's approximation, which a correctly rounded 1 / sqrt does not
# reproduce; torch on the CPU computes 1 / sqrt with correctly rounded operations, as tnorm does on every
# backend. So the HF modules run on the CPU, on rows whose sums of squares are exact in float32 whatever
# the summation order (multiples of 1/16 up to 2): every rounding after the reduction is then fixed by the
# spec, and tnorm's CUDA kernels must give exactly HF's bits. Beside it, HF on CUDA is compared within 1 ulp.

def exact_rows(shape, dtype, generator):
    """Values k / 16, |k| <= 32, on the GPU: exact in every dtype, and exactly summed squares."""
    k = torch.randint(-32, 33, shape, device="cuda", generator=generator)
    return (k.float() / 16).to(TORCH_DTYPES[dtype])


def _host(t):
    """A torch tensor on either device as NumPy (bf16 through its 16 bits)."""
    return TorchKind("cuda" if t.is_cuda else "cpu").to_numpy(t)


def assert_bits(got, expected, what):
    g, e = _host(got), _host(expected)
    assert g.shape == e.shape, f"{what}: shape {g.shape}, expected {e.shape}"
    differ = int((N.bits(g) != N.bits(e)).sum())
    assert differ == 0, f"{what}: {differ} of {g.size} elements differ from the reference's bits"


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("model", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("dim", [128, 4096])
def test_hf_casting_bit_exact(gen, model, dim, dtype):
    """llama casting for LlamaRMSNorm and Qwen3RMSNorm, exact casting with weight_offset 1 for
    Gemma3RMSNorm: the same bits as the module (on the CPU)."""
    module = _hf_module(model)(dim, eps=1e-6).to(dtype=TORCH_DTYPES[dtype])
    with torch.no_grad():
        module.weight.copy_(rand_weight(dim, dtype, gen).cpu() * (0.5 if model == "gemma3" else 1.0))
        x = exact_rows((64, dim), dtype, gen)
        expected = module(x.cpu())
        w = module.weight.detach().cuda()
    if model == "gemma3":
        got = tnorm.rms_norm(x, w, weight_offset=1.0, eps=1e-6)
    else:
        got = tnorm.rms_norm(x, w, eps=1e-6, casting="llama")
    torch.cuda.synchronize()
    assert_bits(got, expected, model)
    with torch.no_grad():
        on_cuda = module.cuda()(x)
    # llama casting rounds twice (the normalised row to x's dtype, then its product with the weight): torch's
    # own order and approximate rsqrt on CUDA can move the first rounding by an ulp, which the weight's
    # product carries into up to two ulps of the result (seen: qwen3 f16 x 128, 4 of 8192 elements).
    assert_near(dtype, got, on_cuda, f"{model} on CUDA", ulps=1 if model == "gemma3" else 2)


def _qwen3_rotary(head_dim, theta, positions, dtype):
    """HF Qwen3's cos and sin ([positions, head_dim], x's dtype), from its own rotary embedding class."""
    import importlib
    try:
        qwen3 = importlib.import_module("transformers.models.qwen3.modeling_qwen3")
        config = importlib.import_module("transformers").Qwen3Config(
            head_dim=head_dim, rope_theta=theta, hidden_size=32 * head_dim, num_attention_heads=32,
            num_key_value_heads=8, max_position_embeddings=4096)
        rotary = qwen3.Qwen3RotaryEmbedding(config=config)
    except Exception as e:  # transformers missing, or a version without these
        pytest.skip(f"transformers' Qwen3 rotary embedding is not usable: {e}")
    probe = torch.zeros(1, dtype=TORCH_DTYPES[dtype])
    cos, sin = rotary(probe, positions[None, :])
    return qwen3, cos[0], sin[0]


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_hf_qwen3_qk_norm_rope_on_packed_qkv(gen, dtype):
    """Qwen3's attention prologue on a packed QKV buffer (32 Q heads, 8 KV heads, head_dim 128): q_norm and
    k_norm, then apply_rotary_pos_emb with HF's own cos/sin, as tnorm.rms_norm_rope in place on the Q and K
    views (llama casting, the table made from HF's cos/sin): HF's bits (on the CPU), V untouched."""
    tokens, qh, kh, hd, theta = 24, 32, 8, 128, 1e6
    positions = torch.randint(0, 4096, (tokens,), generator=torch.Generator().manual_seed(int(gen.initial_seed())))
    qwen3, cos, sin = _qwen3_rotary(hd, theta, torch.arange(4096), dtype)
    qkv = exact_rows((tokens, (qh + 2 * kh) * hd), dtype, gen)
    before = qkv.clone()
    q = qkv[:, :qh * hd].view(tokens, qh, hd)
    k = qkv[:, qh * hd:(qh + kh) * hd].view(tokens, kh, hd)
    q_norm = qwen3.Qwen3RMSNorm(hd, eps=1e-6).to(dtype=TORCH_DTYPES[dtype])
    k_norm = qwen3.Qwen3RMSNorm(hd, eps=1e-6).to(dtype=TORCH_DTYPES[dtype])
    with torch.no_grad():
        q_norm.weight.copy_(rand_weight(hd, dtype, gen).cpu())
        k_norm.weight.copy_(rand_weight(hd, dtype, gen).cpu())
        # HF: [tokens, heads, hd] -> norm -> [1, heads, tokens, hd]; cos/sin [1, tokens, hd]
        qr = q_norm(q.cpu()).transpose(0, 1)[None]
        kr = k_norm(k.cpu()).transpose(0, 1)[None]
        q_hf, k_hf = qwen3.apply_rotary_pos_emb(qr, kr, cos[positions][None], sin[positions][None])
    table = torch.cat([cos[:, :hd // 2], sin[:, :hd // 2]], dim=1).cuda()  # the halves repeat
    pos = positions.cuda()
    tnorm.rms_norm_rope(q, pos, q_norm.weight.detach().cuda(), eps=1e-6, cos_sin=table, casting="llama", out=q)
    tnorm.rms_norm_rope(k, pos, k_norm.weight.detach().cuda(), eps=1e-6, cos_sin=table, casting="llama", out=k)
    torch.cuda.synchronize()
    assert_bits(q, q_hf[0].transpose(0, 1), "Q")
    assert_bits(k, k_hf[0].transpose(0, 1), "K")
    assert_bits(qkv[:, (qh + kh) * hd:], before[:, (qh + kh) * hd:].cpu(), "V")


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_against_torch(gen, dtype):
    """tnorm.layer_norm against F.layer_norm (float32 inside, one rounding) on CUDA: within 1 ulp, with an
    absolute floor where x - mean cancels."""
    x = randn((256, 4096), dtype, generator=gen) + 0.5
    w, b = rand_weight(4096, dtype, gen), rand_weight(4096, dtype, gen)
    got = tnorm.layer_norm(x, w, b, eps=1e-5)
    ref = torch.nn.functional.layer_norm(x.double(), (4096,), w.double(), b.double(), eps=_f32(1e-5))
    g, r = CUDA.to_numpy(got).astype(np.float64), ref.cpu().numpy()
    err = N.error_in_tolerances(dtype, g, r)
    ok = (err <= 1.0) | (np.abs(g - r) <= 1e-5 * np.abs(r).max())
    assert ok.all(), f"{int((~ok).sum())} elements out of tolerance (worst {float(err.max()):.3g})"
