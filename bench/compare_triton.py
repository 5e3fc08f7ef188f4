"""Plain Triton kernels for bench/compare.py: one program per row, the whole row in registers
(BLOCK = next_power_of_2(dim)), float32 arithmetic, one rounding to the output dtype. The straightforward
kernel a practitioner would write, as a peer, not a tuned one. Imported only on the GPU machine."""

import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(X, W, Y, x_stride, y_stride, dim, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    x = tl.load(X + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, axis=0) / dim + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * y_stride + cols, (x * inv * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _l2_norm_kernel(X, Y, x_stride, y_stride, dim, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    x = tl.load(X + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, axis=0) + eps)
    tl.store(Y + row * y_stride + cols, (x * inv).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _add_rms_norm_kernel(X, R, W, Y, S, x_stride, r_stride, y_stride, s_stride, dim, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    x = tl.load(X + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(R + row * r_stride + cols, mask=mask, other=0.0).to(tl.float32)
    s = (x + r).to(S.dtype.element_ty)  # the sum rounded to the activation dtype, as the residual stream holds it
    tl.store(S + row * s_stride + cols, s, mask=mask)
    sf = s.to(tl.float32)
    inv = tl.rsqrt(tl.sum(sf * sf, axis=0) / dim + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * y_stride + cols, (sf * inv * w).to(Y.dtype.element_ty), mask=mask)


def _launch_config(dim):
    block = triton.next_power_of_2(dim)
    # Enough threads that each holds at most 16 elements of the row, within 32 warps.
    warps = min(32, max(1, block // (32 * 16)))
    return block, warps


def rms_norm(x, w, eps, y):
    rows, dim = x.shape
    block, warps = _launch_config(dim)
    _rms_norm_kernel[(rows,)](x, w, y, x.stride(0), y.stride(0), dim, eps, BLOCK=block, num_warps=warps)
    return y


def l2_norm(x, eps, y):
    rows, dim = x.shape
    block, warps = _launch_config(dim)
    _l2_norm_kernel[(rows,)](x, y, x.stride(0), y.stride(0), dim, eps, BLOCK=block, num_warps=warps)
    return y


def add_rms_norm(x, r, w, eps, y, s):
    rows, dim = x.shape
    block, warps = _launch_config(dim)
    _add_rms_norm_kernel[(rows,)](x, r, w, y, s, x.stride(0), r.stride(0), y.stride(0), s.stride(0), dim, eps,
                                  BLOCK=block, num_warps=warps)
    return y, s
