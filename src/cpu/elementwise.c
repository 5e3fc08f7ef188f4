/* add, mul and scale: y = round(x + b), round(x * b), round(x * scale), in blocks of TN_BLOCK elements
 * converted to float32 once. b may be one row applied to every row (then its row stride is ignored). */
#include "row_kernels.h"

TN_INLINE void elementwise_rows(const tn_cpu_call *c, int64_t begin, int64_t end, tn_dtype dtype, tn_op op) {
  const tn_op_args *a = c->args;
  const tn_tensor *b = op == TN_OP_ADD ? a->residual : op == TN_OP_MUL ? a->mul : NULL;
  const int64_t dim = a->x->dim;
  const size_t es = tn_elem_size(dtype);
  float xf[TN_BLOCK], bf[TN_BLOCK], out[TN_BLOCK];
  uint16_t u16[TN_BLOCK];
  for (int64_t r = begin; r < end; r++) {
    const char *x = tn_row_ptr(a->x, r);
    const char *brow = b != NULL ? tn_row_ptr(b, b->rows == 1 ? 0 : r) : NULL;
    char *y = tn_row_ptr(a->y, r);
    for (int64_t k = 0; k < dim; k += TN_BLOCK) {
      const int64_t len = dim - k < TN_BLOCK ? dim - k : TN_BLOCK;
      const float *xb = tn_row_as_f32(dtype, x + (size_t)k * es, len, xf);
      const float *bb = brow != NULL ? tn_row_as_f32(dtype, brow + (size_t)k * es, len, bf) : NULL;
      if (op == TN_OP_ADD)
        for (int64_t i = 0; i < len; i++) out[i] = xb[i] + bb[i];
      else if (op == TN_OP_MUL)
        for (int64_t i = 0; i < len; i++) out[i] = xb[i] * bb[i];
      else
        for (int64_t i = 0; i < len; i++) out[i] = xb[i] * a->scale;
      /* Every input element of the block was read before any output element is written: in place works. */
      if (dtype == TN_F32) {
        tn_copy_out(y + (size_t)k * es, out, (size_t)len * 4, c->stream);
      } else {
        tn_block_out(dtype, y + (size_t)k * es, out, u16, len, c->stream);
      }
    }
  }
  tn_stream_fence(c->stream);
}

#define EW_INSTANCE(name, dt, op)                                                                      \
  static void name(const tn_cpu_call *c, float *scratch, int64_t begin, int64_t end) {                 \
    (void)scratch;                                                                                     \
    elementwise_rows(c, begin, end, dt, op);                                                           \
  }
#define EW_INSTANCES(sfx, dt)          \
  EW_INSTANCE(add_##sfx, dt, TN_OP_ADD) \
  EW_INSTANCE(mul_##sfx, dt, TN_OP_MUL) \
  EW_INSTANCE(scale_##sfx, dt, TN_OP_SCALE)
EW_INSTANCES(f32, TN_F32)
EW_INSTANCES(f16, TN_F16)
EW_INSTANCES(bf16, TN_BF16)

/* [dtype][add, mul, scale] */
static const tn_cpu_rows_fn elementwise_table[TN_DTYPE_COUNT][3] = {
    [TN_F32] = {add_f32, mul_f32, scale_f32},
    [TN_F16] = {add_f16, mul_f16, scale_f16},
    [TN_BF16] = {add_bf16, mul_bf16, scale_bf16},
};

void TN_CPU_ENTRY(tn_cpu_elementwise_rows)(const tn_cpu_call *c, float *scratch, int64_t begin, int64_t end) {
  elementwise_table[c->args->x->dtype][c->args->op - TN_OP_ADD](c, scratch, begin, end);
}
