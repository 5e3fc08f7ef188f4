/* rms_norm (optionally with a weight and a fused multiplicand) and l2_norm with a scale of 1: one family,
 * since l2_norm is the same row with count = 1. The multiplicand is a compile-time choice (its own
 * kernels): carried as a run-time flag, its registers would make every other kernel spill. An l2_norm scale
 * other than 1 goes to norm_x.cu's kernels (backend.c), so these have no per-element code for it (nor for
 * the rounding before it of a fused l2_norm -> scale), which would lengthen every kernel of the family.
 *   y = round(((x * inv) * (w + offset)) [* m]),  inv = 1 / sqrt(sum(x^2) / count + eps)
 * each factor present only when the call has it. Calls without a weight or a multiplicand (l2_norm, the
 * unscaled rms_norm) have kernels of their own too, with no code for a weight (tn_norm_unweighted: the
 * same arithmetic, so the same bytes), which run faster than the weighted kernels with no weight
 * (docs/performance.md, "The norm family's kernels (norm.cu)"). */
#include "row.cuh"

template <bool MUL, bool WEIGHTED = true>
struct tn_norm_op {
  template <int DT>
  using held = tn_chunk;
  using reduce = tn_rms_reduce;
  enum { rows_read = 1 }; /* x (row.cuh's tn_rows_read) */

  /* A row is found by its index alone (2-D views). */
  template <int DT>
  static __device__ __forceinline__ tn_i64 locate(const tn_kernel_params &, tn_i64 row) {
    return row;
  }

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
                                              const tn_row_stats &st) {
    tn_norm_emit<DT, MODE, MUL, WEIGHTED>(p, row, c, q, st.pre, st.inv);
  }

  /* emit, the weight's chunk (x's dtype) read already (row.cuh's weight_first; never with a multiplicand). */
  template <int DT, int MODE>
  static __device__ __forceinline__ void emit_weighted(const tn_kernel_params &p, tn_i64 row, tn_i64 c,
                                                       const tn_chunk &q, const tn_chunk &wq, const tn_row_stats &st) {
    float w[tn_dt<DT>::per_chunk];
    tn_chunk_to_f32<DT>(wq, w);
    tn_norm_store<DT, MODE, false>(p, row, c, q, w, nullptr, st.pre, st.inv);
  }
};

/* rms_norm and l2_norm fetch x's rows ahead (row.cuh's tn_fetch_row_ahead), and read a weight of x's dtype
 * before their first store (weight_first: a store may alias a later load for all the compiler knows, so
 * each chunk's weight read would otherwise wait for the previous chunk's store). Not in
 * TN_FOUR_CHUNKS_ON_A_WARP, where the weight's registers spill. The kernels with a multiplicand keep the
 * defaults: neither choice is measured there.
 * Rows of 33 .. 256 chunks take the pair shapes (G = 32 .. 128, two chunks a thread: registry.c; float32
 * rows of 65 .. 128 chunks stay on G = 32, as rope.cu's heads): twice the threads of the four-chunk shapes
 * of G = 32 and 64, whose threads would hold a row's chunks half empty at its short end; with a
 * multiplicand too (a graph's fusions need the order of the op without one). Longer rows stay on four
 * chunks a thread, where pairs are slower.
 * Without a multiplicand the next kernel may launch as a block starts (early_dependents), so that its
 * blocks take the slots this kernel's last rows free. docs/performance.md, "The norm family's kernels
 * (norm.cu)", has the figures of all three. */
template <bool MUL, bool WEIGHTED, int DT, int G, int MODE, int K>
struct tn_register_shape<tn_norm_op<MUL, WEIGHTED>, DT, G, MODE, K>
    : tn_short_rows_shape<tn_norm_op<MUL, WEIGHTED>, DT, G, !MUL,
                          !MUL && WEIGHTED && !TN_FOUR_CHUNKS_ON_A_WARP(G, K) && MODE == TN_KERNEL_MODE_WHOLE, !MUL> {};

TN_DEFINE_ROW_KERNELS(tn_norm, tn_norm_op<false>)
TN_DEFINE_ROW_KERNELS(tn_norm_mul, tn_norm_op<true>)
using tn_norm_unweighted_op = tn_norm_op<false, false>; /* one macro argument */
TN_DEFINE_ROW_KERNELS(tn_norm_unweighted, tn_norm_unweighted_op)
