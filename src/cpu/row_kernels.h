/* Row building blocks shared by the CPU ops, written once as always-inline "templates": each op file
 * instantiates them with compile-time dtypes and flags, so the dtype switches fold away and every loop
 * vectorises (check with -fopt-info-vec). Each op file is compiled twice, for baseline x86-64 (or the
 * host architecture) and for x86-64-v3 (AVX2, FMA, F16C); TN_CPU_ISA names the build and suffixes the
 * entry points, and the backend picks one set at run time.
 *
 * A row is processed in two passes: pass 1 brings the row (or add_rms_norm's rounded sum) to float32,
 * in a per-chunk scratch row unless it already is f32, and reduces it; pass 2 scales it into the output
 * block by block, converting each block once. Each input is read from memory once and converted once.
 * For the norms that take 3-D views the unit is the vector (a head of a row, tn_vec_ptr), not the row:
 * every head is reduced and scaled on its own, exactly as a row of dim elements would be.
 *
 * Reduction order (the contract for batch invariance): element i of a row is added to lane i % 16; the
 * 16 lanes are then summed as a fixed binary tree. The order depends on dim only, never on the row's
 * position, the number of rows, the thread that runs it or the instruction set (contraction is off, so
 * no build fuses a multiply into an add). layer_norm's mean and variance use the same lanes and tree. */
#ifndef TN_CPU_ROW_KERNELS_H
#define TN_CPU_ROW_KERNELS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "../core/dtype.h"
#include "convert_block.h"
#include "ops.h"

#if defined(__x86_64__) || defined(__i386__)
#include <emmintrin.h>
#define TN_HAVE_STREAM_STORES 1
#endif

#define TN_INLINE static inline __attribute__((always_inline))

#define TN_LANES 16
/* Element i of a row source: f16/bf16 elements (src_half) or float32 ones. */
#define TN_SRC(v, src_half, i) ((const char *)(v) + (size_t)(i) * ((src_half) ? 2u : 4u))
#define TN_BLOCK 512 /* elements staged per block: 2 KiB in f32, in L1 */

/* Pointer to row r of a validated tensor. */
TN_INLINE void *tn_row_ptr(const tn_tensor *t, int64_t r) {
  return (char *)t->data + (size_t)r * (size_t)t->row_stride * tn_elem_size(t->dtype);
}

/* Pointer to vector v of a validated tensor: the norms that take 3-D views [rows, heads, dim] reduce each
 * head on its own, so their unit of work is the vector v = row * heads + head. For a 2-D view it is row v
 * (a test the branch predictor settles, so 2-D calls pay no division). */
TN_INLINE void *tn_vec_ptr(const tn_tensor *t, int64_t v) {
  if (t->heads <= 1) return tn_row_ptr(t, v);
  const int64_t r = v / t->heads, h = v - r * t->heads;
  return (char *)t->data + ((size_t)r * (size_t)t->row_stride + (size_t)h * (size_t)t->head_stride) *
                               tn_elem_size(t->dtype);
}

/* The row as float32: an f32 row is used where it lies (an output that is the same view only writes
 * element i after reading it); f16/bf16 rows are converted once into the scratch row. */
TN_INLINE const float *tn_row_as_f32(tn_dtype dtype, const void *src, int64_t n, float *scratch) {
  if (dtype == TN_F32) return (const float *)src;
  tn_half_to_f32_block(dtype, (const uint16_t *)src, scratch, n);
  return scratch;
}

/* Sums the 16 lanes as a fixed binary tree. */
TN_INLINE float tn_lanes_tree(float *acc) {
  for (int width = TN_LANES / 2; width > 0; width /= 2)
    for (int k = 0; k < width; k++) acc[k] += acc[k + width];
  return acc[0];
}

/* Adds the squares of the zero-padded tail to the 16 lanes, then sums the lanes as a fixed binary tree:
 * the end of every reduction of a row, whatever path computed the lanes. */
TN_INLINE float tn_lanes_finish(float *acc, const float *tail) {
  for (int k = 0; k < TN_LANES; k++) acc[k] += tail[k] * tail[k];
  return tn_lanes_tree(acc);
}

TN_INLINE float tn_sum_squares(const float *v, int64_t n) {
  float acc[TN_LANES] = {0};
  int64_t i = 0;
  for (; i + TN_LANES <= n; i += TN_LANES)
    for (int k = 0; k < TN_LANES; k++) acc[k] += v[i + k] * v[i + k];
  /* The tail goes to lanes 0.. like a full block would, through a zero-padded copy so the lanes stay
   * in registers (adding +0 changes nothing). */
  float tail[TN_LANES] = {0};
  for (int k = 0; i + k < n; k++) tail[k] = v[i + k];
  return tn_lanes_finish(acc, tail);
}

/* The plain sum of a row, in the lanes and tree of tn_sum_squares (layer_norm's mean). */
TN_INLINE float tn_sum(const float *v, int64_t n) {
  float acc[TN_LANES] = {0};
  int64_t i = 0;
  for (; i + TN_LANES <= n; i += TN_LANES)
    for (int k = 0; k < TN_LANES; k++) acc[k] += v[i + k];
  for (int k = 0; i + k < n; k++) acc[k] += v[i + k];
  return tn_lanes_tree(acc);
}

/* The sum of squared deviations from `mean`, in the same lanes and tree (layer_norm's variance, a second
 * pass over the row: never E[x^2] - E[x]^2, which cancels). */
TN_INLINE float tn_sum_sq_dev(const float *v, int64_t n, float mean) {
  float acc[TN_LANES] = {0};
  int64_t i = 0;
  for (; i + TN_LANES <= n; i += TN_LANES)
    for (int k = 0; k < TN_LANES; k++) {
      const float d = v[i + k] - mean;
      acc[k] += d * d;
    }
  for (int k = 0; i + k < n; k++) {
    const float d = v[i + k] - mean;
    acc[k] += d * d;
  }
  return tn_lanes_tree(acc);
}

#ifdef TN_CONVERT_AVX2
/* Stores 16 floats (two registers) at dst and adds their squares to lanes 0-7 (acc0) and 8-15 (acc1). */
TN_INLINE void tn_store_square16(float *dst, __m256 f0, __m256 f1, __m256 *acc0, __m256 *acc1) {
  _mm256_storeu_ps(dst, f0);
  _mm256_storeu_ps(dst + 8, f1);
  *acc0 = _mm256_add_ps(*acc0, _mm256_mul_ps(f0, f0));
  *acc1 = _mm256_add_ps(*acc1, _mm256_mul_ps(f1, f1));
}
#endif

#ifdef TN_CONVERT_AVX2
/* The sum of squares of an f16/bf16 row (as tn_sum_squares of its float32 values, bit for bit: the same
 * lanes, tail and tree); when f32 is not NULL the float32 row is also stored there. */
TN_INLINE float tn_half_sum_squares(tn_dtype dtype, const void *src, int64_t n, float *f32) {
  const uint16_t *h = (const uint16_t *)src;
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(); /* lanes 0-7 and 8-15 */
  int64_t i = 0;
  for (; i + TN_LANES <= n; i += TN_LANES) {
    const __m256 f0 = tn_half8_to_f32(dtype, h + i), f1 = tn_half8_to_f32(dtype, h + i + 8);
    if (f32 != NULL) {
      _mm256_storeu_ps(f32 + i, f0);
      _mm256_storeu_ps(f32 + i + 8, f1);
    }
    acc0 = _mm256_add_ps(acc0, _mm256_mul_ps(f0, f0));
    acc1 = _mm256_add_ps(acc1, _mm256_mul_ps(f1, f1));
  }
  float acc[TN_LANES], tail[TN_LANES] = {0};
  _mm256_storeu_ps(acc, acc0);
  _mm256_storeu_ps(acc + 8, acc1);
  for (int k = 0; i + k < n; k++) {
    tail[k] = tn_load(dtype, src, i + k);
    if (f32 != NULL) f32[i + k] = tail[k];
  }
  return tn_lanes_finish(acc, tail);
}
#endif

/* The row as float32 (as tn_row_as_f32) and its sum of squares (as tn_sum_squares, bit for bit), in one
 * pass over the row. */
TN_INLINE float tn_row_load_sum_squares(tn_dtype dtype, const void *src, int64_t n, float *scratch,
                                        const float **row) {
#ifdef TN_CONVERT_AVX2
  if (dtype != TN_F32) {
    *row = scratch;
    return tn_half_sum_squares(dtype, src, n, scratch);
  }
#endif
  *row = tn_row_as_f32(dtype, src, n, scratch);
  return tn_sum_squares(*row, n);
}

/* The two conventions of a row's scale: 1 / sqrt(sum_sq / count + eps) (rms_norm, and l2_norm with
 * count 1), and l2_norm's TN_L2_MAX_NORM_EPS, 1 / max(sqrt(sum_sq), eps). */
#define TN_SCALE_RSQRT 0
#define TN_SCALE_MAX_NORM 1

/* Whether a row's scale is the plain formula of its sum of squares (tn_row_scale's common case): the
 * sum neither overflowed nor vanished where it matters. With max(norm, eps), a vanished sum matters
 * only when eps is below sqrt(2^-64): at or above that eps wins over any sum below 2^-64 anyway. */
TN_INLINE int tn_row_scale_is_plain(float sum_sq, float eps, int mode) {
  if (mode == TN_SCALE_MAX_NORM) return sum_sq < INFINITY && !(eps < 0x1p-32f && sum_sq < 0x1p-64f);
  return sum_sq < INFINITY && !(eps == 0.0f && sum_sq < 0x1p-64f);
}

/* 1 / sqrt(a), in float32 (two roundings; the same expression on every CPU). */
TN_INLINE float tn_inv_sqrt(float a) { return 1.0f / sqrtf(a); }

/* The scale of a row from its sum of squares, in either convention. The max is written as a comparison
 * so that a NaN norm stays NaN (fmaxf would pick eps and hide it). */
TN_INLINE float tn_row_inv(float sum_sq, float count, float eps, int mode) {
  if (mode == TN_SCALE_MAX_NORM) {
    const float norm = sqrtf(sum_sq);
    return 1.0f / (norm < eps ? eps : norm);
  }
  return tn_inv_sqrt(sum_sq / count + eps);
}

/* The row's scale, given its float32 sum of squares. When that sum left float32's range although the
 * row is finite (|x| beyond about 1e19) or fell to nothing where eps does not take over (|x| below about
 * 1e-19), the row is rewritten into the scratch row times a power of two k (exact) and *v pointed there;
 * the scale returned is then that of the scaled row with eps * k^2 (eps * k for max(norm, eps)), so
 * v * scale is right instead of 0 or Inf. Rows with NaN or Inf take the plain path and propagate. */
TN_INLINE float tn_row_scale(float sum_sq, const float **v, float *scratch, int64_t n, float count, float eps,
                             int mode) {
  if (tn_row_scale_is_plain(sum_sq, eps, mode)) return tn_row_inv(sum_sq, count, eps, mode);
  const float k = sum_sq == INFINITY ? 0x1p-80f : 0x1p80f;
  const float *src = *v;
  float acc[TN_LANES] = {0}, tail[TN_LANES] = {0};
  int64_t i = 0;
  for (; i + TN_LANES <= n; i += TN_LANES)
    for (int j = 0; j < TN_LANES; j++) acc[j] += (src[i + j] * k) * (src[i + j] * k);
  for (int j = 0; i + j < n; j++) tail[j] = src[i + j] * k;
  float scaled_sum = tn_lanes_finish(acc, tail);
  if (!(scaled_sum < INFINITY)) return tn_row_inv(sum_sq, count, eps, mode); /* an Inf in the row: propagate it */
  for (i = 0; i < n; i++) scratch[i] = src[i] * k; /* src may be scratch itself */
  *v = scratch;
  return tn_row_inv(scaled_sum, count, mode == TN_SCALE_MAX_NORM ? eps * k : eps * k * k, mode);
}

/* What pass 1 of a normalised row (rms_norm, l2_norm) hands to pass 2: where to read the row (f16/bf16
 * elements where they lie, or float32 ones) and its scale. */
typedef struct tn_row_source {
  const void *v;
  int half;
  float inv;
} tn_row_source;

/* Pass 1: with AVX2 an f16/bf16 row is only summed, and pass 2 reads it again from cache, converting as it
 * goes (no float32 copy stored and reloaded); a row needing the rescale, and every row without AVX2, is
 * brought to float32 in scratch first (tn_row_load_sum_squares, tn_row_scale). Same bits either way. */
TN_INLINE tn_row_source tn_row_pass1(tn_dtype dtype, const void *x, int64_t n, float count, float eps,
                                     float *scratch, int mode) {
  tn_row_source s;
#ifdef TN_CONVERT_AVX2
  if (dtype != TN_F32) {
    const float sum = tn_half_sum_squares(dtype, x, n, NULL);
    if (tn_row_scale_is_plain(sum, eps, mode)) {
      s.v = x;
      s.half = 1;
      s.inv = tn_row_inv(sum, count, eps, mode);
      return s;
    }
  }
#endif
  const float *v;
  const float sum = tn_row_load_sum_squares(dtype, x, n, scratch, &v);
  s.inv = tn_row_scale(sum, &v, scratch, n, count, eps, mode);
  s.v = v;
  s.half = 0;
  return s;
}

/* Copies a finished block to the output: plain stores, or non-temporal ones for outputs too large to
 * stay in cache (they skip the read-for-ownership, which otherwise costs a third more traffic). */
TN_INLINE void tn_copy_out(void *dst, const void *src, size_t bytes, int stream) {
#ifdef TN_HAVE_STREAM_STORES
  if (stream) {
    char *d = dst;
    const char *s = src;
    size_t head = (size_t)(-(uintptr_t)d & 15u);
    if (head > bytes) head = bytes;
    memcpy(d, s, head);
    size_t i = head;
    for (; i + 16 <= bytes; i += 16)
      _mm_stream_si128((__m128i *)(void *)(d + i), _mm_loadu_si128((const __m128i *)(const void *)(s + i)));
    memcpy(d + i, s + i, bytes - i);
    return;
  }
#endif
  memcpy(dst, src, bytes);
}

/* Orders this thread's non-temporal stores before whatever follows (the pool's completion signal). */
TN_INLINE void tn_stream_fence(int stream) {
#ifdef TN_HAVE_STREAM_STORES
  if (stream) _mm_sfence();
#else
  (void)stream;
#endif
}

/* A block of len finished float32 values (in f32[]) goes to out: converted once to the dtype, written
 * directly or streamed. With dtype f32 and no streaming the values were computed in place already. */
TN_INLINE void tn_block_out(tn_dtype dtype, void *out, float *f32, uint16_t *u16, int64_t len, int stream) {
  if (dtype == TN_F32) {
    if (stream) tn_copy_out(out, f32, (size_t)len * 4, 1);
    return;
  }
  tn_f32_to_half_block(dtype, f32, stream ? u16 : (uint16_t *)out, len);
  if (stream) tn_copy_out(out, u16, (size_t)len * 2, 1);
}

/* v[i] rounded to the dtype and back, in place (tn_round_to through the block conversions, so it
 * vectorises); tmp holds n elements. Nothing to do for f32. */
TN_INLINE void tn_round_block(tn_dtype dtype, float *v, uint16_t *tmp, int64_t n) {
  if (dtype == TN_F32) return;
  tn_f32_to_half_block(dtype, v, tmp, n);
  tn_half_to_f32_block(dtype, tmp, v, n);
}

/* A finished row of n float32 values (at most TN_BLOCK) to out: tn_block_out for values that were not
 * computed in place (f32 included). */
TN_INLINE void tn_row_out(tn_dtype dtype, void *out, const float *f32, uint16_t *u16, int64_t n, int stream) {
  if (dtype == TN_F32) {
    tn_copy_out(out, f32, (size_t)n * 4, stream);
    return;
  }
  tn_f32_to_half_block(dtype, f32, stream ? u16 : (uint16_t *)out, n);
  if (stream) tn_copy_out(out, u16, (size_t)n * 2, 1);
}

/* The residual add of add_rms_norm and add_layer_norm for one row: s = float(x) + float(res) in float32
 * (x of `dtype`; res and out of `rdtype`, x's dtype or f32: an f32 residual stream); out = s rounded once
 * to rdtype. What the norm then reads, left in s: the sum as stored (rounded), or with norm_f32
 * (TN_RESIDUAL_NORM_F32) the float32 sum itself. Block by block, each block of x and res read before its
 * block of out is written, so out may be res (or x) itself. */
TN_INLINE void tn_residual_add(tn_dtype dtype, tn_dtype rdtype, int norm_f32, const void *x, const void *res,
                               void *out, float *s, int64_t n, int stream) {
  float xf[TN_BLOCK], rf[TN_BLOCK];
  uint16_t u16[TN_BLOCK];
  const size_t es = tn_elem_size(dtype), res_es = tn_elem_size(rdtype);
  for (int64_t b = 0; b < n; b += TN_BLOCK) {
    const int64_t len = n - b < TN_BLOCK ? n - b : TN_BLOCK;
    const float *xb = tn_row_as_f32(dtype, (const char *)x + (size_t)b * es, len, xf);
    const float *rb = tn_row_as_f32(rdtype, (const char *)res + (size_t)b * res_es, len, rf);
    for (int64_t i = 0; i < len; i++) s[b + i] = xb[i] + rb[i];
    void *dst = (char *)out + (size_t)b * res_es;
    if (rdtype == TN_F32) {
      tn_copy_out(dst, s + b, (size_t)len * 4, stream);
    } else {
      /* Round once to the dtype and store those bits; unless the norm reads the float32 sum, keep their
       * exact float32 value in s. */
      tn_f32_to_half_block(rdtype, s + b, u16, len);
      if (!norm_f32) tn_half_to_f32_block(rdtype, u16, s + b, len);
      tn_copy_out(dst, u16, (size_t)len * 2, stream);
    }
  }
}

/* tn_residual_add with the residual's dtype and mode constants in each copy: x's dtype with the stored
 * sum, x's dtype with the float32 sum, or f32 (where the two modes are the same). */
TN_INLINE void tn_residual_add_any(tn_dtype dtype, tn_dtype rdtype, int norm_f32, const void *x, const void *res,
                                   void *out, float *s, int64_t n, int stream) {
  if (rdtype == TN_F32)
    tn_residual_add(dtype, TN_F32, 0, x, res, out, s, n, stream);
  else if (norm_f32)
    tn_residual_add(dtype, dtype, 1, x, res, out, s, n, stream);
  else
    tn_residual_add(dtype, dtype, 0, x, res, out, s, n, stream);
}

#ifdef TN_CONVERT_AVX2
/* Eight floats rounded to f16/bf16 and back (tn_round_to, bit for bit, NaN included). */
TN_INLINE __m256 tn_round8_to(tn_dtype dtype, __m256 v) {
  if (dtype == TN_F16) return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  return _mm256_castsi256_ps(_mm256_slli_epi32(tn_bf16_round8(v), 16));
}

/* Eight results of the emit formula below, in registers. */
TN_INLINE __m256 tn_emit8(tn_dtype dtype, int src_half, const void *v, float inv, int round_first, int has_w,
                          const float *w, int has_m, const void *m, int has_scale, float scale) {
  const __m256 x = src_half ? tn_half8_to_f32(dtype, (const uint16_t *)v) : _mm256_loadu_ps((const float *)v);
  __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(inv));
  if (round_first) t = tn_round8_to(dtype, t);
  if (has_w) t = _mm256_mul_ps(t, _mm256_loadu_ps(w));
  if (has_m) t = _mm256_mul_ps(t, dtype == TN_F32 ? _mm256_loadu_ps(m) : tn_half8_to_f32(dtype, m));
  if (has_scale) t = _mm256_mul_ps(t, _mm256_set1_ps(scale));
  return t;
}

/* The emit formula for f32 outputs streamed from registers (out 32-byte aligned); returns how many
 * elements it wrote (a multiple of 8). */
TN_INLINE int64_t tn_emit_f32_stream_avx2(float *out, const float *v, int64_t n, float inv, int has_w, const float *w,
                                          int has_m, const float *m, int has_scale, float scale) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_stream_ps(out + i, tn_emit8(TN_F32, 0, v + i, inv, 0, has_w, w + (has_w ? i : 0), has_m, has_m ? m + i : NULL,
                                       has_scale, scale));
  return i;
}

/* The emit formula for f16/bf16 outputs, 16 elements at a time with the results kept in registers
 * through the conversion; returns how many elements it wrote (a multiple of 16). */
TN_INLINE int64_t tn_emit_half_avx2(tn_dtype dtype, int src_half, uint16_t *out, const void *v, int64_t n, float inv,
                                    int round_first, int has_w,
                                    const float *w, int has_m, const uint16_t *m, int has_scale, float scale, int nt) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256 lo = tn_emit8(dtype, src_half, TN_SRC(v, src_half, i), inv, round_first, has_w, w + (has_w ? i : 0), has_m, has_m ? m + i : NULL, has_scale, scale);
    __m256 hi = tn_emit8(dtype, src_half, TN_SRC(v, src_half, i + 8), inv, round_first, has_w, w + (has_w ? i + 8 : 0), has_m, has_m ? m + i + 8 : NULL,
                         has_scale, scale);
    __m256i packed = tn_f32x16_to_half(dtype, lo, hi);
    if (nt) _mm256_stream_si256((__m256i *)(void *)(out + i), packed); /* out is 32-byte aligned */
    else _mm256_storeu_si256((__m256i *)(void *)(out + i), packed);
  }
  return i;
}
#endif

/* The next row's inputs, fetched into cache while this row's output is computed: pass 1 of the next
 * row then finds its data there instead of waiting on memory. Both pointers may be NULL. */
typedef struct tn_next_row {
  const char *a, *b;
  size_t bytes;
} tn_next_row;

/* How many rows ahead to prefetch (0: none). */
#ifndef TN_CPU_PREFETCH_ROWS
#define TN_CPU_PREFETCH_ROWS 1
#endif

TN_INLINE tn_next_row tn_next_row_of(const tn_tensor *a, const tn_tensor *b, int64_t r, int64_t end) {
  tn_next_row next = {NULL, NULL, (size_t)a->dim * tn_elem_size(a->dtype)};
  if (TN_CPU_PREFETCH_ROWS > 0 && r + TN_CPU_PREFETCH_ROWS < end) {
    next.a = (const char *)tn_vec_ptr(a, r + TN_CPU_PREFETCH_ROWS);
    next.b = b != NULL ? (const char *)tn_vec_ptr(b, r + TN_CPU_PREFETCH_ROWS) : NULL;
  }
  return next;
}

/* Prefetches the part of the next row matching elements [from, to) of n. */
TN_INLINE void tn_prefetch_slice(tn_next_row next, int64_t from, int64_t to, int64_t n) {
  if (next.a == NULL) return;
  size_t begin = next.bytes * (size_t)from / (size_t)n, end = next.bytes * (size_t)to / (size_t)n;
  for (size_t o = begin & ~(size_t)63; o < end; o += 64) {
    __builtin_prefetch(next.a + o, 0, 3);
    if (next.b != NULL) __builtin_prefetch(next.b + o, 0, 3);
  }
}

/* Element i of the emit formula below in float32, before the rounding to the dtype (m: the multiplicand's
 * element, used with has_m). */
TN_INLINE float tn_emit_value(tn_dtype dtype, const void *v, int src_half, int64_t i, float inv, int round_first,
                              int has_w, const float *w, int has_m, float m, int has_scale, float scale,
                              int round_mid) {
  float t = (src_half ? tn_load(dtype, v, i) : ((const float *)v)[i]) * inv;
  if (round_first) t = tn_round_to(dtype, t);
  if (has_w) t *= w[i];
  if (round_mid) t = tn_round_to(dtype, t);
  if (has_m) t *= m;
  if (has_scale) t *= scale;
  return t;
}

/* out[i] = round((((v[i] * inv) * w[i]) * m[i]) * scale) for i < n, each factor present only when its
 * flag is set (w is the weight plus offset, already in float32; m a row of the dtype). With round_first
 * (TN_CASTING_LLAMA on f16/bf16), v[i] * inv is rounded to the dtype before anything multiplies it. With
 * round_mid, (v[i] * inv) * w[i] is rounded to the dtype before m or scale multiplies it (a fused pair of
 * ops; the plain loop below does it). Streamed outputs (large calls) also prefetch the next row. */
TN_INLINE void tn_row_emit_from(tn_dtype dtype, void *out, const void *v, const int src_half, int64_t n, float inv,
                                const int round_first, int has_w, const float *w, int has_m, const void *m,
                                int has_scale, float scale, int round_mid, int stream, tn_next_row next) {
  float f32[TN_BLOCK];
  float mf[TN_BLOCK];
  uint16_t u16[TN_BLOCK];
  const size_t es = tn_elem_size(dtype);
  int64_t b = 0;
#ifdef TN_CONVERT_AVX2
  /* f16/bf16 written directly: everything up to the last multiple of 16, in registers. */
  if (round_mid) {
    /* the plain loop only */
  } else if (dtype != TN_F32 && !stream) {
    b = tn_emit_half_avx2(dtype, src_half, (uint16_t *)out, v, n, inv, round_first, has_w, w, has_m, (const uint16_t *)m, has_scale, scale,
                          0);
  } else if (dtype != TN_F32 && ((uintptr_t)out & 31u) == 0) {
    /* Streamed straight from registers: every 16 elements are one aligned 32-byte store. */
    for (; b + TN_BLOCK <= n; b += TN_BLOCK) {
      tn_prefetch_slice(next, b, b + TN_BLOCK, n);
      tn_emit_half_avx2(dtype, src_half, (uint16_t *)out + b, TN_SRC(v, src_half, b), TN_BLOCK, inv, round_first, has_w, w + (has_w ? b : 0), has_m,
                        (const uint16_t *)m + (has_m ? b : 0), has_scale, scale, 1);
    }
  } else if (dtype == TN_F32 && stream && ((uintptr_t)out & 31u) == 0) {
    for (; b + TN_BLOCK <= n; b += TN_BLOCK) {
      tn_prefetch_slice(next, b, b + TN_BLOCK, n);
      tn_emit_f32_stream_avx2((float *)out + b, (const float *)v + b, TN_BLOCK, inv, has_w, w + (has_w ? b : 0), has_m,
                              (const float *)m + (has_m ? b : 0), has_scale, scale);
    }
  } else if (dtype != TN_F32) {
    for (; b + TN_BLOCK <= n; b += TN_BLOCK) {
      tn_prefetch_slice(next, b, b + TN_BLOCK, n);
      tn_emit_half_avx2(dtype, src_half, u16, TN_SRC(v, src_half, b), TN_BLOCK, inv, round_first, has_w, w + (has_w ? b : 0), has_m,
                        (const uint16_t *)m + (has_m ? b : 0), has_scale, scale, 0);
      tn_copy_out((uint16_t *)out + b, u16, TN_BLOCK * 2, 1);
    }
  }
#endif
  for (; b < n; b += TN_BLOCK) {
    int64_t len = n - b < TN_BLOCK ? n - b : TN_BLOCK;
    if (stream) tn_prefetch_slice(next, b, b + len, n);
    void *dst = (char *)out + (size_t)b * es;
    float *r = dtype == TN_F32 && !stream ? (float *)dst : f32;
    const float *mb = NULL;
    if (has_m) mb = tn_row_as_f32(dtype, (const char *)m + (size_t)b * es, len, mf);
    for (int64_t i = 0; i < len; i++)
      r[i] = tn_emit_value(dtype, v, src_half, b + i, inv, round_first, has_w, w, has_m, has_m ? mb[i] : 1.0f,
                           has_scale, scale, round_mid);
    tn_block_out(dtype, dst, f32, u16, len, stream);
  }
}

/* The emit formula's float32 results for a whole row into out[0 .. n), before the rounding to the dtype
 * (a quantized output's source): the same operations, in the same order, as tn_row_emit_from. */
TN_INLINE void tn_row_result(tn_dtype dtype, float *out, const void *v, int src_half, int64_t n, float inv,
                             int round_first, int has_w, const float *w, int has_m, const void *m, int has_scale,
                             float scale, int round_mid) {
  float mf[TN_BLOCK];
  const size_t es = tn_elem_size(dtype);
  for (int64_t b = 0; b < n; b += TN_BLOCK) {
    const int64_t len = n - b < TN_BLOCK ? n - b : TN_BLOCK;
    const float *mb = has_m ? tn_row_as_f32(dtype, (const char *)m + (size_t)b * es, len, mf) : NULL;
    for (int64_t i = 0; i < len; i++)
      out[b + i] = tn_emit_value(dtype, v, src_half, b + i, inv, round_first, has_w, w, has_m,
                                 has_m ? mb[i] : 1.0f, has_scale, scale, round_mid);
  }
}

/* tn_row_emit_from with src_half and round_first constants in each copy, so their tests fold away (the
 * TN_CASTING_EXACT copies are the plain formula, unchanged). round_first is ignored for f32, whose
 * rounding is the identity. */
TN_INLINE void tn_row_emit(tn_dtype dtype, void *out, const void *v, int src_half, int64_t n, float inv,
                           int round_first, int has_w, const float *w, int has_m, const void *m, int has_scale,
                           float scale, int round_mid, int stream, tn_next_row next) {
  if (round_first && dtype != TN_F32) {
    if (src_half)
      tn_row_emit_from(dtype, out, v, 1, n, inv, 1, has_w, w, has_m, m, has_scale, scale, round_mid, stream, next);
    else
      tn_row_emit_from(dtype, out, v, 0, n, inv, 1, has_w, w, has_m, m, has_scale, scale, round_mid, stream, next);
  } else if (src_half) {
    tn_row_emit_from(dtype, out, v, 1, n, inv, 0, has_w, w, has_m, m, has_scale, scale, round_mid, stream, next);
  } else {
    tn_row_emit_from(dtype, out, v, 0, n, inv, 0, has_w, w, has_m, m, has_scale, scale, round_mid, stream, next);
  }
}

/* The instances of an op's row loop rows_fn(call, scratch, begin, end, dtype, has_w, has_m), one per
 * (dtype, weight or not, multiplicand or not) so that each folds its flags away, and `table`, indexed
 * [dtype][weight][multiplicand], of them (rms_norm and add_rms_norm). */
#define TN_CPU_ROWS_INSTANCE_(name, rows_fn, dt, w, m)                                  \
  static void name(const tn_cpu_call *c, float *scratch, int64_t begin, int64_t end) { \
    rows_fn(c, scratch, begin, end, dt, w, m);                                         \
  }
#define TN_CPU_ROWS_INSTANCES_(table, rows_fn, sfx, dt)           \
  TN_CPU_ROWS_INSTANCE_(table##_##sfx, rows_fn, dt, 0, 0)         \
  TN_CPU_ROWS_INSTANCE_(table##_##sfx##_w, rows_fn, dt, 1, 0)     \
  TN_CPU_ROWS_INSTANCE_(table##_##sfx##_m, rows_fn, dt, 0, 1)     \
  TN_CPU_ROWS_INSTANCE_(table##_##sfx##_w_m, rows_fn, dt, 1, 1)
#define TN_CPU_ROWS_TABLE(table, rows_fn)                                                         \
  TN_CPU_ROWS_INSTANCES_(table, rows_fn, f32, TN_F32)                                             \
  TN_CPU_ROWS_INSTANCES_(table, rows_fn, f16, TN_F16)                                             \
  TN_CPU_ROWS_INSTANCES_(table, rows_fn, bf16, TN_BF16)                                           \
  static const tn_cpu_rows_fn table[TN_DTYPE_COUNT][2][2] = {                                     \
      [TN_F32] = {{table##_f32, table##_f32_m}, {table##_f32_w, table##_f32_w_m}},                \
      [TN_F16] = {{table##_f16, table##_f16_m}, {table##_f16_w, table##_f16_w_m}},                \
      [TN_BF16] = {{table##_bf16, table##_bf16_m}, {table##_bf16_w, table##_bf16_w_m}},           \
  };

/* Suffixes an entry point with the instruction set this file is compiled for. */
#define TN_CPU_CAT2_(a, b) a##_##b
#define TN_CPU_CAT_(a, b) TN_CPU_CAT2_(a, b)
#define TN_CPU_ENTRY(name) TN_CPU_CAT_(name, TN_CPU_ISA)

#endif
