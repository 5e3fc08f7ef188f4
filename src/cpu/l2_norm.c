/* l2_norm: y = x * rsqrt(sum(x^2) + eps) * scale. */
#include "row_kernels.h"

TN_INLINE void l2_norm_rows(const tn_cpu_call *c, float *scratch, int64_t begin, int64_t end, tn_dtype dtype) {
  const tn_op_args *a = c->args;
  const int64_t dim = a->x->dim;
  for (int64_t r = begin; r < end; r++) {
    const tn_row_source src = tn_row_pass1(dtype, tn_row_ptr(a->x, r), dim, 1.0f, a->eps, scratch);
    tn_row_emit(dtype, tn_row_ptr(a->y, r), src.v, src.half, dim, src.inv, 0, NULL, 0, NULL, 1, a->scale,
                c->round_before_last, c->stream, tn_next_row_of(a->x, NULL, r, end));
  }
  tn_stream_fence(c->stream);
}

#define L2_INSTANCE(name, dt)                                                                          \
  static void name(const tn_cpu_call *c, float *scratch, int64_t begin, int64_t end) { \
    l2_norm_rows(c, scratch, begin, end, dt);                                                          \
  }
L2_INSTANCE(l2_f32, TN_F32)
L2_INSTANCE(l2_f16, TN_F16)
L2_INSTANCE(l2_bf16, TN_BF16)

static const tn_cpu_rows_fn l2_table[TN_DTYPE_COUNT] = {[TN_F32] = l2_f32, [TN_F16] = l2_f16, [TN_BF16] = l2_bf16};

void TN_CPU_ENTRY(tn_cpu_l2_norm_rows)(const tn_cpu_call *c, float *scratch, int64_t begin, int64_t end) {
  l2_table[c->args->x->dtype](c, scratch, begin, end);
}
