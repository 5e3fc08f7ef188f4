/* The op table: one row per op, saying which operands it takes and which scalars apply.
 * Validation and every backend read it; nothing else knows an op's operand list. */
#ifndef TN_CORE_OPS_H
#define TN_CORE_OPS_H

#include "tnorm.h"

typedef enum tn_operand {
  TN_OPERAND_X,
  TN_OPERAND_WEIGHT,
  TN_OPERAND_MUL,
  TN_OPERAND_RESIDUAL,
  TN_OPERAND_Y,
  TN_OPERAND_RESIDUAL_OUT,
  TN_OPERAND_COUNT
} tn_operand;

typedef enum tn_presence { TN_ABSENT = 0, TN_OPTIONAL, TN_REQUIRED } tn_presence;

typedef struct tn_op_info {
  const char *name;
  tn_presence operands[TN_OPERAND_COUNT];
  int uses_scale; /* l2_norm's scale; weight_offset applies wherever a weight is taken */
} tn_op_info;

/* NULL for an op outside the enum. */
const tn_op_info *tn_op_info_get(tn_op op);

const char *tn_operand_name(tn_operand operand);
int tn_operand_is_output(tn_operand operand);

/* The operand's tensor in args (NULL when not given). */
const tn_tensor *tn_op_operand(const tn_op_args *args, tn_operand operand);

#endif
