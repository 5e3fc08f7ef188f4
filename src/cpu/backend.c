/* The CPU backend: prepares what every row of a call shares (the weight in float32, scratch rows),
 * then runs the op's row function with rows spread over the context's thread pool. All memory is
 * obtained before the first row runs, so a failure writes nothing. */
#include "backend.h"

#include <stdlib.h>
#include <string.h>

#include "../core/dtype.h"
#include "../core/error.h"
#include "device.h"
#include "ops.h"
#include "thread_pool.h"

/* Below this many elements a call stays on the calling thread: waking workers costs more. */
#define TN_CPU_PARALLEL_MIN_ELEMENTS (1 << 16)
/* Chunks per thread: enough for dynamic balancing, few enough to keep per-chunk overhead small. */
#define TN_CPU_CHUNKS_PER_THREAD 4
/* Calls writing at least this many bytes use non-temporal stores: their output cannot stay in cache
 * for the next op anyway, and plain stores would first read every output line. */
#ifndef TN_CPU_STREAM_MIN_BYTES
#define TN_CPU_STREAM_MIN_BYTES ((size_t)16 << 20)
#endif

#define TN_CPU_KERNEL_SET(isa)                                                                  \
  {#isa,                                                                                        \
   {[TN_OP_RMS_NORM] = tn_cpu_rms_norm_rows_##isa, [TN_OP_L2_NORM] = tn_cpu_l2_norm_rows_##isa,   \
    [TN_OP_ADD_RMS_NORM] = tn_cpu_add_rms_norm_rows_##isa, [TN_OP_ADD] = tn_cpu_elementwise_rows_##isa, \
    [TN_OP_MUL] = tn_cpu_elementwise_rows_##isa, [TN_OP_SCALE] = tn_cpu_elementwise_rows_##isa},          \
   tn_cpu_prepare_weight_##isa}

static const tn_cpu_kernels generic_kernels = TN_CPU_KERNEL_SET(generic);
#ifdef TNORM_CPU_V3
static const tn_cpu_kernels v3_kernels = TN_CPU_KERNEL_SET(v3);
#endif

/* The best kernel set this CPU runs; TNORM_CPU_ISA=generic forces the baseline (to test it). */
static const tn_cpu_kernels *select_kernels(void) {
  const char *forced = getenv("TNORM_CPU_ISA");
  if (forced != NULL && strcmp(forced, "generic") == 0) return &generic_kernels;
#ifdef TNORM_CPU_V3
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
      __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2"))
    return &v3_kernels;
#endif
  return &generic_kernels;
}

typedef struct cpu_state {
  const tn_cpu_kernels *kernels;
  tn_thread_pool *pool;
  float *buffer; /* the weight row, then one scratch row per chunk */
  size_t buffer_floats;
} cpu_state;

typedef struct row_job {
  tn_cpu_rows_fn fn;
  const tn_cpu_call *call;
  float *scratch; /* chunks rows of dim floats */
  int64_t rows, dim, chunks;
} row_job;

static void run_chunk(void *p, int64_t chunk) {
  const row_job *job = p;
  int64_t begin = job->rows * chunk / job->chunks;
  int64_t end = job->rows * (chunk + 1) / job->chunks;
  job->fn(job->call, job->scratch + (size_t)chunk * (size_t)job->dim, begin, end);
}

static tn_status cpu_open(tn_context *ctx, void **state) {
  cpu_state *s = calloc(1, sizeof *s);
  TN_RETURN_ERROR_IF(s == NULL, ctx, TN_ERR_NO_MEMORY, "cpu: out of memory creating the backend");
  s->kernels = select_kernels();
  *state = s;
  return TN_OK;
}

static void cpu_close(void *state) {
  cpu_state *s = state;
  if (s == NULL) return;
  tn_thread_pool_destroy(s->pool);
  free(s->buffer);
  free(s);
}

/* (Re)creates the pool when the wanted thread count changed since the last call. */
static tn_status ensure_pool(cpu_state *s, tn_context *ctx, int wanted) {
  if (s->pool != NULL && tn_thread_pool_size(s->pool) == wanted) return TN_OK;
  tn_thread_pool_destroy(s->pool);
  s->pool = tn_thread_pool_create(wanted);
  TN_RETURN_ERROR_IF(s->pool == NULL, ctx, TN_ERR_NO_MEMORY, "cpu: cannot start a pool of %d threads", wanted);
  return TN_OK;
}

/* Grows the state's buffer to at least n floats; it is kept across calls. */
static tn_status ensure_buffer(cpu_state *s, tn_context *ctx, size_t n) {
  if (s->buffer_floats >= n) return TN_OK;
  float *p = malloc(n * sizeof *p);
  TN_RETURN_ERROR_IF(p == NULL, ctx, TN_ERR_NO_MEMORY, "cpu: out of memory for %zu bytes of scratch",
                     n * sizeof *p);
  free(s->buffer);
  s->buffer = p;
  s->buffer_floats = n;
  return TN_OK;
}

static tn_status cpu_run(void *state, tn_context *ctx, const tn_op_args *args, const tn_run_options *options) {
  cpu_state *s = state;
  const int64_t rows = args->x->rows, dim = args->x->dim;
  const int threads = tn_threads_wanted(ctx);
  int parallel = rows >= 2 && rows * dim >= TN_CPU_PARALLEL_MIN_ELEMENTS && threads > 1;
  if (parallel) TN_FORWARD_IF_ERROR(ensure_pool(s, ctx, threads));
  int64_t chunks = parallel ? (int64_t)tn_thread_pool_size(s->pool) * TN_CPU_CHUNKS_PER_THREAD : 1;
  if (chunks > rows) chunks = rows;
  int has_weight = args->weight != NULL;
  TN_FORWARD_IF_ERROR(ensure_buffer(s, ctx, (size_t)(chunks + has_weight) * (size_t)dim));

  float *weight = NULL;
  if (has_weight) {
    weight = s->buffer + (size_t)chunks * (size_t)dim;
    s->kernels->prepare_weight(args->weight, args->weight_offset, weight);
  }
  size_t outputs = args->residual_out != NULL ? 2 : 1;
  size_t out_bytes = outputs * (size_t)rows * (size_t)dim * tn_elem_size(args->x->dtype);
  tn_cpu_call call = {args, weight, out_bytes >= TN_CPU_STREAM_MIN_BYTES, options->round_before_last};
  row_job job = {s->kernels->rows[args->op], &call, s->buffer, rows, dim, chunks};
  if (parallel) tn_thread_pool_run(s->pool, chunks, run_chunk, &job);
  else run_chunk(&job, 0);
  return TN_OK;
}

const tn_backend tn_cpu_backend = {
    .name = "cpu",
    .kind = TN_DEVICE_CPU,
    .open = cpu_open,
    .close = cpu_close,
    .device_count = tn_cpu_device_count,
    .run = cpu_run,
    .prepare = NULL,
    .alloc = tn_cpu_alloc,
    .release = tn_cpu_release,
    .copy = tn_cpu_copy,
    .synchronize = tn_cpu_synchronize,
    .set_stream = tn_cpu_set_stream,
    .event_create = tn_cpu_event_create,
    .event_record = tn_cpu_event_record,
    .event_elapsed_ms = tn_cpu_event_elapsed_ms,
    .event_destroy = tn_cpu_event_destroy,
};
