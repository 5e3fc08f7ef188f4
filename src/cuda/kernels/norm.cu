/* rms_norm (optionally with a weight and a fused multiplicand) and l2_norm: one family, since l2_norm
 * is the same row with count = 1 and a scale. The multiplicand is a compile-time choice (its own kernels):
 * carried as a run-time flag, its registers made every other kernel spill.
 *   y = round((((x * inv) * (w + offset)) * m) * scale),  inv = 1 / sqrt(sum(x^2) / count + eps)
 * each factor present only when the call has it. */
#include "row.cuh"

template <bool MUL>
struct tn_norm_op {
  template <int DT, int MODE>
  static __device__ __forceinline__ tn_chunk produce(const tn_kernel_params &p, tn_i64 row, tn_i64 c) {
    return tn_load_chunk<DT, MODE>(tn_row(p.x, row, p.x_stride, tn_dt<DT>::size), c, p.dim);
  }

  /* The chunk again, for rows staged by re-reading (x is only written after its last read). */
  template <int DT, int MODE>
  static __device__ __forceinline__ tn_chunk reread(const tn_kernel_params &p, tn_i64 row, tn_i64 c) {
    return produce<DT, MODE>(p, row, c);
  }

  template <int DT, int MODE>
  static __device__ __forceinline__ void emit(const tn_kernel_params &p, tn_i64 row, tn_i64 c, const tn_chunk &q,
                                              float pre, float inv) {
    constexpr int V = tn_dt<DT>::per_chunk;
    float f[V], w[V], m[V];
    tn_chunk_to_f32<DT>(q, f);
    if (p.has_weight) {
      if (p.weight_f32) tn_load_f32<DT, TN_KERNEL_F32, MODE>((const char *)p.weight, c, p.dim, w);
      else tn_load_f32<DT, DT, MODE>((const char *)p.weight, c, p.dim, w);
    }
    if (MUL) tn_load_f32<DT, DT, MODE>(tn_row(p.mul, row, p.mul_stride, tn_dt<DT>::size), c, p.dim, m);
#pragma unroll
    for (int j = 0; j < V; j++) {
      float v = (f[j] * pre) * inv;
      if (p.has_weight) v *= w[j] + p.weight_offset;
      if (p.round_before_last) v = tn_to_f32<DT>(tn_from_f32<DT>(v));
      if (MUL) v *= m[j];
      if (p.has_scale) v *= p.scale;
      f[j] = v;
    }
    tn_store_chunk<DT, MODE>((char *)tn_row(p.y, row, p.y_stride, tn_dt<DT>::size), c, p.dim,
                             tn_chunk_from_f32<DT>(f));
  }
};

TN_DEFINE_ROW_KERNELS(tn_norm, tn_norm_op<false>)
TN_DEFINE_ROW_KERNELS(tn_norm_mul, tn_norm_op<true>)
