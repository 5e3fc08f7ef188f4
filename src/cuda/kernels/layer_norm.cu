/* layer_norm, and add_layer_norm when the residual is of x's dtype and the sum is normalised as stored
 * (its own kernels, tn_add_layer_*: ADD at compile time): the row held as chunks of x's dtype, in the row shapes of row.cuh (so every dim the rms
 * kernels take, with the same G per (dtype, dim) and so a fixed reduction order), reduced by
 * tn_layer_reduce_as with one reduction (ops.cuh: E[x^2] - mean^2 where it cannot cancel, else the mean, then
 * the squared deviations):
 *   y = round(((s * pre - mean) * inv) * (w + offset) + b), s = x, or round(x + r) (also written to
 *   residual_out); weight and bias each optional. TN_CASTING_LLAMA's layer_norm in f16/bf16 is general.cu's
 *   (backend.c): these kernels have no code for its rounding, which takes one branch per element of the
 *   output (docs/performance.md, "layer_norm's kernels (layer_norm.cu)"). */
#include "ops.cuh"

/* ADD: the residual is added first. COMMON_PATHS: the common row (no partial chunk, not rescaled) has its
 * own deviations and output loops, free of the per-element tests and of the multiply by
 * pre; the rest take the general ones. SPLIT: x and the residual are read by tn_add_split's fetch and
 * complete (every load of a thread's chunks before its first store). WHOLE: the kernel's access mode has
 * no partial chunk, so only the common deviations are compiled. PLAIN_OUTPUT: the common output loop
 * beside the general one (by default with the common paths). */
template <bool ADD, bool COMMON_PATHS, bool SPLIT = ADD, bool WHOLE = false, bool PLAIN_OUTPUT = COMMON_PATHS>
struct tn_layer_op : tn_add_split<SPLIT> {
  template <int DT>
  using held = tn_chunk;
  using reduce = tn_layer_reduce_as<COMMON_PATHS, WHOLE, true>;
  enum { rows_read = ADD ? 2 : 1 }; /* x, and the residual (row.cuh's tn_rows_read) */

  template <int DT>
  static __device__ __forceinline__ tn_i64 locate(const tn_kernel_params &, tn_i64 row) {
    return row;
  }

  template <int DT, int MODE>
  static __device__ __forceinline__ tn_chunk produce(const tn_kernel_params &p, tn_i64 row, tn_i64 c) {
    const tn_chunk xq = tn_load_chunk<DT, MODE>(tn_row(p.x, row, p.x_stride, tn_dt<DT>::size), c, p.dim);
    return ADD ? tn_add_rounded_chunk<DT, MODE>(p, row, c, xq) : xq;
  }

  /* The chunk again, for rows staged by re-reading: x, or the sum from residual_out (this thread's). */
  template <int DT, int MODE>
  static __device__ __forceinline__ tn_chunk reread(const tn_kernel_params &p, tn_i64 row, tn_i64 c) {
    constexpr int S = tn_dt<DT>::size;
    if (!ADD) return tn_load_chunk<DT, MODE>(tn_row(p.x, row, p.x_stride, S), c, p.dim);
    return tn_load_chunk<DT, MODE>(tn_row(p.residual_out, row, p.residual_out_stride, S), c, p.dim);
  }

  template <int DT, int MODE>
  static __device__ __forceinline__ void emit(const tn_kernel_params &p, tn_i64 row, tn_i64 c, const tn_chunk &q,
                                              const tn_row_stats &st) {
    constexpr int V = tn_dt<DT>::per_chunk, S = tn_dt<DT>::size;
    float f[V], w[V], b[V];
    tn_chunk_to_f32<DT>(q, f);
    const bool has_bias = tn_flag(p, TN_KERNEL_FLAG_BIAS);
    if (p.has_weight) tn_load_vector<DT, MODE>(p.weight, p.weight_f32, c, p.dim, w);
    if (has_bias) tn_load_vector<DT, MODE>(p.bias, p.bias_f32, c, p.dim, b);
    const tn_factors has = {p.has_weight != 0, has_bias, false, false};
    if (PLAIN_OUTPUT && st.pre == 1.0f) {
#pragma unroll
      for (int j = 0; j < V; j++) f[j] = tn_norm_value<DT, true>(p, f[j], st, true, has, w, b, nullptr, j);
    } else {
#pragma unroll
      for (int j = 0; j < V; j++) f[j] = tn_norm_value<DT, false, false>(p, f[j], st, true, has, w, b, nullptr, j);
    }
    tn_store_chunk<DT, MODE>((char *)tn_row(p.y, row, p.y_stride, S), c, p.dim, tn_chunk_from_f32<DT>(f));
  }
};

/* The common paths cost registers: with 64 a thread (1024 resident threads) they spill. They pay where the
 * row is compute-bound, layer_norm in 2-byte dtypes, with G <= 128 and 896 resident threads (72 registers);
 * not at G = 256 and 512 (spills at 1024 resident threads, too few blocks below), in float32, or for
 * add_layer_norm, which moves more bytes a row. With whole chunks (MODE_WHOLE) the partial-chunk deviations
 * are not compiled, which leaves room for the common deviations at every G (the common output loop still
 * spills above G = 128). add_layer_norm splits its reads (tn_add_split) above G = 32: below, the split
 * spills at 64 registers. docs/performance.md, "layer_norm's kernels (layer_norm.cu)", has the figures. */
template <int DT, int G, int MODE, int K>
struct tn_register_shape<tn_layer_op<false, false>, DT, G, MODE, K>
    /* 896 resident threads with the common output loop (2-byte dtypes, G <= 128); x's rows fetched ahead
     * from G = 256 (row.cuh's tn_fetch_row_ahead: two reductions hold a row, two or one block an SM) */
    : tn_shape_choices<(DT != TN_KERNEL_F32 && G <= 128 ? 896 : TN_KERNEL_MIN_RESIDENT), (G >= 256)> {
  enum { whole = MODE == TN_KERNEL_MODE_WHOLE, common = DT != TN_KERNEL_F32 && (G <= 128 || whole) };
  using op = tn_layer_op<false, common, false, whole, common && G <= 128>;
};

template <int DT, int G, int MODE, int K>
struct tn_register_shape<tn_layer_op<true, false>, DT, G, MODE, K> : tn_shape_choices<> {
  using op = tn_layer_op<true, false, (G > 32)>;
};

using tn_layer_norm_op = tn_layer_op<false, false>; /* named: a macro argument cannot hold the comma */
using tn_add_layer_norm_op = tn_layer_op<true, false>;
TN_DEFINE_ROW_KERNELS(tn_layer, tn_layer_norm_op)
TN_DEFINE_ROW_KERNELS(tn_add_layer, tn_add_layer_norm_op)
