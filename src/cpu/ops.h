/* The CPU ops: each runs a validated op over rows [begin, end) on the calling thread. */
#ifndef TN_CPU_OPS_H
#define TN_CPU_OPS_H

#include <stdint.h>

#include "tnorm.h"

typedef void (*tn_cpu_rows_fn)(const tn_op_args *args, int64_t begin, int64_t end);

void tn_cpu_rms_norm_rows(const tn_op_args *args, int64_t begin, int64_t end);
void tn_cpu_l2_norm_rows(const tn_op_args *args, int64_t begin, int64_t end);
void tn_cpu_add_rms_norm_rows(const tn_op_args *args, int64_t begin, int64_t end);

#endif
