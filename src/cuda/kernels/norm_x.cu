/* rms_norm and l2_norm beyond norm.cu's default path, without a multiplicand: 3-D views (per-head norms,
 * the HEADS flag), TN_CASTING_LLAMA, l2_norm's max(norm, eps) (MAX_NORM); and add_rms_norm with
 * TN_CASTING_LLAMA when the residual is of x's dtype and the sum is normalised as stored (ADD). The row is
 * held as in norm.cu and add_rms_norm.cu (chunks of x's dtype) and reduced in the same order, so a call
 * without those knobs would give norm.cu's bytes:
 *   y = round(round?(((s * pre) * inv)) * (w + offset) [* scale]), s = x, or round(x + r) (also written
 *   to residual_out). */
#include "ops.cuh"

struct tn_normx_op {
  template <int DT>
  using held = tn_chunk;
  using reduce = tn_rmsx_reduce;

  template <int DT>
  static __device__ __forceinline__ tn_vec locate(const tn_kernel_params &p, tn_i64 v) {
    return tn_vec_of(p, v);
  }

  template <int DT, int MODE>
  static __device__ __forceinline__ tn_chunk produce(const tn_kernel_params &p, const tn_vec &at, tn_i64 c) {
    const tn_chunk xq =
        tn_load_chunk<DT, MODE>(tn_vec_ptr(p.x, at, p.x_stride, p.x_head_stride, tn_dt<DT>::size), c, p.dim);
    /* add_rms_norm (2-D): s = round(x + r), written to residual_out, normalised as stored. */
    return tn_flag(p, TN_KERNEL_FLAG_ADD) ? tn_add_rounded_chunk<DT, MODE>(p, at.row, c, xq) : xq;
  }

  /* The chunk again, for rows staged by re-reading: x (only written after its last read), or the sum from
   * residual_out, which this thread wrote. */
  template <int DT, int MODE>
  static __device__ __forceinline__ tn_chunk reread(const tn_kernel_params &p, const tn_vec &at, tn_i64 c) {
    constexpr int S = tn_dt<DT>::size;
    if (!tn_flag(p, TN_KERNEL_FLAG_ADD))
      return tn_load_chunk<DT, MODE>(tn_vec_ptr(p.x, at, p.x_stride, p.x_head_stride, S), c, p.dim);
    return tn_load_chunk<DT, MODE>(tn_row(p.residual_out, at.row, p.residual_out_stride, S), c, p.dim);
  }

  template <int DT, int MODE>
  static __device__ __forceinline__ void emit(const tn_kernel_params &p, const tn_vec &at, tn_i64 c, const tn_chunk &q,
                                              const tn_row_stats &st) {
    constexpr int V = tn_dt<DT>::per_chunk, S = tn_dt<DT>::size;
    float f[V], w[V];
    tn_chunk_to_f32<DT>(q, f);
    if (p.has_weight) tn_load_vector<DT, MODE>(p.weight, p.weight_f32, c, p.dim, w);
    const bool scale = p.has_scale != 0;
#pragma unroll
    for (int j = 0; j < V; j++)
      f[j] = tn_norm_value<DT>(p, f[j], st, false, {p.has_weight != 0, false, false, scale}, w, nullptr, nullptr, j);
    tn_store_chunk<DT, MODE>((char *)tn_vec_ptr(p.y, at, p.y_stride, p.y_head_stride, S), c, p.dim,
                             tn_chunk_from_f32<DT>(f));
  }
};

TN_DEFINE_ROW_KERNELS(tn_normx, tn_normx_op)
