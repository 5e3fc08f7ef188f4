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

TN_CPU_ROWS_TABLE(rms_table, rms_norm_rows)

void TN_CPU_ENTRY(tn_cpu_rms_norm_rows)(const tn_cpu_call *c, float *scratch, int64_t begin, int64_t end) {
  rms_table[c->args->x->dtype][c->weight != NULL][c->args->mul != NULL](c, scratch, begin, end);
}
