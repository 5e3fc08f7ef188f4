#include "reference.h"

#include <math.h>
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

/* add, mul, scale: exact in float64 (the library rounds once, to the dtype). */
static void reference_elementwise(const tn_op_args *a, double *y) {
  const tn_tensor *x = a->x, *b = a->op == TN_OP_ADD ? a->residual : a->op == TN_OP_MUL ? a->mul : NULL;
  for (int64_t r = 0; r < x->rows; r++)
    for (int64_t i = 0; i < x->dim; i++) {
      double v = tn_reference_load(x, r, i);
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
  if (a->op == TN_OP_ADD || a->op == TN_OP_MUL || a->op == TN_OP_SCALE) {
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
