/* What the families added beside norm.cu and add_rms_norm.cu share (norm_x.cu, layer_norm.cu, general.cu,
 * rope.cu): 3-D views, the run-time knobs of tn_kernel_params.flags, layer_norm's reduction and the rms
 * reduction in both l2 conventions, and the output of a normalised element in every casting mode.
 * Those families carry their rarely used knobs as run-time flags (uniform branches), so that one kernel
 * serves every combination; norm.cu and add_rms_norm.cu keep the default path free of them. */
#ifndef TN_CUDA_KERNEL_OPS_CUH
#define TN_CUDA_KERNEL_OPS_CUH

#include "row.cuh"

TN_DEV bool tn_flag(const tn_kernel_params &p, int flag) { return (p.flags & flag) != 0; }

/* v rounded to the dtype (to nearest even) and back: TN_CASTING_LLAMA's intermediate roundings. */
template <int DT>
TN_DEV float tn_round(float v) {
  if (DT == TN_KERNEL_F32) return v;
  return tn_to_f32<DT>(tn_from_f32<DT>(v));
}

/* ---- 3-D views: vector v is head v % heads of row v / heads ---- */

struct tn_vec {
  tn_i64 row, head;
};

/* Where vector v lies. One division per vector (not per element), in 32 bits when both fit (far fewer
 * instructions than a 64-bit one); 2-D views (no HEADS flag) skip it. */
TN_DEV tn_vec tn_vec_of(const tn_kernel_params &p, tn_i64 v) {
  tn_vec at;
  if (!tn_flag(p, TN_KERNEL_FLAG_HEADS)) {
    at.row = v;
    at.head = 0;
    return at;
  }
  const tn_i64 h = p.heads;
  at.row = ((unsigned long long)v >> 32) == 0 && ((unsigned long long)h >> 32) == 0
               ? (tn_i64)((unsigned)v / (unsigned)h)
               : v / h;
  at.head = v - at.row * h;
  return at;
}

/* The first element of a vector of an operand with these strides (elements), as bytes. */
TN_DEV const char *tn_vec_ptr(const void *base, const tn_vec &at, tn_i64 stride, tn_i64 head_stride, int size) {
  return (const char *)base + (at.row * stride + at.head * head_stride) * size;
}

/* ---- the weight and the bias: float32 or x's dtype ---- */

template <int DT, int MODE>
TN_DEV void tn_load_vector(const void *v, bool f32, tn_i64 c, tn_i64 dim, float *f) {
  if (f32) tn_load_f32<DT, TN_KERNEL_F32, MODE>((const char *)v, c, dim, f);
  else tn_load_f32<DT, DT, MODE>((const char *)v, c, dim, f);
}

/* ---- reductions ---- */

/* l2_norm's TN_L2_MAX_NORM_EPS scale 1 / max(sqrt(sum), eps), written as a comparison so that a NaN norm
 * stays NaN (fmaxf would pick eps), or the rsqrt convention; eps is already scaled (eps * k, eps * k^2)
 * for a rescaled row. */
TN_DEV float tn_scale_of(float sum, float count, float eps, bool max_norm) {
  if (max_norm) {
    const float norm = sqrtf(sum);
    return 1.0f / (norm < eps ? eps : norm);
  }
  return tn_inv_sqrt(sum / count + eps);
}

/* rms_norm and l2_norm in both conventions (the MAX_NORM flag): tn_row_inv's rescale, where with
 * max(norm, eps) a vanished sum matters only when eps is below sqrt(2^-64) (at or above it, eps wins over
 * any sum below 2^-64). The same arithmetic as tn_rms_reduce for the rsqrt convention. */
struct tn_rmsx_reduce {
  template <int DT, class H>
  TN_DEV float first(const tn_kernel_params &, const H &q, float acc) {
    return tn_chunk_sum_squares<DT>(q, acc, 1.0f);
  }
  template <int DT, class GroupSum, class Each>
  TN_DEV tn_row_stats finish(const tn_kernel_params &p, float sum, GroupSum group_sum, Each each) {
    const bool max_norm = tn_flag(p, TN_KERNEL_FLAG_MAX_NORM);
    tn_row_stats st;
    st.mean = 0.0f;
    st.pre = 1.0f;
    const bool plain = max_norm ? sum < TN_INF && !(p.eps < 0x1p-32f && sum < 0x1p-64f) : !tn_needs_rescale(sum, p.eps);
    if (plain) {
      st.inv = tn_scale_of(sum, p.count, p.eps, max_norm);
      return st;
    }
    const float k = tn_rescale_factor(sum);
    float acc = 0.0f;
    each([&](const typename Each::held &q, tn_i64) { acc = tn_chunk_sum_squares<DT>(q, acc, k); });
    const float scaled = group_sum(acc);
    if (scaled < TN_INF) {
      st.pre = k;
      st.inv = tn_scale_of(scaled, p.count, max_norm ? p.eps * k : p.eps * k * k, max_norm);
      return st;
    }
    st.inv = tn_scale_of(sum, p.count, p.eps, max_norm); /* an Inf or NaN in the row: propagate it */
    return st;
  }
};

template <int DT, class H>
TN_DEV float tn_chunk_sum(const H &q, float acc, float k) {
  float f[tn_dt<DT>::per_chunk];
  tn_held<H>::template values<DT>(q, f);
#pragma unroll
  for (int j = 0; j < tn_dt<DT>::per_chunk; j++) acc += f[j] * k;
  return acc;
}

/* The squared deviations of chunk c's elements, those at or past dim left out (a chunk's padding, and the
 * zero chunks a thread holds past the row's end, read as zeros, whose deviation is the mean's, not zero).
 * WHOLE: the row has no partial chunk (dim a multiple of the chunk's elements), so a chunk is tested once
 * instead of element by element (these are among the layer_norm's hottest instructions). */
template <int DT, bool WHOLE, class H>
TN_DEV float tn_chunk_deviations(const H &q, tn_i64 c, tn_i64 dim, float acc, float k, float mean) {
  constexpr int V = tn_dt<DT>::per_chunk;
  float f[V];
  tn_held<H>::template values<DT>(q, f);
  const tn_i64 left = dim - c * V; /* elements of this chunk inside the row */
  if (WHOLE && left <= 0) return acc;
#pragma unroll
  for (int j = 0; j < V; j++) {
    const float d = f[j] * k - mean;
    if (WHOLE || j < left) acc += d * d;
  }
  return acc;
}

/* T where B holds, else F. */
template <bool B, class T, class F>
struct tn_pick {
  using type = T;
};
template <class T, class F>
struct tn_pick<false, T, F> {
  using type = F;
};

/* layer_norm's row, in the held chunks' order: the sum of x, mean = sum / dim, then the sum of the squared
 * deviations from that mean (two reductions over the held row), and inv = 1 / sqrt(var + eps).
 * ONE_REDUCTION: the sums of x and of x^2 are reduced together (one barrier where the group spans warps),
 * and var = E[x^2] - mean^2 stands where mean^2 <= var, so that the subtraction cancels at most one bit of
 * E[x^2]; any other row (shifted far from zero, to be rescaled, not finite) takes the two reductions from
 * the sum of x, which the pair already holds. One barrier fewer shortens the wait between a row's loads and
 * its stores (docs/performance.md, "layer_norm's one-pass statistics (ops.cuh)"). A row whose sum or sum of
 * squared deviations left float32's range (finite |x| beyond about 1e19), or whose deviations vanished
 * with eps == 0, is reduced again as x * k (k an exact power of two, as for rms_norm): mean and variance
 * of the scaled row, with eps * k^2; the output is then (x * k - mean_k) * inv_k. A row whose scaled sums
 * are not finite either has an Inf or NaN: the plain statistics propagate it. Every branch depends on
 * group sums alone, so the group takes it together.
 * (A sum of x that left float32's range counts as squares that did: k = 2^-80.)
 * COMMON_PATHS: the deviations of a row without a partial chunk are written apart, without the per-element
 * test (more code, and so more registers: layer_norm.cu says where it pays). */
template <bool COMMON_PATHS, bool WHOLE = false, bool ONE_REDUCTION = false>
struct tn_layer_reduce_as {
  using acc = typename tn_pick<ONE_REDUCTION, tn_sum2, float>::type;

  template <int DT, class H>
  TN_DEV acc first(const tn_kernel_params &, const H &q, acc a) {
    if constexpr (ONE_REDUCTION) {
      a.s = tn_chunk_sum<DT>(q, a.s, 1.0f);
      a.q = tn_chunk_sum_squares<DT>(q, a.q, 1.0f);
      return a;
    } else {
      return tn_chunk_sum<DT>(q, a, 1.0f);
    }
  }

  /* ONE_REDUCTION's statistics from the pair of sums; the two reductions below where E[x^2] - mean^2 could
   * cancel more than a bit or the row needs rescaling. */
  template <int DT, class GroupSum, class Each>
  TN_DEV tn_row_stats finish(const tn_kernel_params &p, tn_sum2 sums, GroupSum group_sum, Each each) {
    const float mean = sums.s / p.count;
    const float var = sums.q / p.count - mean * mean;
    if (fabsf(sums.s) < TN_INF && mean * mean <= var && !tn_needs_rescale(sums.q, p.eps) &&
        !tn_needs_rescale(var * p.count, p.eps)) {
      tn_row_stats st;
      st.pre = 1.0f;
      st.mean = mean;
      st.inv = tn_inv_sqrt(var + p.eps);
      return st;
    }
    return finish<DT>(p, sums.s, group_sum, each);
  }

  template <int DT, class GroupSum, class Each>
  TN_DEV float deviations(GroupSum group_sum, Each each, tn_i64 dim, float k, float mean) {
    float acc = 0.0f;
    if (COMMON_PATHS && (WHOLE || dim % tn_dt<DT>::per_chunk == 0))
      each([&](const typename Each::held &q, tn_i64 c) { acc = tn_chunk_deviations<DT, true>(q, c, dim, acc, k, mean); });
    else
      each([&](const typename Each::held &q, tn_i64 c) { acc = tn_chunk_deviations<DT, false>(q, c, dim, acc, k, mean); });
    return group_sum(acc);
  }

  template <int DT, class GroupSum, class Each>
  TN_DEV tn_row_stats finish(const tn_kernel_params &p, float sum, GroupSum group_sum, Each each) {
    /* Pass 0: the row as it is; pass 1: scaled by k; pass 2: as it is again, whatever comes out (an Inf
     * or NaN in the row). One loop, so that each reduction's code is there once (unrolled, the rare
     * passes make the compiler keep more of the row live and spill). */
    float k = 1.0f, s = sum;
#pragma unroll 1
    for (int pass = 0;; pass++) {
      const float mean = s / p.count;
      float dev = TN_INF;
      if (fabsf(s) < TN_INF || pass == 2) dev = deviations<DT>(group_sum, each, p.dim, k, mean);
      const bool done = pass == 2 || (pass == 0 ? !tn_needs_rescale(dev, p.eps) : fabsf(s) < TN_INF && dev < TN_INF);
      if (done) {
        tn_row_stats st;
        st.pre = k;
        st.mean = mean;
        st.inv = tn_inv_sqrt(dev / p.count + p.eps * k * k);
        return st;
      }
      if (pass == 0) {
        k = tn_rescale_factor(dev);
        float acc = 0.0f;
        each([&](const typename Each::held &q, tn_i64) { acc = tn_chunk_sum<DT>(q, acc, k); });
        s = group_sum(acc);
      } else {
        k = 1.0f;
        s = sum;
      }
    }
  }
};

using tn_layer_reduce = tn_layer_reduce_as<false>;

/* rms_norm's or layer_norm's reduction by the LAYER flag (general.cu). */
struct tn_either_reduce {
  template <int DT, class H>
  TN_DEV float first(const tn_kernel_params &p, const H &q, float acc) {
    return tn_flag(p, TN_KERNEL_FLAG_LAYER) ? tn_layer_reduce::first<DT>(p, q, acc) : tn_rms_reduce::first<DT>(p, q, acc);
  }
  template <int DT, class GroupSum, class Each>
  TN_DEV tn_row_stats finish(const tn_kernel_params &p, float sum, GroupSum group_sum, Each each) {
    if (tn_flag(p, TN_KERNEL_FLAG_LAYER)) return tn_layer_reduce::finish<DT>(p, sum, group_sum, each);
    return tn_rms_reduce::finish<DT>(p, sum, group_sum, each);
  }
};

/* ---- a normalised element's output, in every casting mode ---- */

/* Which factors an element's output has (tn_norm_value). */
struct tn_factors {
  bool w, b, m, scale;
};

/* The value of one element before its final rounding, from the normed input f (x, or a residual sum) and
 * the row's statistics: n = (f * pre - mean) * inv (mean 0 but for layer_norm), rounded to the dtype first
 * with TN_CASTING_LLAMA; then * (w + offset), + b; rounded again before a multiplicand or scale with
 * round_before_last (a fused pair); then * m, * scale. Only the factors `has` names are read. PLAIN: the
 * caller knows pre is 1 and the casting is not llama (a test uniform over the row's group, so a family's
 * output loop may be written once for each answer: layer_norm.cu), so the multiply by pre, which would
 * change no bit, and the per-element test of the flag are left out. MAYBE_LLAMA false: the family never
 * has TN_CASTING_LLAMA (backend.c sends it elsewhere), so the flag's test is left out too. The arrays
 * are always the caller's own (never a pointer chosen at run time, say w or NULL): a chosen pointer makes
 * the compiler keep the arrays in local memory instead of registers, which costs bandwidth. */
template <int DT, bool PLAIN = false, bool MAYBE_LLAMA = true>
TN_DEV float tn_norm_value(const tn_kernel_params &p, float f, const tn_row_stats &st, bool layer, tn_factors has,
                           const float *w, const float *b, const float *m, int j) {
  const float s = PLAIN ? f : f * st.pre;
  float v = layer ? s - st.mean : s;
  v = v * st.inv;
  if (!PLAIN && MAYBE_LLAMA && tn_flag(p, TN_KERNEL_FLAG_LLAMA)) v = tn_round<DT>(v);
  if (has.w) v *= w[j] + p.weight_offset;
  if (has.b) v += b[j];
  if ((has.m || has.scale) && p.round_before_last) v = tn_round<DT>(v);
  if (has.m) v *= m[j];
  if (has.scale) v *= p.scale;
  return v;
}

#endif
