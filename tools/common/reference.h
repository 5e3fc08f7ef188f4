/* The float64 reference of every op, independent of the library's kernels, and the comparison rule.
 * Used by `tnorm check` and by the tests. */
#ifndef TN_TOOLS_REFERENCE_H
#define TN_TOOLS_REFERENCE_H

#include <stddef.h>
#include <stdint.h>

#include "tnorm.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The reference's own f16 and bf16 formats (written from their definitions, not the library's): the value
 * of a pattern, and the pattern of a float rounded once to nearest even (overflow to Inf; NaN stays NaN). */
float tn_reference_f16_value(uint16_t bits);
uint16_t tn_reference_f16_bits(float v);
float tn_reference_bf16_value(uint16_t bits);
uint16_t tn_reference_bf16_bits(float v);

/* Computes the op of args (host tensors) in float64 (for quantize, the value it quantizes: x).
 *
 * Layout: y is contiguous, one vector of dim after another: y[(r * heads + h) * dim + i] is element i of
 * head h of row r for a 3-D view of x (heads > 1; rms_norm and l2_norm), y[r * dim + i] for a 2-D one.
 * residual_out (add_rms_norm, add_layer_norm; may be NULL when not wanted) is rows x dim, [r * dim + i].
 *
 * The only roundings modelled are the ones the spec names, each at the exact value it rounds:
 * - add_rms_norm, add_layer_norm: s = x + residual in float32, rounded to the residual's dtype (what
 *   residual_out holds, and what the norm reads unless residual_mode is TN_RESIDUAL_NORM_F32, where it
 *   reads the float32 sum);
 * - TN_CASTING_LLAMA on f16/bf16: the normalised value rounded to x's dtype before the weight; with a
 *   rope also the weighted value, each product of the rotation and their sum (torch's roundings of
 *   q * cos + rotate_half(q) * sin); for f32 x these roundings are the identity;
 * - the rope's cos and sin: a table's values as given; from theta, the spec's float32 formula
 *   (inv_freq_i = float(1 / theta^(2i / rotary_dim)) in double, angle = float(position) * inv_freq_i
 *   in float32, cos and sin in double rounded to float32).
 * Everything else (the reductions, the products by the scale, weight, multiplicand) is exact.
 * Returns 0; -1 when out of memory; -2 when a rope position is outside its cos_sin table. */
int tn_reference_run(const tn_op_args *args, double *y, double *residual_out);

/* tn_reference_run, also giving for each element of y (same layout; slack may be NULL) how far a
 * float32 evaluation that follows the spec may honestly be from the reference before its final rounding,
 * beyond the relative error that tn_reference_error's tolerance already covers. It is 0 except for
 * layer_norm, add_layer_norm, the rope and TN_CASTING_LLAMA on f16/bf16 (so rms_norm, l2_norm and
 * add_rms_norm keep exactly their tolerance, 3-D views, residual modes and l2 modes included), and comes
 * from two sources only:
 * - cancellation: a float32 difference of nearly equal terms (layer_norm's x - mean, its + bias, the
 *   rope's a * cos - b * sin) keeps an absolute error of a few float32 ulps of the terms, which can be
 *   many ulps of a small result. The slack bounds the terms' float32 error, that of the reduction
 *   behind them (a probabilistic bound, 8 sqrt(ceil(dim / 16) + 4) float32 ulps of the summed
 *   magnitudes: see reference.c) plus a few ulps for the scalar steps, times their magnitude.
 * - an intermediate rounding to x's dtype (TN_CASTING_LLAMA): where the value being rounded is within
 *   that float32 error bound of a rounding boundary, the library may honestly take the other neighbour;
 *   the slack is then that neighbour's effect on the result (typically one more ulp of the dtype), and
 *   is 0 for the large majority of elements, which are not near a boundary. */
int tn_reference_run_slack(const tn_op_args *args, double *y, double *residual_out, double *slack);

/* Error of `got` (a value of dtype, as float) against the float64 reference, in units of the tolerance:
 * <= 1 passes. f16/bf16: ulps of the dtype at the reference's magnitude (so 1 ulp passes);
 * f32: relative error / 2e-5. NaN must meet NaN and Inf the same Inf (else returns +Inf). */
double tn_reference_error(tn_dtype dtype, float got, double ref);

/* tn_reference_error with a slack from tn_reference_run_slack: the distance beyond the slack, in units of
 * the same tolerance taken at |ref| + slack. With slack 0 it is tn_reference_error exactly. */
double tn_reference_error_slack(tn_dtype dtype, float got, double ref, double slack);

/* The value of element i of row r of a host tensor, as float. */
float tn_reference_load(const tn_tensor *t, int64_t r, int64_t i);
/* The value of element i of head h of row r of a host tensor (a 3-D view; h = 0 for a 2-D one). */
float tn_reference_load_head(const tn_tensor *t, int64_t r, int64_t h, int64_t i);
/* Stores v, rounded once to the tensor's dtype, as element i of row r of a host tensor. */
void tn_reference_store(const tn_tensor *t, int64_t r, int64_t i, float v);
/* The same for element i of head h of row r. */
void tn_reference_store_head(const tn_tensor *t, int64_t r, int64_t h, int64_t i, float v);

/* ------------------------------------------------------------------------------------------------ */
/* Quantized outputs (tnorm.h, "Quantized outputs"), written from the formats' definitions: every     */
/* value of a format is decoded from its sign, exponent and mantissa fields, and a value is encoded as */
/* the nearest of them by search. Of a tn_quant these read format, scaling, group_size, pow2_scales,   */
/* layout, scale_ub and scale_min; its tensors are ignored.                                            */
/* ------------------------------------------------------------------------------------------------ */

/* The value of a format's element code: an FP8 byte (E4M3 for MXFP8 too), an INT8 byte, an E2M1 nibble
 * (NVFP4); NaN for FP8's NaN codes, Inf for E5M2's infinities. */
double tn_reference_decode(tn_quant_format format, uint8_t code);

/* The code of v: the nearest value of the format, a tie to the code whose lowest bit is 0 (the even
 * one); beyond the largest finite value (infinities included) the largest, with v's sign; NaN gives 0x7f
 * with v's sign for FP8, 0 for INT8 and E2M1. FP8 and E2M1 keep the sign of a zero result. */
uint8_t tn_reference_encode(tn_quant_format format, double v);

/* Elements per scale: the row (TENSOR, TOKEN), group_size, or the format's own block (MXFP8 32,
 * NVFP4 16). */
int64_t tn_reference_quant_group(const tn_quant *quant, int64_t dim);

/* The dynamic scales' tensor for rows x dim values, in its layout: rows x groups, groups x rows, or the
 * swizzled tile rounded up to 128 rows x 4 groups; its element is 4 bytes (f32) or 1 (UE8M0, E4M3). */
void tn_reference_scales_shape(const tn_quant *quant, int64_t rows, int64_t dim, int64_t *scale_rows,
                               int64_t *scale_dim, size_t *elem_size);

/* q and the dynamic scales of rows x dim float32 values v (v[r * dim + i]), every step in float32 as the
 * spec says (the value quantized is exactly known: TN_QUANT_FROM_ROUNDED takes what y holds).
 * q: rows x (dim, or dim / 2 for NVFP4) bytes, contiguous. scales (NULL with TENSOR scaling): the bytes
 * of the tensor tn_reference_scales_shape describes, contiguous, the swizzled padding zeros. scale: the
 * static scale or NVFP4's global one. */
void tn_reference_quantize(const tn_quant *quant, int64_t rows, int64_t dim, const float *v, float scale,
                           uint8_t *q, uint8_t *scales);

/* The check of a quantized output whose value quantized is known only to within a band (TN_QUANT_FROM_F32
 * on f16/bf16 x: the float32 result is not visible): element k lies in [v[k] - dev[k], v[k] + dev[k]].
 * Every scale must be what some values in the bands give, and every code what some value in its band
 * gives divided by the scale the library stored. q_stride: bytes between q's rows. Returns 0, or -1 with
 * the first mismatch described in why. */
int tn_reference_quant_check_band(const tn_quant *quant, int64_t rows, int64_t dim, const double *v,
                                  const double *dev, float scale, const uint8_t *q, int64_t q_stride,
                                  const uint8_t *scales, char *why, size_t why_len);

#ifdef __cplusplus
}
#endif

#endif
