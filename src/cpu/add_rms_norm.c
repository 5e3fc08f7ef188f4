/* add_rms_norm: s = round(x + residual); residual_out = s; y = rms_norm(s) * (w + offset).
 * The norm is computed from exactly the rounded s (the HF and vLLM semantics): the scratch row holds s
 * rounded to the dtype, and residual_out is written from it. */
#include "row_kernels.h"

TN_INLINE void add_rms_norm_rows(const tn_cpu_call *c, float *s, int64_t begin, int64_t end, tn_dtype dtype,
                                 int has_w) {
  const tn_op_args *a = c->args;
  const int64_t dim = a->x->dim;
  for (int64_t r = begin; r < end; r++) {
    const void *x = tn_row_ptr(a->x, r);
    const void *res = tn_row_ptr(a->residual, r);
    for (int64_t i = 0; i < dim; i++) s[i] = tn_round_to(dtype, tn_load(dtype, x, i) + tn_load(dtype, res, i));
    /* s is exact in the dtype, so this emit (factor 1) stores it unchanged. */
    tn_row_emit(dtype, tn_row_ptr(a->residual_out, r), s, dim, 1.0f, 0, NULL, 0, NULL, 0, 1.0f, c->stream);
    float inv = tn_inv_sqrt(tn_sum_squares(s, dim) / (float)dim + a->eps);
    tn_row_emit(dtype, tn_row_ptr(a->y, r), s, dim, inv, has_w, c->weight, 0, NULL, 0, 1.0f, c->stream);
  }
  tn_stream_fence(c->stream);
}

#define ADD_INSTANCE(name, dt, w)                                                                    \
  TN_CPU_CLONES static void name(const tn_cpu_call *c, float *s, int64_t begin, int64_t end) {     \
    add_rms_norm_rows(c, s, begin, end, dt, w);                                                      \
  }
ADD_INSTANCE(add_f32, TN_F32, 0)
ADD_INSTANCE(add_f32_w, TN_F32, 1)
ADD_INSTANCE(add_f16, TN_F16, 0)
ADD_INSTANCE(add_f16_w, TN_F16, 1)
ADD_INSTANCE(add_bf16, TN_BF16, 0)
ADD_INSTANCE(add_bf16_w, TN_BF16, 1)

/* [dtype][weight] */
static const tn_cpu_rows_fn add_table[TN_DTYPE_COUNT][2] = {
    [TN_F32] = {add_f32, add_f32_w},
    [TN_F16] = {add_f16, add_f16_w},
    [TN_BF16] = {add_bf16, add_bf16_w},
};

void tn_cpu_add_rms_norm_rows(const tn_cpu_call *c, float *s, int64_t begin, int64_t end) {
  add_table[c->args->x->dtype][c->weight != NULL](c, s, begin, end);
}
