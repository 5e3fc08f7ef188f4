/* The element encodings of the quantized outputs: FP8 E4M3 (OCP e4m3fn, as torch's float8_e4m3fn: no
 * infinities, max 448), FP8 E5M2 (max finite 57344) and symmetric INT8 (-127 .. 127), from float32 and
 * back.
 *
 * From float32 every encoding rounds to nearest even once and saturates: a finite value beyond the
 * format's largest rounds to that largest, and so does an infinity (as PTX's cvt.rn.satfinite does, so
 * that GPU kernels can use it). NaN gives 0x7f with the input's sign for both FP8 formats (torch's
 * float8_e4m3fn NaN; for E5M2 ml_dtypes gives 0x7e, another NaN; cvt's NaN is 0x7f whatever the sign, so a
 * GPU kernel must carry the sign over to give these bytes); INT8 has no NaN and gives 0 (as cvt.rni.sat.s8.f32). Subnormal FP8 results are kept, not
 * flushed. Branch-free like dtype.h's conversions, for the same reason: the loops that call them
 * vectorise. */
#ifndef TN_CORE_QUANT_H
#define TN_CORE_QUANT_H

#include <math.h>
#include <stdint.h>

#include "dtype.h"
#include "tnorm.h"

/* Both FP8 formats, from their mantissa bits and exponent bias (constants at every call, so they fold).
 * Normals: rebias the exponent (127 -> bias) and round the dropped bits to nearest even. Below the
 * smallest normal, 2^(1 - bias), the step is 2^(1 - bias - man_bits): adding 2^(24 - bias - man_bits),
 * whose float32 ulp that step is, lets the FPU round to nearest even, and the low bits of the sum
 * count the steps (a full count is the first normal's code). max_bits is the float32 pattern of the
 * largest finite value, max_code its code. */
static inline uint8_t tn_f32_to_fp8(float f, unsigned man_bits, unsigned bias, uint32_t max_bits, uint32_t max_code) {
  const unsigned drop = 23 - man_bits;
  const uint32_t anchor = (127u + 24u - bias - man_bits) << 23;
  uint32_t u = tn_f32_bits(f);
  uint32_t sign = (u >> 24) & 0x80u;
  uint32_t a = u & 0x7fffffffu;
  uint32_t normal = (a - ((127u - bias) << 23) + ((1u << (drop - 1)) - 1u) + ((a >> drop) & 1u)) >> drop;
  uint32_t subnormal = tn_f32_bits(tn_f32_from_bits(a) + tn_f32_from_bits(anchor)) - anchor;
  uint32_t is_sub = tn_mask(a < (127u + 1u - bias) << 23);
  uint32_t is_sat = tn_mask(a >= max_bits); /* infinities included */
  uint32_t is_nan = tn_mask(a > 0x7f800000u);
  uint32_t r = (subnormal & is_sub) | (normal & ~is_sub);
  r = (max_code & is_sat) | (r & ~is_sat);
  r = (0x7fu & is_nan) | (r & ~is_nan);
  return (uint8_t)(sign | r);
}

static inline uint8_t tn_f32_to_e4m3(float f) { return tn_f32_to_fp8(f, 3, 7, 0x43e00000u /* 448 */, 0x7eu); }
static inline uint8_t tn_f32_to_e5m2(float f) { return tn_f32_to_fp8(f, 2, 15, 0x47600000u /* 57344 */, 0x7bu); }

/* Round to nearest even, clamp to [-127, 127]; NaN gives 0. */
static inline int8_t tn_f32_to_int8(float f) {
  float r = nearbyintf(f);
  r = r > 127.0f ? 127.0f : r;
  r = r < -127.0f ? -127.0f : r;
  return (int8_t)(r == r ? (int)r : 0);
}

/* Both FP8 formats back to float32: exponent field 0 is m * 2^(1 - bias - man_bits), the rest rebias;
 * codes from nan_from on are NaN, and inf_code (0 for none) is infinity. */
static inline float tn_fp8_to_f32(uint8_t b, unsigned man_bits, unsigned bias, uint32_t inf_code, uint32_t nan_from) {
  uint32_t sign = (uint32_t)(b & 0x80u) << 24;
  uint32_t em = b & 0x7fu;
  uint32_t small = tn_f32_bits((float)(int32_t)em * tn_f32_from_bits((127u + 1u - bias - man_bits) << 23));
  uint32_t normal = (em << (23 - man_bits)) + ((127u - bias) << 23);
  uint32_t is_small = tn_mask(em < (1u << man_bits));
  uint32_t is_inf = tn_mask(inf_code != 0 && em == inf_code), is_nan = tn_mask(em >= nan_from);
  uint32_t r = (small & is_small) | (normal & ~is_small);
  r = (0x7f800000u & is_inf) | (r & ~is_inf);
  r = (0x7fc00000u & is_nan) | (r & ~is_nan);
  return tn_f32_from_bits(sign | r);
}

static inline float tn_e4m3_to_f32(uint8_t b) { return tn_fp8_to_f32(b, 3, 7, 0, 0x7fu); }
static inline float tn_e5m2_to_f32(uint8_t b) { return tn_fp8_to_f32(b, 2, 15, 0x7cu, 0x7du); }

/* E2M1 (NVFP4's elements: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives) from float32, as a 4-bit code
 * (sign in bit 3): round to nearest even, saturate to 6 (infinities too), NaN to 0. The magnitude's code
 * counts the thresholds it reaches; a tie goes to the even code (the one whose lowest bit is 0). */
static inline uint8_t tn_f32_to_e2m1(float f) {
  const uint32_t u = tn_f32_bits(f);
  const float a = tn_f32_from_bits(u & 0x7fffffffu);
  /* Midpoints between codes k and k + 1; at a midpoint the even code wins: >= where k + 1 is even. */
  uint32_t code = (uint32_t)(a > 0.25f) + (uint32_t)(a >= 0.75f) + (uint32_t)(a > 1.25f) + (uint32_t)(a >= 1.75f) +
                  (uint32_t)(a > 2.5f) + (uint32_t)(a >= 3.5f) + (uint32_t)(a > 5.0f);
  code &= tn_mask(a == a); /* NaN: every comparison is false already; kept explicit */
  return (uint8_t)(((u >> 28) & 0x8u & tn_mask(a == a)) | code);
}

static inline float tn_e2m1_to_f32(uint8_t code) {
  static const float magnitude[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  const float m = magnitude[code & 7u];
  return (code & 8u) ? -m : m;
}

/* The largest finite value of each format's elements: what a dynamic scale maps the amax to. */
static inline float tn_quant_qmax(tn_quant_format format) {
  switch (format) {
    case TN_QUANT_FP8_E4M3:
    case TN_QUANT_MXFP8:
      return 448.0f;
    case TN_QUANT_FP8_E5M2:
      return 57344.0f;
    case TN_QUANT_INT8:
      return 127.0f;
    case TN_QUANT_NVFP4:
      return 6.0f;
    case TN_QUANT_NONE:
      break;
  }
  return 1.0f;
}

/* s rounded up to a power of two, 2^ceil(log2 s), within [2^-127, 2^127] (positive finite s; NaN and
 * infinity give 2^127), and its UE8M0 byte (the exponent + 127). Exact: a mantissa other than zero moves the
 * exponent up by one. */
static inline float tn_pow2_ceil(float s, uint8_t *ue8m0) {
  const uint32_t u = tn_f32_bits(s);
  int32_t e = (int32_t)((u >> 23) & 0xffu) - 127; /* biased 0: a subnormal */
  uint32_t m = u & 0x7fffffu;
  if (!(s < INFINITY)) { /* NaN or infinity */
    e = 127;
    m = 0;
  } else if (e == -127 && m != 0) { /* subnormal: its value is m * 2^-149 */
    int32_t top = 31 - __builtin_clz(m);
    e = top - 149;
    m = m & ((1u << top) - 1u);
  }
  if (m != 0) e += 1;
  if (e < -127) e = -127;
  if (e > 127) e = 127;
  *ue8m0 = (uint8_t)(e + 127);
  return e >= -126 ? tn_f32_from_bits((uint32_t)(e + 127) << 23) : 0x1p-127f;
}

/* A dynamic scale from the amax of its row or group: a / qmax, then at most ub (when ub > 0), then at least
 * lo (tnorm.h). */
static inline float tn_quant_dynamic_scale(float amax, float qmax, float ub, float lo) {
  float s = amax / qmax;
  if (ub > 0.0f && s > ub) s = ub;
  if (!(s >= lo)) s = lo; /* s is never NaN (amax skips NaN), but a NaN would take the floor */
  return s;
}

#endif
