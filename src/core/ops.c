#include "ops.h"

#include <stddef.h>

static const tn_op_info op_table[TN_OP_COUNT] = {
    [TN_OP_RMS_NORM] = {"rms_norm",
                        {[TN_OPERAND_X] = TN_REQUIRED,
                         [TN_OPERAND_WEIGHT] = TN_OPTIONAL,
                         [TN_OPERAND_MUL] = TN_OPTIONAL,
                         [TN_OPERAND_Y] = TN_OPTIONAL, /* required without a quantized output */
                         [TN_OPERAND_Q] = TN_OPTIONAL,
                         [TN_OPERAND_QSCALE] = TN_OPTIONAL,
                         [TN_OPERAND_QSCALES] = TN_OPTIONAL,
                         [TN_OPERAND_COS_SIN] = TN_OPTIONAL},
                        .uses_eps = 1,
                        .views_3d = 1,
                        .rope = 1},
    [TN_OP_L2_NORM] = {"l2_norm", {[TN_OPERAND_X] = TN_REQUIRED, [TN_OPERAND_Y] = TN_REQUIRED}, .uses_scale = 1,
                       .uses_eps = 1, .views_3d = 1, .l2_mode = 1},
    [TN_OP_ADD_RMS_NORM] = {"add_rms_norm",
                            {[TN_OPERAND_X] = TN_REQUIRED,
                             [TN_OPERAND_WEIGHT] = TN_OPTIONAL,
                             [TN_OPERAND_MUL] = TN_OPTIONAL,
                             [TN_OPERAND_RESIDUAL] = TN_REQUIRED,
                             [TN_OPERAND_Y] = TN_OPTIONAL, /* required without a quantized output */
                         [TN_OPERAND_Q] = TN_OPTIONAL,
                         [TN_OPERAND_QSCALE] = TN_OPTIONAL,
                         [TN_OPERAND_QSCALES] = TN_OPTIONAL,
                             [TN_OPERAND_RESIDUAL_OUT] = TN_REQUIRED},
                            .uses_eps = 1},
    [TN_OP_ADD] = {"add",
                   {[TN_OPERAND_X] = TN_REQUIRED, [TN_OPERAND_RESIDUAL] = TN_REQUIRED, [TN_OPERAND_Y] = TN_REQUIRED},
                   .broadcast = 1},
    [TN_OP_MUL] = {"mul",
                   {[TN_OPERAND_X] = TN_REQUIRED, [TN_OPERAND_MUL] = TN_REQUIRED, [TN_OPERAND_Y] = TN_REQUIRED},
                   .broadcast = 1},
    [TN_OP_SCALE] = {"scale", {[TN_OPERAND_X] = TN_REQUIRED, [TN_OPERAND_Y] = TN_REQUIRED}, .uses_scale = 1},
    [TN_OP_LAYER_NORM] = {"layer_norm",
                          {[TN_OPERAND_X] = TN_REQUIRED,
                           [TN_OPERAND_WEIGHT] = TN_OPTIONAL,
                           [TN_OPERAND_BIAS] = TN_OPTIONAL,
                           [TN_OPERAND_Y] = TN_OPTIONAL, /* required without a quantized output */
                         [TN_OPERAND_Q] = TN_OPTIONAL,
                         [TN_OPERAND_QSCALE] = TN_OPTIONAL,
                         [TN_OPERAND_QSCALES] = TN_OPTIONAL},
                          .uses_eps = 1},
    [TN_OP_ADD_LAYER_NORM] = {"add_layer_norm",
                              {[TN_OPERAND_X] = TN_REQUIRED,
                               [TN_OPERAND_WEIGHT] = TN_OPTIONAL,
                               [TN_OPERAND_BIAS] = TN_OPTIONAL,
                               [TN_OPERAND_RESIDUAL] = TN_REQUIRED,
                               [TN_OPERAND_Y] = TN_OPTIONAL, /* required without a quantized output */
                         [TN_OPERAND_Q] = TN_OPTIONAL,
                         [TN_OPERAND_QSCALE] = TN_OPTIONAL,
                         [TN_OPERAND_QSCALES] = TN_OPTIONAL,
                               [TN_OPERAND_RESIDUAL_OUT] = TN_REQUIRED},
                              .uses_eps = 1},
    [TN_OP_QUANTIZE] = {"quantize",
                        {[TN_OPERAND_X] = TN_REQUIRED,
                         [TN_OPERAND_Q] = TN_REQUIRED,
                         [TN_OPERAND_QSCALE] = TN_OPTIONAL,
                         [TN_OPERAND_QSCALES] = TN_OPTIONAL}},
};

int tn_op_is_norm(tn_op op) {
  return op == TN_OP_RMS_NORM || op == TN_OP_L2_NORM || op == TN_OP_ADD_RMS_NORM || op == TN_OP_LAYER_NORM ||
         op == TN_OP_ADD_LAYER_NORM;
}

int tn_op_adds_residual(tn_op op) { return op == TN_OP_ADD_RMS_NORM || op == TN_OP_ADD_LAYER_NORM; }

int tn_op_is_layer_norm(tn_op op) { return op == TN_OP_LAYER_NORM || op == TN_OP_ADD_LAYER_NORM; }

const tn_op_info *tn_op_info_get(tn_op op) {
  return (unsigned)op < TN_OP_COUNT ? &op_table[op] : NULL;
}

const char *tn_op_name(tn_op op) {
  const tn_op_info *info = tn_op_info_get(op);
  return info != NULL ? info->name : "?";
}

const char *tn_operand_name(tn_operand operand) {
  static const char *const names[TN_OPERAND_COUNT] = {"x",       "weight",  "mul",          "residual",
                                                      "y",       "residual_out", "bias", "cos_sin",
                                                      "quant.q", "quant.scale",  "quant.scales"};
  return (unsigned)operand < TN_OPERAND_COUNT ? names[operand] : "?";
}

int tn_operand_is_vector(tn_operand operand) { return operand == TN_OPERAND_WEIGHT || operand == TN_OPERAND_BIAS; }

int tn_operand_is_output(tn_operand operand) {
  return operand == TN_OPERAND_Y || operand == TN_OPERAND_RESIDUAL_OUT || operand == TN_OPERAND_Q ||
         operand == TN_OPERAND_QSCALES;
}

int tn_operand_is_quant(tn_operand operand) {
  return operand == TN_OPERAND_Q || operand == TN_OPERAND_QSCALE || operand == TN_OPERAND_QSCALES;
}

const tn_tensor **tn_op_operand_slot(tn_op_args *args, tn_operand operand) {
  switch (operand) {
    case TN_OPERAND_X:
      return &args->x;
    case TN_OPERAND_WEIGHT:
      return &args->weight;
    case TN_OPERAND_MUL:
      return &args->mul;
    case TN_OPERAND_RESIDUAL:
      return &args->residual;
    case TN_OPERAND_Y:
      return &args->y;
    case TN_OPERAND_RESIDUAL_OUT:
      return &args->residual_out;
    case TN_OPERAND_BIAS:
      return &args->bias;
    case TN_OPERAND_COS_SIN:
      return &args->rope.cos_sin;
    case TN_OPERAND_Q:
      return &args->quant.q;
    case TN_OPERAND_QSCALE:
      return &args->quant.scale;
    case TN_OPERAND_QSCALES:
      return &args->quant.scales;
    case TN_OPERAND_COUNT:
      break;
  }
  return NULL;
}

const tn_tensor *tn_op_operand(const tn_op_args *args, tn_operand operand) {
  const tn_tensor **slot = tn_op_operand_slot((tn_op_args *)args, operand);
  return slot != NULL ? *slot : NULL;
}

tn_op_args tn_op_args_init(tn_op op) {
  tn_op_args a = {0};
  a.op = op;
  a.eps = 1e-6f;
  a.scale = 1.0f;
  a.weight_offset = 0.0f;
  a.casting = TN_CASTING_EXACT;
  a.residual_mode = TN_RESIDUAL_NORM_STORED;
  a.l2_mode = TN_L2_RSQRT_EPS;
  a.rope.style = TN_ROPE_NONE;
  a.quant = tn_quant_init(TN_QUANT_NONE);
  return a;
}

tn_quant tn_quant_init(tn_quant_format format) {
  tn_quant q = {0};
  q.format = format;
  q.scaling = format == TN_QUANT_MXFP8 || format == TN_QUANT_NVFP4 ? TN_QUANT_SCALE_GROUP : TN_QUANT_SCALE_TOKEN;
  q.group_size = 0;
  q.source = TN_QUANT_FROM_ROUNDED;
  q.pow2_scales = 0;
  q.layout = TN_SCALES_ROW_MAJOR;
  q.scale_ub = 0.0f;
  q.scale_min = 0x1p-126f;
  return q;
}

const char *tn_quant_format_name(tn_quant_format format) {
  static const char *const names[] = {"none", "fp8_e4m3", "fp8_e5m2", "int8", "mxfp8", "nvfp4"};
  return (unsigned)format < sizeof names / sizeof names[0] ? names[format] : "?";
}

int64_t tn_quant_group(const tn_quant *q, int64_t dim) {
  if (q->scaling == TN_QUANT_SCALE_TOKEN) return dim;
  if (q->scaling == TN_QUANT_SCALE_TENSOR) return dim;
  if (q->group_size != 0) return q->group_size;
  return q->format == TN_QUANT_NVFP4 ? 16 : 32;
}
