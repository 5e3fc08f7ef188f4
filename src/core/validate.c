#include "validate.h"

#include <inttypes.h>
#include <math.h>

#include "dtype.h"
#include "error.h"
#include "ops.h"
#include "tensor.h"

/* Operands shaped like x's rows (the others are vectors, the rope's table, or a quantized output's). */
static int is_row_shaped(tn_operand operand) {
  return !tn_operand_is_vector(operand) && operand != TN_OPERAND_COS_SIN && !tn_operand_is_quant(operand);
}

/* Checks one tensor on its own: dtype, device, shape, stride, data pointer and sizes. */
static tn_status check_tensor(tn_context *ctx, const char *op, const char *name, const tn_tensor *t) {
  TN_RETURN_ERROR_IF(!tn_dtype_known(t->dtype), ctx, TN_ERR_DTYPE, "%s: %s has unknown dtype %d", op, name,
                     (int)t->dtype);
  TN_RETURN_ERROR_IF((unsigned)t->device.kind >= TN_DEVICE_KIND_COUNT || t->device.index < 0, ctx,
                     TN_ERR_DEVICE, "%s: %s is on unknown device kind %d index %d", op, name,
                     (int)t->device.kind, t->device.index);
  TN_RETURN_ERROR_IF(t->device.kind == TN_DEVICE_CPU && t->device.index != 0, ctx, TN_ERR_DEVICE,
                     "%s: %s is on CPU device index %d; the CPU is index 0", op, name, t->device.index);
  TN_RETURN_ERROR_IF(t->rows < 0, ctx, TN_ERR_SHAPE, "%s: %s has %" PRId64 " rows; must be >= 0", op, name,
                     t->rows);
  TN_RETURN_ERROR_IF(t->dim <= 0, ctx, TN_ERR_SHAPE, "%s: %s has dim %" PRId64 "; must be > 0", op, name,
                     t->dim);
  TN_RETURN_ERROR_IF(t->heads < 0, ctx, TN_ERR_SHAPE, "%s: %s has %" PRId64 " heads; must be >= 0", op, name,
                     t->heads);
  /* A row's elements: dim, or from its first head to the end of its last. */
  int64_t row_span = t->dim;
  if (t->heads > 1) {
    TN_RETURN_ERROR_IF(t->head_stride < t->dim, ctx, TN_ERR_SHAPE,
                       "%s: %s has head_stride %" PRId64 ", less than its dim %" PRId64, op, name, t->head_stride,
                       t->dim);
    int overflow = __builtin_mul_overflow(t->heads - 1, t->head_stride, &row_span) ||
                   __builtin_add_overflow(row_span, t->dim, &row_span);
    TN_RETURN_ERROR_IF(overflow, ctx, TN_ERR_OVERFLOW, "%s: %s of %" PRId64 " heads x head_stride %" PRId64
                       " overflows 64 bits", op, name, t->heads, t->head_stride);
    TN_RETURN_ERROR_IF(t->row_stride < row_span, ctx, TN_ERR_SHAPE,
                       "%s: %s has row_stride %" PRId64 ", less than its %" PRId64 " heads span (%" PRId64
                       " elements: (heads - 1) * head_stride + dim)",
                       op, name, t->row_stride, t->heads, row_span);
  }
  TN_RETURN_ERROR_IF(t->row_stride < t->dim, ctx, TN_ERR_SHAPE,
                     "%s: %s has row_stride %" PRId64 ", less than its dim %" PRId64, op, name, t->row_stride,
                     t->dim);
  if (t->rows == 0) return TN_OK; /* nothing is read or written */
  TN_RETURN_ERROR_IF(t->data == NULL, ctx, TN_ERR_NULL, "%s: %s data is NULL", op, name);
  /* Elements from the first to the last touched: (rows - 1) * row_stride + row_span, then bytes. */
  int64_t span, bytes;
  int overflow = __builtin_mul_overflow(t->rows - 1, t->row_stride, &span) ||
                 __builtin_add_overflow(span, row_span, &span) ||
                 __builtin_mul_overflow(span, (int64_t)tn_dtype_size(t->dtype), &bytes) ||
                 (uint64_t)bytes > (uint64_t)SIZE_MAX ||
                 (uintptr_t)t->data > UINTPTR_MAX - (uintptr_t)bytes;
  TN_RETURN_ERROR_IF(overflow, ctx, TN_ERR_OVERFLOW,
                     "%s: %s of %" PRId64 " rows x row_stride %" PRId64 " %s overflows the address space", op,
                     name, t->rows, t->row_stride, tn_dtype_name(t->dtype));
  return TN_OK;
}

/* Checks an operand against x: shape, dtype and device agreement. */
static tn_status check_against_x(tn_context *ctx, const tn_op_args *args, const tn_op_info *info, tn_operand operand,
                                 const tn_tensor *t) {
  const tn_tensor *x = args->x;
  const char *op = info->name, *name = tn_operand_name(operand);
  const int broadcast = info->broadcast && !tn_operand_is_output(operand) && t->rows == 1 && x->rows != 1;
  if (tn_operand_is_vector(operand)) {
    TN_RETURN_ERROR_IF(t->rows != 1 || tn_tensor_head_count(t) != 1, ctx, TN_ERR_SHAPE,
                       "%s: %s is %" PRId64 " x %" PRId64 "%s; must be one row of dim %" PRId64 " elements", op,
                       name, t->rows, t->dim, tn_tensor_head_count(t) != 1 ? " with heads" : "", x->dim);
    TN_RETURN_ERROR_IF(t->dim != x->dim, ctx, TN_ERR_SHAPE, "%s: %s has %" PRId64 " elements, dim is %" PRId64, op,
                       name, t->dim, x->dim);
    TN_RETURN_ERROR_IF(t->dtype != x->dtype && t->dtype != TN_F32, ctx, TN_ERR_DTYPE,
                       "%s: %s is %s; must be f32 or x's dtype %s", op, name, tn_dtype_name(t->dtype),
                       tn_dtype_name(x->dtype));
  } else if (operand == TN_OPERAND_COS_SIN) {
    const int64_t rotary = args->rope.rotary_dim != 0 ? args->rope.rotary_dim : x->dim;
    TN_RETURN_ERROR_IF(t->dim != rotary || tn_tensor_head_count(t) != 1, ctx, TN_ERR_SHAPE,
                       "%s: cos_sin has rows of %" PRId64 " elements%s; must be rotary_dim = %" PRId64
                       " (the cosines, then the sines)",
                       op, t->dim, tn_tensor_head_count(t) != 1 ? " with heads" : "", rotary);
    TN_RETURN_ERROR_IF(t->rows < 1, ctx, TN_ERR_SHAPE, "%s: cos_sin has no rows; must have one per position", op);
    TN_RETURN_ERROR_IF(t->dtype != x->dtype && t->dtype != TN_F32, ctx, TN_ERR_DTYPE,
                       "%s: cos_sin is %s; must be f32 or x's dtype %s", op, tn_dtype_name(t->dtype),
                       tn_dtype_name(x->dtype));
  } else {
    TN_RETURN_ERROR_IF((t->rows != x->rows && !broadcast) || t->dim != x->dim, ctx, TN_ERR_SHAPE,
                       "%s: %s is %" PRId64 " x %" PRId64 ", x is %" PRId64 " x %" PRId64 "%s", op, name, t->rows,
                       t->dim, x->rows, x->dim, info->broadcast ? " (or 1 x dim, applied to every row)" : "");
    TN_RETURN_ERROR_IF(tn_tensor_head_count(t) != tn_tensor_head_count(x), ctx, TN_ERR_SHAPE,
                       "%s: %s has %" PRId64 " heads per row, x has %" PRId64, op, name, tn_tensor_head_count(t),
                       tn_tensor_head_count(x));
    /* The residual stream (residual in, residual_out) may be f32 beside f16/bf16 activations. */
    const int stream = tn_op_adds_residual(args->op) &&
                       (operand == TN_OPERAND_RESIDUAL || operand == TN_OPERAND_RESIDUAL_OUT);
    if (stream) {
      TN_RETURN_ERROR_IF(t->dtype != x->dtype && t->dtype != TN_F32, ctx, TN_ERR_DTYPE, "%s: %s is %s, x is %s%s",
                         op, name, tn_dtype_name(t->dtype), tn_dtype_name(x->dtype),
                         x->dtype != TN_F32 ? " (the residual stream may also be f32)" : "");
      const tn_tensor *in = args->residual;
      TN_RETURN_ERROR_IF(operand == TN_OPERAND_RESIDUAL_OUT && in != NULL && t->dtype != in->dtype, ctx,
                         TN_ERR_DTYPE, "%s: residual_out is %s, residual is %s; must be the same", op,
                         tn_dtype_name(t->dtype), tn_dtype_name(in->dtype));
    } else {
      TN_RETURN_ERROR_IF(t->dtype != x->dtype, ctx, TN_ERR_DTYPE, "%s: %s is %s, x is %s", op, name,
                         tn_dtype_name(t->dtype), tn_dtype_name(x->dtype));
    }
  }
  TN_RETURN_ERROR_IF(t->device.kind != x->device.kind || t->device.index != x->device.index, ctx, TN_ERR_DEVICE,
                     "%s: %s is on device %d:%d, x on %d:%d", op, name, (int)t->device.kind, t->device.index,
                     (int)x->device.kind, x->device.index);
  return TN_OK;
}

/* The numerics modes and the rope: valid values, and only on the ops that take them. */
static tn_status check_modes(tn_context *ctx, const tn_op_info *info, const tn_op_args *args) {
  const char *op = info->name;
  const int norm = tn_op_is_norm(args->op);
  TN_RETURN_ERROR_IF((unsigned)args->casting > TN_CASTING_LLAMA, ctx, TN_ERR_VALUE, "%s: unknown casting %d", op,
                     (int)args->casting);
  TN_RETURN_ERROR_IF(!norm && args->casting != TN_CASTING_EXACT, ctx, TN_ERR_VALUE,
                     "%s: casting applies to the norms only; must be TN_CASTING_EXACT", op);
  TN_RETURN_ERROR_IF((unsigned)args->residual_mode > TN_RESIDUAL_NORM_F32, ctx, TN_ERR_VALUE,
                     "%s: unknown residual_mode %d", op, (int)args->residual_mode);
  TN_RETURN_ERROR_IF(!tn_op_adds_residual(args->op) && args->residual_mode != TN_RESIDUAL_NORM_STORED, ctx,
                     TN_ERR_VALUE, "%s: residual_mode applies to add_rms_norm and add_layer_norm only", op);
  TN_RETURN_ERROR_IF((unsigned)args->l2_mode > TN_L2_MAX_NORM_EPS, ctx, TN_ERR_VALUE, "%s: unknown l2_mode %d", op,
                     (int)args->l2_mode);
  TN_RETURN_ERROR_IF(!info->l2_mode && args->l2_mode != TN_L2_RSQRT_EPS, ctx, TN_ERR_VALUE,
                     "%s: l2_mode applies to l2_norm only", op);

  const tn_rope *rope = &args->rope;
  TN_RETURN_ERROR_IF((unsigned)rope->style > TN_ROPE_GPTJ, ctx, TN_ERR_VALUE, "%s: unknown rope style %d", op,
                     (int)rope->style);
  if (rope->style == TN_ROPE_NONE) {
    TN_RETURN_ERROR_IF(rope->cos_sin != NULL, ctx, TN_ERR_OPERAND, "%s: cos_sin given without a rope style", op);
    return TN_OK;
  }
  TN_RETURN_ERROR_IF(!info->rope, ctx, TN_ERR_VALUE, "%s: takes no rope (rms_norm does)", op);
  TN_RETURN_ERROR_IF(args->mul != NULL, ctx, TN_ERR_OPERAND, "%s: a rope and a multiplicand cannot be combined", op);
  const int64_t dim = args->x->dim, rotary = rope->rotary_dim != 0 ? rope->rotary_dim : dim;
  TN_RETURN_ERROR_IF(dim > TN_ROPE_MAX_DIM, ctx, TN_ERR_SHAPE, "%s: rope on heads of %" PRId64
                     " elements; at most %d", op, dim, TN_ROPE_MAX_DIM);
  TN_RETURN_ERROR_IF(rotary < 2 || rotary > dim || rotary % 2 != 0, ctx, TN_ERR_VALUE,
                     "%s: rotary_dim is %" PRId64 "; must be even, from 2 to dim %" PRId64 " (0 means dim)", op,
                     rope->rotary_dim, dim);
  TN_RETURN_ERROR_IF(rope->positions == NULL && args->x->rows > 0, ctx, TN_ERR_NULL,
                     "%s: rope positions are NULL", op);
  TN_RETURN_ERROR_IF(rope->positions_i64 != 0 && rope->positions_i64 != 1, ctx, TN_ERR_VALUE,
                     "%s: positions_i64 is %d; must be 0 (int32) or 1 (int64)", op, rope->positions_i64);
  TN_RETURN_ERROR_IF(rope->cos_sin == NULL && !(isfinite(rope->theta) && rope->theta > 0.0f), ctx, TN_ERR_VALUE,
                     "%s: rope theta is %g without a cos_sin table; must be finite and > 0", op,
                     (double)rope->theta);
  return TN_OK;
}

/* A quantized output's settings (format, scaling, group, source, scales kind and layout, the bounds of
 * dynamic scales) against each other and x's dim, and the shapes they give its tensors. */
tn_status tn_quant_shapes_check(tn_context *ctx, const char *op, const tn_quant *q, int64_t rows, int64_t dim,
                                tn_quant_shapes *out) {
  TN_RETURN_ERROR_IF(q->format == TN_QUANT_NONE || (unsigned)q->format > TN_QUANT_NVFP4, ctx, TN_ERR_VALUE,
                     "%s: quant format %d is not a format (fp8_e4m3 .. nvfp4)", op, (int)q->format);
  TN_RETURN_ERROR_IF(rows < 0 || dim <= 0, ctx, TN_ERR_SHAPE, "%s: %" PRId64 " x %" PRId64 " is no tensor shape",
                     op, rows, dim);
  const char *format = tn_quant_format_name(q->format);
  const int block_format = q->format == TN_QUANT_MXFP8 || q->format == TN_QUANT_NVFP4;
  TN_RETURN_ERROR_IF((unsigned)q->scaling > TN_QUANT_SCALE_GROUP, ctx, TN_ERR_VALUE, "%s: unknown quant scaling %d",
                     op, (int)q->scaling);
  TN_RETURN_ERROR_IF(block_format && q->scaling != TN_QUANT_SCALE_GROUP, ctx, TN_ERR_VALUE,
                     "%s: %s takes TN_QUANT_SCALE_GROUP scaling only (its block scales)", op, format);
  TN_RETURN_ERROR_IF((unsigned)q->source > TN_QUANT_FROM_F32, ctx, TN_ERR_VALUE, "%s: unknown quant source %d", op,
                     (int)q->source);
  TN_RETURN_ERROR_IF(q->pow2_scales != 0 && q->pow2_scales != 1, ctx, TN_ERR_VALUE,
                     "%s: quant.pow2_scales is %d; must be 0 or 1", op, q->pow2_scales);
  TN_RETURN_ERROR_IF(q->pow2_scales && (q->scaling == TN_QUANT_SCALE_TENSOR || q->format == TN_QUANT_NVFP4), ctx,
                     TN_ERR_VALUE, "%s: pow2_scales applies to dynamic FP8, INT8 and MXFP8 scales", op);
  TN_RETURN_ERROR_IF((unsigned)q->layout > TN_SCALES_SWIZZLED, ctx, TN_ERR_VALUE, "%s: unknown scales layout %d", op,
                     (int)q->layout);
  const int dynamic = q->scaling != TN_QUANT_SCALE_TENSOR;
  TN_RETURN_ERROR_IF(!dynamic && q->layout != TN_SCALES_ROW_MAJOR, ctx, TN_ERR_VALUE,
                     "%s: a static scale has no scales layout (leave it TN_SCALES_ROW_MAJOR)", op);
  TN_RETURN_ERROR_IF(q->layout == TN_SCALES_SWIZZLED && !block_format, ctx, TN_ERR_VALUE,
                     "%s: the swizzled scales layout is MXFP8's and NVFP4's", op);

  /* The group, and dim against it. */
  if (q->scaling == TN_QUANT_SCALE_GROUP) {
    if (block_format) {
      const int64_t own = q->format == TN_QUANT_MXFP8 ? 32 : 16;
      TN_RETURN_ERROR_IF(q->group_size != 0 && q->group_size != own, ctx, TN_ERR_VALUE,
                         "%s: %s groups are %" PRId64 " elements; group_size is %" PRId64 " (0 means %" PRId64 ")", op,
                         format, own, q->group_size, own);
    } else {
      TN_RETURN_ERROR_IF(q->group_size != 32 && q->group_size != 64 && q->group_size != 128, ctx, TN_ERR_VALUE,
                         "%s: group_size is %" PRId64 "; %s groups are 32, 64 or 128 elements", op, q->group_size,
                         format);
    }
  } else {
    TN_RETURN_ERROR_IF(q->group_size != 0, ctx, TN_ERR_VALUE,
                       "%s: group_size is %" PRId64 " with %s scaling; it applies to group scaling (leave it 0)", op,
                       q->group_size, q->scaling == TN_QUANT_SCALE_TOKEN ? "per-token" : "per-tensor");
  }
  const int64_t group = tn_quant_group(q, dim), groups = dim / group;
  TN_RETURN_ERROR_IF(dim % group != 0, ctx, TN_ERR_SHAPE,
                     "%s: dim %" PRId64 " is not a multiple of %s's group of %" PRId64 " elements", op, dim, format,
                     group);

  /* Scalars of the dynamic scales. */
  TN_RETURN_ERROR_IF(!isfinite(q->scale_ub) || q->scale_ub < 0.0f, ctx, TN_ERR_VALUE,
                     "%s: quant.scale_ub is %g; must be finite and > 0, or 0 for none", op, (double)q->scale_ub);
  TN_RETURN_ERROR_IF(!isfinite(q->scale_min) || q->scale_min <= 0.0f, ctx, TN_ERR_VALUE,
                     "%s: quant.scale_min is %g; must be finite and > 0 (tn_quant_init gives 2^-126)", op,
                     (double)q->scale_min);
  TN_RETURN_ERROR_IF(q->scale_ub != 0.0f && q->scale_ub < q->scale_min, ctx, TN_ERR_VALUE,
                     "%s: quant.scale_ub %g is below quant.scale_min %g", op, (double)q->scale_ub, (double)q->scale_min);

  out->q_dtype = q->format == TN_QUANT_FP8_E5M2 ? TN_F8_E5M2
                 : q->format == TN_QUANT_INT8   ? TN_I8
                 : q->format == TN_QUANT_NVFP4  ? TN_U8
                                                : TN_F8_E4M3;
  out->q_rows = rows;
  out->q_dim = q->format == TN_QUANT_NVFP4 ? dim / 2 : dim;
  out->scales_dtype = q->format == TN_QUANT_NVFP4                   ? TN_F8_E4M3
                      : q->format == TN_QUANT_MXFP8 || q->pow2_scales ? TN_U8
                                                                      : TN_F32;
  out->group = group;
  out->scales_rows = out->scales_dim = 0;
  if (dynamic && q->layout == TN_SCALES_ROW_MAJOR) {
    out->scales_rows = rows;
    out->scales_dim = groups;
  } else if (dynamic && q->layout == TN_SCALES_COLUMN_MAJOR) {
    out->scales_rows = groups;
    out->scales_dim = rows;
  } else if (dynamic) {
    out->scales_rows = (rows + 127) / 128 * 128;
    out->scales_dim = (groups + 3) / 4 * 4;
  }
  return TN_OK;
}

static tn_status check_shape(tn_context *ctx, const char *op, const char *name, const tn_tensor *t, int64_t rows,
                             int64_t dim, const char *what) {
  TN_RETURN_ERROR_IF(t->rows != rows || t->dim != dim || tn_tensor_head_count(t) != 1, ctx, TN_ERR_SHAPE,
                     "%s: %s is %" PRId64 " x %" PRId64 "%s; must be %" PRId64 " x %" PRId64 " (%s)", op, name,
                     t->rows, t->dim, tn_tensor_head_count(t) != 1 ? " with heads" : "", rows, dim, what);
  return TN_OK;
}

/* A quantized output (tn_quant) on an op: where it may be, its settings (tn_quant_shapes_check), and its
 * tensors' presence, dtypes, shapes and device. Operand presence against the op is the table's. */
static tn_status check_quant(tn_context *ctx, const tn_op_info *info, const tn_op_args *args) {
  const char *op = info->name;
  const tn_quant *q = &args->quant;
  const tn_tensor *x = args->x;
  TN_RETURN_ERROR_IF((unsigned)q->format > TN_QUANT_NVFP4, ctx, TN_ERR_VALUE, "%s: unknown quant format %d", op,
                     (int)q->format);
  if (q->format == TN_QUANT_NONE) {
    TN_RETURN_ERROR_IF(args->op == TN_OP_QUANTIZE, ctx, TN_ERR_VALUE, "%s: quant.format is TN_QUANT_NONE", op);
    TN_RETURN_ERROR_IF(q->q != NULL || q->scale != NULL || q->scales != NULL, ctx, TN_ERR_OPERAND,
                       "%s: quant tensors given with format TN_QUANT_NONE", op);
    TN_RETURN_ERROR_IF(info->operands[TN_OPERAND_Y] != TN_ABSENT && args->y == NULL, ctx, TN_ERR_NULL,
                       "%s: y is required (it may be left out only beside a quantized output)", op);
    return TN_OK;
  }
  const char *format = tn_quant_format_name(q->format);
  TN_RETURN_ERROR_IF(info->operands[TN_OPERAND_Q] == TN_ABSENT, ctx, TN_ERR_VALUE,
                     "%s: takes no quantized output (rms_norm, add_rms_norm, layer_norm, add_layer_norm and quantize "
                     "do)", op);
  TN_RETURN_ERROR_IF(args->rope.style != TN_ROPE_NONE, ctx, TN_ERR_VALUE,
                     "%s: a quantized output cannot follow a rope", op);
  TN_RETURN_ERROR_IF(tn_tensor_head_count(x) != 1, ctx, TN_ERR_SHAPE,
                     "%s: a quantized output takes 2-D views; x has %" PRId64 " heads", op, tn_tensor_head_count(x));
  TN_RETURN_ERROR_IF(q->q == NULL, ctx, TN_ERR_NULL, "%s: quant.q is required with format %s", op, format);
  tn_quant_shapes shapes;
  TN_FORWARD_IF_ERROR(tn_quant_shapes_check(ctx, op, q, x->rows, x->dim, &shapes));
  const int dynamic = q->scaling != TN_QUANT_SCALE_TENSOR;

  /* The tensors: each on its own (a column-major scales tensor of a call without rows has no columns,
   * which is its right shape), then against the format. */
  for (int o = TN_OPERAND_Q; o <= TN_OPERAND_QSCALES; o++) {
    const tn_tensor *t = tn_op_operand(args, (tn_operand)o);
    const int empty_columns = o == TN_OPERAND_QSCALES && q->layout == TN_SCALES_COLUMN_MAJOR && x->rows == 0 &&
                              t != NULL && t->dim == 0;
    if (t != NULL && !empty_columns) TN_FORWARD_IF_ERROR(check_tensor(ctx, op, tn_operand_name((tn_operand)o), t));
  }

  /* q */
  const tn_tensor *qt = q->q;
  TN_RETURN_ERROR_IF(qt->dtype != shapes.q_dtype, ctx, TN_ERR_DTYPE, "%s: quant.q is %s; %s stores %s", op,
                     tn_dtype_name(qt->dtype), format, tn_dtype_name(shapes.q_dtype));
  TN_FORWARD_IF_ERROR(check_shape(ctx, op, "quant.q", qt, shapes.q_rows, shapes.q_dim,
                                  q->format == TN_QUANT_NVFP4 ? "x's rows, two elements a byte" : "x's shape"));

  /* scale: the static scale, or NVFP4's global one */
  const int wants_scale = !dynamic || q->format == TN_QUANT_NVFP4;
  TN_RETURN_ERROR_IF(wants_scale && q->scale == NULL, ctx, TN_ERR_NULL, "%s: quant.scale is required (%s)", op,
                     dynamic ? "NVFP4's global scale" : "the static scale");
  TN_RETURN_ERROR_IF(!wants_scale && q->scale != NULL, ctx, TN_ERR_OPERAND,
                     "%s: quant.scale given with dynamic %s scales; only static scaling and NVFP4 take one", op,
                     format);
  if (q->scale != NULL) {
    TN_RETURN_ERROR_IF(q->scale->dtype != TN_F32, ctx, TN_ERR_DTYPE, "%s: quant.scale is %s; must be f32", op,
                       tn_dtype_name(q->scale->dtype));
    TN_FORWARD_IF_ERROR(check_shape(ctx, op, "quant.scale", q->scale, 1, 1, "one float"));
  }

  /* scales: the dynamic ones, in their layout */
  TN_RETURN_ERROR_IF(dynamic && q->scales == NULL, ctx, TN_ERR_NULL, "%s: quant.scales is required with dynamic "
                     "scales", op);
  TN_RETURN_ERROR_IF(!dynamic && q->scales != NULL, ctx, TN_ERR_OPERAND,
                     "%s: quant.scales given with a static scale (quant.scale is the input)", op);
  if (q->scales != NULL) {
    const tn_tensor *st = q->scales;
    static const char *const what[] = {"rows x groups", "groups x rows, column-major",
                                       "rows rounded up to 128 x groups rounded up to 4, swizzled"};
    TN_RETURN_ERROR_IF(st->dtype != shapes.scales_dtype, ctx, TN_ERR_DTYPE,
                       "%s: quant.scales is %s; these scales are %s", op, tn_dtype_name(st->dtype),
                       tn_dtype_name(shapes.scales_dtype));
    TN_FORWARD_IF_ERROR(check_shape(ctx, op, "quant.scales", st, shapes.scales_rows, shapes.scales_dim,
                                    what[q->layout]));
    TN_RETURN_ERROR_IF(q->layout == TN_SCALES_SWIZZLED && st->row_stride != st->dim, ctx, TN_ERR_SHAPE,
                       "%s: swizzled quant.scales must be contiguous; its row_stride is %" PRId64 ", dim %" PRId64,
                       op, st->row_stride, st->dim);
  }
  for (int o = TN_OPERAND_Q; o <= TN_OPERAND_QSCALES; o++) {
    const tn_tensor *t = tn_op_operand(args, (tn_operand)o);
    TN_RETURN_ERROR_IF(t != NULL && (t->device.kind != x->device.kind || t->device.index != x->device.index), ctx,
                       TN_ERR_DEVICE, "%s: %s is on device %d:%d, x on %d:%d", op, tn_operand_name((tn_operand)o),
                       (int)t->device.kind, t->device.index, (int)x->device.kind, x->device.index);
  }
  return TN_OK;
}

static tn_status check_scalars(tn_context *ctx, const tn_op_info *info, const tn_op_args *args) {
  const char *op = info->name;
  TN_RETURN_ERROR_IF(info->uses_eps && (!isfinite(args->eps) || args->eps < 0.0f), ctx, TN_ERR_VALUE,
                     "%s: eps is %g; must be finite and >= 0", op, (double)args->eps);
  if (info->uses_scale) {
    TN_RETURN_ERROR_IF(!isfinite(args->scale), ctx, TN_ERR_VALUE, "%s: scale is %g; must be finite", op,
                       (double)args->scale);
  } else {
    TN_RETURN_ERROR_IF(args->scale != 1.0f, ctx, TN_ERR_VALUE, "%s: scale is %g; this op takes none (must be 1)",
                       op, (double)args->scale);
  }
  if (args->weight != NULL) { /* validation already refused a weight the op does not take */
    TN_RETURN_ERROR_IF(!isfinite(args->weight_offset), ctx, TN_ERR_VALUE, "%s: weight_offset is %g; must be finite",
                       op, (double)args->weight_offset);
  } else {
    TN_RETURN_ERROR_IF(args->weight_offset != 0.0f, ctx, TN_ERR_VALUE,
                       "%s: weight_offset is %g without a weight; must be 0", op, (double)args->weight_offset);
  }
  return TN_OK;
}

/* An output may be exactly a row-shaped input; any other shared byte is refused. */
static tn_status check_overlaps(tn_context *ctx, const char *op, const tn_op_args *args) {
  for (int o = 0; o < TN_OPERAND_COUNT; o++) {
    const tn_tensor *out = tn_op_operand(args, (tn_operand)o);
    if (out == NULL || !tn_operand_is_output((tn_operand)o)) continue;
    for (int i = 0; i < TN_OPERAND_COUNT; i++) {
      const tn_tensor *other = tn_op_operand(args, (tn_operand)i);
      if (i == o || other == NULL) continue;
      if (tn_operand_is_output((tn_operand)i) && i < o) continue; /* pair already checked */
      if (!tn_tensors_overlap(out, other)) continue;
      int in_place = !tn_operand_is_output((tn_operand)i) && is_row_shaped((tn_operand)i) &&
                     tn_tensor_same_view(out, other);
      TN_RETURN_ERROR_IF(!in_place, ctx, TN_ERR_OVERLAP,
                         "%s: %s overlaps %s without being the same view (only an output equal to a row input "
                         "is allowed)",
                         op, tn_operand_name((tn_operand)o), tn_operand_name((tn_operand)i));
    }
  }
  return TN_OK;
}

tn_status tn_validate(tn_context *ctx, const tn_op_args *args) {
  TN_RETURN_ERROR_IF(args == NULL, ctx, TN_ERR_NULL, "tn_op_run: args is NULL");
  const tn_op_info *info = tn_op_info_get(args->op);
  TN_RETURN_ERROR_IF(info == NULL, ctx, TN_ERR_VALUE, "tn_op_run: unknown op %d", (int)args->op);
  const char *op = info->name;

  for (int i = 0; i < TN_OPERAND_COUNT; i++) {
    const tn_tensor *t = tn_op_operand(args, (tn_operand)i);
    const char *name = tn_operand_name((tn_operand)i);
    TN_RETURN_ERROR_IF(t == NULL && info->operands[i] == TN_REQUIRED, ctx, TN_ERR_NULL, "%s: %s is required", op,
                       name);
    TN_RETURN_ERROR_IF(t != NULL && info->operands[i] == TN_ABSENT, ctx, TN_ERR_OPERAND, "%s: takes no %s operand",
                       op, name);
    /* The quantized output's tensors are checked by check_quant, once the format says their shapes. */
    if (t != NULL && !tn_operand_is_quant((tn_operand)i)) TN_FORWARD_IF_ERROR(check_tensor(ctx, op, name, t));
  }
  TN_RETURN_ERROR_IF(tn_tensor_head_count(args->x) != 1 && !info->views_3d, ctx, TN_ERR_SHAPE,
                     "%s: x is a 3-D view (%" PRId64 " heads); this op takes 2-D views (rms_norm and l2_norm "
                     "take heads)", op, tn_tensor_head_count(args->x));
  TN_RETURN_ERROR_IF(!tn_dtype_valid(args->x->dtype), ctx, TN_ERR_DTYPE,
                     "%s: x is %s; ops compute in f32, f16 or bf16", op, tn_dtype_name(args->x->dtype));
  for (int i = 0; i < TN_OPERAND_COUNT; i++) {
    const tn_tensor *t = tn_op_operand(args, (tn_operand)i);
    if (t != NULL && i != TN_OPERAND_X && !tn_operand_is_quant((tn_operand)i))
      TN_FORWARD_IF_ERROR(check_against_x(ctx, args, info, (tn_operand)i, t));
  }
  TN_FORWARD_IF_ERROR(check_scalars(ctx, info, args));
  TN_FORWARD_IF_ERROR(check_modes(ctx, info, args));
  TN_FORWARD_IF_ERROR(check_quant(ctx, info, args));
  TN_FORWARD_IF_ERROR(check_overlaps(ctx, op, args));
  return TN_OK;
}
