#include "reference.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The reference's own element formats, written from their definitions (IEEE binary16; bfloat16 as the
 * top half of a binary32), sharing no code with the library it checks. */

/* One ulp of float32 at 1. */
#define F32_U 0x1p-24

static double round_to_dtype(tn_dtype dtype, double v);

static const char *element_ptr(const tn_tensor *t, int64_t r, int64_t h, int64_t i) {
  const int64_t head_offset = t->heads > 1 ? h * t->head_stride : 0;
  return (const char *)t->data + (size_t)(r * t->row_stride + head_offset + i) * tn_dtype_size(t->dtype);
}

static float f32_of_bits(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

static uint32_t bits_of_f32(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

/* binary16: sign, 5 exponent bits (bias 15), 10 fraction bits; exponent 0 is subnormal, 31 Inf or NaN. */
float tn_reference_f16_value(uint16_t h) {
  const int e = (h >> 10) & 0x1f, m = h & 0x3ff;
  double v;
  if (e == 0) v = ldexp((double)m, -24);
  else if (e == 31) v = m == 0 ? INFINITY : NAN;
  else v = ldexp(1024.0 + m, e - 25);
  return (float)((h & 0x8000) ? -v : v);
}

/* The binary16 pattern of v rounded once to nearest even (round_to_dtype), overflow to Inf; a NaN keeps its
 * sign and the top of its payload, made quiet. */
uint16_t tn_reference_f16_bits(float v) {
  const uint16_t sign = signbit(v) ? 0x8000 : 0;
  if (isnan(v)) return (uint16_t)(sign | 0x7e00 | ((bits_of_f32(v) >> 13) & 0x3ff));
  const double r = fabs(round_to_dtype(TN_F16, (double)v));
  if (isinf(r)) return sign | 0x7c00;
  if (r < 0x1p-14) return (uint16_t)(sign | (uint16_t)ldexp(r, 24)); /* subnormal: r / 2^-24 is the fraction */
  int e;
  const double m = frexp(r, &e); /* r = m 2^e, m in [0.5, 1) */
  return (uint16_t)(sign | (uint16_t)((e + 14) << 10) | (uint16_t)(ldexp(m, 11) - 1024.0));
}

float tn_reference_bf16_value(uint16_t b) { return f32_of_bits((uint32_t)b << 16); }

uint16_t tn_reference_bf16_bits(float v) {
  if (isnan(v)) return (uint16_t)((bits_of_f32(v) >> 16) | 0x40);
  return (uint16_t)(bits_of_f32((float)round_to_dtype(TN_BF16, (double)v)) >> 16);
}

static float load_element(tn_dtype dtype, const char *p) {
  uint16_t h;
  if (dtype == TN_F32) {
    float f;
    memcpy(&f, p, sizeof f);
    return f;
  }
  memcpy(&h, p, sizeof h);
  return dtype == TN_F16 ? tn_reference_f16_value(h) : tn_reference_bf16_value(h);
}

static void store_element(tn_dtype dtype, char *p, float v) {
  if (dtype == TN_F32) {
    memcpy(p, &v, sizeof v);
    return;
  }
  const uint16_t h = dtype == TN_F16 ? tn_reference_f16_bits(v) : tn_reference_bf16_bits(v);
  memcpy(p, &h, sizeof h);
}

float tn_reference_load(const tn_tensor *t, int64_t r, int64_t i) {
  return load_element(t->dtype, element_ptr(t, r, 0, i));
}

float tn_reference_load_head(const tn_tensor *t, int64_t r, int64_t h, int64_t i) {
  return load_element(t->dtype, element_ptr(t, r, h, i));
}

void tn_reference_store(const tn_tensor *t, int64_t r, int64_t i, float v) {
  store_element(t->dtype, (char *)element_ptr(t, r, 0, i), v);
}

void tn_reference_store_head(const tn_tensor *t, int64_t r, int64_t h, int64_t i, float v) {
  store_element(t->dtype, (char *)element_ptr(t, r, h, i), v);
}

/* add, mul, scale: exact in float64 (the library rounds once, to the dtype); quantize: x itself, the value
 * it quantizes. */
static void reference_elementwise(const tn_op_args *a, double *y) {
  const tn_tensor *x = a->x, *b = a->op == TN_OP_ADD ? a->residual : a->op == TN_OP_MUL ? a->mul : NULL;
  for (int64_t r = 0; r < x->rows; r++)
    for (int64_t i = 0; i < x->dim; i++) {
      double v = tn_reference_load(x, r, i);
      if (a->op == TN_OP_QUANTIZE) {
        y[r * x->dim + i] = v;
        continue;
      }
      double w = b != NULL ? (double)tn_reference_load(b, b->rows == 1 ? 0 : r, i) : (double)a->scale;
      y[r * x->dim + i] = a->op == TN_OP_ADD ? v + w : v * w;
    }
}

/* v rounded once, to nearest even, to the dtype (from the double itself: rounding through float32 first
 * would round twice). Overflow gives Inf; subnormal results keep the dtype's subnormal spacing. */
static double round_to_dtype(tn_dtype dtype, double v) {
  if (dtype == TN_F32) return (double)(float)v;
  if (!isfinite(v) || v == 0.0) return v;
  const int mant_bits = dtype == TN_F16 ? 10 : 7, min_exp = dtype == TN_F16 ? -14 : -126;
  const double max_finite = dtype == TN_F16 ? 65504.0 : 0x1.fep127;
  int e = ilogb(v);
  if (e < min_exp) e = min_exp;
  const double quantum = ldexp(1.0, e - mant_bits);
  const double r = nearbyint(v / quantum) * quantum; /* both scalings exact; nearbyint ties to even */
  return fabs(r) > max_finite ? copysign(INFINITY, v) : r;
}

/* An intermediate rounding: the reference rounds the exact v; the library rounds its float32 value,
 * which may be anywhere within `noise` of v, so it may get any rounded value in
 * [round(v - noise), round(v + noise)]. Returns round(v) and sets *dev to the farthest of those from it
 * (0 unless v is within noise of a rounding boundary). */
static double round_dev(tn_dtype dtype, double v, double noise, double *dev) {
  const double r = round_to_dtype(dtype, v);
  *dev = 0.0;
  if (!isfinite(r) || !isfinite(noise)) return r;
  const double lo = round_to_dtype(dtype, v - noise), hi = round_to_dtype(dtype, v + noise);
  const double d = fmax(fabs(lo - r), fabs(hi - r));
  if (isfinite(d)) *dev = d;
  return r;
}

/* The rope's cosines and sines for a position: cs[i] = cos_i, cs[half + i] = sin_i. */
static void rope_cos_sin(const tn_rope *rope, int64_t rot, int64_t pos, double *cs) {
  const int64_t half = rot / 2;
  for (int64_t i = 0; i < half; i++) {
    if (rope->cos_sin != NULL) {
      cs[i] = tn_reference_load(rope->cos_sin, pos, i);
      cs[half + i] = tn_reference_load(rope->cos_sin, pos, half + i);
    } else {
      const float inv_freq = (float)(1.0 / pow((double)rope->theta, (double)(2 * i) / (double)rot));
      const float angle = (float)pos * inv_freq;
      cs[i] = (float)cos((double)angle);
      cs[half + i] = (float)sin((double)angle);
    }
  }
}

static int64_t rope_position(const tn_rope *rope, int64_t r) {
  return rope->positions_i64 ? ((const int64_t *)rope->positions)[r] : (int64_t)((const int32_t *)rope->positions)[r];
}

/* The rotation of one vector: A[i] the normalised weighted values, dA[i] their deviations (LLAMA), written
 * to y[0, dim) and slack[0, dim). */
static void reference_rope(const tn_rope *rope, tn_dtype dtype, int llama, int64_t dim, const double *A,
                           const double *dA, const double *cs, double eps_chain, double *y, double *slack) {
  const int64_t rot = rope->rotary_dim != 0 ? rope->rotary_dim : dim, half = rot / 2;
  for (int64_t i = 0; i < half; i++) {
    const int64_t ia = rope->style == TN_ROPE_GPTJ ? 2 * i : i;
    const int64_t ib = rope->style == TN_ROPE_GPTJ ? 2 * i + 1 : i + half;
    const double a = A[ia], b = A[ib], c = cs[i], s = cs[half + i];
    if (llama) {
      /* t1 = round(a c), t2 = round(-b s), a' = round(t1 + t2); b' likewise from b c and a s. Each product
       * of a value of the dtype and a float32 is rounded to float32 on its way (noise: one float32 ulp). */
      double d1, d2, d3, d4;
      const double t1 = round_dev(dtype, a * c, fabs(c) * dA[ia] + F32_U * fabs(a * c), &d1);
      const double t2 = round_dev(dtype, -b * s, fabs(s) * dA[ib] + F32_U * fabs(b * s), &d2);
      const double t3 = round_dev(dtype, b * c, fabs(c) * dA[ib] + F32_U * fabs(b * c), &d3);
      const double t4 = round_dev(dtype, a * s, fabs(s) * dA[ia] + F32_U * fabs(a * s), &d4);
      y[ia] = t1 + t2;
      y[ib] = t3 + t4;
      slack[ia] = d1 + d2;
      slack[ib] = d3 + d4;
    } else {
      y[ia] = a * c - b * s;
      y[ib] = b * c + a * s;
      slack[ia] = eps_chain * (fabs(a * c) + fabs(b * s));
      slack[ib] = eps_chain * (fabs(b * c) + fabs(a * s));
    }
  }
  for (int64_t i = rot; i < dim; i++) {
    y[i] = A[i];
    slack[i] = dA[i];
  }
}

int tn_reference_run_slack(const tn_op_args *a, double *y, double *residual_out, double *slack) {
  const tn_tensor *x = a->x;
  const int64_t rows = x->rows, dim = x->dim, heads = x->heads > 1 ? x->heads : 1;
  if (a->op == TN_OP_ADD || a->op == TN_OP_MUL || a->op == TN_OP_SCALE || a->op == TN_OP_QUANTIZE) {
    reference_elementwise(a, y);
    if (slack != NULL)
      for (int64_t k = 0; k < rows * dim; k++) slack[k] = 0.0;
    return 0;
  }
  const tn_dtype dtype = x->dtype;
  const int layer = a->op == TN_OP_LAYER_NORM || a->op == TN_OP_ADD_LAYER_NORM;
  const int add = a->op == TN_OP_ADD_RMS_NORM || a->op == TN_OP_ADD_LAYER_NORM;
  const int l2 = a->op == TN_OP_L2_NORM;
  const int rope = a->op == TN_OP_RMS_NORM && a->rope.style != TN_ROPE_NONE;
  const int llama = a->casting == TN_CASTING_LLAMA && dtype != TN_F32;
  const int64_t rot = rope ? (a->rope.rotary_dim != 0 ? a->rope.rotary_dim : dim) : 0;
  if (rope && a->rope.cos_sin != NULL)
    for (int64_t r = 0; r < rows; r++) {
      const int64_t pos = rope_position(&a->rope, r);
      if (pos < 0 || pos >= a->rope.cos_sin->rows) return -2;
    }
  /* The float32 evaluation's error bound. A reduction of dim terms by any method whose longest chain of
   * additions is n = ceil(dim / 16) + 4 (16 or more partial sums, then a tree; the CPU's lanes, a GPU's
   * threads) errs by at most lambda * sqrt(n) * u * sum(|terms|) with probability at least
   * 1 - 2 exp(-lambda^2 / 2) (Higham and Mary's probabilistic rounding error analysis, 2019); lambda = 8
   * puts a failure beyond 1e-13 per row. The worst case, n * u, is reached only by adversarial rounding
   * and would make the slack dozens of times too generous. eps_chain: the relative error of a normalised
   * value (half the sum's, as the square root halves it, plus the division, eps, the square root, the
   * reciprocal and the product by x); eps_mean: layer_norm's mean, relative to the mean of |x|. */
  const double chain = sqrt((double)((dim + 15) / 16 + 4));
  const double eps_chain = (4.0 * chain + 3.0) * F32_U, eps_mean = (8.0 * chain + 1.0) * F32_U;

  /* s: the vector being normalised; A, dA: its weighted values and their deviations (rope); cs: cos and
   * sin; own_slack: where the slack goes when the caller wants none. */
  double *s = malloc((size_t)dim * 5 * sizeof *s);
  if (s == NULL) return -1;
  double *A = s + dim, *dA = A + dim, *cs = dA + dim, *own_slack = cs + dim;
  for (int64_t r = 0; r < rows; r++) {
    if (rope) rope_cos_sin(&a->rope, rot, rope_position(&a->rope, r), cs);
    for (int64_t h = 0; h < heads; h++) {
      double *yv = y + (r * heads + h) * dim;
      double *sv = slack != NULL ? slack + (r * heads + h) * dim : own_slack;
      for (int64_t i = 0; i < dim; i++) {
        if (add) {
          /* The spec's rounding of the residual sum: in float32, stored in the residual's dtype. */
          const float sum = tn_reference_load(x, r, i) + tn_reference_load(a->residual, r, i);
          const float stored = (float)round_to_dtype(a->residual->dtype, (double)sum);
          if (residual_out != NULL) residual_out[r * dim + i] = stored;
          s[i] = a->residual_mode == TN_RESIDUAL_NORM_F32 ? sum : stored;
        } else {
          s[i] = tn_reference_load_head(x, r, h, i);
        }
      }
      double inv, mean = 0.0, mean_abs = 0.0;
      if (layer) {
        for (int64_t i = 0; i < dim; i++) {
          mean += s[i];
          mean_abs += fabs(s[i]);
        }
        mean /= (double)dim;
        mean_abs /= (double)dim;
        double var = 0.0;
        for (int64_t i = 0; i < dim; i++) var += (s[i] - mean) * (s[i] - mean);
        inv = 1.0 / sqrt(var / (double)dim + a->eps);
      } else {
        double sum_sq = 0.0;
        for (int64_t i = 0; i < dim; i++) sum_sq += s[i] * s[i];
        if (!l2) {
          inv = 1.0 / sqrt(sum_sq / (double)dim + a->eps);
        } else if (a->l2_mode == TN_L2_MAX_NORM_EPS) {
          const double norm = sqrt(sum_sq);
          inv = 1.0 / (norm < a->eps ? (double)a->eps : norm); /* NaN stays NaN */
        } else {
          inv = 1.0 / sqrt(sum_sq + a->eps);
        }
      }
      for (int64_t i = 0; i < dim; i++) {
        const double v = (layer ? s[i] - mean : s[i]) * inv;
        /* How far the library's float32 v may be from v. */
        const double noise = eps_chain * fabs(v) + (layer ? eps_mean * inv * mean_abs : 0.0);
        double n = v, dn = 0.0;
        if (llama) n = round_dev(dtype, v, noise, &dn);
        const double w = a->weight != NULL ? (double)tn_reference_load(a->weight, 0, i) + a->weight_offset : 1.0;
        double t = n * w, sl = 0.0;
        if (rope) {
          A[i] = t;
          dA[i] = 0.0;
          if (llama && a->weight != NULL) A[i] = round_dev(dtype, t, fabs(w) * dn + F32_U * fabs(t), &dA[i]);
          else if (llama) dA[i] = dn;
          continue;
        }
        if (layer) {
          /* x - mean cancels where x is near the mean: the mean's float32 error stays, whatever the size of
           * the result (under llama it only decides the rounding of n, counted in dn). */
          sl = llama ? fabs(w) * dn : fabs(w) * eps_mean * inv * mean_abs;
          if (a->bias != NULL) {
            const double b = tn_reference_load(a->bias, 0, i);
            sl += llama ? F32_U * (fabs(t) + fabs(b)) : eps_chain * fabs(t) + F32_U * fabs(b);
            t += b;
          }
        } else {
          double gain = fabs(w);
          if (l2) {
            t *= a->scale;
            gain *= fabs((double)a->scale);
          }
          if (a->mul != NULL) {
            const double m = tn_reference_load_head(a->mul, r, h, i);
            t *= m;
            gain *= fabs(m);
          }
          sl = gain * dn;
        }
        yv[i] = t;
        sv[i] = sl;
      }
      if (rope) reference_rope(&a->rope, dtype, llama, dim, A, dA, cs, eps_chain, yv, sv);
    }
  }
  free(s);
  return 0;
}

int tn_reference_run(const tn_op_args *a, double *y, double *residual_out) {
  return tn_reference_run_slack(a, y, residual_out, NULL);
}

/* Spacing of the dtype's values at magnitude |v| (finite v). */
static double ulp_at(tn_dtype dtype, double v) {
  int mant_bits = dtype == TN_F16 ? 10 : dtype == TN_BF16 ? 7 : 23;
  int min_exp = dtype == TN_F16 ? -14 : -126;
  double a = fabs(v);
  int e = a > 0 ? ilogb(a) : min_exp;
  if (e < min_exp) e = min_exp;
  return ldexp(1.0, e - mant_bits);
}

static double max_finite_of(tn_dtype dtype) {
  return dtype == TN_F16 ? 65504.0 : dtype == TN_BF16 ? 0x1.fep127 : 0x1.fffffep127;
}

double tn_reference_error(tn_dtype dtype, float got, double ref) {
  if (isnan(ref) || isnan(got)) return isnan(ref) && isnan(got) ? 0.0 : INFINITY;
  double max_finite = max_finite_of(dtype);
  /* A reference beyond the dtype's range (past the rounding midpoint) rounds to Inf of its sign. */
  int ref_overflows = isinf(ref) || fabs(ref) >= max_finite + ulp_at(dtype, max_finite) / 2;
  if (isinf(got)) return ref_overflows && (got > 0) == (ref > 0) ? 0.0 : INFINITY;
  if (isinf(ref)) return INFINITY;
  double diff = fabs((double)got - ref);
  if (dtype == TN_F32) {
    double scale = fabs(ref) > 0x1p-126 ? fabs(ref) : 0x1p-126; /* below the normal range: absolute */
    return diff / (2e-5 * scale);
  }
  return diff / ulp_at(dtype, ref);
}

double tn_reference_error_slack(tn_dtype dtype, float got, double ref, double slack) {
  if (!(slack > 0.0) || !isfinite(slack) || !isfinite(ref) || isnan(got)) return tn_reference_error(dtype, got, ref);
  const double reach = fabs(ref) + slack; /* the largest magnitude the library's value may honestly have */
  if (isinf(got)) {
    const double max_finite = max_finite_of(dtype);
    return reach >= max_finite + ulp_at(dtype, max_finite) / 2 && (got > 0) == (ref > 0) ? 0.0 : INFINITY;
  }
  const double beyond = fabs((double)got - ref) - slack;
  if (beyond <= 0.0) return 0.0;
  if (dtype == TN_F32) return beyond / (2e-5 * (reach > 0x1p-126 ? reach : 0x1p-126));
  return beyond / ulp_at(dtype, reach);
}

/* ------------------------------------------------------------------------------------------------ */
/* Quantized outputs                                                                                */
/* ------------------------------------------------------------------------------------------------ */

static int is_fp8(tn_quant_format f) {
  return f == TN_QUANT_FP8_E4M3 || f == TN_QUANT_FP8_E5M2 || f == TN_QUANT_MXFP8;
}

/* A floating-point code's value from its fields: exponent field 0 holds the subnormals m * 2^(1 - bias -
 * man_bits), the others (2^man_bits + m) * 2^(e - bias - man_bits). */
static double decode_fields(unsigned code, int exp_bits, int man_bits, int bias) {
  const unsigned sign = (code >> (exp_bits + man_bits)) & 1u;
  const unsigned e = (code >> man_bits) & ((1u << exp_bits) - 1u), m = code & ((1u << man_bits) - 1u);
  const double mag = e == 0 ? ldexp((double)m, 1 - bias - man_bits)
                            : ldexp((double)((1u << man_bits) + m), (int)e - bias - man_bits);
  return sign ? -mag : mag;
}

double tn_reference_decode(tn_quant_format format, uint8_t code) {
  switch (format) {
    case TN_QUANT_FP8_E4M3:
    case TN_QUANT_MXFP8: /* e4m3fn: S.1111.111 is NaN, no infinities */
      return (code & 0x7fu) == 0x7fu ? NAN : decode_fields(code, 4, 3, 7);
    case TN_QUANT_FP8_E5M2: /* IEEE-like: exponent field 31 is Inf (mantissa 0) or NaN */
      if ((code & 0x7cu) == 0x7cu) return (code & 3u) != 0 ? NAN : (code & 0x80u) ? -INFINITY : INFINITY;
      return decode_fields(code, 5, 2, 15);
    case TN_QUANT_INT8:
      return (double)(int8_t)code;
    case TN_QUANT_NVFP4: /* E2M1: 0, 0.5, 1, 1.5, 2, 3, 4, 6 */
      return decode_fields(code & 0xfu, 2, 1, 1);
    case TN_QUANT_NONE:
      break;
  }
  return NAN;
}

/* The code of the largest finite magnitude, and the magnitude of a code below it (codes 0 .. top grow
 * with their value in every format). */
static unsigned top_magnitude_code(tn_quant_format f) {
  return f == TN_QUANT_FP8_E5M2 ? 0x7bu : f == TN_QUANT_INT8 ? 127u : f == TN_QUANT_NVFP4 ? 7u : 0x7eu;
}

static double magnitude(tn_quant_format f, unsigned k) { return tn_reference_decode(f, (uint8_t)k); }

uint8_t tn_reference_encode(tn_quant_format format, double v) {
  const int negative = signbit(v) != 0;
  if (isnan(v)) return is_fp8(format) ? (uint8_t)(0x7fu | (negative ? 0x80u : 0u)) : 0;
  const double a = fabs(v);
  const unsigned top = top_magnitude_code(format);
  unsigned k = top;
  if (a < magnitude(format, top)) {
    /* The first code whose value reaches a, then the nearer of it and the one below. */
    unsigned lo = 0, hi = top;
    while (lo < hi) {
      const unsigned mid = (lo + hi) / 2;
      if (magnitude(format, mid) >= a) hi = mid;
      else lo = mid + 1;
    }
    k = hi;
    if (k > 0 && magnitude(format, k) != a) {
      const double below = a - magnitude(format, k - 1), above = magnitude(format, k) - a;
      if (below < above || (below == above && (k - 1) % 2 == 0)) k = k - 1;
    }
  }
  if (format == TN_QUANT_INT8) return (uint8_t)(negative ? -(int)k : (int)k);
  return (uint8_t)(k | (negative ? (format == TN_QUANT_NVFP4 ? 0x8u : 0x80u) : 0u));
}

/* A code's place on the number line (0 for both zeros), for bands of codes; NaN codes have none. */
static int code_rank(tn_quant_format f, uint8_t code) {
  if (f == TN_QUANT_INT8) return (int8_t)code;
  const unsigned sign = f == TN_QUANT_NVFP4 ? 0x8u : 0x80u, k = code & (sign - 1u);
  return (code & sign) ? -(int)k : (int)k;
}

int64_t tn_reference_quant_group(const tn_quant *q, int64_t dim) {
  if (q->scaling != TN_QUANT_SCALE_GROUP) return dim;
  if (q->format == TN_QUANT_MXFP8) return 32;
  if (q->format == TN_QUANT_NVFP4) return 16;
  return q->group_size;
}

static size_t scale_elem_size(const tn_quant *q) {
  return q->format == TN_QUANT_NVFP4 || q->format == TN_QUANT_MXFP8 || q->pow2_scales ? 1 : 4;
}

void tn_reference_scales_shape(const tn_quant *q, int64_t rows, int64_t dim, int64_t *scale_rows, int64_t *scale_dim,
                               size_t *elem_size) {
  const int64_t groups = dim / tn_reference_quant_group(q, dim);
  *elem_size = scale_elem_size(q);
  if (q->scaling == TN_QUANT_SCALE_TENSOR) {
    *scale_rows = *scale_dim = 0;
  } else if (q->layout == TN_SCALES_COLUMN_MAJOR) {
    *scale_rows = groups;
    *scale_dim = rows;
  } else if (q->layout == TN_SCALES_SWIZZLED) {
    *scale_rows = (rows + 127) / 128 * 128;
    *scale_dim = (groups + 3) / 4 * 4;
  } else {
    *scale_rows = rows;
    *scale_dim = groups;
  }
}

/* Where scale (r, g) is in the contiguous scales tensor, in elements (tnorm.h's tn_scale_layout). */
static size_t scale_index(const tn_quant *q, int64_t r, int64_t g, int64_t rows, int64_t groups) {
  if (q->layout == TN_SCALES_COLUMN_MAJOR) return (size_t)(g * rows + r);
  if (q->layout == TN_SCALES_SWIZZLED) {
    const int64_t groups4 = (groups + 3) / 4 * 4;
    return (size_t)(((r / 128) * (groups4 / 4) + g / 4) * 512 + (r % 32) * 16 + ((r % 128) / 32) * 4 + g % 4);
  }
  return (size_t)(r * groups + g);
}

/* 2^ceil(log2 s) as its exponent, within [-127, 127] (infinity gives 127). */
static int pow2_ceil_exponent(float s) {
  if (!(s < INFINITY)) return 127;
  int e;
  const double m = frexp((double)s, &e); /* s = m * 2^e, m in [0.5, 1) */
  if (m == 0.5) e -= 1;                  /* s is a power of two itself */
  return e < -127 ? -127 : e > 127 ? 127 : e;
}

static float quant_qmax(tn_quant_format f) {
  return f == TN_QUANT_FP8_E5M2 ? 57344.0f : f == TN_QUANT_INT8 ? 127.0f : f == TN_QUANT_NVFP4 ? 6.0f : 448.0f;
}

/* A dynamic scale from its row's or group's amax, each operation one float32 rounding as the spec
 * writes it; *stored: what the scales tensor holds (the f32's bits, the UE8M0 byte or NVFP4's E4M3 byte). */
static float dynamic_scale(const tn_quant *q, float amax, float global, uint32_t *stored) {
  if (q->format == TN_QUANT_NVFP4) {
    const float t = (amax / 6.0f) * global;
    const uint8_t sb = tn_reference_encode(TN_QUANT_FP8_E4M3, t);
    *stored = sb;
    return (float)tn_reference_decode(TN_QUANT_FP8_E4M3, sb) / global;
  }
  float s = amax / quant_qmax(q->format);
  if (q->scale_ub > 0.0f && s > q->scale_ub) s = q->scale_ub;
  if (!(s >= q->scale_min)) s = q->scale_min;
  if (q->pow2_scales || q->format == TN_QUANT_MXFP8) {
    const int e = pow2_ceil_exponent(s);
    *stored = (uint32_t)(e + 127);
    return ldexpf(1.0f, e);
  }
  memcpy(stored, &s, sizeof s);
  return s;
}

/* The largest |v| of n values, NaN skipped. */
static float amax_of(const float *v, int64_t n) {
  float a = 0.0f;
  for (int64_t i = 0; i < n; i++)
    if (fabsf(v[i]) > a) a = fabsf(v[i]);
  return a;
}

static void put_code(tn_quant_format f, uint8_t *qrow, int64_t i, uint8_t code) {
  if (f == TN_QUANT_NVFP4) qrow[i / 2] = (uint8_t)(qrow[i / 2] | code << (4 * (i % 2))); /* element 2i low */
  else qrow[i] = code;
}

static uint8_t get_code(tn_quant_format f, const uint8_t *qrow, int64_t i) {
  return f == TN_QUANT_NVFP4 ? (uint8_t)((qrow[i / 2] >> (4 * (i % 2))) & 0xfu) : qrow[i];
}

static void store_scale(const tn_quant *q, uint8_t *scales, size_t index, uint32_t stored) {
  if (scale_elem_size(q) == 4) memcpy(scales + 4 * index, &stored, 4);
  else scales[index] = (uint8_t)stored;
}

void tn_reference_quantize(const tn_quant *q, int64_t rows, int64_t dim, const float *v, float scale, uint8_t *qout,
                           uint8_t *scales) {
  const int64_t group = tn_reference_quant_group(q, dim), groups = dim / group;
  const int64_t qdim = q->format == TN_QUANT_NVFP4 ? dim / 2 : dim;
  int64_t srows, sdim;
  size_t es;
  tn_reference_scales_shape(q, rows, dim, &srows, &sdim, &es);
  if (scales != NULL) memset(scales, 0, (size_t)(srows * sdim) * es);
  memset(qout, 0, (size_t)(rows * qdim));
  for (int64_t r = 0; r < rows; r++) {
    for (int64_t g = 0; g < groups; g++) {
      const float *vg = v + r * dim + g * group;
      float s = scale;
      if (q->scaling != TN_QUANT_SCALE_TENSOR) {
        uint32_t stored;
        s = dynamic_scale(q, amax_of(vg, group), scale, &stored);
        store_scale(q, scales, scale_index(q, r, g, rows, groups), stored);
      }
      for (int64_t i = 0; i < group; i++) {
        /* A zero NVFP4 scale (its E4M3 byte rounded to 0) leaves the group's codes 0. */
        /* An infinity under an infinite scale stays itself (saturates), not inf / inf's NaN. */
        const float t = isinf(vg[i]) && isinf(s) ? vg[i] : vg[i] / s;
        const uint8_t code = s == 0.0f ? 0 : tn_reference_encode(q->format, t);
        put_code(q->format, qout + r * qdim, g * group + i, code);
      }
    }
  }
}

/* The scale the library stored for (r, g), as the value that divided, checked against the band of scales
 * that amax values in [a_lo, a_hi] give. */
static int check_scale_band(const tn_quant *q, const uint8_t *scales, size_t index, double a_lo, double a_hi,
                            float global, float *s, char *why, size_t why_len) {
  uint32_t lo, hi;
  const float s_lo = dynamic_scale(q, (float)a_lo, global, &lo), s_hi = dynamic_scale(q, (float)a_hi, global, &hi);
  int ok;
  if (q->format == TN_QUANT_NVFP4) {
    const uint8_t sb = scales[index];
    *s = (float)tn_reference_decode(TN_QUANT_FP8_E4M3, sb) / global;
    ok = code_rank(TN_QUANT_FP8_E4M3, sb) >= code_rank(TN_QUANT_FP8_E4M3, (uint8_t)lo) &&
         code_rank(TN_QUANT_FP8_E4M3, sb) <= code_rank(TN_QUANT_FP8_E4M3, (uint8_t)hi);
  } else if (scale_elem_size(q) == 1) {
    *s = ldexpf(1.0f, (int)scales[index] - 127);
    ok = scales[index] >= lo && scales[index] <= hi;
  } else {
    memcpy(s, scales + 4 * index, sizeof *s);
    ok = *s >= s_lo && *s <= s_hi;
  }
  if (!ok)
    snprintf(why, why_len, "scale %.9g, expected one in [%.9g, %.9g] (amax in [%.9g, %.9g])", (double)*s,
             (double)s_lo, (double)s_hi, a_lo, a_hi);
  return ok ? 0 : -1;
}

/* One code against the codes of the values in [v - d, v + d] divided by s. */
static int check_code_band(tn_quant_format f, uint8_t code, double v, double d, float s) {
  if (isnan(v)) return is_fp8(f) ? (code & 0x7fu) == 0x7fu : code == 0; /* a NaN's sign is the op's */
  if (f == TN_QUANT_NVFP4 && s == 0.0f) return code == 0;
  if (is_fp8(f) && isnan(tn_reference_decode(f, code))) return 0;
  const double lo = isfinite(v) ? v - d : v, hi = isfinite(v) ? v + d : v;
  const int rank = code_rank(f, code);
  return rank >= code_rank(f, tn_reference_encode(f, lo / s)) && rank <= code_rank(f, tn_reference_encode(f, hi / s));
}

int tn_reference_quant_check_band(const tn_quant *q, int64_t rows, int64_t dim, const double *v, const double *dev,
                                  float scale, const uint8_t *qbytes, int64_t q_stride, const uint8_t *scales,
                                  char *why, size_t why_len) {
  const int64_t group = tn_reference_quant_group(q, dim), groups = dim / group;
  for (int64_t r = 0; r < rows; r++) {
    const uint8_t *qrow = qbytes + r * q_stride;
    for (int64_t g = 0; g < groups; g++) {
      const int64_t first = r * dim + g * group;
      float s = scale;
      if (q->scaling != TN_QUANT_SCALE_TENSOR) {
        double a_lo = 0.0, a_hi = 0.0;
        for (int64_t k = first; k < first + group; k++) {
          if (isnan(v[k])) continue;
          a_lo = fmax(a_lo, fabs(v[k]) - dev[k]);
          a_hi = fmax(a_hi, fabs(v[k]) + dev[k]);
        }
        char what[160];
        if (check_scale_band(q, scales, scale_index(q, r, g, rows, groups), a_lo, a_hi, scale, &s, what,
                             sizeof what) != 0) {
          snprintf(why, why_len, "row %" PRId64 " group %" PRId64 ": %s", r, g, what);
          return -1;
        }
      }
      for (int64_t i = 0; i < group; i++) {
        const int64_t k = first + i, col = g * group + i;
        const uint8_t code = get_code(q->format, qrow, col);
        if (!check_code_band(q->format, code, v[k], dev[k], s)) {
          snprintf(why, why_len, "q[%" PRId64 ", %" PRId64 "] = 0x%02x (%.9g), expected the code of %.9g / %.9g",
                   r, col, (unsigned)code, tn_reference_decode(q->format, code), v[k], (double)s);
          return -1;
        }
      }
    }
  }
  return 0;
}
