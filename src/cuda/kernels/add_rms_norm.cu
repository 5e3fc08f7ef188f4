/* add_rms_norm: s = round(x + r); residual_out = s; y = round(((s * inv) * (w + offset)) [* m]),
 * inv = 1 / sqrt(sum(s^2) / dim + eps), from exactly the rounded s. The multiplicand has its own kernels,
 * as in norm.cu. */
#include "row.cuh"

template <bool MUL>
struct tn_add_norm_op : tn_add_split<true> {
  template <int DT>
  using held = tn_chunk;
  using reduce = tn_rms_reduce;

  /* A row is found by its index alone (2-D views). */
  template <int DT>
  static __device__ __forceinline__ tn_i64 locate(const tn_kernel_params &, tn_i64 row) {
    return row;
  }

  /* s for chunk c, rounded to the dtype, also written to residual_out (tn_add_split's fetch and complete). */
  template <int DT, int MODE>
  static __device__ __forceinline__ tn_chunk produce(const tn_kernel_params &p, tn_i64 row, tn_i64 c) {
    return complete<DT, MODE>(p, row, c, fetch<DT, MODE>(p, row, c));
  }

  /* s again, from residual_out, which this thread wrote (staged rows read again). */
  template <int DT, int MODE>
  static __device__ __forceinline__ tn_chunk reread(const tn_kernel_params &p, tn_i64 row, tn_i64 c) {
    return tn_load_chunk<DT, MODE>(tn_row(p.residual_out, row, p.residual_out_stride, tn_dt<DT>::size), c, p.dim);
  }

  template <int DT, int MODE>
  static __device__ __forceinline__ void emit(const tn_kernel_params &p, tn_i64 row, tn_i64 c, const tn_chunk &q,
                                              const tn_row_stats &st) {
    tn_norm_emit<DT, MODE, MUL>(p, row, c, q, st.pre, st.inv);
  }
};

/* Short rows (G <= 16) of 16-byte access fetch x's and the residual's rows ahead, in one bulk request each
 * (row.cuh's tn_fetch_row_ahead). H100, % of the copy ceiling, best of two rounds: bf16 131072x128 95.9 ->
 * 96.8, 65536x256 96.5 -> 97.2, f32 262144x64 98.4 -> 99.1. A prefetch per chunk with the loads had lost
 * 9-11 points; from G = 32 the bulk one spills the f16/bf16 kernels (24-64 bytes), so they do without. */
template <bool MUL, int DT, int G, int MODE>
struct tn_register_shape<tn_add_norm_op<MUL>, DT, G, MODE>
    : tn_short_rows_shape<tn_add_norm_op<MUL>, DT, G, !MUL && G <= 16 && MODE >= TN_KERNEL_MODE_VECTORS> {};

TN_DEFINE_ROW_KERNELS(tn_add_norm, tn_add_norm_op<false>)
TN_DEFINE_ROW_KERNELS(tn_add_norm_mul, tn_add_norm_op<true>)
