/* l2_norm: y = x * rsqrt(sum(x^2) + eps) * scale, or with TN_L2_MAX_NORM_EPS
 * y = x * (1 / max(sqrt(sum(x^2)), eps)) * scale, on every vector of x (rows, or heads of a 3-D view). */
#include "row_kernels.h"

TN_INLINE void l2_norm_rows(const tn_cpu_call *c, float *scratch, int64_t begin, int64_t end, tn_dtype dtype,
                            int mode) {
  const tn_op_args *a = c->args;
  const int64_t dim = a->x->dim;
  const int llama = a->casting == TN_CASTING_LLAMA;
  for (int64_t v = begin; v < end; v++) {
    const tn_row_source src = tn_row_pass1(dtype, tn_vec_ptr(a->x, v), dim, 1.0f, a->eps, scratch, mode);
    tn_row_emit(dtype, tn_vec_ptr(a->y, v), src.v, src.half, dim, src.inv, llama, 0, NULL, 0, NULL, 1, a->scale,
                c->round_before_last, c->stream, tn_next_row_of(a->x, NULL, v, end));
  }
  tn_stream_fence(c->stream);
}

#define L2_INSTANCE(name, dt, mode)                                                    \
  static void name(const tn_cpu_call *c, float *scratch, int64_t begin, int64_t end) { \
    l2_norm_rows(c, scratch, begin, end, dt, mode);                                    \
  }
L2_INSTANCE(l2_f32, TN_F32, TN_SCALE_RSQRT)
L2_INSTANCE(l2_f16, TN_F16, TN_SCALE_RSQRT)
L2_INSTANCE(l2_bf16, TN_BF16, TN_SCALE_RSQRT)
L2_INSTANCE(l2_max_f32, TN_F32, TN_SCALE_MAX_NORM)
L2_INSTANCE(l2_max_f16, TN_F16, TN_SCALE_MAX_NORM)
L2_INSTANCE(l2_max_bf16, TN_BF16, TN_SCALE_MAX_NORM)

/* [dtype][l2_mode] */
static const tn_cpu_rows_fn l2_table[TN_DTYPE_COUNT][2] = {
    [TN_F32] = {l2_f32, l2_max_f32}, [TN_F16] = {l2_f16, l2_max_f16}, [TN_BF16] = {l2_bf16, l2_max_bf16}};

void TN_CPU_ENTRY(tn_cpu_l2_norm_rows)(const tn_cpu_call *c, float *scratch, int64_t begin, int64_t end) {
  l2_table[c->args->x->dtype][c->args->l2_mode == TN_L2_MAX_NORM_EPS](c, scratch, begin, end);
}
