/* The float64 reference of every op, independent of the library's kernels, and the comparison rule.
 * Used by `tnorm check` and by the tests. */
#ifndef TN_TOOLS_REFERENCE_H
#define TN_TOOLS_REFERENCE_H

#include <stdint.h>

#include "tnorm.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Computes the op of args (host tensors) in float64: y[r * dim + i] and, for add_rms_norm,
 * residual_out[r * dim + i] (may be NULL otherwise), both contiguous rows x dim.
 * The only rounding it models is the one the spec names: add_rms_norm's s = round(x + residual) to x's
 * dtype, with x + residual in float32. Returns 0, or -1 when out of memory. */
int tn_reference_run(const tn_op_args *args, double *y, double *residual_out);

/* Error of `got` (a value of dtype, as float) against the float64 reference, in units of the tolerance:
 * <= 1 passes. f16/bf16: ulps of the dtype at the reference's magnitude (so 1 ulp passes);
 * f32: relative error / 2e-5. NaN must meet NaN and Inf the same Inf (else returns +Inf). */
double tn_reference_error(tn_dtype dtype, float got, double ref);

/* The value of element i of row r of a host tensor, as float. */
float tn_reference_load(const tn_tensor *t, int64_t r, int64_t i);
/* Stores v, rounded once to the tensor's dtype, as element i of row r of a host tensor. */
void tn_reference_store(const tn_tensor *t, int64_t r, int64_t i, float v);

#ifdef __cplusplus
}
#endif

#endif
