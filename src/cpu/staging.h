/* Operands whose data is not aligned to their element: the CPU kernels read rows through float and
 * uint16_t pointers (and the rope's positions through int32_t / int64_t), which C only allows at their
 * alignment. Such an operand is copied to an aligned buffer, the op runs on the copies, and the outputs
 * are copied back, so a call accepts any alignment, as the CUDA backend does. */
#ifndef TN_CPU_STAGING_H
#define TN_CPU_STAGING_H

#include "../core/ops.h"

typedef struct tn_cpu_staging {
  tn_op_args args;                         /* the call's arguments, with the staged operands swapped in */
  tn_tensor tensors[TN_OPERAND_COUNT];     /* the staged views (packed, aligned) */
  void *buffers[TN_OPERAND_COUNT];         /* their memory; NULL where the operand is used as given */
  void *positions;                         /* the rope's positions, when staged */
} tn_cpu_staging;

/* Whether some operand (or the rope's positions) is not aligned to its element. */
int tn_cpu_needs_staging(const tn_op_args *args);

/* Copies the misaligned inputs into aligned buffers and makes aligned buffers for the misaligned outputs;
 * st->args is then the call to run. Fails with TN_ERR_NO_MEMORY having freed what it took. */
tn_status tn_cpu_stage(tn_context *ctx, const tn_op_args *args, tn_cpu_staging *st);

/* Copies the staged outputs back into the caller's views (only when `ran` is nonzero, so a failed run
 * writes nothing) and frees every buffer. */
void tn_cpu_unstage(tn_cpu_staging *st, const tn_op_args *args, int ran);

#endif
