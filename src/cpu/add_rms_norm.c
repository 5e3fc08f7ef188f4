/* add_rms_norm: s = round(x + residual); residual_out = s; y = rms_norm(s) * (w + offset) [* m].
 * By default the norm is computed from exactly the rounded s (the HF and vLLM semantics): the scratch row
 * holds s rounded to the residual's dtype, and residual_out receives the same rounded values. With
 * TN_RESIDUAL_NORM_F32 the scratch row keeps the float32 sum instead; with an f32 residual stream the
 * two are the same (tn_residual_add). */
#include "quant_row.h"
#include "row_kernels.h"

#ifdef TN_CONVERT_AVX2
/* f16/bf16 in one pass with AVX2: s = round(x + res) to out and to the scratch row, 16 elements at a time,
 * and the sum of squares of s with exactly tn_sum_squares' lanes, tail and tree. */
TN_INLINE float add_round_store_sum_avx2(tn_dtype dtype, const uint16_t *x, const uint16_t *res, uint16_t *out,
                                         float *s, int64_t n, int stream) {
  const int nt = stream && ((uintptr_t)out & 31u) == 0;
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + TN_LANES <= n; i += TN_LANES) {
    __m256 sum0 = _mm256_add_ps(tn_half8_to_f32(dtype, x + i), tn_half8_to_f32(dtype, res + i));
    __m256 sum1 = _mm256_add_ps(tn_half8_to_f32(dtype, x + i + 8), tn_half8_to_f32(dtype, res + i + 8));
    __m256i packed = tn_f32x16_to_half(dtype, sum0, sum1);
    if (nt) _mm256_stream_si256((__m256i *)(void *)(out + i), packed);
    else _mm256_storeu_si256((__m256i *)(void *)(out + i), packed);
    tn_store_square16(s + i, tn_half8_reg_to_f32(dtype, _mm256_castsi256_si128(packed)),
                      tn_half8_reg_to_f32(dtype, _mm256_extracti128_si256(packed, 1)), &acc0, &acc1);
  }
  float acc[TN_LANES], tail[TN_LANES] = {0};
  _mm256_storeu_ps(acc, acc0);
  _mm256_storeu_ps(acc + 8, acc1);
  for (int k = 0; i + k < n; k++) {
    float v = tn_round_to(dtype, tn_load(dtype, x, i + k) + tn_load(dtype, res, i + k));
    tn_store(dtype, out, i + k, v);
    tail[k] = s[i + k] = v;
  }
  return tn_lanes_finish(acc, tail);
}
#endif

TN_INLINE void add_rms_norm_rows(const tn_cpu_call *c, float *s, int64_t begin, int64_t end, tn_dtype dtype,
                                 int has_w, int has_m) {
  const tn_op_args *a = c->args;
  const int64_t dim = a->x->dim;
  const tn_dtype rdtype = a->residual->dtype;
  const int norm_f32 = a->residual_mode == TN_RESIDUAL_NORM_F32;
  const int llama = a->casting == TN_CASTING_LLAMA;
  for (int64_t r = begin; r < end; r++) {
    const void *x = tn_row_ptr(a->x, r), *res = tn_row_ptr(a->residual, r);
    void *out = tn_row_ptr(a->residual_out, r);
    float sum_sq;
#ifdef TN_CONVERT_AVX2
    if (dtype != TN_F32 && rdtype == dtype && !norm_f32) {
      sum_sq = add_round_store_sum_avx2(dtype, x, res, out, s, dim, c->stream);
    } else
#endif
    {
      tn_residual_add_any(dtype, rdtype, norm_f32, x, res, out, s, dim, c->stream);
      sum_sq = tn_sum_squares(s, dim);
    }
    const float *v = s;
    float inv = tn_row_scale(sum_sq, &v, s, dim, (float)dim, a->eps, TN_SCALE_RSQRT);
    if (a->quant.format != TN_QUANT_NONE) {
      float *result = s + dim;
      tn_row_result(dtype, result, v, 0, dim, inv, llama && dtype != TN_F32, has_w, c->weight, has_m,
                    has_m ? tn_row_ptr(a->mul, r) : NULL, 0, 1.0f, c->round_before_last);
      tn_quant_finish(c, dtype, result, dim, r);
      continue;
    }
    tn_row_emit(dtype, tn_row_ptr(a->y, r), v, 0, dim, inv, llama, has_w, c->weight, has_m,
                has_m ? tn_row_ptr(a->mul, r) : NULL, 0, 1.0f, c->round_before_last, c->stream,
                tn_next_row_of(a->x, a->residual, r, end));
  }
  tn_stream_fence(c->stream);
}

TN_CPU_ROWS_TABLE(add_table, add_rms_norm_rows)

void TN_CPU_ENTRY(tn_cpu_add_rms_norm_rows)(const tn_cpu_call *c, float *s, int64_t begin, int64_t end) {
  add_table[c->args->x->dtype][c->weight != NULL][c->args->mul != NULL](c, s, begin, end);
}
