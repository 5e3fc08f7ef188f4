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
  TN_OPERAND_BIAS,
  TN_OPERAND_COS_SIN, /* the rope's table: args->rope.cos_sin */
  TN_OPERAND_Q,       /* the quantized output: args->quant.q */
  TN_OPERAND_QSCALE,  /* its static or global scale (an input): args->quant.scale */
  TN_OPERAND_QSCALES, /* its dynamic scales (an output): args->quant.scales */
  TN_OPERAND_COUNT
} tn_operand;

typedef enum tn_presence { TN_ABSENT = 0, TN_OPTIONAL, TN_REQUIRED } tn_presence;

typedef struct tn_op_info {
  const char *name;
  tn_presence operands[TN_OPERAND_COUNT];
  int uses_scale; /* l2_norm's and scale's scale; weight_offset applies wherever a weight is taken */
  int uses_eps;   /* the norms */
  int broadcast;  /* the second row operand (residual or mul) may be one row applied to every row */
  int views_3d;   /* x (and the row operands) may be 3-D views [rows, heads, dim] */
  int l2_mode;    /* takes tn_op_args.l2_mode */
  int rope;       /* takes tn_op_args.rope (without mul) */
} tn_op_info;

/* The ops that reduce a row (the norms): they take casting and eps. */
int tn_op_is_norm(tn_op op);
/* add_rms_norm and add_layer_norm: a residual sum, its own dtype (x's or f32), and a residual mode. */
int tn_op_adds_residual(tn_op op);
/* layer_norm and add_layer_norm. */
int tn_op_is_layer_norm(tn_op op);

/* Elements per scale of a validated quantized output: the group (its group_size, or the format's own
 * for MXFP8 and NVFP4), or dim for TOKEN and TENSOR scales. */
int64_t tn_quant_group(const tn_quant *q, int64_t dim);

/* NULL for an op outside the enum. */
const tn_op_info *tn_op_info_get(tn_op op);

const char *tn_operand_name(tn_operand operand);
int tn_operand_is_output(tn_operand operand);

/* The quantized output's operands (q, scale, scales): shaped by the format, not like x. */
int tn_operand_is_quant(tn_operand operand);

/* Operands that are vectors of dim elements (weight, bias), not row-shaped. */
int tn_operand_is_vector(tn_operand operand);

/* The operand's tensor in args (NULL when not given), and the field that holds it (NULL outside the enum). */
const tn_tensor *tn_op_operand(const tn_op_args *args, tn_operand operand);
const tn_tensor **tn_op_operand_slot(tn_op_args *args, tn_operand operand);

#endif
