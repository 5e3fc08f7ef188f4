/* Row building blocks shared by the CPU ops, written once as always-inline "templates": each op file
 * instantiates them with compile-time dtypes so the dtype switches fold away and the loops vectorise.
 *
 * Reduction order (the contract for batch invariance): element i of a row is added to lane i % 16;
 * the 16 lanes are then summed as a fixed binary tree. The order depends on dim only, never on the row's
 * position, the number of rows or the thread that runs it. */
#ifndef TN_CPU_ROW_KERNELS_H
#define TN_CPU_ROW_KERNELS_H

#include <math.h>
#include <stdint.h>

#include "../core/dtype.h"

#define TN_INLINE static inline __attribute__((always_inline))

/* Runtime dispatch between a generic x86-64 build and one for AVX2/FMA/F16C machines. Contraction is
 * off for the whole library, so both clones give the same bits. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define TN_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define TN_CPU_CLONES
#endif

#define TN_LANES 16

/* "No weight": a weight dtype outside the enum, folded at compile time. */
#define TN_NO_WEIGHT ((tn_dtype)-1)

TN_INLINE float tn_row_sum_squares(tn_dtype dtype, const void *row, int64_t n) {
  float acc[TN_LANES] = {0};
  int64_t i = 0;
  for (; i + TN_LANES <= n; i += TN_LANES) {
    for (int k = 0; k < TN_LANES; k++) {
      float v = tn_load(dtype, row, i + k);
      acc[k] += v * v;
    }
  }
  for (int k = 0; i + k < n; k++) {
    float v = tn_load(dtype, row, i + k);
    acc[k] += v * v;
  }
  for (int width = TN_LANES / 2; width > 0; width /= 2)
    for (int k = 0; k < width; k++) acc[k] += acc[k + width];
  return acc[0];
}

/* y[i] = round(((x[i] * inv) * (w[i] + w_offset)) * m[i]), with the weight and m factors present only
 * when wdtype is a dtype and has_mul is set. */
TN_INLINE void tn_row_scale_store(tn_dtype dtype, const void *x, void *y, int64_t n, float inv, tn_dtype wdtype,
                                  const void *w, float w_offset, int has_mul, const void *m) {
  for (int64_t i = 0; i < n; i++) {
    float v = tn_load(dtype, x, i) * inv;
    if (wdtype != TN_NO_WEIGHT) v *= tn_load(wdtype, w, i) + w_offset;
    if (has_mul) v *= tn_load(dtype, m, i);
    tn_store(dtype, y, i, v);
  }
}

/* Pointer to row r of a validated tensor. */
TN_INLINE void *tn_row_ptr(const tn_tensor *t, int64_t r) {
  return (char *)t->data + (size_t)r * (size_t)t->row_stride * tn_dtype_size(t->dtype);
}

/* 1 / sqrt(a), in float32 (two roundings; the same expression on every CPU). */
TN_INLINE float tn_inv_sqrt(float a) { return 1.0f / sqrtf(a); }

#endif
