/* The CPU ops: each runs a validated op over rows [begin, end) on the calling thread (for the norms that
 * take 3-D views, over vectors: vector v is head v % heads of row v / heads). Every entry point exists
 * once per instruction set the kernels are compiled for (see row_kernels.h). */
#ifndef TN_CPU_OPS_H
#define TN_CPU_OPS_H

#include <stdint.h>

#include "tnorm.h"

/* What every row of one call shares, prepared once by the backend before any row runs. */
typedef struct tn_cpu_call {
  const tn_op_args *args;
  const float *weight; /* weight + weight_offset in float32 (dim elements), or NULL without a weight */
  const float *bias;   /* layer_norm's bias in float32 (dim elements), or NULL without one */
  const float *rope_inv_freq; /* the rope's frequencies from theta (rotary_dim / 2), or NULL with a table */
  int stream;          /* write outputs with non-temporal stores */
  int round_before_last; /* tn_run_options */
  float quant_scale;     /* a quantized output's static scale, or NVFP4's global one (read once) */
  int64_t quant_group;   /* elements per dynamic scale (tn_quant_group) */
} tn_cpu_call;

/* scratch of a call with a quantized output: two rows of dim floats (the second holds the result). */

/* scratch: dim floats owned by the caller for this range of rows. */
typedef void (*tn_cpu_rows_fn)(const tn_cpu_call *call, float *scratch, int64_t begin, int64_t end);
/* out[i] = weight[i] + offset in float32. */
typedef void (*tn_cpu_weight_fn)(const tn_tensor *weight, float offset, float *out);
/* out[i] = v[i] in float32, exactly (a bias: -0 stays -0). */
typedef void (*tn_cpu_vector_fn)(const tn_tensor *v, float *out);

/* One instruction set's kernels. */
typedef struct tn_cpu_kernels {
  const char *isa;
  tn_cpu_rows_fn rows[TN_OP_COUNT];
  tn_cpu_rows_fn rms_norm_rope; /* rms_norm with a rope (over vectors) */
  tn_cpu_weight_fn prepare_weight;
  tn_cpu_vector_fn prepare_vector;
} tn_cpu_kernels;

#define TN_CPU_DECLARE_KERNELS(isa)                                                           \
  void tn_cpu_rms_norm_rows_##isa(const tn_cpu_call *, float *, int64_t, int64_t);           \
  void tn_cpu_rms_norm_rope_rows_##isa(const tn_cpu_call *, float *, int64_t, int64_t);      \
  void tn_cpu_l2_norm_rows_##isa(const tn_cpu_call *, float *, int64_t, int64_t);            \
  void tn_cpu_add_rms_norm_rows_##isa(const tn_cpu_call *, float *, int64_t, int64_t);       \
  void tn_cpu_layer_norm_rows_##isa(const tn_cpu_call *, float *, int64_t, int64_t);         \
  void tn_cpu_elementwise_rows_##isa(const tn_cpu_call *, float *, int64_t, int64_t);        \
  void tn_cpu_quantize_rows_##isa(const tn_cpu_call *, float *, int64_t, int64_t);           \
  void tn_cpu_prepare_weight_##isa(const tn_tensor *, float, float *);                       \
  void tn_cpu_prepare_vector_##isa(const tn_tensor *, float *);

TN_CPU_DECLARE_KERNELS(generic)
#ifdef TNORM_CPU_V3
TN_CPU_DECLARE_KERNELS(v3)
#endif

#endif
