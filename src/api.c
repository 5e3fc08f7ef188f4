/* The public entry points: context lifetime, the backend registry, and every op through one path:
 * validate (core) -> backend chosen by the tensors' device -> kernel. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/backend.h"
#include "core/context.h"
#include "core/error.h"
#include "core/validate.h"
#include "cpu/backend.h"

/* The registry: the backend for each device kind compiled into this build (NULL where none). */
static const tn_backend *const backends[TN_DEVICE_KIND_COUNT] = {
    [TN_DEVICE_CPU] = &tn_cpu_backend,
    [TN_DEVICE_CUDA] = NULL,
};

static const char *const device_names[TN_DEVICE_KIND_COUNT] = {[TN_DEVICE_CPU] = "CPU", [TN_DEVICE_CUDA] = "CUDA"};

tn_status tn_context_create(tn_context **out) {
  if (out == NULL) return TN_ERR_NULL;
  *out = calloc(1, sizeof **out);
  return *out != NULL ? TN_OK : TN_ERR_NO_MEMORY;
}

void tn_context_destroy(tn_context *ctx) {
  if (ctx == NULL) return;
  for (int k = 0; k < TN_DEVICE_KIND_COUNT; k++)
    if (ctx->backend_state[k] != NULL) backends[k]->close(ctx->backend_state[k]);
  free(ctx);
}

tn_status tn_context_set_num_threads(tn_context *ctx, int n) {
  if (ctx == NULL) return TN_ERR_NULL;
  TN_RETURN_ERROR_IF(n > TN_MAX_THREADS, ctx, TN_ERR_VALUE, "set_num_threads: %d threads; at most %d", n,
                     TN_MAX_THREADS);
  ctx->num_threads_requested = n > 0 ? n : 0;
  tn_error_clear(ctx);
  return TN_OK;
}

int tn_context_num_threads(const tn_context *ctx) { return tn_threads_wanted(ctx); }

/* The opened backend for a device kind, opening it on first use; the failure is remembered. */
static tn_status backend_for(tn_context *ctx, tn_device_kind kind, void **state) {
  const tn_backend *b = backends[kind];
  TN_RETURN_ERROR_IF(b == NULL, ctx, TN_ERR_UNAVAILABLE, "%s backend unavailable: not compiled into this build",
                     device_names[kind]);
  if (!ctx->backend_tried[kind]) {
    ctx->backend_tried[kind] = 1;
    ctx->backend_status[kind] = b->open(ctx, &ctx->backend_state[kind]);
    if (ctx->backend_status[kind] != TN_OK) {
      memcpy(ctx->backend_reason[kind], ctx->last_error, sizeof ctx->backend_reason[kind]);
    }
  }
  TN_RETURN_ERROR_IF(ctx->backend_status[kind] != TN_OK, ctx, ctx->backend_status[kind], "%s",
                     ctx->backend_reason[kind]);
  *state = ctx->backend_state[kind];
  return TN_OK;
}

tn_status tn_device_available(tn_context *ctx, tn_device_kind kind) {
  if (ctx == NULL) return TN_ERR_NULL;
  TN_RETURN_ERROR_IF((unsigned)kind >= TN_DEVICE_KIND_COUNT, ctx, TN_ERR_DEVICE, "unknown device kind %d",
                     (int)kind);
  void *state = NULL;
  TN_FORWARD_IF_ERROR(backend_for(ctx, kind, &state));
  tn_error_clear(ctx);
  return TN_OK;
}

tn_status tn_op_validate(tn_context *ctx, const tn_op_args *args) {
  if (ctx == NULL) return TN_ERR_NULL;
  TN_FORWARD_IF_ERROR(tn_validate(ctx, args));
  tn_error_clear(ctx);
  return TN_OK;
}

tn_status tn_op_run(tn_context *ctx, const tn_op_args *args) {
  if (ctx == NULL) return TN_ERR_NULL;
  TN_FORWARD_IF_ERROR(tn_validate(ctx, args));
  /* The device must be usable even for an empty call: the same call must not fail only when rows > 0. */
  tn_device_kind kind = args->x->device.kind;
  void *state = NULL;
  TN_FORWARD_IF_ERROR(backend_for(ctx, kind, &state));
  tn_error_clear(ctx);
  if (args->x->rows == 0) return TN_OK;
  TN_FORWARD_IF_ERROR(backends[kind]->run(state, ctx, args));
  tn_error_clear(ctx);
  return TN_OK;
}

tn_status tn_rms_norm(tn_context *ctx, const tn_tensor *x, const tn_tensor *weight, float weight_offset, float eps,
                      const tn_tensor *y) {
  tn_op_args a = tn_op_args_init(TN_OP_RMS_NORM);
  a.x = x;
  a.weight = weight;
  a.weight_offset = weight_offset;
  a.eps = eps;
  a.y = y;
  return tn_op_run(ctx, &a);
}

tn_status tn_rms_norm_mul(tn_context *ctx, const tn_tensor *x, const tn_tensor *weight, float weight_offset,
                          const tn_tensor *mul, float eps, const tn_tensor *y) {
  TN_RETURN_ERROR_IF(ctx != NULL && mul == NULL, ctx, TN_ERR_NULL, "rms_norm: mul is required by tn_rms_norm_mul");
  tn_op_args a = tn_op_args_init(TN_OP_RMS_NORM);
  a.x = x;
  a.weight = weight;
  a.weight_offset = weight_offset;
  a.mul = mul;
  a.eps = eps;
  a.y = y;
  return tn_op_run(ctx, &a);
}

tn_status tn_l2_norm(tn_context *ctx, const tn_tensor *x, float eps, float scale, const tn_tensor *y) {
  tn_op_args a = tn_op_args_init(TN_OP_L2_NORM);
  a.x = x;
  a.eps = eps;
  a.scale = scale;
  a.y = y;
  return tn_op_run(ctx, &a);
}

tn_status tn_add_rms_norm(tn_context *ctx, const tn_tensor *x, const tn_tensor *residual, const tn_tensor *weight,
                          float weight_offset, float eps, const tn_tensor *y, const tn_tensor *residual_out) {
  tn_op_args a = tn_op_args_init(TN_OP_ADD_RMS_NORM);
  a.x = x;
  a.residual = residual;
  a.weight = weight;
  a.weight_offset = weight_offset;
  a.eps = eps;
  a.y = y;
  a.residual_out = residual_out;
  return tn_op_run(ctx, &a);
}
