/* rms_norm with a rotary position embedding after it, on every head (a 3-D view [tokens, heads, dim], or a
 * 2-D one whose rows are the heads, each its own token): Q or K normalised and rotated in one pass.
 *
 * Shape: a block takes tokens_per_block whole tokens (all their heads; at least TN_KERNEL_ROPE_MIN_BLOCK
 * threads' worth of heads, at most TN_KERNEL_ROPE_MAX_BLOCK threads, looping over more), G threads per
 * head, each holding TN_KERNEL_REG_CHUNKS chunks in registers: the register shape of rms_norm with the same
 * G for (dtype, dim), so a head is reduced in the same order as rms_norm reduces a row of dim elements
 * (dim <= TN_ROPE_MAX_DIM keeps G <= 32: a head's group is inside a warp). The block first stages the
 * cos and sin of its tokens in shared memory, once per token for all heads: read from the table (the
 * position clamped to its rows), or computed from theta (inv_freq once per block, in double as the spec
 * says, then sincos in double per token).
 *
 * A NEOX pair (i, i + rotary_dim / 2) may sit in chunks of different threads of the group: after the
 * reduction the group puts its head's chunks of x in a slot of shared memory (16-byte stores and loads,
 * padded against bank conflicts), and each thread normalises the partners of its chunks itself (their x,
 * the group's scale, their weight), so no normalised float crosses threads. The output loop then reads
 * its chunks from the slot too: a loop over chunks that is not unrolled (the register-indexed form of
 * three pair layouts spilled heavily). A GPTJ pair (2i, 2i + 1) is always within a chunk.
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

/* The rotation of a pair's element: `self` and its partner normalised, c and s the cosine and sine of the
 * pair's angle; first: whether self is the pair's first element (a' = a c - b s, else b' = b c + a s). */
template <int DT>
TN_DEV float tn_rope_rotate(bool llama, float self, float partner, float c, float s, bool first) {
  if (!llama) return first ? self * c - partner * s : self * c + partner * s;
  const float sc = tn_round<DT>(self * c);
  const float ps = first ? tn_round<DT>((-partner) * s) : tn_round<DT>(partner * s);
  return tn_round<DT>(sc + ps);
}

/* Four floats read as one 16-byte access (shared memory rows aligned to 16 bytes). */
struct __align__(16) tn_f32x4 {
  float v[4];
};

template <int DT, int G, int MODE>
TN_DEV void tn_rope_rows(const tn_kernel_params &p) {
  constexpr int K = TN_KERNEL_REG_CHUNKS, V = tn_dt<DT>::per_chunk, S = tn_dt<DT>::size;
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
   * instead of a global read, a conversion and an addition (measured on the H100, 8192 x 40 x 128 bf16:
   * 64.2 -> 67.2% of the copy ceiling from a table, 56.0 -> 60.2% from theta). Reading cos and sin 16
   * bytes at a time gained nothing there. */
  float *w_staged = inv_freq + (((size_t)half + 3) & ~(size_t)3); /* backend.c's rope_smem sizes it alike */
  if (p.has_weight)
    for (int i = threadIdx.x; i < p.dim; i += blockDim.x)
      w_staged[i] = tn_rope_weight<DT, MODE>(p, i) + p.weight_offset;
  /* Element e's factor in the slot path. A chunk may pass dim: the host sizes the staged weight in whole
   * chunks, but only the first dim are written, and the elements past dim are never stored. */
  const auto factor = [&](int e) { return p.has_weight ? w_staged[e] : 0.0f; };
  const unsigned mask = tn_group_mask<G>();
  int turn = 0;
  float unused_partials[1]; /* G <= 32: the group's sums are shuffles alone */

  if (!table)
    for (int i = threadIdx.x; i < half; i += blockDim.x)
      inv_freq[i] = (float)(1.0 / pow((double)p.theta, (double)(2 * i) / (double)rot));

  for (tn_i64 tok0 = (tn_i64)blockIdx.x * tpb; tok0 < tokens; tok0 += (tn_i64)gridDim.x * tpb) {
    const int ntok = (int)(tokens - tok0 < tpb ? tokens - tok0 : tpb);
    __syncthreads(); /* inv_freq is written; the previous tokens' cos and sin are no longer read */
    for (int i = threadIdx.x; i < ntok * half; i += blockDim.x) {
      const int tt = i / half, j = i - tt * half;
      const tn_i64 pos = tn_rope_position<MODE>(p, tok0 + tt);
      float c, s;
      if (table) {
        const tn_i64 row = pos < 0 ? 0 : pos >= p.cos_sin_rows ? p.cos_sin_rows - 1 : pos;
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
       * rescaled row's second pass reads its chunks there too (kept in registers for it, with the other
       * pass's conversions, the head spilled). */
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

/* G <= 32 threads per head; blocks of at most TN_KERNEL_ROPE_MAX_BLOCK threads, with the register cap of
 * the other row kernels (64 a thread). */
template <int DT, int G, int MODE>
__global__ void __launch_bounds__(TN_KERNEL_ROPE_MAX_BLOCK, TN_KERNEL_MIN_RESIDENT / TN_KERNEL_ROPE_MAX_BLOCK)
    tn_rope_registers(const tn_kernel_params p) {
  tn_pdl_wait();
  tn_rope_rows<DT, G, MODE>(p);
  tn_pdl_launch_dependents();
}
