/* The CPU ops: each runs a validated op over rows [begin, end) on the calling thread. */
#ifndef TN_CPU_OPS_H
#define TN_CPU_OPS_H

#include <stdint.h>

#include "tnorm.h"

/* What every row of one call shares, prepared once by the backend before any row runs. */
typedef struct tn_cpu_call {
  const tn_op_args *args;
  const float *weight; /* weight + weight_offset in float32 (dim elements), or NULL without a weight */
  int stream;          /* write outputs with non-temporal stores */
} tn_cpu_call;

/* scratch: dim floats owned by the caller for this range of rows. */
typedef void (*tn_cpu_rows_fn)(const tn_cpu_call *call, float *scratch, int64_t begin, int64_t end);

void tn_cpu_rms_norm_rows(const tn_cpu_call *call, float *scratch, int64_t begin, int64_t end);
void tn_cpu_l2_norm_rows(const tn_cpu_call *call, float *scratch, int64_t begin, int64_t end);
void tn_cpu_add_rms_norm_rows(const tn_cpu_call *call, float *scratch, int64_t begin, int64_t end);

#endif
