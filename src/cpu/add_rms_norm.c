/* add_rms_norm: s = round(x + residual); residual_out = s; y = rms_norm(s) * (w + offset).
 * The sum is stored first and the norm reads it back from residual_out, so y is computed from exactly
 * the rounded s (the HF and vLLM semantics). The row is still in cache for the second read. */
#include "ops.h"
#include "row_kernels.h"

TN_INLINE void add_rms_norm_rows(const tn_op_args *a, int64_t begin, int64_t end, tn_dtype dtype,
                                 tn_dtype wdtype) {
  const int64_t dim = a->x->dim;
  const void *w = a->weight != NULL ? a->weight->data : NULL;
  for (int64_t r = begin; r < end; r++) {
    const void *x = tn_row_ptr(a->x, r);
    const void *res = tn_row_ptr(a->residual, r);
    void *s = tn_row_ptr(a->residual_out, r);
    for (int64_t i = 0; i < dim; i++) tn_store(dtype, s, i, tn_load(dtype, x, i) + tn_load(dtype, res, i));
    float inv = tn_inv_sqrt(tn_row_sum_squares(dtype, s, dim) / (float)dim + a->eps);
    tn_row_scale_store(dtype, s, tn_row_ptr(a->y, r), dim, inv, wdtype, w, a->weight_offset, 0, NULL);
  }
}

#define ADD_INSTANCE(name, dt, wdt)                                                   \
  TN_CPU_CLONES static void name(const tn_op_args *a, int64_t begin, int64_t end) {  \
    add_rms_norm_rows(a, begin, end, dt, wdt);                                        \
  }
#define ADD_INSTANCES(suffix, dt)                         \
  ADD_INSTANCE(add_##suffix##_plain, dt, TN_NO_WEIGHT)    \
  ADD_INSTANCE(add_##suffix##_w, dt, dt)                  \
  ADD_INSTANCE(add_##suffix##_wf32, dt, TN_F32)
ADD_INSTANCES(f32, TN_F32)
ADD_INSTANCES(f16, TN_F16)
ADD_INSTANCES(bf16, TN_BF16)

/* [x dtype][weight: none, x's dtype, f32] */
static const tn_cpu_rows_fn add_table[TN_DTYPE_COUNT][3] = {
    [TN_F32] = {add_f32_plain, add_f32_w, add_f32_wf32},
    [TN_F16] = {add_f16_plain, add_f16_w, add_f16_wf32},
    [TN_BF16] = {add_bf16_plain, add_bf16_w, add_bf16_wf32},
};

void tn_cpu_add_rms_norm_rows(const tn_op_args *a, int64_t begin, int64_t end) {
  int weight_kind = a->weight == NULL ? 0 : (a->weight->dtype == TN_F32 ? 2 : 1);
  add_table[a->x->dtype][weight_kind](a, begin, end);
}
