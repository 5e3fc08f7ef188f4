/* The row machinery every tnorm kernel is built from, compiled by NVRTC (no system headers).
 *
 * A kernel is (op family, dtype, row shape, access mode):
 * - the op family (an "Op" policy: tn_norm_op in norm.cu, tn_add_norm_op in add_rms_norm.cu, and the
 *   families of norm_x.cu, layer_norm.cu and general.cu) says how a row's 16-byte chunk is produced from
 *   the inputs, what is held of it (the chunk, or its elements in float32), how the row is reduced (the
 *   sum of squares, or layer_norm's mean and deviations) and how a finished chunk is written;
 * - the row shape is either G threads per row with the row in registers (G = 1 .. 1024, several rows per
 *   block when G <= 32), its few-rows form, or 1024 threads per row with the row staged in shared memory
 *   or read again for the output (rows too long for registers);
 * - the access mode is how memory is touched: 16-byte vectors where every pointer and row pitch allows
 *   it, else element by element, else byte by byte (pointers not even aligned to their elements).
 * The order in which a row is reduced depends on G alone (params.h), and G on (dtype, dim) alone, so
 * every kernel of one (op, dtype, dim) gives the same bits for a row, whatever the batch.
 *
 * Arithmetic is float32 with one rounding to the output dtype (more only where a casting mode or a fused
 * pair names them), in the same expression order as the CPU backend; the host compiles with --fmad=false
 * so no multiply is fused into an add. rope.cu has its own shape (ops.cuh's helpers, this reduction). */
#ifndef TN_CUDA_KERNEL_ROW_CUH
#define TN_CUDA_KERNEL_ROW_CUH

#include "params.h"

typedef unsigned char tn_u8;
typedef unsigned short tn_u16;
typedef unsigned int tn_u32;
typedef long long tn_i64;

#define TN_DEV static __device__ __forceinline__
#define TN_INF __int_as_float(0x7f800000)


/* Sixteen bytes of a row: 4 f32 or 8 f16/bf16 elements, element 0 in the low bits of w[0]. */
struct __align__(16) tn_chunk {
  tn_u32 w[4];
};

template <int DT>
struct tn_dt {
  enum { size = DT == TN_KERNEL_F32 ? 4 : 2, per_chunk = DT == TN_KERNEL_F32 ? 4 : 8 };
};

/* ---- conversions: the same bits as the CPU backend for every pattern, NaN payloads included ---- */

template <int DT>
TN_DEV float tn_to_f32(tn_u32 bits) {
  if (DT == TN_KERNEL_F32) return __uint_as_float(bits);
  if (DT == TN_KERNEL_BF16) return __uint_as_float(bits << 16);
  const tn_u16 h = (tn_u16)bits;
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

/* Round to nearest even. One value at a time: bf16 on the bits, as the CPU backend does (NaN made quiet,
 * payload kept); f16 with the hardware conversion. tn_pack2 below is the fast path for pairs. */
template <int DT>
TN_DEV tn_u32 tn_from_f32(float f) {
  const tn_u32 u = __float_as_uint(f);
  if (DT == TN_KERNEL_F32) return u;
  if (DT == TN_KERNEL_BF16) {
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  }
  tn_u16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

/* Two values rounded into one 32-bit word, lo in the low half. */
template <int DT>
TN_DEV tn_u32 tn_pack2(float lo, float hi) {
  if (DT == TN_KERNEL_F16) {
    tn_u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  /* One instruction for two values (the bit-level rounding costs a dozen per value, enough to make a
   * bf16 row compute-bound); the same rounding, but a NaN comes out as the canonical NaN. */
  tn_u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
#else
  return tn_from_f32<DT>(lo) | (tn_from_f32<DT>(hi) << 16);
#endif
}

template <int DT>
TN_DEV tn_u32 tn_chunk_bits(const tn_chunk &q, int j) {
  if (DT == TN_KERNEL_F32) return q.w[j];
  return (q.w[j >> 1] >> (16 * (j & 1))) & 0xffffu;
}

template <int DT>
TN_DEV void tn_chunk_set(tn_chunk &q, int j, tn_u32 bits) {
  if (DT == TN_KERNEL_F32) {
    q.w[j] = bits;
  } else {
    const int sh = 16 * (j & 1);
    q.w[j >> 1] = (q.w[j >> 1] & ~(0xffffu << sh)) | (bits << sh);
  }
}

template <int DT>
TN_DEV void tn_chunk_to_f32(const tn_chunk &q, float *f) {
#pragma unroll
  for (int j = 0; j < tn_dt<DT>::per_chunk; j++) f[j] = tn_to_f32<DT>(tn_chunk_bits<DT>(q, j));
}

template <int DT>
TN_DEV tn_chunk tn_chunk_from_f32(const float *f) {
  tn_chunk q;
  if (DT == TN_KERNEL_F32) {
#pragma unroll
    for (int j = 0; j < 4; j++) q.w[j] = __float_as_uint(f[j]);
  } else {
#pragma unroll
    for (int j = 0; j < 4; j++) q.w[j] = tn_pack2<DT>(f[2 * j], f[2 * j + 1]);
  }
  return q;
}

TN_DEV tn_chunk tn_chunk_zero() {
  tn_chunk q;
#pragma unroll
  for (int j = 0; j < 4; j++) q.w[j] = 0u;
  return q;
}

/* ---- memory: one chunk of a row, in the access mode; elements at or past dim read as +0 ---- */

TN_DEV const char *tn_row(const void *base, tn_i64 row, tn_i64 stride, int size) {
  return (const char *)base + row * stride * size;
}

template <int SIZE, int MODE>
TN_DEV tn_u32 tn_load_element(const char *p) {
  if (MODE == TN_KERNEL_MODE_BYTES) {
    tn_u32 v = 0;
#pragma unroll
    for (int b = 0; b < SIZE; b++) v |= (tn_u32)((const volatile tn_u8 *)p)[b] << (8 * b);
    return v;
  }
  if (SIZE == 4) return *(const tn_u32 *)p;
  return *(const tn_u16 *)p;
}

template <int SIZE, int MODE>
TN_DEV void tn_store_element(char *p, tn_u32 v) {
  if (MODE == TN_KERNEL_MODE_BYTES) {
#pragma unroll
    for (int b = 0; b < SIZE; b++) p[b] = (char)(v >> (8 * b));
  } else if (SIZE == 4) {
    *(tn_u32 *)p = v;
  } else {
    *(tn_u16 *)p = (tn_u16)v;
  }
}

/* Chunk c of a row of dim elements of dtype DT. */
template <int DT, int MODE>
TN_DEV tn_chunk tn_load_chunk(const char *row, tn_i64 c, tn_i64 dim) {
  constexpr int V = tn_dt<DT>::per_chunk, S = tn_dt<DT>::size;
  const tn_i64 first = c * V;
  if constexpr (MODE == TN_KERNEL_MODE_WHOLE) return *(const tn_chunk *)(row + first * S);
  if (MODE == TN_KERNEL_MODE_VECTORS && first + V <= dim) return *(const tn_chunk *)(row + first * S);
  tn_chunk q = tn_chunk_zero();
#pragma unroll
  for (int j = 0; j < V; j++)
    if (first + j < dim) tn_chunk_set<DT>(q, j, tn_load_element<S, MODE>(row + (first + j) * S));
  return q;
}

template <int DT, int MODE>
TN_DEV void tn_store_chunk(char *row, tn_i64 c, tn_i64 dim, const tn_chunk &q) {
  constexpr int V = tn_dt<DT>::per_chunk, S = tn_dt<DT>::size;
  const tn_i64 first = c * V;
  if constexpr (MODE == TN_KERNEL_MODE_WHOLE) {
    *(tn_chunk *)(row + first * S) = q;
  } else if (MODE == TN_KERNEL_MODE_VECTORS && first + V <= dim) {
    *(tn_chunk *)(row + first * S) = q;
  } else {
#pragma unroll
    for (int j = 0; j < V; j++)
      if (first + j < dim) tn_store_element<S, MODE>(row + (first + j) * S, tn_chunk_bits<DT>(q, j));
  }
}

/* Chunk c of row `row` of s = round(x + residual), each of x's dtype, also written to residual_out, from x's
 * and the residual's chunks xq and rq (tn_add_rounded_chunk reads rq itself): the input of add_rms_norm
 * and add_layer_norm (the sum normalised as stored). */
template <int DT, int MODE>
TN_DEV tn_chunk tn_add_rounded_sum(const tn_kernel_params &p, tn_i64 row, tn_i64 c, const tn_chunk &xq, const tn_chunk &rq) {
  constexpr int V = tn_dt<DT>::per_chunk, S = tn_dt<DT>::size;
  float xf[V], rf[V];
  tn_chunk_to_f32<DT>(xq, xf);
  tn_chunk_to_f32<DT>(rq, rf);
#pragma unroll
  for (int j = 0; j < V; j++) xf[j] = xf[j] + rf[j];
  const tn_chunk s = tn_chunk_from_f32<DT>(xf);
  tn_store_chunk<DT, MODE>((char *)tn_row(p.residual_out, row, p.residual_out_stride, S), c, p.dim, s);
  return s;
}

template <int DT, int MODE>
TN_DEV tn_chunk tn_add_rounded_chunk(const tn_kernel_params &p, tn_i64 row, tn_i64 c, const tn_chunk &xq) {
  const tn_chunk rq = tn_load_chunk<DT, MODE>(tn_row(p.residual, row, p.residual_stride, tn_dt<DT>::size), c, p.dim);
  return tn_add_rounded_sum<DT, MODE>(p, row, c, xq, rq);
}

/* A 2-D row's s = round(x + residual) produced in two steps (tn_splits_production, below): fetch reads x's
 * and the residual's chunk c, complete makes their sum and writes it to residual_out. The families of a
 * residual of x's dtype normalised as stored derive from tn_add_split<true>. */
struct tn_add_raw {
  tn_chunk x, r;
};

template <bool ADD>
struct tn_add_split {};

template <>
struct tn_add_split<true> {
  template <int DT>
  using raw = tn_add_raw;
  template <int DT, int MODE>
  static __device__ __forceinline__ tn_add_raw fetch(const tn_kernel_params &p, tn_i64 row, tn_i64 c) {
    constexpr int S = tn_dt<DT>::size;
    tn_add_raw r;
    r.x = tn_load_chunk<DT, MODE>(tn_row(p.x, row, p.x_stride, S), c, p.dim);
    r.r = tn_load_chunk<DT, MODE>(tn_row(p.residual, row, p.residual_stride, S), c, p.dim);
    return r;
  }
  template <int DT, int MODE>
  static __device__ __forceinline__ tn_chunk complete(const tn_kernel_params &p, tn_i64 row, tn_i64 c,
                                                      const tn_add_raw &r) {
    return tn_add_rounded_sum<DT, MODE>(p, row, c, r.x, r.r);
  }
};

/* The n = per_chunk(DT) elements of chunk c of a row of dtype WDT (f32 or DT: a weight or a
 * multiplicand), as float32; elements past dim read as 0. */
template <int DT, int WDT, int MODE>
TN_DEV void tn_load_f32(const char *row, tn_i64 c, tn_i64 dim, float *f) {
  constexpr int V = tn_dt<DT>::per_chunk, WV = tn_dt<WDT>::per_chunk;
#pragma unroll
  for (int h = 0; h < V / WV; h++) {
    tn_chunk q = tn_load_chunk<WDT, MODE>(row, c * (V / WV) + h, dim);
    tn_chunk_to_f32<WDT>(q, f + h * WV);
  }
}

/* ---- reductions over a row's group of G threads (the order is the contract: see params.h) ---- */

template <int G>
TN_DEV unsigned tn_group_mask() {
  if (G >= 32) return 0xffffffffu;
  constexpr unsigned width = G < 32 ? G : 1; /* keeps the shift below in range when G >= 32 */
  const unsigned lane = threadIdx.x & 31u;
  return ((1u << width) - 1u) << (lane & ~(width - 1u));
}

/* Two sums reduced together (layer_norm's: s of x, q of x^2), one barrier for both. */
struct tn_sum2 {
  float s, q;
};
TN_DEV tn_sum2 operator+(tn_sum2 a, tn_sum2 b) { return {a.s + b.s, a.q + b.q}; }
TN_DEV float tn_shfl_xor(unsigned mask, float v, int o) { return __shfl_xor_sync(mask, v, o); }
TN_DEV tn_sum2 tn_shfl_xor(unsigned mask, tn_sum2 v, int o) {
  return {__shfl_xor_sync(mask, v.s, o), __shfl_xor_sync(mask, v.q, o)};
}

/* A reduction's shared partials: two sets of G / 32 sums of up to two floats. */
#define TN_PARTIALS_OF(G) (4 * ((G) > 32 ? (G) / 32 : 1))

/* The sum over warps 0 .. WARPS - 1 of each one's sum v (its lane 0's), identical in every thread of the
 * block, through shared memory (BLOCK_WIDER: the block has more warps, which take part in the barrier but
 * write nothing): partials (TN_PARTIALS_OF(G) floats) holds two sets of WARPS
 * sums used in turn (*turn flips on every call, the same in every thread), so one barrier per reduction
 * suffices: a set is written again only after the next reduction's barrier, which every thread reaches
 * after reading it. Each set has the room of WARPS pairs whatever the sum's type, so that the sets stay
 * apart when a row's reductions differ in type (layer_norm's pair of sums, then its float deviations: set
 * 1 of floats would otherwise begin inside set 0 of pairs, which slower warps may still be reading). */
template <int WARPS, bool BLOCK_WIDER, class T>
TN_DEV T tn_warps_meet(T v, float *partials, int *turn) {
  static_assert(sizeof(T) <= 2 * sizeof(float), "a set holds WARPS sums of up to two floats");
  T *set = reinterpret_cast<T *>(partials + (*turn) * 2 * WARPS);
  *turn ^= 1;
  if ((threadIdx.x & 31u) == 0 && (!BLOCK_WIDER || (threadIdx.x >> 5) < (unsigned)WARPS)) set[threadIdx.x >> 5] = v;
  __syncthreads();
  T s = set[0];
#pragma unroll
  for (int w = 1; w < WARPS; w++) s = s + set[w];
  return s;
}

/* The sum of v (a float, or a tn_sum2 pair, whose two sums take a float's order) over the group, identical
 * in every thread of it: shuffles within a warp, above one warp then tn_warps_meet. */
template <int G, class T>
TN_DEV T tn_group_sum(T v, float *partials, int *turn) {
  const unsigned mask = tn_group_mask<G>();
  constexpr int width = G < 32 ? G : 32;
#pragma unroll
  for (int o = width / 2; o > 0; o >>= 1) v = v + tn_shfl_xor(mask, v, o);
  if constexpr (G <= 32) return v;
  else return tn_warps_meet<G / 32, false>(v, partials, turn);
}

/* What a row kernel holds of a chunk between its reduction and its output: the chunk itself (tn_chunk), or
 * its elements in float32 (tn_held32: general.cu's sums, which need not be of x's dtype). tn_held<H> gives
 * both the same interface: a zero, and the elements as float32. */
template <int DT>
struct tn_held32 {
  float f[tn_dt<DT>::per_chunk];
};

template <class H>
struct tn_held;

template <>
struct tn_held<tn_chunk> {
  TN_DEV tn_chunk zero() { return tn_chunk_zero(); }
  template <int DT>
  TN_DEV void values(const tn_chunk &q, float *f) {
    tn_chunk_to_f32<DT>(q, f);
  }
};

template <int D>
struct tn_held<tn_held32<D>> {
  TN_DEV tn_held32<D> zero() {
    tn_held32<D> q;
#pragma unroll
    for (int j = 0; j < tn_dt<D>::per_chunk; j++) q.f[j] = 0.0f;
    return q;
  }
  template <int DT>
  TN_DEV void values(const tn_held32<D> &q, float *f) {
#pragma unroll
    for (int j = 0; j < tn_dt<D>::per_chunk; j++) f[j] = q.f[j];
  }
};

template <int DT, class H>
TN_DEV float tn_chunk_sum_squares(const H &q, float acc, float k) {
  float f[tn_dt<DT>::per_chunk];
  tn_held<H>::template values<DT>(q, f);
#pragma unroll
  for (int j = 0; j < tn_dt<DT>::per_chunk; j++) acc += (f[j] * k) * (f[j] * k);
  return acc;
}

/* 1 / sqrt(a): two correctly rounded operations, as on the CPU. */
TN_DEV float tn_inv_sqrt(float a) { return 1.0f / sqrtf(a); }

/* Whether a row's float32 sum of squares left float32's range although the row may be finite, or
 * vanished with eps == 0: such a row is reduced again scaled by an exact power of two (as on the CPU). */
TN_DEV bool tn_needs_rescale(float sum, float eps) { return !(sum < TN_INF) || (eps == 0.0f && sum < 0x1p-64f); }
TN_DEV float tn_rescale_factor(float sum) { return sum == TN_INF ? 0x1p-80f : 0x1p80f; }

/* A row's scale 1 / sqrt(sum / count + eps) from its group's sum of squares. A row whose sum left float32's
 * range (or vanished with eps == 0) is reduced again scaled by an exact power of two k:
 * scaled_squares(k) gives this thread's sum of (x * k)^2 over its chunks, in its usual order. When that
 * sum is finite the row counts as x * k with eps * k^2 and *pre becomes k; otherwise the plain scale
 * propagates the row's Inf or NaN. Every thread of the group takes the same branch. */
template <class GroupSum, class ScaledSquares>
TN_DEV float tn_row_inv(float sum, const tn_kernel_params &p, float *pre, GroupSum group_sum,
                        ScaledSquares scaled_squares) {
  *pre = 1.0f;
  if (!tn_needs_rescale(sum, p.eps)) return tn_inv_sqrt(sum / p.count + p.eps);
  const float k = tn_rescale_factor(sum);
  const float scaled = group_sum(scaled_squares(k));
  if (scaled < TN_INF) {
    *pre = k;
    return tn_inv_sqrt(scaled / p.count + p.eps * k * k);
  }
  return tn_inv_sqrt(sum / p.count + p.eps);
}

/* ---- a row's reduction ---- */

/* What a row's output needs from its reduction: the scale inv, the power of two pre the row was scaled by
 * when it was reduced again (1 otherwise), and layer_norm's mean (of the row times pre). */
struct tn_row_stats {
  float pre, inv, mean;
};

/* How a row is reduced (an Op's `reduce`): first(p, q, acc) folds a held chunk into this thread's first sum,
 * in chunk order; finish(p, sum, group_sum, each) makes the row's statistics from the group's first sum,
 * where each(fn) calls fn(q, c) on this thread's held chunks again, in the same order, with their index
 * (for later passes), and group_sum(v) sums v over the group. rms_norm and l2_norm: the sum of squares,
 * then tn_row_inv. */
struct tn_rms_reduce {
  template <int DT, class H>
  TN_DEV float first(const tn_kernel_params &, const H &q, float acc) {
    return tn_chunk_sum_squares<DT>(q, acc, 1.0f);
  }
  template <int DT, class GroupSum, class Each>
  TN_DEV tn_row_stats finish(const tn_kernel_params &p, float sum, GroupSum group_sum, Each each) {
    tn_row_stats st;
    st.mean = 0.0f;
    st.inv = tn_row_inv(sum, p, &st.pre, group_sum, [&](float k) {
      float acc = 0.0f;
      each([&](const typename Each::held &q, tn_i64) { acc = tn_chunk_sum_squares<DT>(q, acc, k); });
      return acc;
    });
    return st;
  }
};

/* ---- programmatic dependent launch (sm_90+): wait for the previous kernel's writes; let the next
 * kernel start launching while this one drains ---- */

TN_DEV void tn_pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

TN_DEV void tn_pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

/* ---- a norm's output chunk ---- */

/* y for chunk c of a row from its chunk q of the normed input (x, or add_rms_norm's sum) and the row's
 * scale: round((((q * pre) * inv) * (w + offset)) [* m]), each factor present only when the call has it;
 * with round_before_last (a fused rms_norm -> mul) the product up to the weight is rounded to the dtype
 * before the multiplicand, as the pair did. (An l2_norm scale other than 1 is norm_x.cu's: backend.c.)
 * WEIGHTED: false in the kernels of calls without a weight (norm.cu's unweighted family), which then
 * have no code for one; the same arithmetic as has_weight == 0. */
template <int DT, int MODE, bool MUL, bool WEIGHTED = true>
TN_DEV void tn_norm_store(const tn_kernel_params &p, tn_i64 row, tn_i64 c, const tn_chunk &q, const float *w,
                          const float *m, float pre, float inv) {
  constexpr int V = tn_dt<DT>::per_chunk;
  float f[V];
  tn_chunk_to_f32<DT>(q, f);
#pragma unroll
  for (int j = 0; j < V; j++) {
    float v = (f[j] * pre) * inv;
    if (WEIGHTED && p.has_weight) v *= w[j] + p.weight_offset;
    if (MUL && p.round_before_last) v = tn_to_f32<DT>(tn_from_f32<DT>(v));
    if (MUL) v *= m[j];
    f[j] = v;
  }
  tn_store_chunk<DT, MODE>((char *)tn_row(p.y, row, p.y_stride, tn_dt<DT>::size), c, p.dim, tn_chunk_from_f32<DT>(f));
}

template <int DT, int MODE, bool MUL, bool WEIGHTED = true>
TN_DEV void tn_norm_emit(const tn_kernel_params &p, tn_i64 row, tn_i64 c, const tn_chunk &q, float pre, float inv) {
  constexpr int V = tn_dt<DT>::per_chunk;
  float w[V], m[V];
  if (WEIGHTED && p.has_weight) {
    if (p.weight_f32) tn_load_f32<DT, TN_KERNEL_F32, MODE>((const char *)p.weight, c, p.dim, w);
    else tn_load_f32<DT, DT, MODE>((const char *)p.weight, c, p.dim, w);
  }
  if (MUL) tn_load_f32<DT, DT, MODE>(tn_row(p.mul, row, p.mul_stride, tn_dt<DT>::size), c, p.dim, m);
  tn_norm_store<DT, MODE, MUL, WEIGHTED>(p, row, c, q, w, m, pre, inv);
}

/* ---- the row shapes ---- */

/* Threads per block for G threads per row, and the blocks per SM the register allocation must allow for
 * RESIDENT threads an SM: by default 1024, so at most 64 registers a thread. Fewer resident rows lose more
 * to the last partial wave of rows than extra registers gain (docs/performance.md, "Registers and resident
 * threads (row.cuh)"); with the multiplicand in its own kernels the default paths do not spill at this cap
 * (layer_norm's common paths take 896, see tn_register_shape). */
#ifndef TN_KERNEL_MIN_RESIDENT
#define TN_KERNEL_MIN_RESIDENT 1024
#endif
#define TN_MIN_BLOCKS_AT(G, RESIDENT) (TN_KERNEL_BLOCK_OF(G) >= (RESIDENT) ? 1 : (RESIDENT) / TN_KERNEL_BLOCK_OF(G))

/* What a family's register-shape kernel of dtype DT, G threads per row and access mode MODE runs (op), how
 * many of its threads an SM must hold (resident, for the register budget), whether it fetches its rows
 * ahead (ahead, tn_fetch_row_ahead: x's, and the residual's where the op reads one), whether a weight of
 * x's dtype is read whole before the first output store (weight_first: Op::emit_weighted), and whether a
 * block lets the next kernel launch when it starts rather than when it ends (early_dependents: the next
 * kernel's blocks then take the slots the last rows free and wait there, instead of launching once the
 * last block is done): the family's Op,
 * TN_KERNEL_MIN_RESIDENT, no, no and no, unless the family specializes this where another choice runs
 * faster (norm.cu, add_rms_norm.cu, layer_norm.cu), naming only the choices it makes (tn_shape_choices'
 * defaults are the rest). */
template <int RESIDENT = TN_KERNEL_MIN_RESIDENT, bool AHEAD = false, bool WEIGHT_FIRST = false,
          bool EARLY_DEPENDENTS = false>
struct tn_shape_choices {
  enum { resident = RESIDENT, ahead = AHEAD, weight_first = WEIGHT_FIRST, early_dependents = EARLY_DEPENDENTS };
};

template <class Op, int DT, int G, int MODE, int K>
struct tn_register_shape : tn_shape_choices<> {
  using op = Op;
};

/* Whether a register shape is the four-chunk one of G = 32: at the 64-register cap the most crowded, whose
 * f16/bf16 kernels spill with the fetch ahead in one request and with the weight read first. Its pair
 * shape (two chunks a thread) has the room. */
#define TN_FOUR_CHUNKS_ON_A_WARP(G, K) ((G) == 32 && (K) == TN_KERNEL_REG_CHUNKS)

/* The register shape of rms_norm's and add_rms_norm's families (norm.cu, add_rms_norm.cu): short rows of
 * 2-byte dtypes (G <= 16) at 72 registers, 896 resident threads: the room a thread of four chunks needs
 * there not to spill (with two, params.h's TN_KERNEL_CHUNKS_OF, they fit 64 too; docs/performance.md,
 * "Registers and resident threads (row.cuh)"). */
template <class Op, int DT, int G, bool AHEAD = false, bool WEIGHT_FIRST = false, bool EARLY_DEPENDENTS = false>
struct tn_short_rows_shape : tn_shape_choices<(DT != TN_KERNEL_F32 && G <= 16 ? 896 : TN_KERNEL_MIN_RESIDENT), AHEAD,
                                              WEIGHT_FIRST, EARLY_DEPENDENTS> {
  using op = Op;
};

/* The line holding `at` fetched to L2, nothing waiting on it (the host emulator has no cache to fill). */
TN_DEV void tn_prefetch_l2(const void *at) {
#if defined(__CUDA_ARCH__)
  asm volatile("prefetch.global.L2 [%0];" ::"l"(at));
#else
  (void)at;
#endif
}

/* Bytes from `at` (16-byte aligned, a multiple of 16) to L2 in one request of the bulk copy engine (sm_90
 * and later: TN_BULK_PREFETCH; elsewhere, and in the host emulator, rows are fetched ahead chunk by chunk). */
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define TN_BULK_PREFETCH 1
TN_DEV void tn_prefetch_row_l2(const void *at, unsigned bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(at), "r"(bytes) : "memory");
}
#else
#define TN_BULK_PREFETCH 0
TN_DEV void tn_prefetch_row_l2(const void *, unsigned) {}
#endif

/* Chunk c of x's row `row` + p.ahead_blocks * RPB (the row the block half a wave of resident blocks on
 * takes: backend.c) to L2, so that block's loads wait on L2 instead of memory: for rows without 16-byte
 * access and devices before sm_90 (else tn_fetch_row_ahead, below). A row kernel's block waits on its
 * loads, then on its reductions, before its stores; rows read from L2 shorten the wait where too few
 * blocks an SM keep loads in flight meanwhile (docs/performance.md, "Prefetching rows ahead (row.cuh)",
 * has which families gain). */
template <int RPB>
TN_DEV void tn_fetch_ahead(const tn_kernel_params &p, tn_i64 row, tn_i64 c, int size) {
  const tn_i64 ahead = row + (tn_i64)p.ahead_blocks * RPB;
  if (ahead < p.rows) tn_prefetch_l2(tn_row(p.x, ahead, p.x_stride, size) + c * 16);
}

/* x's row `row` (and the residual's, RESIDUAL) to L2 in one request of the bulk copy engine each (sm_90),
 * for rows whose pointer and pitch are 16-byte aligned: its whole chunks (a partial last chunk is left to
 * the load); nothing past the last row. */
template <int DT, int MODE, bool RESIDUAL>
TN_DEV void tn_fetch_row(const tn_kernel_params &p, tn_i64 row) {
  constexpr int S = tn_dt<DT>::size;
  const unsigned bytes = (unsigned)(p.dim * S);
  /* The whole chunks (a WHOLE row has no partial chunk, and at least one whole one). */
  if (row >= p.rows || (MODE != TN_KERNEL_MODE_WHOLE && bytes < 16)) return;
  const unsigned whole = MODE == TN_KERNEL_MODE_WHOLE ? bytes : bytes & ~15u;
  tn_prefetch_row_l2(tn_row(p.x, row, p.x_stride, S), whole);
  if (RESIDUAL) tn_prefetch_row_l2(tn_row(p.residual, row, p.residual_stride, S), whole);
}

/* Row `row` + p.ahead_blocks * RPB fetched (tn_fetch_row), issued by a group's first thread once its own
 * share of the row is back (tn_summed): one request costs the group's other threads nothing, and issued with
 * the loads it would compete with the row's own reads while the row is waited on (docs/performance.md,
 * "Prefetching rows ahead (row.cuh)"). */
template <int DT, int MODE, int RPB, bool RESIDUAL>
TN_DEV void tn_fetch_row_ahead(const tn_kernel_params &p, tn_i64 row) {
  tn_fetch_row<DT, MODE, RESIDUAL>(p, row + (tn_i64)p.ahead_blocks * RPB);
}

/* Whether a thread's first sum is a number: a test that needs the row's loads back, on which the fetch
 * ahead waits (a NaN row skips it: a fetch is only a hint). */
TN_DEV bool tn_summed(float v) { return v == v; }
TN_DEV bool tn_summed(const tn_sum2 &v) { return v.q == v.q; }


/* An op family (Op) gives the row shapes below:
 * - held<DT>: what is kept of a chunk (tn_chunk or tn_held32<DT>), and reduce: how a row is reduced
 *   (tn_rms_reduce, or ops.cuh's);
 * - locate<DT>(p, v): where vector v (a row, or a head of a 3-D view) lies, computed once per vector;
 * - produce(p, at, c): chunk c of the vector's normed input (reading the inputs, maybe writing
 *   residual_out); reread(p, at, c): the same again, for rows staged by re-reading;
 * - emit(p, at, c, q, stats): the outputs of chunk c. */

/* A thread's held chunks of a row, visited again in the order of its first sum: each(fn) calls fn(q, c) on
 * every one with its chunk index c (chunks at or past the row's end are zeros), for each row shape: the
 * `each` of a reduction's finish. */
template <class H, int G, int K>
struct tn_each_in_registers {
  using held = H;
  const H *q;
  int t;
  template <class F>
  __device__ __forceinline__ void operator()(F fn) const {
#pragma unroll
    for (int k = 0; k < K; k++) fn(q[k], (tn_i64)k * G + t);
  }
};

template <class H, int G, int K>
struct tn_each_wide {
  using held = H;
  const H *staged;
  int t;
  tn_i64 chunks;
  template <class F>
  __device__ __forceinline__ void operator()(F fn) const {
    if (t < G) {
#pragma unroll
      for (int k = 0; k < K; k++) {
        const tn_i64 c = (tn_i64)k * G + t;
        fn(c < chunks ? staged[c] : tn_held<H>::zero(), c);
      }
    }
  }
};

template <int DT, int STAGE, int MODE, class Op, class At>
struct tn_each_staged {
  using held = typename Op::template held<DT>;
  const tn_kernel_params &p;
  At at;
  const held *staged;
  int t;
  tn_i64 chunks;
  template <class F>
  __device__ __forceinline__ void operator()(F fn) const {
    for (tn_i64 c = t; c < chunks; c += TN_KERNEL_MAX_GROUP) {
      const held q = STAGE == TN_KERNEL_STAGE_SHARED ? staged[c] : Op::template reread<DT, MODE>(p, at, c);
      fn(q, c);
    }
  }
};

/* Whether an Op splits the production of a chunk in two: fetch<DT, MODE>(p, at, c), the loads, returning
 * Op::raw<DT>; complete<DT, MODE>(p, at, c, raw), the rest (add_rms_norm's sum and its store to
 * residual_out). A store may alias a later load for all the compiler knows, so chunks produced one by one
 * issue a chunk's loads only once the previous chunk's store is issued, that is once its loads are back:
 * a row in registers then waits on memory once per chunk. Split, a thread issues every load first. */
template <class... T>
struct tn_void_of {
  typedef void type;
};
template <class Op, class = void>
struct tn_splits_production {
  enum { value = 0 };
};
template <class Op>
struct tn_splits_production<Op, typename tn_void_of<typename Op::template raw<0>>::type> {
  enum { value = 1 };
};

/* What a reduction's first sum is: float, or R::acc where R declares one (layer_norm's tn_sum2). */
template <class R, class = void>
struct tn_acc_of {
  using type = float;
};
template <class R>
struct tn_acc_of<R, typename tn_void_of<typename R::acc>::type> {
  using type = typename R::acc;
};

/* The rows of its inputs a 2-D row family reads by the row's index alone, which its kernels fetch to L2
 * (before the wait, and ahead where the shape says so): x's (Op::rows_read = 1), or x's and the residual's
 * (2). 0 (general.cu's and norm_x.cu's ops, which locate vectors in 3-D views, declare none): no fetch
 * before the wait, and such an op's shapes do not fetch ahead (tn_rows_in_registers asserts it). */
template <class Op, class = void>
struct tn_rows_read {
  enum { value = 0 };
};
template <class Op>
struct tn_rows_read<Op, typename tn_void_of<decltype(Op::rows_read)>::type> {
  enum { value = Op::rows_read };
};

/* A block's own rows of x (and of the residual) to L2, issued before it waits on the previous kernel
 * (tn_pdl_wait), by every register kernel of a 2-D row family with 16-byte access on sm_90. Blocks launched
 * early (programmatic dependent launch, once every block of the previous kernel has let it: the kernels of
 * early_dependents as they start, the other tnorm kernels as they end) take the slots its last blocks free
 * and wait there; fetched now, their rows come from memory during that kernel's last wave, which leaves
 * memory partly idle, and the first wave then reads from L2 (no block fetches the first half wave's rows
 * ahead). A fetch is a hint that returns nothing: the previous kernel may still be writing those lines,
 * and since L2 is where every SM's accesses meet, the loads after the wait see its writes all the same. For
 * a block launched after the previous kernel ended the request finds the row fetched ahead
 * already, or is merged with the block's own loads. Every block fetches its own rows, not only the first
 * wave's, since the largest calls gain from it too (docs/performance.md, "A block's own rows before the
 * wait (row.cuh)"). */
template <int DT, int G, int MODE, class Op>
TN_DEV void tn_fetch_own_rows(const tn_kernel_params &p) {
  if constexpr (TN_BULK_PREFETCH && MODE >= TN_KERNEL_MODE_VECTORS && tn_rows_read<Op>::value > 0) {
    constexpr int RPB = TN_KERNEL_BLOCK_OF(G) / G;
    const tn_i64 row = (tn_i64)blockIdx.x * RPB + threadIdx.x / G; /* tn_rows_in_registers' first row */
    if (threadIdx.x % G == 0 && row < p.rows) tn_fetch_row<DT, MODE, tn_rows_read<Op>::value == 2>(p, row);
  }
}

/* G threads per row, each keeping K chunks in registers (TN_KERNEL_CHUNKS_OF(G), or two in the pair
 * shapes); several rows per block
 * when G <= 32 (a row's group is then within a warp; above a warp a block is one row, since the group's
 * barrier and shared partial sums belong to the block); rows spread over a grid that strides (rows are never a grid dimension
 * with a 65535 cap; every offset is 64-bit). */
template <int DT, int G, int K, int MODE, class Op, bool AHEAD = false, bool WEIGHT_FIRST = false>
TN_DEV void tn_rows_in_registers(const tn_kernel_params &p) {
  using H = typename Op::template held<DT>;
  using R = typename Op::reduce;
  constexpr int V = tn_dt<DT>::per_chunk;
  constexpr int BLOCK = TN_KERNEL_BLOCK_OF(G), RPB = BLOCK / G; /* one row per block above one warp */
  static_assert(!AHEAD || tn_rows_read<Op>::value > 0, "rows are fetched ahead by their index: the op names them");
  __shared__ float partials[TN_PARTIALS_OF(G)];
  int turn = 0;
  const int t = threadIdx.x % G;
  const tn_i64 chunks = (p.dim + V - 1) / V;
  for (tn_i64 row = (tn_i64)blockIdx.x * RPB + threadIdx.x / G; row < p.rows; row += (tn_i64)gridDim.x * RPB) {
    const auto at = Op::template locate<DT>(p, row);
    H q[K];
    if constexpr (tn_splits_production<Op>::value) {
      typename Op::template raw<DT> r[K];
#pragma unroll
      for (int k = 0; k < K; k++) {
        const tn_i64 c = (tn_i64)k * G + t;
        r[k] = c < chunks ? Op::template fetch<DT, MODE>(p, at, c) : typename Op::template raw<DT>{};
      }
#pragma unroll
      for (int k = 0; k < K; k++) {
        const tn_i64 c = (tn_i64)k * G + t;
        q[k] = c < chunks ? Op::template complete<DT, MODE>(p, at, c, r[k]) : tn_held<H>::zero();
      }
    } else {
#pragma unroll
      for (int k = 0; k < K; k++) {
        const tn_i64 c = (tn_i64)k * G + t;
        q[k] = c < chunks ? Op::template produce<DT, MODE>(p, at, c) : tn_held<H>::zero();
      }
    }
    /* Not in the f16/bf16 kernels of TN_FOUR_CHUNKS_ON_A_WARP, which spill more with it than with the
     * prefetch per chunk. */
    constexpr bool BULK_AHEAD = AHEAD && TN_BULK_PREFETCH && MODE >= TN_KERNEL_MODE_VECTORS &&
                                (DT == TN_KERNEL_F32 || !TN_FOUR_CHUNKS_ON_A_WARP(G, K));
    if constexpr (AHEAD && !BULK_AHEAD) {
#pragma unroll
      for (int k = 0; k < K; k++) {
        const tn_i64 c = (tn_i64)k * G + t;
        if (c < chunks) tn_fetch_ahead<RPB>(p, row, c, tn_dt<DT>::size);
      }
    }
    typename tn_acc_of<R>::type acc{};
#pragma unroll
    for (int k = 0; k < K; k++) acc = R::template first<DT>(p, q[k], acc);
    if constexpr (BULK_AHEAD) {
      if (t == 0 && tn_summed(acc)) tn_fetch_row_ahead<DT, MODE, RPB, tn_rows_read<Op>::value == 2>(p, row);
    }
    const auto sum = tn_group_sum<G>(acc, partials, &turn);
    const tn_row_stats st = R::template finish<DT>(
        p, sum, [&](float v) { return tn_group_sum<G>(v, partials, &turn); }, tn_each_in_registers<H, G, K>{q, t});
    if constexpr (WEIGHT_FIRST) {
      /* Every weight chunk of the thread read before its first store: a store may alias a later load as far
       * as the compiler knows, so each chunk's weight read otherwise waits for the previous chunk's store. */
      if (p.has_weight && !p.weight_f32) {
        tn_chunk w[K];
#pragma unroll
        for (int k = 0; k < K; k++) {
          const tn_i64 c = (tn_i64)k * G + t;
          w[k] = c < chunks ? tn_load_chunk<DT, MODE>((const char *)p.weight, c, p.dim) : tn_chunk_zero();
        }
#pragma unroll
        for (int k = 0; k < K; k++) {
          const tn_i64 c = (tn_i64)k * G + t;
          if (c < chunks) Op::template emit_weighted<DT, MODE>(p, at, c, q[k], w[k], st);
        }
        continue;
      }
    }
#pragma unroll
    for (int k = 0; k < K; k++) {
      const tn_i64 c = (tn_i64)k * G + t;
      if (c < chunks) Op::template emit<DT, MODE>(p, at, c, q[k], st);
    }
  }
}

/* The sum over a G-thread group (G >= 64) whose block has more threads than the group: the same
 * arithmetic as tn_group_sum<G> for threads 0 .. G - 1, and every thread of the block takes part (the
 * barrier is the block's). */
template <int G, class T>
TN_DEV T tn_wide_group_sum(T v, float *partials, int *turn) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = v + tn_shfl_xor(0xffffffffu, v, o);
  return tn_warps_meet<G / 32, true>(v, partials, turn);
}

/* Few rows (one block each, the decode regime): a row of the G-thread register shape (G >= 64), with the
 * same reduction (threads 0 .. G - 1 sum chunks t, t + G, ... in that order, then as tn_group_sum<G>),
 * but loaded and written by W = min(4 G, 1024) threads, one chunk each (two when G = 512), through
 * shared memory. A one-row call is bound by the serial work of one thread, which this cuts by four;
 * the rows come out bit for bit as from tn_rows_in_registers<G>. */
template <int DT, int G, int MODE, class Op>
TN_DEV void tn_rows_wide(const tn_kernel_params &p) {
  using H = typename Op::template held<DT>;
  using R = typename Op::reduce;
  constexpr int K = TN_KERNEL_CHUNKS_OF(G), W = TN_KERNEL_WIDE_BLOCK_OF(G), PER = G * K / W;
  __shared__ H staged[G * K];
  __shared__ float partials[TN_PARTIALS_OF(G)];
  int turn = 0;
  const int t = threadIdx.x;
  const tn_i64 chunks = (p.dim + tn_dt<DT>::per_chunk - 1) / tn_dt<DT>::per_chunk;
  for (tn_i64 row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const auto at = Op::template locate<DT>(p, row);
#pragma unroll
    for (int j = 0; j < PER; j++) {
      const tn_i64 c = (tn_i64)j * W + t;
      if (c < chunks) staged[c] = Op::template produce<DT, MODE>(p, at, c);
    }
    __syncthreads();
    typename tn_acc_of<R>::type acc{};
    if (t < G) {
#pragma unroll
      for (int k = 0; k < K; k++) {
        const tn_i64 c = (tn_i64)k * G + t;
        acc = R::template first<DT>(p, c < chunks ? staged[c] : tn_held<H>::zero(), acc);
      }
    }
    const auto sum = tn_wide_group_sum<G>(acc, partials, &turn);
    const tn_row_stats st = R::template finish<DT>(
        p, sum, [&](float v) { return tn_wide_group_sum<G>(v, partials, &turn); },
        tn_each_wide<H, G, K>{staged, t, chunks});
#pragma unroll
    for (int j = 0; j < PER; j++) {
      const tn_i64 c = (tn_i64)j * W + t;
      if (c < chunks) Op::template emit<DT, MODE>(p, at, c, staged[c], st);
    }
    __syncthreads(); /* staged is the next row's */
  }
}

/* The block's dynamic shared memory (staged rows, rope.cu's tables), typed by each user. */
extern __shared__ __align__(16) unsigned char tn_dynamic_smem[];

/* TN_KERNEL_MAX_GROUP threads per row, one row per block at a time, for rows longer than registers
 * hold: the held chunks wait in shared memory (STAGE_SHARED, chunks * sizeof(held) bytes of dynamic
 * shared memory) or are produced again for the output (STAGE_REREAD; from L2 in practice). Chunks go to
 * threads as in tn_rows_in_registers with G = TN_KERNEL_MAX_GROUP, so the reduction order is the same. */
template <int DT, int STAGE, int MODE, class Op>
TN_DEV void tn_rows_staged(const tn_kernel_params &p) {
  using H = typename Op::template held<DT>;
  using R = typename Op::reduce;
  /* BATCH chunks in flight per thread: 64 bytes (held float32 chunks are twice the size). */
  constexpr int G = TN_KERNEL_MAX_GROUP, V = tn_dt<DT>::per_chunk, BATCH = sizeof(H) > 16 ? 2 : 4;
  H *staged = reinterpret_cast<H *>(tn_dynamic_smem);
  __shared__ float partials[TN_PARTIALS_OF(G)];
  int turn = 0;
  const int t = threadIdx.x;
  const tn_i64 chunks = (p.dim + V - 1) / V;
  for (tn_i64 row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const auto at = Op::template locate<DT>(p, row);
    typename tn_acc_of<R>::type acc{};
    /* BATCH chunks loaded, then summed in chunk order. */
    for (tn_i64 c0 = t; c0 < chunks; c0 += (tn_i64)BATCH * G) {
      H q[BATCH];
#pragma unroll
      for (int b = 0; b < BATCH; b++) {
        const tn_i64 c = c0 + (tn_i64)b * G;
        q[b] = c < chunks ? Op::template produce<DT, MODE>(p, at, c) : tn_held<H>::zero();
        if (STAGE == TN_KERNEL_STAGE_SHARED && c < chunks) staged[c] = q[b];
      }
#pragma unroll
      for (int b = 0; b < BATCH; b++) acc = R::template first<DT>(p, q[b], acc);
    }
    const auto sum = tn_group_sum<G>(acc, partials, &turn);
    const tn_row_stats st = R::template finish<DT>(
        p, sum, [&](float v) { return tn_group_sum<G>(v, partials, &turn); },
        tn_each_staged<DT, STAGE, MODE, Op, decltype(at)>{p, at, staged, t, chunks});
    for (tn_i64 c0 = t; c0 < chunks; c0 += (tn_i64)BATCH * G) {
      H q[BATCH];
#pragma unroll
      for (int b = 0; b < BATCH; b++) {
        const tn_i64 c = c0 + (tn_i64)b * G;
        if (c < chunks)
          q[b] = STAGE == TN_KERNEL_STAGE_SHARED ? staged[c] : Op::template reread<DT, MODE>(p, at, c);
      }
#pragma unroll
      for (int b = 0; b < BATCH; b++) {
        const tn_i64 c = c0 + (tn_i64)b * G;
        if (c < chunks) Op::template emit<DT, MODE>(p, at, c, q[b], st);
      }
    }
  }
}

/* Blocks per SM a kernel's registers must allow for RESIDENT threads, DIV times fewer for families whose
 * rows need more registers (general.cu: float32 chunks), at least one. */
#define TN_MIN_BLOCKS_DIV(G, DIV, RESIDENT) \
  (TN_MIN_BLOCKS_AT(G, RESIDENT) / (DIV) > 0 ? TN_MIN_BLOCKS_AT(G, RESIDENT) / (DIV) : 1)

/* The kernels of one op family: Op's rows in registers (G threads per row, K chunks a thread: the pair
 * shapes name K, TN_KERNEL_PAIR_CHUNKS), in the few-rows form, or staged. MIN_DIV: 1, or the factor by
 * which the family's register shapes allow fewer resident blocks. */
#define TN_DEFINE_ROW_KERNELS_DIV(prefix, Op, MIN_DIV)                                                    \
  template <int DT, int G, int MODE, int K = TN_KERNEL_CHUNKS_OF(G)>                                      \
  __global__ void __launch_bounds__(TN_KERNEL_BLOCK_OF(G),                                                \
                                    TN_MIN_BLOCKS_DIV(G, MIN_DIV, (tn_register_shape<Op, DT, G, MODE, K>::resident))) \
      prefix##_registers(const tn_kernel_params p) {                                                      \
    using shape = tn_register_shape<Op, DT, G, MODE, K>;                                                  \
    tn_fetch_own_rows<DT, G, MODE, typename shape::op>(p);                                                 \
    tn_pdl_wait();                                                                                        \
    if (shape::early_dependents) tn_pdl_launch_dependents();                                              \
    tn_rows_in_registers<DT, G, K, MODE, typename shape::op, (shape::ahead != 0), (shape::weight_first != 0)>(p); \
    if (!shape::early_dependents) tn_pdl_launch_dependents();                                             \
  }                                                                                                       \
  template <int DT, int G, int MODE>                                                                      \
  __global__ void __launch_bounds__(TN_KERNEL_WIDE_BLOCK_OF(G), 1) prefix##_wide(const tn_kernel_params p) { \
    tn_pdl_wait();                                                                                        \
    tn_rows_wide<DT, G, MODE, Op>(p);                                                                     \
    tn_pdl_launch_dependents();                                                                           \
  }                                                                                                       \
  template <int DT, int STAGE, int MODE>                                                                  \
  __global__ void __launch_bounds__(TN_KERNEL_MAX_GROUP, 1) prefix##_staged(const tn_kernel_params p) {   \
    tn_pdl_wait();                                                                                        \
    tn_rows_staged<DT, STAGE, MODE, Op>(p);                                                               \
    tn_pdl_launch_dependents();                                                                           \
  }

#define TN_DEFINE_ROW_KERNELS(prefix, Op) TN_DEFINE_ROW_KERNELS_DIV(prefix, Op, 1)

#endif
