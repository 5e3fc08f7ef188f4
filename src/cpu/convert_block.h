/* Bulk conversions between float32 and f16/bf16 for the CPU kernels. Bit-identical to the scalar
 * conversions of core/dtype.h (the tests check both): with AVX2 (the x86-64-v3 build of the kernels)
 * they are written with intrinsics, f16 through F16C; elsewhere they are the scalar conversions in
 * loops the compiler vectorises. */
#ifndef TN_CPU_CONVERT_BLOCK_H
#define TN_CPU_CONVERT_BLOCK_H

#include <stdint.h>

#include "../core/dtype.h"

#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#define TN_CONVERT_AVX2 1
#endif

#define TN_CVT_INLINE static inline __attribute__((always_inline))

#ifdef TN_CONVERT_AVX2
/* Eight floats to bf16 in the low 16 bits of each 32-bit lane, rounded to nearest even; correct for
 * every value but NaN (whose rounding may carry into the exponent). */
TN_CVT_INLINE __m256i tn_bf16_round8_finite(__m256 v) {
  __m256i u = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
}

/* The same for any value: NaN lanes become quiet NaNs (sign and top payload bits kept). */
TN_CVT_INLINE __m256i tn_bf16_round8(__m256 v) {
  __m256i quiet_nan = _mm256_or_si256(_mm256_srli_epi32(_mm256_castps_si256(v), 16), _mm256_set1_epi32(0x40));
  __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(tn_bf16_round8_finite(v), quiet_nan, is_nan);
}

/* Eight f16/bf16 values in a register, as float32. */
TN_CVT_INLINE __m256 tn_half8_reg_to_f32(tn_dtype dtype, __m128i h) {
  if (dtype == TN_F16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* Eight f16/bf16 values from memory, as float32. */
TN_CVT_INLINE __m256 tn_half8_to_f32(tn_dtype dtype, const uint16_t *src) {
  return tn_half8_reg_to_f32(dtype, _mm_loadu_si128((const __m128i *)(const void *)src));
}

/* Sixteen floats rounded once to f16/bf16, in order, in one register. */
TN_CVT_INLINE __m256i tn_f32x16_to_half(tn_dtype dtype, __m256 lo, __m256 hi) {
  if (dtype == TN_F16)
    return _mm256_set_m128i(_mm256_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT), _mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT));
  /* NaN is rare: one test for all sixteen lanes, and the blend only when one is there. */
  __m256 nan = _mm256_or_ps(_mm256_cmp_ps(lo, lo, _CMP_UNORD_Q), _mm256_cmp_ps(hi, hi, _CMP_UNORD_Q));
  __m256i rl, rh;
  if (__builtin_expect(_mm256_testz_ps(nan, nan), 1)) {
    rl = tn_bf16_round8_finite(lo);
    rh = tn_bf16_round8_finite(hi);
  } else {
    rl = tn_bf16_round8(lo);
    rh = tn_bf16_round8(hi);
  }
  /* Every lane is <= 0xffff, so the saturating pack is exact; it interleaves 128-bit halves. */
  return _mm256_permute4x64_epi64(_mm256_packus_epi32(rl, rh), 0xd8);
}
#endif

/* dst[i] = float32 of element i of src (f16 or bf16). */
TN_CVT_INLINE void tn_half_to_f32_block(tn_dtype dtype, const uint16_t *src, float *dst, int64_t n) {
  int64_t i = 0;
#ifdef TN_CONVERT_AVX2
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, tn_half8_to_f32(dtype, src + i));
#endif
  for (; i < n; i++) dst[i] = dtype == TN_F16 ? tn_f16_to_f32(src[i]) : tn_bf16_to_f32(src[i]);
}

/* dst[i] = src[i] rounded once to f16 or bf16. */
TN_CVT_INLINE void tn_f32_to_half_block(tn_dtype dtype, const float *src, uint16_t *dst, int64_t n) {
  int64_t i = 0;
#ifdef TN_CONVERT_AVX2
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256((__m256i *)(void *)(dst + i),
                        tn_f32x16_to_half(dtype, _mm256_loadu_ps(src + i), _mm256_loadu_ps(src + i + 8)));
#endif
  if (dtype == TN_F16)
    for (; i < n; i++) dst[i] = tn_f32_to_f16(src[i]);
  else
    for (; i < n; i++) dst[i] = tn_f32_to_bf16(src[i]);
}

#endif
