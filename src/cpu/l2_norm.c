/* l2_norm: y = x * rsqrt(sum(x^2) + eps) * scale. */
#include "ops.h"
#include "row_kernels.h"

TN_INLINE void l2_norm_rows(const tn_op_args *a, int64_t begin, int64_t end, tn_dtype dtype) {
  const int64_t dim = a->x->dim;
  for (int64_t r = begin; r < end; r++) {
    const void *x = tn_row_ptr(a->x, r);
    float inv = tn_inv_sqrt(tn_row_sum_squares(dtype, x, dim) + a->eps);
    void *y = tn_row_ptr(a->y, r);
    for (int64_t i = 0; i < dim; i++) tn_store(dtype, y, i, tn_load(dtype, x, i) * inv * a->scale);
  }
}

#define L2_INSTANCE(name, dt) \
  TN_CPU_CLONES static void name(const tn_op_args *a, int64_t begin, int64_t end) { l2_norm_rows(a, begin, end, dt); }
L2_INSTANCE(l2_f32, TN_F32)
L2_INSTANCE(l2_f16, TN_F16)
L2_INSTANCE(l2_bf16, TN_BF16)

static const tn_cpu_rows_fn l2_table[TN_DTYPE_COUNT] = {[TN_F32] = l2_f32, [TN_F16] = l2_f16, [TN_BF16] = l2_bf16};

void tn_cpu_l2_norm_rows(const tn_op_args *a, int64_t begin, int64_t end) { l2_table[a->x->dtype](a, begin, end); }
