/* layer_norm and add_layer_norm: y = ((x - mean) * rsqrt(var + eps)) * w + b, with the mean taken first
 * and the variance as the mean of the squared deviations (a second pass; never E[x^2] - E[x]^2), both
 * in the lanes and tree of the rms reduction, so the order depends on dim only. add_layer_norm first
 * forms s = x + residual as add_rms_norm does (tn_residual_add) and normalises s. */
#include "quant_row.h"
#include "row_kernels.h"

/* The mean and the scale of a float32 row. As for the rms norms (tn_row_scale), a finite row whose sums
 * overflow float32 (|x| beyond about 1e19, or a mean beyond float32) or whose variance vanishes with
 * eps == 0 is rewritten into scratch times an exact power of two k and *v pointed there; mean and scale
 * are then those of the scaled row (eps * k^2), so (v - mean) * scale is right. A row with NaN or Inf
 * has a NaN mean or variance: its scale is NaN and the whole row NaN, as the plain formula gives. */
TN_INLINE float ln_stats(const float **v, float *scratch, int64_t n, float eps, float *mean) {
  const float *src = *v;
  const float count = (float)n;
  const float m = tn_sum(src, n) / count;
  const float var_sum = tn_sum_sq_dev(src, n, m);
  if (var_sum < INFINITY && !(eps == 0.0f && var_sum < 0x1p-64f)) {
    *mean = m;
    return tn_inv_sqrt(var_sum / count + eps);
  }
  const float k = var_sum < INFINITY ? 0x1p80f : 0x1p-80f;
  for (int64_t i = 0; i < n; i++) scratch[i] = src[i] * k; /* src may be scratch itself */
  *v = scratch;
  const float mk = tn_sum(scratch, n) / count;
  const float vk = tn_sum_sq_dev(scratch, n, mk);
  *mean = mk;
  if (!(vk < INFINITY)) return NAN; /* not a finite row: NaN everywhere, as unscaled */
  return tn_inv_sqrt(vk / count + eps * k * k);
}

/* out[i] = round(((v[i] - mean) * inv) [rounded to the dtype with llama] * w[i] + b[i]), block by block
 * (each factor only when given). An f32 output is computed where it lies: element i is read before it is
 * written, so y may be x. */
/* One block of that formula's float32 results (len elements from element b) into r, before the rounding
 * to the dtype; u16 is room for len elements. */
TN_INLINE void ln_block(tn_dtype dtype, float *r, const float *v, int64_t b, int64_t len, float mean, float inv,
                        int llama, int has_w, const float *w, int has_b, const float *bias, uint16_t *u16) {
  for (int64_t i = 0; i < len; i++) r[i] = (v[b + i] - mean) * inv;
  if (llama) tn_round_block(dtype, r, u16, len);
  if (has_w)
    for (int64_t i = 0; i < len; i++) r[i] *= w[b + i];
  if (has_b)
    for (int64_t i = 0; i < len; i++) r[i] += bias[b + i];
}

TN_INLINE void ln_emit(tn_dtype dtype, void *out, const float *v, int64_t n, float mean, float inv, int llama,
                       int has_w, const float *w, int has_b, const float *bias, int stream, tn_next_row next) {
  float f32[TN_BLOCK];
  uint16_t u16[TN_BLOCK];
  const size_t es = tn_elem_size(dtype);
  for (int64_t b = 0; b < n; b += TN_BLOCK) {
    const int64_t len = n - b < TN_BLOCK ? n - b : TN_BLOCK;
    if (stream) tn_prefetch_slice(next, b, b + len, n);
    void *dst = (char *)out + (size_t)b * es;
    float *r = dtype == TN_F32 && !stream ? (float *)dst : f32;
    ln_block(dtype, r, v, b, len, mean, inv, llama, has_w, w, has_b, bias, u16);
    tn_block_out(dtype, dst, f32, u16, len, stream);
  }
}

/* A quantized output's row: the whole row's results into res (not v), then tn_quant_finish. */
TN_INLINE void ln_quant(const tn_cpu_call *c, tn_dtype dtype, float *res, const float *v, int64_t n, int64_t row,
                        float mean, float inv, int llama, int has_w, int has_b) {
  uint16_t u16[TN_BLOCK];
  for (int64_t b = 0; b < n; b += TN_BLOCK) {
    const int64_t len = n - b < TN_BLOCK ? n - b : TN_BLOCK;
    ln_block(dtype, res + b, v, b, len, mean, inv, llama, has_w, c->weight, has_b, c->bias, u16);
  }
  tn_quant_finish(c, dtype, res, n, row);
}

TN_INLINE void layer_norm_rows(const tn_cpu_call *c, float *s, int64_t begin, int64_t end, tn_dtype dtype, int add,
                               int has_w, int has_b) {
  const tn_op_args *a = c->args;
  const int64_t dim = a->x->dim;
  const int llama = a->casting == TN_CASTING_LLAMA && dtype != TN_F32;
  const tn_dtype rdtype = add ? a->residual->dtype : dtype;
  const int norm_f32 = a->residual_mode == TN_RESIDUAL_NORM_F32;
  for (int64_t r = begin; r < end; r++) {
    const float *v;
    if (add) {
      tn_residual_add_any(dtype, rdtype, norm_f32, tn_row_ptr(a->x, r), tn_row_ptr(a->residual, r),
                          tn_row_ptr(a->residual_out, r), s, dim, c->stream);
      v = s;
    } else {
      v = tn_row_as_f32(dtype, tn_row_ptr(a->x, r), dim, s);
    }
    float mean;
    const float inv = ln_stats(&v, s, dim, a->eps, &mean);
    if (a->quant.format != TN_QUANT_NONE) {
      ln_quant(c, dtype, s + dim, v, dim, r, mean, inv, llama, has_w, has_b);
      continue;
    }
    void *y = tn_row_ptr(a->y, r);
    const tn_next_row next = tn_next_row_of(a->x, add ? a->residual : NULL, r, end);
    if (llama)
      ln_emit(dtype, y, v, dim, mean, inv, 1, has_w, c->weight, has_b, c->bias, c->stream, next);
    else
      ln_emit(dtype, y, v, dim, mean, inv, 0, has_w, c->weight, has_b, c->bias, c->stream, next);
  }
  tn_stream_fence(c->stream);
}

#define LN_INSTANCE_(name, dt, add, w, b)                                              \
  static void name(const tn_cpu_call *c, float *scratch, int64_t begin, int64_t end) { \
    layer_norm_rows(c, scratch, begin, end, dt, add, w, b);                            \
  }
#define LN_INSTANCES_(sfx, dt)              \
  LN_INSTANCE_(ln_##sfx, dt, 0, 0, 0)       \
  LN_INSTANCE_(ln_##sfx##_b, dt, 0, 0, 1)   \
  LN_INSTANCE_(ln_##sfx##_w, dt, 0, 1, 0)   \
  LN_INSTANCE_(ln_##sfx##_wb, dt, 0, 1, 1)  \
  LN_INSTANCE_(aln_##sfx, dt, 1, 0, 0)      \
  LN_INSTANCE_(aln_##sfx##_b, dt, 1, 0, 1)  \
  LN_INSTANCE_(aln_##sfx##_w, dt, 1, 1, 0)  \
  LN_INSTANCE_(aln_##sfx##_wb, dt, 1, 1, 1)
LN_INSTANCES_(f32, TN_F32)
LN_INSTANCES_(f16, TN_F16)
LN_INSTANCES_(bf16, TN_BF16)

#define LN_ROW_(sfx)                                                   \
  {{{ln_##sfx, ln_##sfx##_b}, {ln_##sfx##_w, ln_##sfx##_wb}},          \
   {{aln_##sfx, aln_##sfx##_b}, {aln_##sfx##_w, aln_##sfx##_wb}}}
/* [dtype][add][weight][bias] */
static const tn_cpu_rows_fn ln_table[TN_DTYPE_COUNT][2][2][2] = {
    [TN_F32] = LN_ROW_(f32), [TN_F16] = LN_ROW_(f16), [TN_BF16] = LN_ROW_(bf16)};

void TN_CPU_ENTRY(tn_cpu_layer_norm_rows)(const tn_cpu_call *c, float *scratch, int64_t begin, int64_t end) {
  const tn_op_args *a = c->args;
  ln_table[a->x->dtype][a->op == TN_OP_ADD_LAYER_NORM][c->weight != NULL][c->bias != NULL](c, scratch, begin, end);
}
