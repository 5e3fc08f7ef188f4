/* The quantized output of a row (tnorm.h, "Quantized outputs"): from the op's float32 result, y (when
 * given) and the value quantized, then q and the row's scales. Included by the op files after
 * row_kernels.h; the formulas themselves are core/quant.h's, written once. */
#ifndef TN_CPU_QUANT_ROW_H
#define TN_CPU_QUANT_ROW_H

#include "../core/quant.h"
#include "row_kernels.h"

/* Where scale (r, g) of the dynamic scales lives, by layout. */
TN_INLINE char *tn_quant_scale_ptr(const tn_quant *q, int64_t r, int64_t g, int64_t groups) {
  const tn_tensor *s = q->scales;
  const size_t es = tn_elem_size(s->dtype);
  size_t index;
  if (q->layout == TN_SCALES_ROW_MAJOR) {
    index = (size_t)r * (size_t)s->row_stride + (size_t)g;
  } else if (q->layout == TN_SCALES_COLUMN_MAJOR) {
    index = (size_t)g * (size_t)s->row_stride + (size_t)r;
  } else {
    const size_t groups4 = (size_t)(groups + 3) / 4 * 4;
    index = ((size_t)r / 128 * (groups4 / 4) + (size_t)g / 4) * 512 + (size_t)r % 32 * 16 + (size_t)r % 128 / 32 * 4 +
            (size_t)g % 4;
  }
  return (char *)s->data + index * es;
}

/* The largest |v[i]| of n values, NaN skipped (a comparison that is false for NaN). */
TN_INLINE float tn_quant_amax(const float *v, int64_t n) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; i++) {
    const float a = fabsf(v[i]);
    amax = a > amax ? a : amax;
  }
  return amax;
}

/* v / s, but an infinity under an infinite scale stays itself (the encoders saturate it, its sign kept)
 * where the division would give a NaN whose sign the hardware picks. */
TN_INLINE float tn_quant_div(float v, float s) {
  const float t = v / s;
  return t != t && v == v ? v : t;
}

/* q for n values of one scale s (FP8, INT8: one byte each), one loop per format so that each vectorises
 * (a format test inside the loop keeps it scalar). */
TN_INLINE void tn_quant_bytes(tn_quant_format format, const float *v, int64_t n, float s, uint8_t *q) {
  switch (format) {
    case TN_QUANT_FP8_E4M3:
    case TN_QUANT_MXFP8:
      for (int64_t i = 0; i < n; i++) q[i] = tn_f32_to_e4m3(tn_quant_div(v[i], s));
      break;
    case TN_QUANT_FP8_E5M2:
      for (int64_t i = 0; i < n; i++) q[i] = tn_f32_to_e5m2(tn_quant_div(v[i], s));
      break;
    case TN_QUANT_INT8:
      for (int64_t i = 0; i < n; i++) q[i] = (uint8_t)tn_f32_to_int8(tn_quant_div(v[i], s));
      break;
    default:
      break;
  }
}

/* Row r of the quantized output from its n values v. */
TN_INLINE void tn_quant_row(const tn_cpu_call *c, const float *v, int64_t n, int64_t r) {
  const tn_quant *qa = &c->args->quant;
  uint8_t *q = (uint8_t *)tn_row_ptr(qa->q, r);
  if (qa->scaling == TN_QUANT_SCALE_TENSOR) {
    tn_quant_bytes(qa->format, v, n, c->quant_scale, q);
    return;
  }
  const int64_t group = c->quant_group, groups = n / group;
  const float qmax = tn_quant_qmax(qa->format);
  for (int64_t g = 0; g < groups; g++) {
    const float *vg = v + g * group;
    const float amax = tn_quant_amax(vg, group);
    char *slot = tn_quant_scale_ptr(qa, r, g, groups);
    if (qa->format == TN_QUANT_NVFP4) {
      const uint8_t sb = tn_f32_to_e4m3((amax / 6.0f) * c->quant_scale);
      const float s = tn_e4m3_to_f32(sb) / c->quant_scale;
      *(uint8_t *)slot = sb;
      uint8_t *qg = q + g * group / 2;
      for (int64_t i = 0; i < group; i += 2) {
        const uint8_t lo = s != 0.0f ? tn_f32_to_e2m1(vg[i] / s) : 0, hi = s != 0.0f ? tn_f32_to_e2m1(vg[i + 1] / s) : 0;
        qg[i / 2] = (uint8_t)(lo | hi << 4);
      }
      continue;
    }
    float s = tn_quant_dynamic_scale(amax, qmax, qa->scale_ub, qa->scale_min);
    if (qa->pow2_scales || qa->format == TN_QUANT_MXFP8) {
      uint8_t e;
      s = tn_pow2_ceil(s, &e);
      *(uint8_t *)slot = e;
    } else {
      memcpy(slot, &s, sizeof s);
    }
    tn_quant_bytes(qa->format, vg, group, s, q + g * group);
  }
}

/* The end of a quantized row: res holds the op's float32 result (n values, before its rounding to the
 * dtype). y, when given, receives it rounded; the value quantized is that rounded result (source ROUNDED)
 * or res itself (F32). res is overwritten. */
TN_INLINE void tn_quant_finish(const tn_cpu_call *c, tn_dtype dtype, float *res, int64_t n, int64_t r) {
  const tn_op_args *a = c->args;
  uint16_t u16[TN_BLOCK];
  const int rounded = a->quant.source == TN_QUANT_FROM_ROUNDED && dtype != TN_F32;
  const size_t es = tn_elem_size(dtype);
  for (int64_t b = 0; b < n; b += TN_BLOCK) {
    const int64_t len = n - b < TN_BLOCK ? n - b : TN_BLOCK;
    if (a->y != NULL) {
      char *dst = (char *)tn_row_ptr(a->y, r) + (size_t)b * es;
      if (dtype == TN_F32) memcpy(dst, res + b, (size_t)len * 4);
      else tn_f32_to_half_block(dtype, res + b, (uint16_t *)(void *)dst, len);
    }
    if (rounded) tn_round_block(dtype, res + b, u16, len);
  }
  tn_quant_row(c, res, n, r);
}

#endif
