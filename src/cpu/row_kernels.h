/* Row building blocks shared by the CPU ops, written once as always-inline "templates": each op file
 * instantiates them with compile-time dtypes and flags, so the dtype switches fold away and every loop
 * vectorises (check with -fopt-info-vec).
 *
 * A row is processed in two passes over a per-chunk float32 scratch row: pass 1 converts the row (or
 * add_rms_norm's rounded sum) into the scratch and reduces it; pass 2 scales the scratch into the output.
 * Each input is therefore read from memory once and converted once.
 *
 * Reduction order (the contract for batch invariance): element i of a row is added to lane i % 16; the
 * 16 lanes are then summed as a fixed binary tree. The order depends on dim only, never on the row's
 * position, the number of rows or the thread that runs it. */
#ifndef TN_CPU_ROW_KERNELS_H
#define TN_CPU_ROW_KERNELS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "../core/dtype.h"
#include "ops.h"

#if defined(__x86_64__) || defined(__i386__)
#include <emmintrin.h>
#define TN_HAVE_STREAM_STORES 1
#endif

#define TN_INLINE static inline __attribute__((always_inline))

/* Runtime dispatch between a generic x86-64 build and one for AVX2/FMA/F16C machines. Contraction is
 * off for the whole library, so both clones give the same bits. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define TN_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define TN_CPU_CLONES
#endif

#define TN_LANES 16
#define TN_BLOCK 512 /* elements staged per output block: 2 KiB in f32, in L1 */

/* Pointer to row r of a validated tensor. */
TN_INLINE void *tn_row_ptr(const tn_tensor *t, int64_t r) {
  return (char *)t->data + (size_t)r * (size_t)t->row_stride * tn_elem_size(t->dtype);
}

/* The row as float32: an f32 row is used where it lies (an output that is the same view only writes
 * element i after reading it); f16/bf16 rows are converted once into the scratch row. */
TN_INLINE const float *tn_row_as_f32(tn_dtype dtype, const void *src, int64_t n, float *scratch) {
  if (dtype == TN_F32) return (const float *)src;
  for (int64_t i = 0; i < n; i++) scratch[i] = tn_load(dtype, src, i);
  return scratch;
}

TN_INLINE float tn_sum_squares(const float *v, int64_t n) {
  float acc[TN_LANES] = {0};
  int64_t i = 0;
  for (; i + TN_LANES <= n; i += TN_LANES)
    for (int k = 0; k < TN_LANES; k++) acc[k] += v[i + k] * v[i + k];
  /* The tail goes to lanes 0.. like a full block would, through a zero-padded copy so the lanes stay
   * in registers (adding +0 changes nothing). */
  float tail[TN_LANES] = {0};
  for (int k = 0; i + k < n; k++) tail[k] = v[i + k];
  for (int k = 0; k < TN_LANES; k++) acc[k] += tail[k] * tail[k];
  for (int width = TN_LANES / 2; width > 0; width /= 2)
    for (int k = 0; k < width; k++) acc[k] += acc[k + width];
  return acc[0];
}

/* 1 / sqrt(a), in float32 (two roundings; the same expression on every CPU). */
TN_INLINE float tn_inv_sqrt(float a) { return 1.0f / sqrtf(a); }

/* Copies a finished block to the output: plain stores, or non-temporal ones for outputs too large to
 * stay in cache (they skip the read-for-ownership, which otherwise costs a third more traffic). */
TN_INLINE void tn_copy_out(void *dst, const void *src, size_t bytes, int stream) {
#ifdef TN_HAVE_STREAM_STORES
  if (stream) {
    char *d = dst;
    const char *s = src;
    size_t head = (size_t)(-(uintptr_t)d & 15u);
    if (head > bytes) head = bytes;
    memcpy(d, s, head);
    size_t i = head;
    for (; i + 16 <= bytes; i += 16) _mm_stream_si128((__m128i *)(void *)(d + i), _mm_loadu_si128((const __m128i *)(const void *)(s + i)));
    memcpy(d + i, s + i, bytes - i);
    return;
  }
#endif
  memcpy(dst, src, bytes);
}

/* Orders this thread's non-temporal stores before whatever follows (the pool's completion signal). */
TN_INLINE void tn_stream_fence(int stream) {
#ifdef TN_HAVE_STREAM_STORES
  if (stream) _mm_sfence();
#else
  (void)stream;
#endif
}

/* One output element: round((((v * inv) * w) * m) * scale), each factor present only when its flag is
 * set (w is the weight plus offset, already in float32). */
#define TN_EMIT_VALUE(i_v, i_m)                           \
  float r = v[i_v] * inv;                                 \
  if (has_w) r *= w[i_v];                                 \
  if (has_m) r *= tn_load(dtype, m, i_m);                 \
  if (has_scale) r *= scale;

/* out[i] for i < n from the scratch row v. Large outputs are staged in L1 blocks and copied out with
 * non-temporal stores; others are written directly. */
TN_INLINE void tn_row_emit(tn_dtype dtype, void *out, const float *v, int64_t n, float inv, int has_w, const float *w,
                           int has_m, const void *m, int has_scale, float scale, int stream) {
  if (!stream) {
    for (int64_t i = 0; i < n; i++) {
      TN_EMIT_VALUE(i, i)
      tn_store(dtype, out, i, r);
    }
    return;
  }
  union {
    float f32[TN_BLOCK];
    uint16_t u16[TN_BLOCK];
  } stage;
  const size_t es = tn_elem_size(dtype);
  for (int64_t b = 0; b < n; b += TN_BLOCK) {
    int64_t len = n - b < TN_BLOCK ? n - b : TN_BLOCK;
    for (int64_t i = 0; i < len; i++) {
      TN_EMIT_VALUE(b + i, b + i)
      tn_store(dtype, &stage, i, r);
    }
    tn_copy_out((char *)out + (size_t)b * es, &stage, (size_t)len * es, stream);
  }
}
#undef TN_EMIT_VALUE_

#endif
