/* rms_norm with a rotary position embedding after it, on every head (a 3-D view [tokens, heads, dim], or a
 * 2-D one whose rows are the heads, each its own token): Q or K normalised and rotated in one pass. Each
 * head is reduced as rms_norm's register shape of the same G for (dtype, dim) reduces a row of dim
 * elements (dim <= TN_ROPE_MAX_DIM keeps G <= 32: a head's group is inside a warp). Two kinds of kernel:
 *
 * - The paired kernels (access mode TN_KERNEL_MODE_WHOLE; backend.c takes them for whole chunks where
 *   every pair lies in one thread's chunks: GPTJ, and NEOX with halves a multiple of GR chunks apart).
 *   A head has GR = TN_KERNEL_ROPE_PAIRED_GROUP(G, chunks) threads of TN_KERNEL_REG_CHUNKS chunks each (G
 *   or G / 2: a thread then takes two lanes' chunks, params.h).
 *   A block takes TN_KERNEL_BLOCK_OF(G) / GR heads in a row of the view, whatever their tokens, as
 *   rms_norm's kernels take the vectors of a 3-D view; its threads issue their heads' loads, then stage
 *   the cos and sin of the block's few tokens in shared memory (from the table, or from theta) while those
 *   loads are in flight, then one barrier; each pair is rotated from the registers. The staging so
 *   overlaps the loads, and the pairs need no shared-memory slot (docs/performance.md, "The rope (rope.cu,
 *   params.h)").
 * - The slot kernels (the other modes): G threads a head, each holding TN_KERNEL_CHUNKS_OF(G) chunks; a
 *   block takes whole tokens, stages their cos and sin first, and the pairs meet in a shared-memory slot of
 *   the head's group (below).
 *
 * The cos and sin are staged once per token for all heads: read from the table (the position clamped to
 * its rows), or computed from theta (inv_freq once per block, in double as the spec says, then sincos in
 * double per token).
 *
 * In the slot kernels a NEOX pair (i, i + rotary_dim / 2) may sit in chunks of different threads of the
 * group: after the reduction the group puts its head's chunks of x in a slot of shared memory (16-byte
 * stores and loads, padded against bank conflicts), and each thread normalises the partners of its chunks
 * itself (their x, the group's scale, their weight), so no normalised float crosses threads. The output
 * loop then reads its chunks from the slot too: a loop over chunks that is not unrolled (registers
 * indexed by chunk, for three pair layouts, spill heavily). A GPTJ pair (2i, 2i + 1) is always within
 * a chunk.
 *
 *   n = rms_norm(x) * (w + offset) (TN_CASTING_LLAMA: round(round((x * pre) * inv) * (w + offset)));
 *   first of a pair a' = a * cos - b * sin, second b' = b * cos + a * sin (LLAMA: each product rounded,
 *   then the sum, as torch's q * cos + rotate_half(q) * sin); elements from rotary_dim on: n. */
#include "ops.cuh"

/* Position of token `token`, int32 or int64, in the access mode. */
template <int MODE>
TN_DEV tn_i64 tn_rope_position(const tn_kernel_params &p, tn_i64 token) {
  if (tn_flag(p, TN_KERNEL_FLAG_POS_I64)) {
    const char *q = (const char *)p.positions + token * 8;
    const tn_u32 lo = tn_load_element<4, MODE>(q), hi = tn_load_element<4, MODE>(q + 4);
    return (tn_i64)(((unsigned long long)hi << 32) | lo);
  }
  return (tn_i64)(int)tn_load_element<4, MODE>((const char *)p.positions + token * 4);
}

/* The table row of a position: clamped to the table's rows (the host cannot read positions to check them). */
TN_DEV tn_i64 tn_rope_table_row(const tn_kernel_params &p, tn_i64 pos) {
  return pos < 0 ? 0 : pos >= p.cos_sin_rows ? p.cos_sin_rows - 1 : pos;
}

/* Element i of the table's row `row`, as float32 (the table is f32 or x's dtype). */
template <int DT, int MODE>
TN_DEV float tn_rope_table(const tn_kernel_params &p, tn_i64 row, int i) {
  if (tn_flag(p, TN_KERNEL_FLAG_TABLE_F32))
    return __uint_as_float(tn_load_element<4, MODE>((const char *)p.cos_sin + (row * p.cos_sin_stride + i) * 4));
  constexpr int S = tn_dt<DT>::size;
  return tn_to_f32<DT>(tn_load_element<S, MODE>((const char *)p.cos_sin + (row * p.cos_sin_stride + i) * S));
}

/* The normalised value of an element, the input of the rotation, from its x and its weight factor (the
 * weight plus offset, read only when `weighted`): ((x * pre) * inv) [* factor], each step rounded to the
 * dtype with LLAMA casting (tn_norm_value's arithmetic for a weight alone, then the rope's own rounding). */
template <int DT>
TN_DEV float tn_rope_normed(bool llama, bool weighted, float x, float factor, const tn_row_stats &st) {
  float v = (x * st.pre) * st.inv;
  if (llama) v = tn_round<DT>(v);
  if (weighted) v *= factor;
  return llama ? tn_round<DT>(v) : v;
}

/* Weight element e (f32 or x's dtype); there is a weight. */
template <int DT, int MODE>
TN_DEV float tn_rope_weight(const tn_kernel_params &p, tn_i64 e) {
  if (p.weight_f32) return __uint_as_float(tn_load_element<4, MODE>((const char *)p.weight + e * 4));
  constexpr int S = tn_dt<DT>::size;
  return tn_to_f32<DT>(tn_load_element<S, MODE>((const char *)p.weight + e * S));
}

/* The block's staged weight plus offset (float32), and inv_freq from theta (in double, as the spec says):
 * both rope kernels stage them once per block. */
template <int DT, int MODE>
TN_DEV void tn_rope_stage_weight(const tn_kernel_params &p, float *w_staged) {
  if (p.has_weight)
    for (int i = threadIdx.x; i < p.dim; i += blockDim.x) w_staged[i] = tn_rope_weight<DT, MODE>(p, i) + p.weight_offset;
}

TN_DEV void tn_rope_stage_inv_freq(const tn_kernel_params &p, float *inv_freq, int rot, int half) {
  for (int i = threadIdx.x; i < half; i += blockDim.x)
    inv_freq[i] = (float)(1.0 / pow((double)p.theta, (double)(2 * i) / (double)rot));
}

/* The rotation of a pair's element: `self` and its partner normalised, c and s the cosine and sine of the
 * pair's angle; first: whether self is the pair's first element (a' = a c - b s, else b' = b c + a s). */
template <int DT>
TN_DEV float tn_rope_rotate(bool llama, float self, float partner, float c, float s, bool first) {
  if (!llama) return first ? self * c - partner * s : self * c + partner * s;
  const float sc = tn_round<DT>(self * c);
  const float ps = first ? tn_round<DT>((-partner) * s) : tn_round<DT>(partner * s);
  return tn_round<DT>(sc + ps);
}

/* Four floats read as one 16-byte access (shared memory rows aligned to 16 bytes), and the 8-byte
 * accesses of the paired kernels. */
struct __align__(16) tn_f32x4 {
  float v[4];
};
struct __align__(8) tn_f32x2 {
  float v[2];
};

template <int DT, int G, int MODE>
TN_DEV void tn_rope_rows(const tn_kernel_params &p) {
  constexpr int K = TN_KERNEL_CHUNKS_OF(G), V = tn_dt<DT>::per_chunk, S = tn_dt<DT>::size;
  constexpr int SWAP = TN_KERNEL_ROPE_SLOT_CHUNKS(G);
  const int rot = p.rotary_dim, half = rot / 2, tpb = p.tokens_per_block;
  const bool gptj = tn_flag(p, TN_KERNEL_FLAG_ROPE_GPTJ), table = tn_flag(p, TN_KERNEL_FLAG_ROPE_TABLE),
             llama = tn_flag(p, TN_KERNEL_FLAG_LLAMA);
  const tn_i64 tokens = p.rows, heads = p.heads, chunks = (p.dim + V - 1) / V;
  const int group = threadIdx.x / G, groups = blockDim.x / G, t = threadIdx.x % G;
  /* Dynamic shared memory: the groups' swap slots, the tokens' cos and sin rows, inv_freq (theta). */
  tn_chunk *swap = reinterpret_cast<tn_chunk *>(tn_dynamic_smem) + (tn_i64)group * SWAP;
  float *cs = reinterpret_cast<float *>(tn_dynamic_smem + (size_t)groups * SWAP * sizeof(tn_chunk));
  float *inv_freq = cs + (size_t)tpb * rot;
  /* The weight plus offset as float32, once per block, the factor every path reads (16-byte aligned for the
   * paired path, where rotary_dim is a multiple of 8): each element then costs one shared-memory read
   * instead of a global read, a conversion and an addition (docs/performance.md, "The rope (rope.cu,
   * params.h)"). */
  float *w_staged = inv_freq + (((size_t)half + 3) & ~(size_t)3); /* backend.c's rope_smem sizes it alike */
  tn_rope_stage_weight<DT, MODE>(p, w_staged);
  /* Element e's factor in the slot path. A chunk may pass dim: the host sizes the staged weight in whole
   * chunks, but only the first dim are written, and the elements past dim are never stored. */
  const auto factor = [&](int e) { return p.has_weight ? w_staged[e] : 0.0f; };
  const unsigned mask = tn_group_mask<G>();
  int turn = 0;
  float unused_partials[1]; /* G <= 32: the group's sums are shuffles alone */

  if (!table) tn_rope_stage_inv_freq(p, inv_freq, rot, half);

  for (tn_i64 tok0 = (tn_i64)blockIdx.x * tpb; tok0 < tokens; tok0 += (tn_i64)gridDim.x * tpb) {
    const int ntok = (int)(tokens - tok0 < tpb ? tokens - tok0 : tpb);
    __syncthreads(); /* inv_freq is written; the previous tokens' cos and sin are no longer read */
    for (int i = threadIdx.x; i < ntok * half; i += blockDim.x) {
      const int tt = i / half, j = i - tt * half;
      const tn_i64 pos = tn_rope_position<MODE>(p, tok0 + tt);
      float c, s;
      if (table) {
        const tn_i64 row = tn_rope_table_row(p, pos);
        c = tn_rope_table<DT, MODE>(p, row, j);
        s = tn_rope_table<DT, MODE>(p, row, half + j);
      } else {
        const float angle = (float)pos * inv_freq[j];
        double sd, cd;
        sincos((double)angle, &sd, &cd);
        c = (float)cd;
        s = (float)sd;
      }
      cs[tt * rot + j] = c;
      cs[tt * rot + half + j] = s;
    }
    __syncthreads();

    const tn_i64 vectors = (tn_i64)ntok * heads;
    for (tn_i64 v = group; v < vectors; v += groups) {
      const tn_i64 tt = v / heads, h = v - tt * heads;
      char *y = (char *)p.y + ((tok0 + tt) * p.y_stride + h * p.y_head_stride) * S;
      const float *cos_row = cs + tt * rot;

      /* The head in registers, reduced as rms_norm's register shape of this G reduces a row. */
      const char *x = (const char *)p.x + ((tok0 + tt) * p.x_stride + h * p.x_head_stride) * S;
      tn_chunk q[K];
#pragma unroll
      for (int k = 0; k < K; k++) {
        const tn_i64 c = (tn_i64)k * G + t;
        q[k] = c < chunks ? tn_load_chunk<DT, MODE>(x, c, p.dim) : tn_chunk_zero();
      }

      /* Every chunk of the head to the group's slot, where each thread finds its chunks' partners; a
       * rescaled row's second pass reads its chunks there too (kept in registers for it, beside the other
       * pass's conversions, the head would spill). */
#pragma unroll
      for (int k = 0; k < K; k++) swap[k * G + t] = q[k];
      float acc = 0.0f;
#pragma unroll
      for (int k = 0; k < K; k++) acc = tn_chunk_sum_squares<DT>(q[k], acc, 1.0f);
      __syncwarp(mask);
      const tn_row_stats st = tn_rms_reduce::finish<DT>(
          p, tn_group_sum<G>(acc, unused_partials, &turn),
          [&](float u) { return tn_group_sum<G>(u, unused_partials, &turn); },
          tn_each_wide<tn_chunk, G, K>{swap, t, chunks});

      if (!gptj && half % (V * G) == 0) {
        /* NEOX with whole chunks of partners a multiple of G chunks apart: a chunk's partners are in one
         * chunk of the same thread, so each pair of chunks is normalised and rotated once, together. */
#pragma unroll 1
        for (tn_i64 c = t; c < chunks; c += G) {
          const int first_e = (int)c * V;
          if (first_e >= half && first_e < rot) continue; /* done with its first half */
          float a[V], b[V];
          tn_chunk_to_f32<DT>(swap[c], a);
          const bool rotated = first_e < rot;
          const tn_i64 pc = rotated ? c + half / V : c;
          tn_chunk_to_f32<DT>(swap[pc], b);
#pragma unroll
          for (int e0 = 0; e0 < V; e0 += 4) {
            tn_f32x4 wa = {}, wb = {};
            if (p.has_weight) {
              wa = *reinterpret_cast<const tn_f32x4 *>(w_staged + first_e + e0);
              wb = *reinterpret_cast<const tn_f32x4 *>(w_staged + pc * V + e0);
            }
#pragma unroll
            for (int e = 0; e < 4; e++) {
              a[e0 + e] = tn_rope_normed<DT>(llama, p.has_weight, a[e0 + e], wa.v[e], st);
              b[e0 + e] = tn_rope_normed<DT>(llama, p.has_weight, b[e0 + e], wb.v[e], st);
            }
          }
          if (!rotated) {
            tn_store_chunk<DT, MODE>(y, c, p.dim, tn_chunk_from_f32<DT>(a));
            continue;
          }
#pragma unroll
          for (int e = 0; e < V; e++) {
            const float co = cos_row[first_e + e], si = cos_row[half + first_e + e], na = a[e];
            a[e] = tn_rope_rotate<DT>(llama, na, b[e], co, si, true);
            b[e] = tn_rope_rotate<DT>(llama, b[e], na, co, si, false);
          }
          tn_store_chunk<DT, MODE>(y, c, p.dim, tn_chunk_from_f32<DT>(a));
          tn_store_chunk<DT, MODE>(y, pc, p.dim, tn_chunk_from_f32<DT>(b));
        }
        __syncwarp(mask); /* the slot is the group's next head's */
        continue;
      }
#pragma unroll 1
      for (tn_i64 c = t; c < chunks; c += G) {
        float f[V], out[V];
        const int first_e = (int)c * V;
        tn_chunk_to_f32<DT>(swap[c], f);
#pragma unroll
        for (int e = 0; e < V; e++) f[e] = tn_rope_normed<DT>(llama, p.has_weight, f[e], factor(first_e + e), st);
        if (first_e >= rot) {
#pragma unroll
          for (int e = 0; e < V; e++) out[e] = f[e];
        } else if (gptj) {
          /* Pairs (2i, 2i + 1): within the chunk (chunks start at even elements, rotary_dim is even). */
#pragma unroll
          for (int e = 0; e < V; e++) {
            const int i = (first_e + e) >> 1;
            out[e] = first_e + e < rot ? tn_rope_rotate<DT>(llama, f[e], f[e ^ 1], cos_row[i], cos_row[half + i], (e & 1) == 0)
                                       : f[e];
          }
        } else if (half % V == 0) {
          /* The partners of this chunk's elements fill one chunk, at the same places. */
          const bool first = first_e < half;
          const tn_i64 pc = first ? c + half / V : c - half / V;
          float pf[V];
          tn_chunk_to_f32<DT>(swap[pc], pf);
          const int i0 = first ? first_e : first_e - half;
#pragma unroll
          for (int e = 0; e < V; e++) {
            const float partner = tn_rope_normed<DT>(llama, p.has_weight, pf[e], factor((int)pc * V + e), st);
            out[e] = tn_rope_rotate<DT>(llama, f[e], partner, cos_row[i0 + e], cos_row[half + i0 + e], first);
          }
        } else {
          /* rotary_dim / 2 is not a whole number of chunks: partners element by element. */
#pragma unroll
          for (int e = 0; e < V; e++) {
            const int at = first_e + e;
            out[e] = f[e];
            if (at >= rot) continue;
            const bool first = at < half;
            const int pe = first ? at + half : at - half, i = first ? at : pe;
            const float px = tn_to_f32<DT>(tn_chunk_bits<DT>(swap[pe / V], pe % V));
            const float partner = tn_rope_normed<DT>(llama, p.has_weight, px, factor(pe), st);
            out[e] = tn_rope_rotate<DT>(llama, f[e], partner, cos_row[i], cos_row[half + i], first);
          }
        }
        tn_store_chunk<DT, MODE>(y, c, p.dim, tn_chunk_from_f32<DT>(out));
      }
      __syncwarp(mask); /* the slot is the group's next head's */
    }
  }
}

/* ---- the paired kernels (TN_KERNEL_MODE_WHOLE) ---- */

/* Floats i .. i + N - 1 (N = 2 or 4) of a shared-memory array, in one access (aligned to N floats). */
template <int N>
TN_DEV void tn_rope_floats(const float *src, float *out) {
  if constexpr (N == 2) {
    const tn_f32x2 v = *reinterpret_cast<const tn_f32x2 *>(src);
    out[0] = v.v[0], out[1] = v.v[1];
  } else {
    const tn_f32x4 v = *reinterpret_cast<const tn_f32x4 *>(src);
#pragma unroll
    for (int e = 0; e < 4; e++) out[e] = v.v[e];
  }
}

/* Elements e0 .. e0 + 3 of a chunk: read as float32, written from float32 (e0 a multiple of 4). */
template <int DT>
TN_DEV void tn_chunk_get4(const tn_chunk &q, int e0, float *f) {
#pragma unroll
  for (int j = 0; j < 4; j++) f[j] = tn_to_f32<DT>(tn_chunk_bits<DT>(q, e0 + j));
}

template <int DT>
TN_DEV void tn_chunk_put4(tn_chunk &q, int e0, const float *f) {
  if (DT == TN_KERNEL_F32) {
#pragma unroll
    for (int j = 0; j < 4; j++) q.w[e0 + j] = __float_as_uint(f[j]);
  } else {
    q.w[e0 / 2] = tn_pack2<DT>(f[0], f[1]);
    q.w[e0 / 2 + 1] = tn_pack2<DT>(f[2], f[3]);
  }
}

/* What a head's output reads from the block's shared memory: its token's cos and sin row (the cosines,
 * then the sines) and the weight plus offset (NULL without a weight). */
struct tn_rope_staged {
  const float *cs, *w;
};

/* Elements e0 .. e0 + 3 of chunk c, held in q, normalised (the input of the rotation). Four at a time, so
 * that a pair of chunks' values, weights, cosines and sines fit the registers with the head's chunks. */
template <int DT, bool LLAMA>
TN_DEV void tn_rope_normed4(const tn_kernel_params &p, const tn_rope_staged &in, const tn_chunk &q, tn_i64 c,
                            int e0, const tn_row_stats &st, float *f) {
  float w[4];
  tn_chunk_get4<DT>(q, e0, f);
  if (p.has_weight) tn_rope_floats<4>(in.w + c * tn_dt<DT>::per_chunk + e0, w);
#pragma unroll
  for (int e = 0; e < 4; e++) f[e] = tn_rope_normed<DT>(LLAMA, p.has_weight, f[e], w[e], st);
}

/* NEOX with the partners of chunk k * G + t in chunk (k + D) * G + t of the same thread (rotary_dim / 2 =
 * D * G chunks): chunks k < D are the first halves, k < 2 D rotated, the rest past rotary_dim. */
template <int DT, int G, int D, bool LLAMA>
TN_DEV void tn_rope_paired_neox(const tn_kernel_params &p, const tn_rope_staged &in, char *y, const tn_chunk *q,
                                int t, const tn_row_stats &st) {
  constexpr int K = TN_KERNEL_REG_CHUNKS, V = tn_dt<DT>::per_chunk;
  constexpr int MODE = TN_KERNEL_MODE_WHOLE;
  const int half = p.rotary_dim / 2;
  const tn_i64 chunks = p.dim / V;
#pragma unroll
  for (int k = 0; k < D; k++) {
    const tn_i64 c = (tn_i64)k * G + t, pc = c + D * G;
    tn_chunk ya, yb;
#pragma unroll
    for (int e0 = 0; e0 < V; e0 += 4) {
      float a[4], b[4], co[4], si[4];
      tn_rope_floats<4>(in.cs + c * V + e0, co);
      tn_rope_floats<4>(in.cs + half + c * V + e0, si);
      tn_rope_normed4<DT, LLAMA>(p, in, q[k], c, e0, st, a);
      tn_rope_normed4<DT, LLAMA>(p, in, q[k + D], pc, e0, st, b);
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const float na = a[e];
        a[e] = tn_rope_rotate<DT>(LLAMA, na, b[e], co[e], si[e], true);
        b[e] = tn_rope_rotate<DT>(LLAMA, b[e], na, co[e], si[e], false);
      }
      tn_chunk_put4<DT>(ya, e0, a);
      tn_chunk_put4<DT>(yb, e0, b);
    }
    tn_store_chunk<DT, MODE>(y, c, p.dim, ya);
    tn_store_chunk<DT, MODE>(y, pc, p.dim, yb);
  }
#pragma unroll
  for (int k = 2 * D; k < K; k++) {
    const tn_i64 c = (tn_i64)k * G + t;
    if (c >= chunks) continue;
    tn_chunk yc;
#pragma unroll
    for (int e0 = 0; e0 < V; e0 += 4) {
      float f[4];
      tn_rope_normed4<DT, LLAMA>(p, in, q[k], c, e0, st, f);
      tn_chunk_put4<DT>(yc, e0, f);
    }
    tn_store_chunk<DT, MODE>(y, c, p.dim, yc);
  }
}

/* GPTJ: the pairs (2i, 2i + 1) of a chunk are its own; a chunk is rotated whole or not at all (rotary_dim
 * a multiple of a chunk's elements). */
template <int DT, int G, bool LLAMA>
TN_DEV void tn_rope_paired_gptj(const tn_kernel_params &p, const tn_rope_staged &in, char *y, const tn_chunk *q,
                                int t, const tn_row_stats &st) {
  constexpr int K = TN_KERNEL_REG_CHUNKS, V = tn_dt<DT>::per_chunk;
  const int half = p.rotary_dim / 2;
  const tn_i64 chunks = p.dim / V;
#pragma unroll
  for (int k = 0; k < K; k++) {
    const tn_i64 c = (tn_i64)k * G + t;
    if (c >= chunks) continue;
    const bool rotated = c * V < p.rotary_dim;
    tn_chunk yc;
#pragma unroll
    for (int e0 = 0; e0 < V; e0 += 4) {
      float f[4];
      tn_rope_normed4<DT, LLAMA>(p, in, q[k], c, e0, st, f);
      if (rotated) {
        float co[2], si[2];
        tn_rope_floats<2>(in.cs + (c * V + e0) / 2, co);
        tn_rope_floats<2>(in.cs + half + (c * V + e0) / 2, si);
#pragma unroll
        for (int e = 0; e < 4; e += 2) {
          const float first = f[e];
          f[e] = tn_rope_rotate<DT>(LLAMA, first, f[e + 1], co[e / 2], si[e / 2], true);
          f[e + 1] = tn_rope_rotate<DT>(LLAMA, f[e + 1], first, co[e / 2], si[e / 2], false);
        }
      }
      tn_chunk_put4<DT>(yc, e0, f);
    }
    tn_store_chunk<DT, TN_KERNEL_MODE_WHOLE>(y, c, p.dim, yc);
  }
}

template <int DT, int G, bool LLAMA>
TN_DEV void tn_rope_paired_out(const tn_kernel_params &p, bool gptj, int d, const tn_rope_staged &in, char *y,
                               const tn_chunk *q, int t, const tn_row_stats &st) {
  constexpr int K = TN_KERNEL_REG_CHUNKS;
  if (gptj) tn_rope_paired_gptj<DT, G, LLAMA>(p, in, y, q, t, st);
  else if (d == K / 2) tn_rope_paired_neox<DT, G, K / 2, LLAMA>(p, in, y, q, t, st);
  else tn_rope_paired_neox<DT, G, 1, LLAMA>(p, in, y, q, t, st);
}

/* The cos and sin rows of tokens tok0 .. tok0 + ntok - 1 (the cosines, then the sines, rotary_dim floats
 * a token) into cs from the table, each position clamped to its rows; and the rows of tokens ahead0 ..
 * ahead0 + ahead_tokens - 1 to L2 (the tokens of the block about a wave of blocks on, whose staging then
 * waits on two reads from L2, the position and its row, instead of a read from memory after one from L2;
 * docs/performance.md, "The rope (rope.cu, params.h)"). Their positions are read before this block's
 * rows, and their lines fetched after, so that nothing here waits on them. */
template <int DT>
TN_DEV void tn_rope_stage_table(const tn_kernel_params &p, float *cs, tn_i64 tok0, int ntok, tn_i64 ahead0,
                                int ahead_tokens) {
  constexpr int MODE = TN_KERNEL_MODE_WHOLE;
  const int rot = p.rotary_dim, quads = rot / 4;
  const int size = tn_flag(p, TN_KERNEL_FLAG_TABLE_F32) ? 4 : tn_dt<DT>::size, lines = (rot * size + 127) / 128;
  const bool fetch_ahead = (int)threadIdx.x < ahead_tokens * lines;
  const tn_i64 ahead_pos = fetch_ahead ? tn_rope_position<MODE>(p, ahead0 + threadIdx.x / lines) : 0;
  for (int i = threadIdx.x; i < ntok * quads; i += blockDim.x) {
    const int tt = i / quads, j = (i - tt * quads) * 4;
    const tn_i64 pos = tn_rope_position<MODE>(p, tok0 + tt);
    const tn_i64 row = tn_rope_table_row(p, pos);
    tn_f32x4 f;
#pragma unroll
    for (int e = 0; e < 4; e++) f.v[e] = tn_rope_table<DT, MODE>(p, row, j + e);
    *reinterpret_cast<tn_f32x4 *>(cs + tt * rot + j) = f;
  }
  if (fetch_ahead) {
    const tn_i64 row = tn_rope_table_row(p, ahead_pos);
    tn_prefetch_l2((const char *)p.cos_sin + (row * p.cos_sin_stride * size + (threadIdx.x % lines) * 128));
  }
}

/* The same rows computed from theta: angle = position * inv_freq[j] in float32, its sine and cosine in
 * double, as the CPU backend computes them. */
template <int DT>
TN_DEV void tn_rope_stage_theta(const tn_kernel_params &p, float *cs, const float *inv_freq, tn_i64 tok0, int ntok) {
  const int rot = p.rotary_dim, half = rot / 2;
  for (int i = threadIdx.x; i < ntok * half; i += blockDim.x) {
    const int tt = i / half, j = i - tt * half;
    const float angle = (float)tn_rope_position<TN_KERNEL_MODE_WHOLE>(p, tok0 + tt) * inv_freq[j];
    double sd, cd;
    sincos((double)angle, &sd, &cd);
    cs[tt * rot + j] = (float)cd;
    cs[tt * rot + half + j] = (float)sd;
  }
}

/* The whole-chunk kernels (TN_KERNEL_MODE_WHOLE), taken when every pair lies in one thread's chunks
 * (backend.c): each head is rms_norm's register row (the same group, the same order), its pairs rotated
 * from the registers. A block takes RPB heads in a row of the 3-D view, whatever their tokens, as
 * rms_norm's kernels take its vectors: its threads load their heads first, then stage the cos and sin
 * of the block's few tokens (p.tokens_per_block rows at most: backend.c) and the weight plus offset in
 * shared memory while those loads are in flight, then one barrier. */
template <int DT, int G, int GR>
TN_DEV void tn_rope_paired(const tn_kernel_params &p) {
  /* GR threads a head, each holding chunks k * GR + t (k < K); with FOLD = 2 those of k even are lane t's of
   * the G-lane order, those of k odd lane t + GR's (a lane's chunks past those are zeros, whose squares
   * add exactly nothing). */
  constexpr int FOLD = G / GR;
  constexpr int K = TN_KERNEL_REG_CHUNKS, V = tn_dt<DT>::per_chunk, S = tn_dt<DT>::size;
  constexpr int MODE = TN_KERNEL_MODE_WHOLE, RPB = TN_KERNEL_BLOCK_OF(G) / GR;
  static_assert(FOLD == 1 || FOLD == 2, "a thread holds one lane's chunks or two lanes'");
  const bool gptj = tn_flag(p, TN_KERNEL_FLAG_ROPE_GPTJ), llama = tn_flag(p, TN_KERNEL_FLAG_LLAMA),
             table = tn_flag(p, TN_KERNEL_FLAG_ROPE_TABLE);
  const tn_i64 heads = p.heads, vectors = p.rows * heads, chunks = p.dim / V;
  const int rot = p.rotary_dim, half = rot / 2, t = threadIdx.x % GR, d = half / (V * GR);
  /* Dynamic shared memory: the weight plus offset (dim floats), inv_freq (theta: half floats, padded to
   * 4), then tokens_per_block rows of rot floats. */
  float *w_staged = reinterpret_cast<float *>(tn_dynamic_smem);
  float *inv_freq = w_staged + p.dim;
  float *cs = inv_freq + ((half + 3) & ~3);
  tn_rope_stage_weight<DT, MODE>(p, w_staged);
  if (!table) tn_rope_stage_inv_freq(p, inv_freq, rot, half);
  int turn = 0;
  float unused_partials[1]; /* G <= 32: the group's sums are shuffles alone */
  const auto token_of = [&](tn_i64 v) {
    return ((unsigned long long)v >> 32) == 0 && ((unsigned long long)heads >> 32) == 0
               ? (tn_i64)((unsigned)v / (unsigned)heads)
               : v / heads;
  };
  for (tn_i64 first = (tn_i64)blockIdx.x * RPB; first < vectors; first += (tn_i64)gridDim.x * RPB) {
    const tn_i64 v = first + threadIdx.x / GR, last = (first + RPB < vectors ? first + RPB : vectors) - 1;
    const bool active = v < vectors;
    const tn_i64 tok = token_of(active ? v : last), tok0 = token_of(first);
    const char *x = (const char *)p.x + (tok * p.x_stride + (v - tok * heads) * p.x_head_stride) * S;
    tn_chunk q[K];
#pragma unroll
    for (int k = 0; k < K; k++) {
      const tn_i64 c = (tn_i64)k * GR + t;
      q[k] = active && c < chunks ? tn_load_chunk<DT, MODE>(x, c, p.dim) : tn_chunk_zero();
    }
    /* The block's tokens' cos and sin (the barrier first: inv_freq is written, and the previous heads'
     * rows are no longer read). */
    const int ntok = (int)(token_of(last) - tok0 + 1);
    __syncthreads();
    if (table) {
      const tn_i64 ahead = first + (tn_i64)p.ahead_blocks * RPB;
      tn_i64 ahead0 = 0;
      int ahead_tokens = 0;
      if (p.ahead_blocks > 0 && ahead < vectors) {
        ahead0 = token_of(ahead);
        ahead_tokens = (int)(token_of((ahead + RPB < vectors ? ahead + RPB : vectors) - 1) - ahead0 + 1);
      }
      tn_rope_stage_table<DT>(p, cs, tok0, ntok, ahead0, ahead_tokens);
    } else {
      tn_rope_stage_theta<DT>(p, cs, inv_freq, tok0, ntok);
    }
    __syncthreads();
    if (!active) continue;
    /* This thread's part of the head's sum of (x * k)^2 in the order of G lanes: its lane's (or, folded,
     * lane t's plus lane t + GR's, the butterfly's first step), for tn_group_sum<GR> to finish. */
    const auto squares = [&](float k) {
      float lane[FOLD] = {};
#pragma unroll
      for (int i = 0; i < K; i++) lane[i % FOLD] = tn_chunk_sum_squares<DT>(q[i], lane[i % FOLD], k);
      return FOLD == 1 ? lane[0] : lane[0] + lane[FOLD - 1];
    };
    const auto group_sum = [&](float u) { return tn_group_sum<GR>(u, unused_partials, &turn); };
    tn_row_stats st;
    st.mean = 0.0f;
    st.inv = tn_row_inv(group_sum(squares(1.0f)), p, &st.pre, group_sum, squares);
    char *y = (char *)p.y + (tok * p.y_stride + (v - tok * heads) * p.y_head_stride) * S;
    const tn_rope_staged in = {cs + (tok - tok0) * rot, w_staged};
    /* The casting chosen once (per-element branches keep the compiler from scheduling across them). */
    if (llama) tn_rope_paired_out<DT, GR, true>(p, gptj, d, in, y, q, t, st);
    else tn_rope_paired_out<DT, GR, false>(p, gptj, d, in, y, q, t, st);
  }
}
static_assert(TN_KERNEL_REG_CHUNKS == 4, "tn_rope_paired names the pair distances of four chunks: 1 and 2");

/* The paired kernel of G for the head's chunks: G / 2 threads a head or G, as params.h's
 * TN_KERNEL_ROPE_PAIRED_GROUP says (backend.c plans the launch by it); only the variants it can name for
 * this G are compiled (G / 2 alone where G's shape holds two chunks a thread, G alone at G = 1). */
template <int DT, int G>
TN_DEV void tn_rope_paired_of(const tn_kernel_params &p) {
  constexpr bool FOLDED_ONLY = G > 1 && TN_KERNEL_CHUNKS_OF(G) < TN_KERNEL_REG_CHUNKS;
  if constexpr (G > 1) {
    if (FOLDED_ONLY || TN_KERNEL_ROPE_PAIRED_GROUP(G, p.dim / tn_dt<DT>::per_chunk) == G / 2)
      return tn_rope_paired<DT, G, G / 2>(p);
  }
  if constexpr (!FOLDED_ONLY) tn_rope_paired<DT, G, G>(p);
}

/* G <= 32 threads per head. The slot kernels: blocks of at most TN_KERNEL_ROPE_MAX_BLOCK threads, with
 * the register cap of the other row kernels (64 a thread); the paired ones: TN_KERNEL_BLOCK_OF(G)
 * threads, RESIDENT of them an SM. */
#ifndef TN_KERNEL_ROPE_PAIRED_RESIDENT
#define TN_KERNEL_ROPE_PAIRED_RESIDENT 896
#endif
template <int DT, int G, int MODE>
__global__ void __launch_bounds__(MODE == TN_KERNEL_MODE_WHOLE ? TN_KERNEL_BLOCK_OF(G) : TN_KERNEL_ROPE_MAX_BLOCK,
                                  MODE == TN_KERNEL_MODE_WHOLE ? TN_KERNEL_ROPE_PAIRED_RESIDENT / TN_KERNEL_BLOCK_OF(G)
                                                               : TN_KERNEL_MIN_RESIDENT / TN_KERNEL_ROPE_MAX_BLOCK)
    tn_rope_registers(const tn_kernel_params p) {
  tn_pdl_wait();
  if constexpr (MODE == TN_KERNEL_MODE_WHOLE) tn_rope_paired_of<DT, G>(p);
  else tn_rope_rows<DT, G, MODE>(p);
  tn_pdl_launch_dependents();
}
