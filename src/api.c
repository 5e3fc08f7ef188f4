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
#include "graph/graph.h"
#ifdef TNORM_CUDA
#include "cuda/backend.h"
#include "cuda/registry.h"
#endif

/* The registry: the backend for each device kind compiled into this build (NULL where none). */
static const tn_backend *const backends[TN_DEVICE_KIND_COUNT] = {
    [TN_DEVICE_CPU] = &tn_cpu_backend,
#ifdef TNORM_CUDA
    [TN_DEVICE_CUDA] = &tn_cuda_backend,
#else
    [TN_DEVICE_CUDA] = NULL,
#endif
};

static const char *const device_names[TN_DEVICE_KIND_COUNT] = {[TN_DEVICE_CPU] = "CPU", [TN_DEVICE_CUDA] = "CUDA"};

/* The body of every public entry point that takes a context: `call` (a tn_status expression) runs with
 * ctx claimed by this thread, or TN_ERR_BUSY comes back at once when another thread is inside a call. */
#define TN_WITH_CONTEXT(ctx, call)                 \
  do {                                             \
    if ((ctx) == NULL) return TN_ERR_NULL;         \
    TN_FORWARD_IF_ERROR(tn_context_enter(ctx));    \
    const tn_status tn_with_context_st_ = (call);  \
    tn_context_leave(ctx);                         \
    return tn_with_context_st_;                    \
  } while (0)

tn_status tn_context_create(tn_context **out) {
  if (out == NULL) return TN_ERR_NULL;
  *out = calloc(1, sizeof **out);
  return *out != NULL ? TN_OK : TN_ERR_NO_MEMORY;
}

void tn_context_destroy(tn_context *ctx) {
  if (ctx == NULL) return;
  for (int k = 0; k < TN_DEVICE_KIND_COUNT; k++)
    if (ctx->backend_state[k] != NULL) backends[k]->close(ctx->backend_state[k]);
  tn_graph_destroy(ctx->recording);
  free(ctx);
}

static tn_status context_set_num_threads_locked(tn_context *ctx, int n) {
  TN_RETURN_ERROR_IF(n > TN_MAX_THREADS, ctx, TN_ERR_VALUE, "set_num_threads: %d threads; at most %d", n,
                     TN_MAX_THREADS);
  ctx->num_threads_requested = n > 0 ? n : 0;
  tn_error_clear(ctx);
  return TN_OK;
}

tn_status tn_context_set_num_threads(tn_context *ctx, int n) {
  TN_WITH_CONTEXT(ctx, context_set_num_threads_locked(ctx, n));
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

static tn_status device_available_locked(tn_context *ctx, tn_device_kind kind) {
  TN_RETURN_ERROR_IF((unsigned)kind >= TN_DEVICE_KIND_COUNT, ctx, TN_ERR_DEVICE, "unknown device kind %d",
                     (int)kind);
  void *state = NULL;
  TN_FORWARD_IF_ERROR(backend_for(ctx, kind, &state));
  tn_error_clear(ctx);
  return TN_OK;
}

tn_status tn_device_available(tn_context *ctx, tn_device_kind kind) {
  TN_WITH_CONTEXT(ctx, device_available_locked(ctx, kind));
}

/* A device named by a caller: a known kind, an index that exists, its backend open. */
static tn_status device_backend(tn_context *ctx, tn_device device, const char *what, void **state) {
  TN_RETURN_ERROR_IF((unsigned)device.kind >= TN_DEVICE_KIND_COUNT, ctx, TN_ERR_DEVICE, "%s: unknown device kind %d",
                     what, (int)device.kind);
  TN_FORWARD_IF_ERROR(backend_for(ctx, device.kind, state));
  const int count = backends[device.kind]->device_count(*state);
  TN_RETURN_ERROR_IF(device.index < 0 || device.index >= count, ctx, TN_ERR_DEVICE,
                     "%s: %s device %d does not exist; there %s %d", what, device_names[device.kind], device.index,
                     count == 1 ? "is" : "are", count);
  return TN_OK;
}

static tn_status device_count_locked(tn_context *ctx, tn_device_kind kind, int *count) {
  TN_RETURN_ERROR_IF(count == NULL, ctx, TN_ERR_NULL, "device_count: count is NULL");
  *count = 0;
  TN_RETURN_ERROR_IF((unsigned)kind >= TN_DEVICE_KIND_COUNT, ctx, TN_ERR_DEVICE, "unknown device kind %d", (int)kind);
  void *state = NULL;
  TN_FORWARD_IF_ERROR(backend_for(ctx, kind, &state));
  *count = backends[kind]->device_count(state);
  tn_error_clear(ctx);
  return TN_OK;
}

tn_status tn_device_count(tn_context *ctx, tn_device_kind kind, int *count) {
  TN_WITH_CONTEXT(ctx, device_count_locked(ctx, kind, count));
}

static tn_status context_set_stream_locked(tn_context *ctx, tn_device_kind kind, void *stream) {
  TN_RETURN_ERROR_IF((unsigned)kind >= TN_DEVICE_KIND_COUNT, ctx, TN_ERR_DEVICE, "set_stream: unknown device kind %d",
                     (int)kind);
  void *state = NULL;
  TN_FORWARD_IF_ERROR(backend_for(ctx, kind, &state));
  TN_FORWARD_IF_ERROR(backends[kind]->set_stream(state, ctx, stream));
  tn_error_clear(ctx);
  return TN_OK;
}

tn_status tn_context_set_stream(tn_context *ctx, tn_device_kind kind, void *stream) {
  TN_WITH_CONTEXT(ctx, context_set_stream_locked(ctx, kind, stream));
}

static tn_status malloc_locked(tn_context *ctx, tn_device device, size_t bytes, void **ptr) {
  TN_RETURN_ERROR_IF(ptr == NULL, ctx, TN_ERR_NULL, "malloc: ptr is NULL");
  void *state = NULL;
  TN_FORWARD_IF_ERROR(device_backend(ctx, device, "malloc", &state));
  void *p = NULL;
  TN_FORWARD_IF_ERROR(backends[device.kind]->alloc(state, ctx, device.index, bytes, &p));
  *ptr = p;
  tn_error_clear(ctx);
  return TN_OK;
}

tn_status tn_malloc(tn_context *ctx, tn_device device, size_t bytes, void **ptr) {
  TN_WITH_CONTEXT(ctx, malloc_locked(ctx, device, bytes, ptr));
}

static tn_status free_locked(tn_context *ctx, tn_device device, void *ptr) {
  if (ptr == NULL) return TN_OK;
  void *state = NULL;
  TN_FORWARD_IF_ERROR(device_backend(ctx, device, "free", &state));
  TN_FORWARD_IF_ERROR(backends[device.kind]->release(state, ctx, device.index, ptr));
  tn_error_clear(ctx);
  return TN_OK;
}

tn_status tn_free(tn_context *ctx, tn_device device, void *ptr) { TN_WITH_CONTEXT(ctx, free_locked(ctx, device, ptr)); }

static tn_status memcpy_locked(tn_context *ctx, void *dst, tn_device dst_device, const void *src,
                               tn_device src_device, size_t bytes) {
  TN_RETURN_ERROR_IF(bytes > 0 && (dst == NULL || src == NULL), ctx, TN_ERR_NULL, "memcpy: %s is NULL",
                     dst == NULL ? "dst" : "src");
  void *dst_state = NULL, *src_state = NULL;
  TN_FORWARD_IF_ERROR(device_backend(ctx, dst_device, "memcpy", &dst_state));
  TN_FORWARD_IF_ERROR(device_backend(ctx, src_device, "memcpy", &src_state));
  /* The backend of the side that is not the CPU does the copy (it knows both). */
  const int by_dst = dst_device.kind != TN_DEVICE_CPU;
  const tn_device_kind kind = by_dst ? dst_device.kind : src_device.kind;
  TN_FORWARD_IF_ERROR(
      backends[kind]->copy(by_dst ? dst_state : src_state, ctx, dst, dst_device, src, src_device, bytes));
  tn_error_clear(ctx);
  return TN_OK;
}

tn_status tn_memcpy(tn_context *ctx, void *dst, tn_device dst_device, const void *src, tn_device src_device,
                    size_t bytes) {
  TN_WITH_CONTEXT(ctx, memcpy_locked(ctx, dst, dst_device, src, src_device, bytes));
}

static tn_status synchronize_locked(tn_context *ctx, tn_device device) {
  void *state = NULL;
  TN_FORWARD_IF_ERROR(device_backend(ctx, device, "synchronize", &state));
  TN_FORWARD_IF_ERROR(backends[device.kind]->synchronize(state, ctx, device.index));
  tn_error_clear(ctx);
  return TN_OK;
}

tn_status tn_synchronize(tn_context *ctx, tn_device device) { TN_WITH_CONTEXT(ctx, synchronize_locked(ctx, device)); }

struct tn_event {
  tn_device device;
  void *handle;
};

static tn_status event_create_locked(tn_context *ctx, tn_device device, tn_event **event) {
  TN_RETURN_ERROR_IF(event == NULL, ctx, TN_ERR_NULL, "event_create: event is NULL");
  void *state = NULL;
  TN_FORWARD_IF_ERROR(device_backend(ctx, device, "event_create", &state));
  tn_event *e = calloc(1, sizeof *e);
  TN_RETURN_ERROR_IF(e == NULL, ctx, TN_ERR_NO_MEMORY, "event_create: out of memory");
  e->device = device;
  tn_status st = backends[device.kind]->event_create(state, ctx, device.index, &e->handle);
  if (st != TN_OK) {
    free(e);
    return st;
  }
  *event = e;
  tn_error_clear(ctx);
  return TN_OK;
}

tn_status tn_event_create(tn_context *ctx, tn_device device, tn_event **event) {
  TN_WITH_CONTEXT(ctx, event_create_locked(ctx, device, event));
}

static tn_status event_record_locked(tn_context *ctx, tn_event *event) {
  TN_RETURN_ERROR_IF(event == NULL, ctx, TN_ERR_NULL, "event_record: event is NULL");
  void *state = NULL;
  TN_FORWARD_IF_ERROR(device_backend(ctx, event->device, "event_record", &state));
  TN_FORWARD_IF_ERROR(backends[event->device.kind]->event_record(state, ctx, event->handle));
  tn_error_clear(ctx);
  return TN_OK;
}

tn_status tn_event_record(tn_context *ctx, tn_event *event) { TN_WITH_CONTEXT(ctx, event_record_locked(ctx, event)); }

static tn_status event_elapsed_ms_locked(tn_context *ctx, const tn_event *start, const tn_event *end, double *ms) {
  TN_RETURN_ERROR_IF(start == NULL || end == NULL || ms == NULL, ctx, TN_ERR_NULL, "event_elapsed_ms: %s is NULL",
                     start == NULL ? "start" : end == NULL ? "end" : "ms");
  TN_RETURN_ERROR_IF(start->device.kind != end->device.kind || start->device.index != end->device.index, ctx,
                     TN_ERR_DEVICE, "event_elapsed_ms: the events are on different devices");
  void *state = NULL;
  TN_FORWARD_IF_ERROR(device_backend(ctx, start->device, "event_elapsed_ms", &state));
  TN_FORWARD_IF_ERROR(backends[start->device.kind]->event_elapsed_ms(state, ctx, start->handle, end->handle, ms));
  tn_error_clear(ctx);
  return TN_OK;
}

tn_status tn_event_elapsed_ms(tn_context *ctx, const tn_event *start, const tn_event *end, double *ms) {
  TN_WITH_CONTEXT(ctx, event_elapsed_ms_locked(ctx, start, end, ms));
}

void tn_event_destroy(tn_event *event) {
  if (event == NULL) return;
  const tn_backend *b = (unsigned)event->device.kind < TN_DEVICE_KIND_COUNT ? backends[event->device.kind] : NULL;
  if (b != NULL) b->event_destroy(event->handle);
  free(event);
}

static tn_status cuda_build_kernels_locked(tn_context *ctx, int arch, int *count) {
#ifdef TNORM_CUDA
  TN_FORWARD_IF_ERROR(tn_cuda_build_all(ctx, arch, count));
  tn_error_clear(ctx);
  return TN_OK;
#else
  (void)arch;
  (void)count;
  return tn_error(ctx, TN_ERR_UNAVAILABLE, "CUDA backend unavailable: not compiled into this build");
#endif
}

tn_status tn_cuda_build_kernels(tn_context *ctx, int arch, int *count) {
  TN_WITH_CONTEXT(ctx, cuda_build_kernels_locked(ctx, arch, count));
}

void tn_kernel_cache_stats_get(tn_kernel_cache_stats *out) {
  if (out == NULL) return;
#ifdef TNORM_CUDA
  tn_kernel_stats_get(out);
#else
  memset(out, 0, sizeof *out);
#endif
}

static tn_status op_validate_locked(tn_context *ctx, const tn_op_args *args) {
  TN_FORWARD_IF_ERROR(tn_validate(ctx, args));
  tn_error_clear(ctx);
  return TN_OK;
}

tn_status tn_op_validate(tn_context *ctx, const tn_op_args *args) {
  TN_WITH_CONTEXT(ctx, op_validate_locked(ctx, args));
}

/* The options of an op called on its own (a graph's fused ops carry their own: src/graph). */
static const tn_run_options unfused = {0};

static tn_status op_prepare_locked(tn_context *ctx, const tn_op_args *args) {
  TN_FORWARD_IF_ERROR(tn_validate(ctx, args));
  void *state = NULL;
  TN_FORWARD_IF_ERROR(device_backend(ctx, args->x->device, tn_op_name(args->op), &state));
  if (backends[args->x->device.kind]->prepare != NULL)
    TN_FORWARD_IF_ERROR(backends[args->x->device.kind]->prepare(state, ctx, args, &unfused));
  tn_error_clear(ctx);
  return TN_OK;
}

tn_status tn_op_prepare(tn_context *ctx, const tn_op_args *args) { TN_WITH_CONTEXT(ctx, op_prepare_locked(ctx, args)); }

static tn_status op_run_locked(tn_context *ctx, const tn_op_args *args) {
  TN_FORWARD_IF_ERROR(tn_validate(ctx, args));
  /* The device must be usable even for an empty call: the same call must not fail only when rows > 0. */
  tn_device_kind kind = args->x->device.kind;
  void *state = NULL;
  TN_FORWARD_IF_ERROR(device_backend(ctx, args->x->device, tn_op_name(args->op), &state));
  if (ctx->recording != NULL) {
    if (args->x->rows > 0) TN_FORWARD_IF_ERROR(tn_graph_append(ctx, ctx->recording, args));
    tn_error_clear(ctx);
    return TN_OK;
  }
  tn_error_clear(ctx);
  if (args->x->rows == 0) return TN_OK;
  TN_FORWARD_IF_ERROR(backends[kind]->run(state, ctx, args, &unfused));
  tn_error_clear(ctx);
  return TN_OK;
}

tn_status tn_op_run(tn_context *ctx, const tn_op_args *args) { TN_WITH_CONTEXT(ctx, op_run_locked(ctx, args)); }

/* Every norm entry point: the operands it names, the default modes, and the rope when one is given. */
static tn_status norm_call(tn_context *ctx, tn_op op, const tn_tensor *x, const tn_tensor *residual,
                           const tn_tensor *weight, float weight_offset, const tn_tensor *bias, const tn_tensor *mul,
                           float eps, const tn_tensor *y, const tn_tensor *residual_out, const tn_rope *rope,
                           const tn_quant *quant) {
  tn_op_args a = tn_op_args_init(op);
  a.x = x;
  a.residual = residual;
  a.weight = weight;
  a.weight_offset = weight_offset;
  a.bias = bias;
  a.mul = mul;
  a.eps = eps;
  a.y = y;
  a.residual_out = residual_out;
  if (rope != NULL) a.rope = *rope;
  if (quant != NULL) a.quant = *quant;
  return tn_op_run(ctx, &a);
}

static tn_status missing_mul_locked(tn_context *ctx, tn_op op, const char *mul_required_by) {
  return tn_error(ctx, TN_ERR_NULL, "%s: mul is required by %s", tn_op_name(op), mul_required_by);
}

/* rms_norm and add_rms_norm, with or without the multiplicand (residual and residual_out NULL for
 * rms_norm). mul_required_by: the _mul entry point's name, which refuses a NULL mul; else NULL. */
static tn_status rms_norm_call(tn_context *ctx, const char *mul_required_by, tn_op op, const tn_tensor *x,
                               const tn_tensor *residual, const tn_tensor *weight, float weight_offset,
                               const tn_tensor *mul, float eps, const tn_tensor *y, const tn_tensor *residual_out) {
  if (mul_required_by != NULL && mul == NULL) TN_WITH_CONTEXT(ctx, missing_mul_locked(ctx, op, mul_required_by));
  return norm_call(ctx, op, x, residual, weight, weight_offset, NULL, mul, eps, y, residual_out, NULL, NULL);
}

tn_status tn_rms_norm(tn_context *ctx, const tn_tensor *x, const tn_tensor *weight, float weight_offset, float eps,
                      const tn_tensor *y) {
  return rms_norm_call(ctx, NULL, TN_OP_RMS_NORM, x, NULL, weight, weight_offset, NULL, eps, y, NULL);
}

tn_status tn_rms_norm_mul(tn_context *ctx, const tn_tensor *x, const tn_tensor *weight, float weight_offset,
                          const tn_tensor *mul, float eps, const tn_tensor *y) {
  return rms_norm_call(ctx, "tn_rms_norm_mul", TN_OP_RMS_NORM, x, NULL, weight, weight_offset, mul, eps, y, NULL);
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
  return rms_norm_call(ctx, NULL, TN_OP_ADD_RMS_NORM, x, residual, weight, weight_offset, NULL, eps, y,
                       residual_out);
}

tn_status tn_add_rms_norm_mul(tn_context *ctx, const tn_tensor *x, const tn_tensor *residual, const tn_tensor *weight,
                              float weight_offset, const tn_tensor *mul, float eps, const tn_tensor *y,
                              const tn_tensor *residual_out) {
  return rms_norm_call(ctx, "tn_add_rms_norm_mul", TN_OP_ADD_RMS_NORM, x, residual, weight, weight_offset, mul,
                       eps, y, residual_out);
}

tn_status tn_rms_norm_rope(tn_context *ctx, const tn_tensor *x, const tn_tensor *weight, float weight_offset,
                           float eps, const tn_rope *rope, const tn_tensor *y) {
  return norm_call(ctx, TN_OP_RMS_NORM, x, NULL, weight, weight_offset, NULL, NULL, eps, y, NULL, rope, NULL);
}

tn_status tn_layer_norm(tn_context *ctx, const tn_tensor *x, const tn_tensor *weight, const tn_tensor *bias, float eps,
                        const tn_tensor *y) {
  return norm_call(ctx, TN_OP_LAYER_NORM, x, NULL, weight, 0.0f, bias, NULL, eps, y, NULL, NULL, NULL);
}

tn_status tn_add_layer_norm(tn_context *ctx, const tn_tensor *x, const tn_tensor *residual, const tn_tensor *weight,
                            const tn_tensor *bias, float eps, const tn_tensor *y, const tn_tensor *residual_out) {
  return norm_call(ctx, TN_OP_ADD_LAYER_NORM, x, residual, weight, 0.0f, bias, NULL, eps, y, residual_out, NULL, NULL);
}

static tn_status missing_quant_locked(tn_context *ctx, const char *entry) {
  return tn_error(ctx, TN_ERR_NULL, "%s: quant is NULL", entry);
}

tn_status tn_quant_shapes_get(const tn_quant *quant, int64_t rows, int64_t dim, tn_quant_shapes *out) {
  if (quant == NULL || out == NULL) return TN_ERR_NULL;
  return tn_quant_shapes_check(NULL, "tn_quant_shapes_get", quant, rows, dim, out);
}

tn_status tn_quantize(tn_context *ctx, const tn_tensor *x, const tn_quant *quant) {
  if (quant == NULL) TN_WITH_CONTEXT(ctx, missing_quant_locked(ctx, "tn_quantize"));
  tn_op_args a = tn_op_args_init(TN_OP_QUANTIZE);
  a.x = x;
  a.quant = *quant;
  return tn_op_run(ctx, &a);
}

tn_status tn_rms_norm_quant(tn_context *ctx, const tn_tensor *x, const tn_tensor *weight, float weight_offset,
                            float eps, const tn_quant *quant, const tn_tensor *y) {
  if (quant == NULL) TN_WITH_CONTEXT(ctx, missing_quant_locked(ctx, "tn_rms_norm_quant"));
  return norm_call(ctx, TN_OP_RMS_NORM, x, NULL, weight, weight_offset, NULL, NULL, eps, y, NULL, NULL, quant);
}

tn_status tn_add_rms_norm_quant(tn_context *ctx, const tn_tensor *x, const tn_tensor *residual,
                                const tn_tensor *weight, float weight_offset, float eps, const tn_quant *quant,
                                const tn_tensor *y, const tn_tensor *residual_out) {
  if (quant == NULL) TN_WITH_CONTEXT(ctx, missing_quant_locked(ctx, "tn_add_rms_norm_quant"));
  return norm_call(ctx, TN_OP_ADD_RMS_NORM, x, residual, weight, weight_offset, NULL, NULL, eps, y, residual_out,
                   NULL, quant);
}

/* add and mul: b goes in the operand slot of the op table (residual for add, mul for mul). */
static tn_status binary_op(tn_context *ctx, tn_op op, const tn_tensor *x, const tn_tensor *b, const tn_tensor *y) {
  tn_op_args a = tn_op_args_init(op);
  a.x = x;
  if (op == TN_OP_ADD) a.residual = b;
  else a.mul = b;
  a.y = y;
  return tn_op_run(ctx, &a);
}

tn_status tn_add(tn_context *ctx, const tn_tensor *x, const tn_tensor *b, const tn_tensor *y) {
  return binary_op(ctx, TN_OP_ADD, x, b, y);
}

tn_status tn_mul(tn_context *ctx, const tn_tensor *x, const tn_tensor *b, const tn_tensor *y) {
  return binary_op(ctx, TN_OP_MUL, x, b, y);
}

tn_status tn_scale(tn_context *ctx, const tn_tensor *x, float scale, const tn_tensor *y) {
  tn_op_args a = tn_op_args_init(TN_OP_SCALE);
  a.x = x;
  a.scale = scale;
  a.y = y;
  return tn_op_run(ctx, &a);
}

/* ---- graphs ---- */

static tn_status graph_begin_locked(tn_context *ctx) {
  TN_RETURN_ERROR_IF(ctx->recording != NULL, ctx, TN_ERR_VALUE, "graph_begin: the context is already recording");
  TN_FORWARD_IF_ERROR(tn_graph_new(ctx, &ctx->recording));
  tn_error_clear(ctx);
  return TN_OK;
}

tn_status tn_graph_begin(tn_context *ctx) { TN_WITH_CONTEXT(ctx, graph_begin_locked(ctx)); }

static tn_status graph_end_locked(tn_context *ctx, tn_graph **graph) {
  TN_RETURN_ERROR_IF(graph == NULL, ctx, TN_ERR_NULL, "graph_end: graph is NULL");
  TN_RETURN_ERROR_IF(ctx->recording == NULL, ctx, TN_ERR_VALUE, "graph_end: the context is not recording");
  tn_graph *g = ctx->recording;
  ctx->recording = NULL;
  tn_graph_fuse(g);
  *graph = g;
  tn_error_clear(ctx);
  return TN_OK;
}

tn_status tn_graph_end(tn_context *ctx, tn_graph **graph) { TN_WITH_CONTEXT(ctx, graph_end_locked(ctx, graph)); }

/* The one device every node of g runs on, when its backend can replay a graph as one submission. */
static int single_capturable_device(const tn_graph *g, tn_device *device) {
  if (g->count == 0) return 0;
  *device = g->nodes[0].args.x->device;
  for (int i = 1; i < g->count; i++) {
    const tn_device d = g->nodes[i].args.x->device;
    if (d.kind != device->kind || d.index != device->index) return 0;
  }
  return (unsigned)device->kind < TN_DEVICE_KIND_COUNT && backends[device->kind] != NULL &&
         backends[device->kind]->capture_begin != NULL;
}

/* Captures g's nodes on `device` into g->exec: instantiated, or updated in place when g already has one.
 * Every kernel is made ready first, so nothing is compiled or loaded while capturing. */
static tn_status build_device_graph(tn_context *ctx, tn_graph *g, tn_device device) {
  void *state = NULL;
  TN_FORWARD_IF_ERROR(device_backend(ctx, device, "graph", &state));
  const tn_backend *b = backends[device.kind];
  for (int i = 0; i < g->count; i++) TN_FORWARD_IF_ERROR(b->prepare(state, ctx, &g->nodes[i].args, &g->nodes[i].options));
  TN_FORWARD_IF_ERROR(b->capture_begin(state, ctx, device.index));
  tn_status st = TN_OK;
  for (int i = 0; i < g->count && st == TN_OK; i++) st = b->run(state, ctx, &g->nodes[i].args, &g->nodes[i].options);
  int updated = 0;
  if (st != TN_OK) {
    char message[TN_ERROR_CAPACITY];
    memcpy(message, ctx->last_error, sizeof message);
    b->capture_end(state, ctx, 1, &g->exec, &updated);
    return tn_error(ctx, st, "%s", message);
  }
  TN_FORWARD_IF_ERROR(b->capture_end(state, ctx, 0, &g->exec, &updated));
  g->exec_destroy = b->exec_destroy;
  g->exec_device = device;
  g->info.device_graph = 1;
  if (updated) g->info.updates_in_place++;
  else g->info.instantiations++;
  return TN_OK;
}

static tn_status graph_launch_locked(tn_context *ctx, tn_graph *graph) {
  TN_RETURN_ERROR_IF(graph == NULL, ctx, TN_ERR_NULL, "graph_launch: graph is NULL");
  TN_RETURN_ERROR_IF(ctx->recording != NULL, ctx, TN_ERR_VALUE, "graph_launch: the context is recording");
  /* A graph with an executable graph is on one capturable device: no need to look at its nodes again. */
  tn_device device = graph->exec_device;
  if (graph->exec != NULL || single_capturable_device(graph, &device)) {
    void *state = NULL;
    TN_FORWARD_IF_ERROR(device_backend(ctx, device, "graph_launch", &state));
    if (graph->exec == NULL) TN_FORWARD_IF_ERROR(build_device_graph(ctx, graph, device));
    TN_FORWARD_IF_ERROR(backends[device.kind]->exec_launch(state, ctx, graph->exec));
  } else {
    for (int i = 0; i < graph->count; i++) {
      const tn_graph_node *n = &graph->nodes[i];
      void *state = NULL;
      TN_FORWARD_IF_ERROR(device_backend(ctx, n->args.x->device, tn_op_name(n->args.op), &state));
      TN_FORWARD_IF_ERROR(backends[n->args.x->device.kind]->run(state, ctx, &n->args, &n->options));
    }
  }
  tn_error_clear(ctx);
  return TN_OK;
}

tn_status tn_graph_launch(tn_context *ctx, tn_graph *graph) { TN_WITH_CONTEXT(ctx, graph_launch_locked(ctx, graph)); }

static tn_status graph_update_locked(tn_context *ctx, tn_graph *graph, const tn_graph *recorded) {
  TN_RETURN_ERROR_IF(graph == NULL || recorded == NULL, ctx, TN_ERR_NULL, "graph_update: %s is NULL",
                     graph == NULL ? "graph" : "recorded");
  TN_RETURN_ERROR_IF(ctx->recording != NULL, ctx, TN_ERR_VALUE, "graph_update: the context is recording");
  /* Built aside, so that graph is unchanged when the capture fails. */
  tn_graph next;
  memset(&next, 0, sizeof next);
  next.info = graph->info;
  TN_FORWARD_IF_ERROR(tn_graph_copy_nodes(ctx, &next, recorded));
  next.exec = graph->exec;
  next.exec_device = graph->exec_device;
  next.exec_destroy = graph->exec_destroy;
  tn_device device;
  if (next.exec != NULL) {
    if (single_capturable_device(&next, &device)) {
      const tn_status st = build_device_graph(ctx, &next, device);
      if (st != TN_OK) {
        free(next.nodes);
        return st;
      }
    } else { /* now on the CPU, or on several devices: replayed op by op */
      next.exec_destroy(next.exec);
      next.exec = NULL;
      next.info.device_graph = 0;
    }
  }
  free(graph->nodes);
  *graph = next;
  tn_error_clear(ctx);
  return TN_OK;
}

tn_status tn_graph_update(tn_context *ctx, tn_graph *graph, const tn_graph *recorded) {
  TN_WITH_CONTEXT(ctx, graph_update_locked(ctx, graph, recorded));
}

tn_status tn_graph_get_info(const tn_graph *graph, tn_graph_info *info) {
  if (graph == NULL || info == NULL) return TN_ERR_NULL;
  *info = graph->info;
  return TN_OK;
}

const char *tn_graph_fusions(const tn_graph *graph) { return graph != NULL ? graph->fusions : ""; }

void tn_graph_destroy(tn_graph *graph) {
  if (graph == NULL) return;
  if (graph->exec != NULL) graph->exec_destroy(graph->exec);
  free(graph->nodes);
  free(graph);
}
