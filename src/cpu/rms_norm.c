/* rms_norm and its fused multiply: y = x * rsqrt(mean(x^2) + eps) * (w + offset) [* m]. */
#include "row_kernels.h"

TN_INLINE void rms_norm_rows(const tn_cpu_call *c, float *scratch, int64_t begin, int64_t end, tn_dtype dtype,
                             int has_w, int has_m) {
  const tn_op_args *a = c->args;
  const int64_t dim = a->x->dim;
  for (int64_t r = begin; r < end; r++) {
    const tn_row_source src = tn_row_pass1(dtype, tn_row_ptr(a->x, r), dim, (float)dim, a->eps, scratch);
    tn_row_emit(dtype, tn_row_ptr(a->y, r), src.v, src.half, dim, src.inv, has_w, c->weight, has_m,
                has_m ? tn_row_ptr(a->mul, r) : NULL, 0, 1.0f, c->round_before_last, c->stream,
                tn_next_row_of(a->x, has_m ? a->mul : NULL, r, end));
  }
  tn_stream_fence(c->stream);
}

/* One instance per (dtype, weight or not, mul or not). */
#define RMS_INSTANCE(name, dt, w, m)                                                                   \
  static void name(const tn_cpu_call *c, float *scratch, int64_t begin, int64_t end) { \
    rms_norm_rows(c, scratch, begin, end, dt, w, m);                                                   \
  }
#define RMS_INSTANCES(sfx, dt)            \
  RMS_INSTANCE(rms_##sfx, dt, 0, 0)       \
  RMS_INSTANCE(rms_##sfx##_w, dt, 1, 0)   \
  RMS_INSTANCE(rms_##sfx##_m, dt, 0, 1)   \
  RMS_INSTANCE(rms_##sfx##_w_m, dt, 1, 1)
RMS_INSTANCES(f32, TN_F32)
RMS_INSTANCES(f16, TN_F16)
RMS_INSTANCES(bf16, TN_BF16)

/* [dtype][weight][mul] */
static const tn_cpu_rows_fn rms_table[TN_DTYPE_COUNT][2][2] = {
    [TN_F32] = {{rms_f32, rms_f32_m}, {rms_f32_w, rms_f32_w_m}},
    [TN_F16] = {{rms_f16, rms_f16_m}, {rms_f16_w, rms_f16_w_m}},
    [TN_BF16] = {{rms_bf16, rms_bf16_m}, {rms_bf16_w, rms_bf16_w_m}},
};

void TN_CPU_ENTRY(tn_cpu_rms_norm_rows)(const tn_cpu_call *c, float *scratch, int64_t begin, int64_t end) {
  rms_table[c->args->x->dtype][c->weight != NULL][c->args->mul != NULL](c, scratch, begin, end);
}
