/* rms_norm and its fused multiply: y = x * rsqrt(mean(x^2) + eps) * (w + offset) [* m], on every vector
 * of x (its rows, or each head of each row of a 3-D view). */
#include "quant_row.h"
#include "row_kernels.h"

TN_INLINE void rms_norm_rows(const tn_cpu_call *c, float *scratch, int64_t begin, int64_t end, tn_dtype dtype,
                             int has_w, int has_m) {
  const tn_op_args *a = c->args;
  const int64_t dim = a->x->dim;
  const int llama = a->casting == TN_CASTING_LLAMA;
  const int quant = a->quant.format != TN_QUANT_NONE;
  for (int64_t v = begin; v < end; v++) {
    const tn_row_source src =
        tn_row_pass1(dtype, tn_vec_ptr(a->x, v), dim, (float)dim, a->eps, scratch, TN_SCALE_RSQRT);
    if (quant) {
      float *res = scratch + dim;
      tn_row_result(dtype, res, src.v, src.half, dim, src.inv, llama && dtype != TN_F32, has_w, c->weight, has_m,
                    has_m ? tn_vec_ptr(a->mul, v) : NULL, 0, 1.0f, c->round_before_last);
      tn_quant_finish(c, dtype, res, dim, v);
      continue;
    }
    tn_row_emit(dtype, tn_vec_ptr(a->y, v), src.v, src.half, dim, src.inv, llama, has_w, c->weight, has_m,
                has_m ? tn_vec_ptr(a->mul, v) : NULL, 0, 1.0f, c->round_before_last, c->stream,
                tn_next_row_of(a->x, has_m ? a->mul : NULL, v, end));
  }
  tn_stream_fence(c->stream);
}

TN_CPU_ROWS_TABLE(rms_table, rms_norm_rows)

void TN_CPU_ENTRY(tn_cpu_rms_norm_rows)(const tn_cpu_call *c, float *scratch, int64_t begin, int64_t end) {
  rms_table[c->args->x->dtype][c->weight != NULL][c->args->mul != NULL](c, scratch, begin, end);
}
