#include "reference.h"

#include <math.h>
#include <stdlib.h>

#include "../../src/core/dtype.h"

float tn_reference_load(const tn_tensor *t, int64_t r, int64_t i) {
  const char *row = (const char *)t->data + (size_t)r * (size_t)t->row_stride * tn_dtype_size(t->dtype);
  return tn_load(t->dtype, row, i);
}

void tn_reference_store(const tn_tensor *t, int64_t r, int64_t i, float v) {
  char *row = (char *)t->data + (size_t)r * (size_t)t->row_stride * tn_dtype_size(t->dtype);
  tn_store(t->dtype, row, i, v);
}

/* add, mul, scale: exact in float64 (the library rounds once, to the dtype). */
static void reference_elementwise(const tn_op_args *a, double *y) {
  const tn_tensor *x = a->x, *b = a->op == TN_OP_ADD ? a->residual : a->op == TN_OP_MUL ? a->mul : NULL;
  for (int64_t r = 0; r < x->rows; r++)
    for (int64_t i = 0; i < x->dim; i++) {
      double v = tn_reference_load(x, r, i);
      double w = b != NULL ? (double)tn_reference_load(b, b->rows == 1 ? 0 : r, i) : (double)a->scale;
      y[r * x->dim + i] = a->op == TN_OP_ADD ? v + w : v * w;
    }
}

int tn_reference_run(const tn_op_args *a, double *y, double *residual_out) {
  const tn_tensor *x = a->x;
  const int64_t rows = x->rows, dim = x->dim;
  if (a->op == TN_OP_ADD || a->op == TN_OP_MUL || a->op == TN_OP_SCALE) {
    reference_elementwise(a, y);
    return 0;
  }
  double *s = malloc((size_t)dim * sizeof *s);
  if (s == NULL) return -1;
  for (int64_t r = 0; r < rows; r++) {
    double sum_sq = 0.0;
    for (int64_t i = 0; i < dim; i++) {
      double v = tn_reference_load(x, r, i);
      if (a->op == TN_OP_ADD_RMS_NORM) {
        /* The spec's one intermediate rounding: the sum in float32, stored in x's dtype. */
        float sum = tn_reference_load(x, r, i) + tn_reference_load(a->residual, r, i);
        v = tn_round_to(x->dtype, sum);
        residual_out[r * dim + i] = v;
      }
      s[i] = v;
      sum_sq += v * v;
    }
    double inv = a->op == TN_OP_L2_NORM ? 1.0 / sqrt(sum_sq + a->eps) : 1.0 / sqrt(sum_sq / (double)dim + a->eps);
    for (int64_t i = 0; i < dim; i++) {
      double v = s[i] * inv;
      if (a->op == TN_OP_L2_NORM) v *= a->scale;
      if (a->weight != NULL) v *= (double)tn_reference_load(a->weight, 0, i) + a->weight_offset;
      if (a->mul != NULL) v *= tn_reference_load(a->mul, r, i);
      y[r * dim + i] = v;
    }
  }
  free(s);
  return 0;
}

/* Spacing of the dtype's values at magnitude |v| (finite v). */
static double ulp_at(tn_dtype dtype, double v) {
  int mant_bits = dtype == TN_F16 ? 10 : dtype == TN_BF16 ? 7 : 23;
  int min_exp = dtype == TN_F16 ? -14 : -126;
  double a = fabs(v);
  int e = a > 0 ? ilogb(a) : min_exp;
  if (e < min_exp) e = min_exp;
  return ldexp(1.0, e - mant_bits);
}

double tn_reference_error(tn_dtype dtype, float got, double ref) {
  if (isnan(ref) || isnan(got)) return isnan(ref) && isnan(got) ? 0.0 : INFINITY;
  double max_finite = dtype == TN_F16 ? 65504.0 : dtype == TN_BF16 ? 0x1.fep127 : 0x1.fffffep127;
  /* A reference beyond the dtype's range (past the rounding midpoint) rounds to Inf of its sign. */
  int ref_overflows = isinf(ref) || fabs(ref) >= max_finite + ulp_at(dtype, max_finite) / 2;
  if (isinf(got)) return ref_overflows && (got > 0) == (ref > 0) ? 0.0 : INFINITY;
  if (isinf(ref)) return INFINITY;
  double diff = fabs((double)got - ref);
  if (dtype == TN_F32) {
    double scale = fabs(ref) > 0x1p-126 ? fabs(ref) : 0x1p-126; /* below the normal range: absolute */
    return diff / (2e-5 * scale);
  }
  return diff / ulp_at(dtype, ref);
}
