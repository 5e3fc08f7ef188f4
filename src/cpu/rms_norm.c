/* rms_norm and its fused multiply: y = x * rsqrt(mean(x^2) + eps) * (w + offset) [* m]. */
#include "ops.h"
#include "row_kernels.h"

TN_INLINE void rms_norm_rows(const tn_op_args *a, int64_t begin, int64_t end, tn_dtype dtype, tn_dtype wdtype,
                             int has_mul) {
  const int64_t dim = a->x->dim;
  const void *w = a->weight != NULL ? a->weight->data : NULL;
  for (int64_t r = begin; r < end; r++) {
    const void *x = tn_row_ptr(a->x, r);
    float inv = tn_inv_sqrt(tn_row_sum_squares(dtype, x, dim) / (float)dim + a->eps);
    tn_row_scale_store(dtype, x, tn_row_ptr(a->y, r), dim, inv, wdtype, w, a->weight_offset, has_mul,
                       has_mul ? tn_row_ptr(a->mul, r) : NULL);
  }
}

/* One instance per (x dtype, weight dtype or none, mul or not). */
#define RMS_INSTANCE(name, dt, wdt, mul)                                                 \
  TN_CPU_CLONES static void name(const tn_op_args *a, int64_t begin, int64_t end) {     \
    rms_norm_rows(a, begin, end, dt, wdt, mul);                                          \
  }
#define RMS_INSTANCES(suffix, dt)                                  \
  RMS_INSTANCE(rms_##suffix##_plain, dt, TN_NO_WEIGHT, 0)          \
  RMS_INSTANCE(rms_##suffix##_w, dt, dt, 0)                        \
  RMS_INSTANCE(rms_##suffix##_wf32, dt, TN_F32, 0)                 \
  RMS_INSTANCE(rms_##suffix##_mul, dt, TN_NO_WEIGHT, 1)            \
  RMS_INSTANCE(rms_##suffix##_w_mul, dt, dt, 1)                    \
  RMS_INSTANCE(rms_##suffix##_wf32_mul, dt, TN_F32, 1)
RMS_INSTANCES(f32, TN_F32)
RMS_INSTANCES(f16, TN_F16)
RMS_INSTANCES(bf16, TN_BF16)

/* [x dtype][weight: none, x's dtype, f32][mul] */
static const tn_cpu_rows_fn rms_table[TN_DTYPE_COUNT][3][2] = {
    [TN_F32] = {{rms_f32_plain, rms_f32_mul}, {rms_f32_w, rms_f32_w_mul}, {rms_f32_wf32, rms_f32_wf32_mul}},
    [TN_F16] = {{rms_f16_plain, rms_f16_mul}, {rms_f16_w, rms_f16_w_mul}, {rms_f16_wf32, rms_f16_wf32_mul}},
    [TN_BF16] = {{rms_bf16_plain, rms_bf16_mul}, {rms_bf16_w, rms_bf16_w_mul}, {rms_bf16_wf32, rms_bf16_wf32_mul}},
};

void tn_cpu_rms_norm_rows(const tn_op_args *a, int64_t begin, int64_t end) {
  int weight_kind = a->weight == NULL ? 0 : (a->weight->dtype == TN_F32 ? 2 : 1);
  rms_table[a->x->dtype][weight_kind][a->mul != NULL](a, begin, end);
}
