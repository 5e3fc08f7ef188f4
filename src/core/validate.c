#include "validate.h"

#include <inttypes.h>
#include <math.h>

#include "dtype.h"
#include "error.h"
#include "ops.h"
#include "tensor.h"

static int is_row_shaped(tn_operand operand) { return operand != TN_OPERAND_WEIGHT; }

/* Checks one tensor on its own: dtype, device, shape, stride, data pointer and sizes. */
static tn_status check_tensor(tn_context *ctx, const char *op, const char *name, const tn_tensor *t) {
  TN_RETURN_ERROR_IF(!tn_dtype_valid(t->dtype), ctx, TN_ERR_DTYPE, "%s: %s has unknown dtype %d", op, name,
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
  TN_RETURN_ERROR_IF(t->row_stride < t->dim, ctx, TN_ERR_SHAPE,
                     "%s: %s has row_stride %" PRId64 ", less than its dim %" PRId64, op, name, t->row_stride,
                     t->dim);
  if (t->rows == 0) return TN_OK; /* nothing is read or written */
  TN_RETURN_ERROR_IF(t->data == NULL, ctx, TN_ERR_NULL, "%s: %s data is NULL", op, name);
  /* Elements from the first to the last touched: (rows - 1) * row_stride + dim, then bytes. */
  int64_t span, bytes;
  int overflow = __builtin_mul_overflow(t->rows - 1, t->row_stride, &span) ||
                 __builtin_add_overflow(span, t->dim, &span) ||
                 __builtin_mul_overflow(span, (int64_t)tn_dtype_size(t->dtype), &bytes) ||
                 (uint64_t)bytes > (uint64_t)SIZE_MAX ||
                 (uintptr_t)t->data > UINTPTR_MAX - (uintptr_t)bytes;
  TN_RETURN_ERROR_IF(overflow, ctx, TN_ERR_OVERFLOW,
                     "%s: %s of %" PRId64 " rows x row_stride %" PRId64 " %s overflows the address space", op,
                     name, t->rows, t->row_stride, tn_dtype_name(t->dtype));
  return TN_OK;
}

/* Checks an operand against x: shape, dtype and device agreement. */
static tn_status check_against_x(tn_context *ctx, const tn_op_info *info, tn_operand operand, const tn_tensor *t,
                                 const tn_tensor *x) {
  const char *op = info->name, *name = tn_operand_name(operand);
  const int broadcast = info->broadcast && !tn_operand_is_output(operand) && t->rows == 1 && x->rows != 1;
  if (operand == TN_OPERAND_WEIGHT) {
    TN_RETURN_ERROR_IF(t->rows != 1, ctx, TN_ERR_SHAPE,
                       "%s: weight is %" PRId64 " x %" PRId64 "; must be one row of dim %" PRId64 " elements", op,
                       t->rows, t->dim, x->dim);
    TN_RETURN_ERROR_IF(t->dim != x->dim, ctx, TN_ERR_SHAPE, "%s: weight has %" PRId64 " elements, dim is %" PRId64,
                       op, t->dim, x->dim);
    TN_RETURN_ERROR_IF(t->dtype != x->dtype && t->dtype != TN_F32, ctx, TN_ERR_DTYPE,
                       "%s: weight is %s; must be f32 or x's dtype %s", op, tn_dtype_name(t->dtype),
                       tn_dtype_name(x->dtype));
  } else {
    TN_RETURN_ERROR_IF((t->rows != x->rows && !broadcast) || t->dim != x->dim, ctx, TN_ERR_SHAPE,
                       "%s: %s is %" PRId64 " x %" PRId64 ", x is %" PRId64 " x %" PRId64 "%s", op, name, t->rows,
                       t->dim, x->rows, x->dim, info->broadcast ? " (or 1 x dim, applied to every row)" : "");
    TN_RETURN_ERROR_IF(t->dtype != x->dtype, ctx, TN_ERR_DTYPE, "%s: %s is %s, x is %s", op, name,
                       tn_dtype_name(t->dtype), tn_dtype_name(x->dtype));
  }
  TN_RETURN_ERROR_IF(t->device.kind != x->device.kind || t->device.index != x->device.index, ctx, TN_ERR_DEVICE,
                     "%s: %s is on device %d:%d, x on %d:%d", op, name, (int)t->device.kind, t->device.index,
                     (int)x->device.kind, x->device.index);
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
    if (t != NULL) TN_FORWARD_IF_ERROR(check_tensor(ctx, op, name, t));
  }
  for (int i = 0; i < TN_OPERAND_COUNT; i++) {
    const tn_tensor *t = tn_op_operand(args, (tn_operand)i);
    if (t != NULL && i != TN_OPERAND_X) TN_FORWARD_IF_ERROR(check_against_x(ctx, info, (tn_operand)i, t, args->x));
  }
  TN_FORWARD_IF_ERROR(check_scalars(ctx, info, args));
  TN_FORWARD_IF_ERROR(check_overlaps(ctx, op, args));
  return TN_OK;
}
