"""A numpy model of tnorm.h's quantized outputs, for the command's tests, written from the spec: float32
arithmetic step by step (numpy's float32 division is IEEE's), the element encodings as ml_dtypes' casts
(round to nearest even, subnormals kept) after saturating to the format's largest value, NaN handled as
the spec says (ml_dtypes gives E5M2's NaN another code).
"""

import ml_dtypes
import numpy as np

F32 = np.float32
QMAX = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0, "int8": 127.0, "mxfp8": 448.0, "nvfp4": 6.0}
ELEMENT = {"fp8_e4m3": np.dtype(ml_dtypes.float8_e4m3fn), "mxfp8": np.dtype(ml_dtypes.float8_e4m3fn),
           "fp8_e5m2": np.dtype(ml_dtypes.float8_e5m2), "nvfp4": np.dtype(ml_dtypes.float4_e2m1fn)}
BLOCK = {"mxfp8": 32, "nvfp4": 16}
E2M1_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def encode(fmt, v):
    """Codes (uint8) of float32 values: FP8 bytes, INT8 bytes, E2M1 nibbles."""
    v = np.asarray(v, F32)
    nan = np.isnan(v)
    finite = np.where(nan, F32(0), v)
    if fmt == "int8":
        return np.clip(np.rint(finite), -127, 127).astype(np.int8).view(np.uint8)
    m = F32(QMAX[fmt])
    codes = np.clip(finite, -m, m).astype(ELEMENT[fmt]).view(np.uint8)
    if fmt == "nvfp4":
        return np.where(nan, 0, codes & 0xF).astype(np.uint8)
    sign = np.signbit(v).astype(np.uint8) << 7
    return np.where(nan, 0x7F | sign, codes).astype(np.uint8)


def decode(fmt, codes):
    codes = np.asarray(codes, np.uint8)
    if fmt == "int8":
        return codes.view(np.int8).astype(F32)
    if fmt == "nvfp4":
        return E2M1_VALUES[codes & 0xF]
    return codes.view(ELEMENT[fmt]).astype(F32)


def pow2_ceil(s):
    """2^ceil(log2 s) within [2^-127, 2^127] (float32), and its UE8M0 byte."""
    m, e = np.frexp(s.astype(np.float64))
    e = np.where(m == 0.5, e - 1, e)
    e = np.where(np.isinf(s), 127, e)
    e = np.clip(e, -127, 127)
    return np.ldexp(1.0, e).astype(F32), (e + 127).astype(np.uint8)


def swizzle_index(r, g, groups):
    groups4 = (groups + 3) // 4 * 4
    return ((r // 128) * (groups4 // 4) + g // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + g % 4


def lay_out(stored, layout):
    """The scales tensor of stored[rows, groups] in a layout (the swizzled padding zeros)."""
    rows, groups = stored.shape
    if layout == "row":
        return stored
    if layout == "column":
        return np.ascontiguousarray(stored.T)
    out = np.zeros(((rows + 127) // 128 * 128) * ((groups + 3) // 4 * 4), stored.dtype)
    r, g = np.meshgrid(np.arange(rows), np.arange(groups), indexing="ij")
    out[swizzle_index(r, g, groups).reshape(-1)] = stored.reshape(-1)
    return out.reshape((rows + 127) // 128 * 128, (groups + 3) // 4 * 4)


def quantize(fmt, v, scaling="token", group=None, scale=None, pow2=False, layout="row", scale_ub=0.0):
    """(q, scales) of rows x dim float32 values v. q: uint8 [rows, dim] (int8's bytes; NVFP4 [rows, dim/2],
    element 2i in the low nibble). scales: None for a static scale; float32 or uint8 (UE8M0, NVFP4's E4M3
    bytes) in the layout. scale: the static scale, or NVFP4's global one."""
    v = np.asarray(v, F32)
    rows, dim = v.shape
    if fmt in BLOCK:
        scaling, group = "group", BLOCK[fmt]
    g = dim if scaling in ("tensor", "token") else group
    groups = dim // g
    vg = v.reshape(rows, groups, g)
    stored = None
    with np.errstate(all="ignore"):
        if scaling == "tensor":
            s = np.full((rows, groups), F32(scale))
        else:
            mag = np.abs(vg)
            a = np.where(np.isnan(mag), F32(0), mag).max(axis=2, initial=F32(0)).astype(F32)
            if fmt == "nvfp4":
                stored = encode("fp8_e4m3", (a / F32(6)) * F32(scale))
                s = decode("fp8_e4m3", stored) / F32(scale)
            else:
                s = a / F32(QMAX[fmt])
                if scale_ub > 0:
                    s = np.minimum(s, F32(scale_ub))
                s = np.maximum(s, F32(2.0 ** -126))
                if pow2 or fmt == "mxfp8":
                    s, stored = pow2_ceil(s)
                else:
                    stored = s.astype(F32)
        # An infinity under an infinite scale stays itself (saturates), not inf / inf's NaN.
        quot = np.where(np.isinf(vg) & np.isinf(s[..., None]), vg, vg / s[..., None]).astype(F32)
    codes = encode(fmt, quot)
    if fmt == "nvfp4":
        codes = np.where(s[..., None] == 0, 0, codes).astype(np.uint8)
    codes = codes.reshape(rows, dim)
    q = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8) if fmt == "nvfp4" else codes
    return q, None if stored is None else lay_out(stored, layout)


def rank(fmt, codes):
    """Each code's place on the number line (both zeros 0), to measure how far two codes are apart."""
    codes = np.asarray(codes, np.uint8).astype(np.int32)
    if fmt == "int8":
        return codes.astype(np.uint8).view(np.int8).astype(np.int32)
    sign = 0x8 if fmt == "nvfp4" else 0x80
    mag = codes & (sign - 1)
    return np.where(codes & sign, -mag, mag)


def unpack_nvfp4(q):
    """[rows, dim/2] packed bytes -> [rows, dim] codes."""
    out = np.empty((q.shape[0], q.shape[1] * 2), np.uint8)
    out[:, 0::2] = q & 0xF
    out[:, 1::2] = q >> 4
    return out
