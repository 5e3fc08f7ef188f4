/* The element encodings of the quantized outputs: FP8 E4M3 (OCP e4m3fn, as torch's float8_e4m3fn: no
 * infinities, max 448), FP8 E5M2 (max finite 57344) and symmetric INT8 (-127 .. 127), from float32 and
 * back.
 *
 * From float32 every encoding rounds to nearest even once and saturates: a finite value beyond the
 * format's largest rounds to that largest, and so does an infinity (as PTX's cvt.rn.satfinite does, so
 * that GPU kernels can use it). NaN gives 0x7f with the input's sign for both FP8 formats (as ml_dtypes
 * and torch do; cvt's NaN is 0x7f whatever the sign, so a GPU kernel must carry the sign over to give
 * these bytes); INT8 has no NaN and gives 0 (as cvt.rni.sat.s8.f32). Subnormal FP8 results are kept, not
 * flushed. Branch-free like dtype.h's conversions, for the same reason: the loops that call them
 * vectorise. */
#ifndef TN_CORE_QUANT_H
#define TN_CORE_QUANT_H

#include <math.h>
#include <stdint.h>

#include "dtype.h"

/* |f| >= 2^-6 is an E4M3 normal: rebias the exponent (127 -> 7) and round the 20 dropped bits to nearest
 * even. Below it the step is 2^-9: adding 2^14 (whose float32 ulp is 2^-9) lets the FPU round to nearest
 * even, and the low bits of the sum count the steps (8 of them is 2^-6, the first normal's code). */
static inline uint8_t tn_f32_to_e4m3(float f) {
  uint32_t u = tn_f32_bits(f);
  uint32_t sign = (u >> 24) & 0x80u;
  uint32_t a = u & 0x7fffffffu;
  uint32_t normal = (a - (120u << 23) + 0x7ffffu + ((a >> 20) & 1u)) >> 20;
  uint32_t subnormal = tn_f32_bits(tn_f32_from_bits(a) + 16384.0f) - 0x46800000u;
  uint32_t is_sub = tn_mask(a < 0x3c800000u);  /* 2^-6 */
  uint32_t is_sat = tn_mask(a >= 0x43e00000u); /* 448, infinities included */
  uint32_t is_nan = tn_mask(a > 0x7f800000u);
  uint32_t r = (subnormal & is_sub) | (normal & ~is_sub);
  r = (0x7eu & is_sat) | (r & ~is_sat);
  r = (0x7fu & is_nan) | (r & ~is_nan);
  return (uint8_t)(sign | r);
}

/* The same for E5M2: exponent 127 -> 15, 21 dropped bits; below 2^-14 the step is 2^-16 (2^7's ulp). */
static inline uint8_t tn_f32_to_e5m2(float f) {
  uint32_t u = tn_f32_bits(f);
  uint32_t sign = (u >> 24) & 0x80u;
  uint32_t a = u & 0x7fffffffu;
  uint32_t normal = (a - (112u << 23) + 0xfffffu + ((a >> 21) & 1u)) >> 21;
  uint32_t subnormal = tn_f32_bits(tn_f32_from_bits(a) + 128.0f) - 0x43000000u;
  uint32_t is_sub = tn_mask(a < 0x38800000u);  /* 2^-14 */
  uint32_t is_sat = tn_mask(a >= 0x47600000u); /* 57344, infinities included */
  uint32_t is_nan = tn_mask(a > 0x7f800000u);
  uint32_t r = (subnormal & is_sub) | (normal & ~is_sub);
  r = (0x7bu & is_sat) | (r & ~is_sat);
  r = (0x7fu & is_nan) | (r & ~is_nan);
  return (uint8_t)(sign | r);
}

/* Round to nearest even, clamp to [-127, 127]; NaN gives 0. */
static inline int8_t tn_f32_to_int8(float f) {
  float r = nearbyintf(f);
  r = r > 127.0f ? 127.0f : r;
  r = r < -127.0f ? -127.0f : r;
  return (int8_t)(r == r ? (int)r : 0);
}

static inline float tn_e4m3_to_f32(uint8_t b) {
  uint32_t sign = (uint32_t)(b & 0x80u) << 24;
  uint32_t em = b & 0x7fu;
  uint32_t small = tn_f32_bits((float)(int32_t)em * 0x1p-9f); /* exponent field 0: m * 2^-9 */
  uint32_t normal = (em << 20) + (120u << 23);
  uint32_t is_small = tn_mask(em < 0x08u);
  uint32_t r = (small & is_small) | (normal & ~is_small);
  r = (0x7fc00000u & tn_mask(em == 0x7fu)) | (r & ~tn_mask(em == 0x7fu));
  return tn_f32_from_bits(sign | r);
}

static inline float tn_e5m2_to_f32(uint8_t b) {
  uint32_t sign = (uint32_t)(b & 0x80u) << 24;
  uint32_t em = b & 0x7fu;
  uint32_t small = tn_f32_bits((float)(int32_t)em * 0x1p-16f); /* exponent field 0: m * 2^-16 */
  uint32_t normal = (em << 21) + (112u << 23);
  uint32_t is_small = tn_mask(em < 0x04u);
  uint32_t r = (small & is_small) | (normal & ~is_small);
  r = (0x7f800000u & tn_mask(em == 0x7cu)) | (r & ~tn_mask(em == 0x7cu)); /* infinity */
  r = (0x7fc00000u & tn_mask(em > 0x7cu)) | (r & ~tn_mask(em > 0x7cu));   /* NaN */
  return tn_f32_from_bits(sign | r);
}

#endif
