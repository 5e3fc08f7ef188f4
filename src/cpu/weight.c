/* The weight plus its offset, and the bias, in float32, once per call: every row then reads f32. */
#include "row_kernels.h"

void TN_CPU_ENTRY(tn_cpu_prepare_weight)(const tn_tensor *w, float offset, float *out) {
  const int64_t n = w->dim;
  const float *f = tn_row_as_f32(w->dtype, w->data, n, out); /* f16/bf16: converted into out */
  for (int64_t i = 0; i < n; i++) out[i] = f[i] + offset;
}

void TN_CPU_ENTRY(tn_cpu_prepare_vector)(const tn_tensor *v, float *out) {
  const int64_t n = v->dim;
  const float *f = tn_row_as_f32(v->dtype, v->data, n, out);
  if (f != out) memcpy(out, f, (size_t)n * sizeof *out);
}
