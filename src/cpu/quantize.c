/* quantize: q (and the scales) of x's rows, x's own values quantized (tnorm.h, "Quantized outputs"). */
#include "quant_row.h"
#include "row_kernels.h"

TN_INLINE void quantize_rows(const tn_cpu_call *c, float *scratch, int64_t begin, int64_t end, tn_dtype dtype) {
  const tn_op_args *a = c->args;
  const int64_t dim = a->x->dim;
  for (int64_t r = begin; r < end; r++) tn_quant_row(c, tn_row_as_f32(dtype, tn_row_ptr(a->x, r), dim, scratch), dim, r);
}

static void quantize_f32(const tn_cpu_call *c, float *s, int64_t begin, int64_t end) { quantize_rows(c, s, begin, end, TN_F32); }
static void quantize_f16(const tn_cpu_call *c, float *s, int64_t begin, int64_t end) { quantize_rows(c, s, begin, end, TN_F16); }
static void quantize_bf16(const tn_cpu_call *c, float *s, int64_t begin, int64_t end) { quantize_rows(c, s, begin, end, TN_BF16); }

static const tn_cpu_rows_fn quantize_table[TN_DTYPE_COUNT] = {
    [TN_F32] = quantize_f32, [TN_F16] = quantize_f16, [TN_BF16] = quantize_bf16};

void TN_CPU_ENTRY(tn_cpu_quantize_rows)(const tn_cpu_call *c, float *scratch, int64_t begin, int64_t end) {
  quantize_table[c->args->x->dtype](c, scratch, begin, end);
}
