/* Every norm combination the other families do not take, with each knob a run-time flag: add_rms_norm and
 * add_layer_norm whose residual stream is float32 beside f16/bf16 activations (RESIDUAL_F32) or whose
 * float32 sum is normalised unrounded (TN_RESIDUAL_NORM_F32: no ROUND_SUM); rms_norm and add_rms_norm with
 * a multiplicand and TN_CASTING_LLAMA or a 3-D view; layer_norm's reduction with the LAYER flag (and so
 * layer_norm and add_layer_norm with TN_CASTING_LLAMA, which layer_norm.cu's kernels leave out).
 *
 * The normed row is held in float32 (tn_held32: the sum x + r need not be representable in x's dtype), so
 * a thread holds twice the registers of the other families' chunks; the register shapes allow half the
 * resident blocks (TN_DEFINE_ROW_KERNELS_DIV). The registry gives this family the G of norm_x.cu's for
 * every row (a graph's fusions move an op between the two: registry.c) and the staged shapes, and no
 * few-rows (wide) form, whose staged row would not fit a block's static shared memory. residual_out is
 * written with y, from the held sum, and a row staged by re-reading computes its sum again from x and the
 * residual (both still unwritten then), so that an unrounded sum is never read back from a rounded
 * residual_out.
 *   s = float(x) + float(r) [rounded to the residual's dtype with ROUND_SUM]; residual_out = round(s);
 *   y = round(round?((s * pre - mean) * inv) * (w + offset) [+ b] [round] [* m]) */
#include "ops.cuh"

struct tn_general_op {
  template <int DT>
  using held = tn_held32<DT>;

  using reduce = tn_either_reduce;

  template <int DT>
  static __device__ __forceinline__ tn_vec locate(const tn_kernel_params &p, tn_i64 v) {
    return tn_vec_of(p, v);
  }

  /* The normed input of chunk c: x, or x + r (r of x's dtype or float32), as float32. No side effect, so
   * that reread is the same call. */
  template <int DT, int MODE>
  static __device__ __forceinline__ tn_held32<DT> produce(const tn_kernel_params &p, const tn_vec &at, tn_i64 c) {
    constexpr int V = tn_dt<DT>::per_chunk, S = tn_dt<DT>::size;
    tn_held32<DT> h;
    tn_chunk_to_f32<DT>(tn_load_chunk<DT, MODE>(tn_vec_ptr(p.x, at, p.x_stride, p.x_head_stride, S), c, p.dim), h.f);
    if (!tn_flag(p, TN_KERNEL_FLAG_ADD)) return h;
    float r[V];
    if (tn_flag(p, TN_KERNEL_FLAG_RESIDUAL_F32))
      tn_load_f32<DT, TN_KERNEL_F32, MODE>(tn_row(p.residual, at.row, p.residual_stride, 4), c, p.dim, r);
    else
      tn_load_f32<DT, DT, MODE>(tn_row(p.residual, at.row, p.residual_stride, S), c, p.dim, r);
    const bool round_sum = tn_flag(p, TN_KERNEL_FLAG_ROUND_SUM);
#pragma unroll
    for (int j = 0; j < V; j++) {
      const float s = h.f[j] + r[j];
      h.f[j] = round_sum ? tn_round<DT>(s) : s;
    }
    return h;
  }

  template <int DT, int MODE>
  static __device__ __forceinline__ tn_held32<DT> reread(const tn_kernel_params &p, const tn_vec &at, tn_i64 c) {
    return produce<DT, MODE>(p, at, c);
  }

  template <int DT, int MODE>
  static __device__ __forceinline__ void emit(const tn_kernel_params &p, const tn_vec &at, tn_i64 c,
                                              const tn_held32<DT> &q, const tn_row_stats &st) {
    constexpr int V = tn_dt<DT>::per_chunk, S = tn_dt<DT>::size;
    if (tn_flag(p, TN_KERNEL_FLAG_ADD)) {
      /* residual_out = s rounded to the residual's dtype (exact when the held s was rounded already). */
      if (tn_flag(p, TN_KERNEL_FLAG_RESIDUAL_F32)) {
#pragma unroll
        for (int h = 0; h < V / 4; h++) {
          tn_chunk o;
#pragma unroll
          for (int j = 0; j < 4; j++) o.w[j] = __float_as_uint(q.f[4 * h + j]);
          tn_store_chunk<TN_KERNEL_F32, MODE>((char *)tn_row(p.residual_out, at.row, p.residual_out_stride, 4),
                                              c * (V / 4) + h, p.dim, o);
        }
      } else {
        tn_store_chunk<DT, MODE>((char *)tn_row(p.residual_out, at.row, p.residual_out_stride, S), c, p.dim,
                                 tn_chunk_from_f32<DT>(q.f));
      }
    }
    const bool layer = tn_flag(p, TN_KERNEL_FLAG_LAYER), has_bias = tn_flag(p, TN_KERNEL_FLAG_BIAS),
               has_mul = tn_flag(p, TN_KERNEL_FLAG_MUL);
    float f[V], w[V], b[V], m[V];
    if (p.has_weight) tn_load_vector<DT, MODE>(p.weight, p.weight_f32, c, p.dim, w);
    if (has_bias) tn_load_vector<DT, MODE>(p.bias, p.bias_f32, c, p.dim, b);
    if (has_mul) tn_load_f32<DT, DT, MODE>(tn_vec_ptr(p.mul, at, p.mul_stride, p.mul_head_stride, S), c, p.dim, m);
#pragma unroll
    for (int j = 0; j < V; j++)
      f[j] = tn_norm_value<DT>(p, q.f[j], st, layer, {p.has_weight != 0, has_bias, has_mul, false}, w, b, m, j);
    tn_store_chunk<DT, MODE>((char *)tn_vec_ptr(p.y, at, p.y_stride, p.y_head_stride, S), c, p.dim,
                             tn_chunk_from_f32<DT>(f));
  }
};

/* Twice the registers of a chunk per held chunk: half the resident blocks of the other families. */
TN_DEFINE_ROW_KERNELS_DIV(tn_general, tn_general_op, 2)
