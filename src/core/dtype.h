/* dtypes and their conversions to and from float32, exact for every bit pattern.
 *
 * The conversions are branch-free (selects, integer and float arithmetic only) so that the compiler
 * vectorises the loops that call them; they rely on the default floating-point environment (round to
 * nearest even, no flush-to-zero), which the library never changes. */
#ifndef TN_CORE_DTYPE_H
#define TN_CORE_DTYPE_H

#include <stdint.h>
#include <string.h>

#include "tnorm.h"

static inline uint32_t tn_f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

static inline float tn_f32_from_bits(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

/* All-ones when cond holds, else zero: selects written as masks, which the vectoriser takes. */
static inline uint32_t tn_mask(int cond) { return (uint32_t)0 - (uint32_t)(cond != 0); }

static inline float tn_bf16_to_f32(uint16_t h) { return tn_f32_from_bits((uint32_t)h << 16); }

/* Round to nearest even; NaN stays NaN (made quiet, sign and top payload bits kept); overflow -> Inf. */
static inline uint16_t tn_f32_to_bf16(float f) {
  uint32_t u = tn_f32_bits(f);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  uint32_t quiet_nan = (u >> 16) | 0x0040u;
  uint32_t is_nan = tn_mask((u & 0x7fffffffu) > 0x7f800000u);
  return (uint16_t)((quiet_nan & is_nan) | (rounded & ~is_nan));
}

static inline float tn_f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t em = h & 0x7fffu; /* exponent and mantissa */
  /* Subnormals and zero: the 10-bit mantissa times 2^-24 is exact in float32. */
  uint32_t small = tn_f32_bits((float)(int32_t)em * 0x1p-24f);
  /* Normals: rebias the exponent by 127 - 15; Inf and NaN: exponent 31 -> 255, payload kept, NaN made
   * quiet (as F16C's vcvtph2ps does, so every build gives the same bits). */
  uint32_t normal = (em << 13) + 0x38000000u + (tn_mask(em >= 0x7c00u) & 0x38000000u);
  normal |= tn_mask(em > 0x7c00u) & 0x00400000u;
  uint32_t is_small = tn_mask(em < 0x0400u);
  return tn_f32_from_bits(sign | (small & is_small) | (normal & ~is_small));
}

/* Round to nearest even, with subnormal results and overflow to Inf; NaN stays NaN (quiet). */
static inline uint16_t tn_f32_to_f16(float f) {
  uint32_t u = tn_f32_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  /* Below 2^-14 the result is subnormal: adding 0.5 puts the f16 ulp (2^-24) at the float's last
   * mantissa bit, so the FPU rounds to nearest even for us and the low bits are the f16 mantissa. */
  uint32_t subnormal = tn_f32_bits(tn_f32_from_bits(a) + 0.5f) - 0x3f000000u;
  /* Normal range: rebias the exponent (-112 << 23) and round the 13 dropped bits to nearest even. */
  uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;
  uint32_t is_sub = tn_mask(a < 0x38800000u);
  uint32_t is_inf = tn_mask(a >= 0x477ff000u); /* >= 65520 rounds to Inf */
  uint32_t is_nan = tn_mask(a > 0x7f800000u);
  uint32_t r = (subnormal & is_sub) | (normal & ~is_sub);
  r = (0x7c00u & is_inf) | (r & ~is_inf);
  r = ((0x7e00u | ((a >> 13) & 0x03ffu)) & is_nan) | (r & ~is_nan);
  return (uint16_t)(sign | r);
}

/* Element i of a row of the given dtype, as float32. With a constant dtype the switch folds away. */
static inline float tn_load(tn_dtype dtype, const void *row, int64_t i) {
  switch (dtype) {
    case TN_F16:
      return tn_f16_to_f32(((const uint16_t *)row)[i]);
    case TN_BF16:
      return tn_bf16_to_f32(((const uint16_t *)row)[i]);
    case TN_F32:
    default:
      return ((const float *)row)[i];
  }
}

/* Rounds v once to the dtype and stores it as element i of the row. */
static inline void tn_store(tn_dtype dtype, void *row, int64_t i, float v) {
  switch (dtype) {
    case TN_F16:
      ((uint16_t *)row)[i] = tn_f32_to_f16(v);
      break;
    case TN_BF16:
      ((uint16_t *)row)[i] = tn_f32_to_bf16(v);
      break;
    case TN_F32:
    default:
      ((float *)row)[i] = v;
      break;
  }
}

/* v rounded to the dtype and back: the value a store followed by a load gives. */
static inline float tn_round_to(tn_dtype dtype, float v) {
  switch (dtype) {
    case TN_F16:
      return tn_f16_to_f32(tn_f32_to_f16(v));
    case TN_BF16:
      return tn_bf16_to_f32(tn_f32_to_bf16(v));
    case TN_F32:
    default:
      return v;
  }
}

/* A dtype ops compute in (f32, f16, bf16). */
static inline int tn_dtype_valid(tn_dtype dtype) { return (unsigned)dtype < TN_DTYPE_COUNT; }

/* Any dtype of the enum, the storage ones of quantized outputs included. */
static inline int tn_dtype_known(tn_dtype dtype) { return (unsigned)dtype < TN_DTYPE_ALL_COUNT; }

/* tn_dtype_size, inlinable for the kernels' address arithmetic. */
static inline size_t tn_elem_size(tn_dtype dtype) {
  return dtype == TN_F32 ? 4 : tn_dtype_valid(dtype) ? 2 : tn_dtype_known(dtype) ? 1 : 0;
}

#endif
