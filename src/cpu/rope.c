/* rms_norm with a rotary position embedding fused after it (Q and K heads in place in a packed QKV
 * buffer): on each vector (a head of a row of a 3-D view, or a row), n = rms_norm(x) * (w + offset), then
 * the first rotary_dim elements are rotated in pairs by the angles of the row's position.
 *
 * dim is at most TN_ROPE_MAX_DIM, so a whole head fits in the stack buffers below: a pair's two elements
 * may be half a head apart (NEOX), and the head is finished in float32 before it is written once. */
#include "row_kernels.h"

#if TN_ROPE_MAX_DIM > TN_BLOCK
#error "a rope head must fit in one block"
#endif

/* The row's position, int32 or int64. */
TN_INLINE int64_t rope_position(const tn_rope *rope, int64_t r) {
  if (rope->positions_i64) return ((const int64_t *)rope->positions)[r];
  return ((const int32_t *)rope->positions)[r];
}

/* The cosines then the sines of the half pairs at a position, in cs[0, half) and cs[half, 2 half): read
 * from the table's row (values as given, f32 or x's dtype), or computed from the frequencies the backend
 * derived from theta: angle = float(position) * inv_freq[i] in float32, cos and sin in double, each
 * rounded to float32 (the same libm calls on every build, so the bits do not depend on the ISA). */
TN_INLINE void rope_cos_sin(const tn_cpu_call *c, int64_t pos, int64_t half, float *cs) {
  const tn_tensor *table = c->args->rope.cos_sin;
  if (table != NULL) {
    const float *f = tn_row_as_f32(table->dtype, tn_row_ptr(table, pos), 2 * half, cs);
    if (f != cs) memcpy(cs, f, (size_t)(2 * half) * sizeof *cs);
    return;
  }
  const float p = (float)pos;
  for (int64_t i = 0; i < half; i++) {
    const float angle = p * c->rope_inv_freq[i];
    cs[i] = (float)cos((double)angle);
    cs[half + i] = (float)sin((double)angle);
  }
}

TN_INLINE void rope_rows(const tn_cpu_call *c, float *scratch, int64_t begin, int64_t end, tn_dtype dtype,
                         int has_w, int gptj, int llama) {
  const tn_op_args *a = c->args;
  const tn_rope *rope = &a->rope;
  const int64_t dim = a->x->dim, heads = a->x->heads > 1 ? a->x->heads : 1;
  const int64_t rot = rope->rotary_dim != 0 ? rope->rotary_dim : dim, half = rot / 2;
  float cs[TN_ROPE_MAX_DIM], nv[TN_ROPE_MAX_DIM], out[TN_ROPE_MAX_DIM];
  float pa[TN_ROPE_MAX_DIM / 2], pb[TN_ROPE_MAX_DIM / 2], ra[TN_ROPE_MAX_DIM / 2], rb[TN_ROPE_MAX_DIM / 2];
  float t1[TN_ROPE_MAX_DIM / 2], t2[TN_ROPE_MAX_DIM / 2];
  uint16_t u16[TN_ROPE_MAX_DIM];
  int64_t cached_row = -1; /* the heads of a row share its position: cos and sin are computed once */
  for (int64_t v = begin; v < end; v++) {
    const int64_t r = v / heads;
    if (r != cached_row) {
      rope_cos_sin(c, rope_position(rope, r), half, cs);
      cached_row = r;
    }
    /* n = (x * inv) [rounded] * w [rounded]: the normalised head, as rms_norm's emit forms it. */
    const tn_row_source src = tn_row_pass1(dtype, tn_vec_ptr(a->x, v), dim, (float)dim, a->eps, scratch,
                                           TN_SCALE_RSQRT);
    if (src.half)
      tn_half_to_f32_block(dtype, (const uint16_t *)src.v, nv, dim);
    else
      memcpy(nv, src.v, (size_t)dim * sizeof *nv);
    for (int64_t i = 0; i < dim; i++) nv[i] *= src.inv;
    if (llama) tn_round_block(dtype, nv, u16, dim);
    if (has_w) {
      for (int64_t i = 0; i < dim; i++) nv[i] *= c->weight[i];
      if (llama) tn_round_block(dtype, nv, u16, dim);
    }
    /* The pairs (a, b): split halves (NEOX) or neighbours (GPTJ), gathered into two rows. */
    const float *A = nv, *B = nv + half;
    if (gptj) {
      for (int64_t i = 0; i < half; i++) {
        pa[i] = nv[2 * i];
        pb[i] = nv[2 * i + 1];
      }
      A = pa;
      B = pb;
    }
    const float *co = cs, *si = cs + half;
    if (llama) {
      /* HF's q * cos + rotate_half(q) * sin with torch's roundings: each product rounded to the dtype,
       * then their sum (rounded once more on the way out). rotate_half gives -b for a, a for b. */
      for (int64_t i = 0; i < half; i++) {
        t1[i] = A[i] * co[i];
        t2[i] = (-B[i]) * si[i];
      }
      tn_round_block(dtype, t1, u16, half);
      tn_round_block(dtype, t2, u16, half);
      for (int64_t i = 0; i < half; i++) ra[i] = t1[i] + t2[i];
      for (int64_t i = 0; i < half; i++) {
        t1[i] = B[i] * co[i];
        t2[i] = A[i] * si[i];
      }
      tn_round_block(dtype, t1, u16, half);
      tn_round_block(dtype, t2, u16, half);
      for (int64_t i = 0; i < half; i++) rb[i] = t1[i] + t2[i];
    } else {
      for (int64_t i = 0; i < half; i++) {
        ra[i] = A[i] * co[i] - B[i] * si[i];
        rb[i] = B[i] * co[i] + A[i] * si[i];
      }
    }
    if (gptj) {
      for (int64_t i = 0; i < half; i++) {
        out[2 * i] = ra[i];
        out[2 * i + 1] = rb[i];
      }
    } else {
      memcpy(out, ra, (size_t)half * sizeof *out);
      memcpy(out + half, rb, (size_t)half * sizeof *out);
    }
    memcpy(out + rot, nv + rot, (size_t)(dim - rot) * sizeof *out); /* pass through, normalised */
    tn_row_out(dtype, tn_vec_ptr(a->y, v), out, u16, dim, c->stream);
  }
  tn_stream_fence(c->stream);
}

#define ROPE_INSTANCE_(name, dt, w, gptj, llama)                                       \
  static void name(const tn_cpu_call *c, float *scratch, int64_t begin, int64_t end) { \
    rope_rows(c, scratch, begin, end, dt, w, gptj, llama);                             \
  }
#define ROPE_INSTANCES_(sfx, dt, llama)                  \
  ROPE_INSTANCE_(rope_##sfx, dt, 0, 0, llama)           \
  ROPE_INSTANCE_(rope_##sfx##_w, dt, 1, 0, llama)       \
  ROPE_INSTANCE_(rope_##sfx##_gptj, dt, 0, 1, llama)    \
  ROPE_INSTANCE_(rope_##sfx##_w_gptj, dt, 1, 1, llama)
ROPE_INSTANCES_(f32, TN_F32, 0) /* rounding to f32 is the identity: one set serves both castings */
ROPE_INSTANCES_(f16, TN_F16, 0)
ROPE_INSTANCES_(f16_llama, TN_F16, 1)
ROPE_INSTANCES_(bf16, TN_BF16, 0)
ROPE_INSTANCES_(bf16_llama, TN_BF16, 1)

#define ROPE_SET_(sfx) {{rope_##sfx, rope_##sfx##_gptj}, {rope_##sfx##_w, rope_##sfx##_w_gptj}}
/* [dtype][llama][weight][gptj] */
static const tn_cpu_rows_fn rope_table[TN_DTYPE_COUNT][2][2][2] = {
    [TN_F32] = {ROPE_SET_(f32), ROPE_SET_(f32)},
    [TN_F16] = {ROPE_SET_(f16), ROPE_SET_(f16_llama)},
    [TN_BF16] = {ROPE_SET_(bf16), ROPE_SET_(bf16_llama)},
};

void TN_CPU_ENTRY(tn_cpu_rms_norm_rope_rows)(const tn_cpu_call *c, float *scratch, int64_t begin, int64_t end) {
  const tn_op_args *a = c->args;
  rope_table[a->x->dtype][a->casting == TN_CASTING_LLAMA][c->weight != NULL][a->rope.style == TN_ROPE_GPTJ](
      c, scratch, begin, end);
}
