/* add_rms_norm: s = round(x + r); residual_out = s; y = round(((s * inv) * (w + offset)) [* m]),
 * inv = 1 / sqrt(sum(s^2) / dim + eps), from exactly the rounded s. The multiplicand has its own kernels,
 * as in norm.cu. */
#include "row.cuh"

template <bool MUL>
struct tn_add_norm_op : tn_add_split<true> {
  template <int DT>
  using held = tn_chunk;
  using reduce = tn_rms_reduce;
  enum { rows_read = 2 }; /* x and the residual (row.cuh's tn_rows_read) */

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
 * (row.cuh's tn_fetch_row_ahead), where a prefetch per chunk with the loads is slower; from G = 32 the bulk
 * one spills the f16/bf16 kernels of four chunks a thread.
 * Rows of 33 .. 2048 chunks take the pair shapes (G = 32 .. 1024, two chunks a thread: registry.c; float32
 * rows of 65 .. 128 chunks stay on G = 32), the layout of a plain Triton kernel: faster here than four
 * chunks a thread; those of G >= 256 with the fetch ahead, which they have the registers for. rms_norm's
 * rows stay on four chunks from G = 256, where pairs are slower for it, so an add_rms_norm that a graph
 * fused from an add and an rms_norm takes rms_norm's shapes, which this family has too (registry.c:
 * tn_kernel_order_family). Without a multiplicand the next kernel may launch as a block starts
 * (early_dependents). docs/performance.md, "add_rms_norm's kernels (add_rms_norm.cu)", has the figures. */
template <bool MUL, int DT, int G, int MODE, int K>
struct tn_register_shape<tn_add_norm_op<MUL>, DT, G, MODE, K>
    : tn_short_rows_shape<tn_add_norm_op<MUL>, DT, G,
                          !MUL && (G <= 16 || (K == TN_KERNEL_PAIR_CHUNKS && G >= TN_KERNEL_ADD_PAIR_MIN_GROUP)) &&
                              MODE >= TN_KERNEL_MODE_VECTORS,
                          false, !MUL> {};

TN_DEFINE_ROW_KERNELS(tn_add_norm, tn_add_norm_op<false>)
TN_DEFINE_ROW_KERNELS(tn_add_norm_mul, tn_add_norm_op<true>)
