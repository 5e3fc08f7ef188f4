/* The CPU backend: prepares what every row of a call shares (the weight and bias in float32, the rope's
 * frequencies, scratch rows), then runs the op's row function with rows (or the heads of 3-D views)
 * spread over the context's thread pool. All memory is obtained, and every rope position checked,
 * before the first row runs, so a failure writes nothing. Operands not aligned to their element run on
 * aligned copies (staging.h). */
#include "backend.h"

#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../core/dtype.h"
#include "../core/error.h"
#include "../core/tensor.h"
#include "device.h"
#include "ops.h"
#include "staging.h"
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
    [TN_OP_MUL] = tn_cpu_elementwise_rows_##isa, [TN_OP_SCALE] = tn_cpu_elementwise_rows_##isa,           \
    [TN_OP_LAYER_NORM] = tn_cpu_layer_norm_rows_##isa, [TN_OP_ADD_LAYER_NORM] = tn_cpu_layer_norm_rows_##isa, \
    [TN_OP_QUANTIZE] = tn_cpu_quantize_rows_##isa},                                                              \
   tn_cpu_rms_norm_rope_rows_##isa, tn_cpu_prepare_weight_##isa, tn_cpu_prepare_vector_##isa}

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
  float *scratch; /* chunks scratch areas of scratch_floats each */
  int64_t rows, scratch_floats, chunks; /* rows: the units the op's row function counts (vectors for 3-D views) */
} row_job;

/* The first row of chunk c of rows split into chunks nearly equal parts: rows * c / chunks, computed so
 * that the product cannot overflow whatever rows validation lets through. */
static int64_t chunk_start(int64_t rows, int64_t chunks, int64_t c) {
  return rows / chunks * c + rows % chunks * c / chunks;
}

static void run_chunk(void *p, int64_t chunk) {
  const row_job *job = p;
  int64_t begin = chunk_start(job->rows, job->chunks, chunk);
  int64_t end = chunk_start(job->rows, job->chunks, chunk + 1);
  job->fn(job->call, job->scratch + (size_t)chunk * (size_t)job->scratch_floats, begin, end);
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

/* Grows the state's buffer to at least vectors * dim floats; it is kept across calls. Validation bounds
 * rows * dim, not dim alone, so the product is checked here. */
static tn_status ensure_buffer(cpu_state *s, tn_context *ctx, size_t vectors, int64_t dim) {
  TN_RETURN_ERROR_IF(dim < 0 || (uint64_t)dim > SIZE_MAX / sizeof(float) / vectors, ctx, TN_ERR_OVERFLOW,
                     "cpu: %zu scratch rows of %" PRId64 " floats do not fit the address space", vectors, dim);
  const size_t n = vectors * (size_t)dim;
  if (s->buffer_floats >= n) return TN_OK;
  float *p = malloc(n * sizeof *p);
  TN_RETURN_ERROR_IF(p == NULL, ctx, TN_ERR_NO_MEMORY, "cpu: out of memory for %zu bytes of scratch",
                     n * sizeof *p);
  free(s->buffer);
  s->buffer = p;
  s->buffer_floats = n;
  return TN_OK;
}

/* The rope's table is indexed by positions only the host can read: every one is checked before any row
 * runs, so a bad one writes nothing. */
static tn_status check_rope_positions(tn_context *ctx, const tn_op_args *args) {
  const tn_rope *rope = &args->rope;
  if (rope->cos_sin == NULL) return TN_OK;
  const int64_t table_rows = rope->cos_sin->rows;
  for (int64_t r = 0; r < args->x->rows; r++) {
    const int64_t pos = rope->positions_i64 ? ((const int64_t *)rope->positions)[r]
                                            : (int64_t)((const int32_t *)rope->positions)[r];
    TN_RETURN_ERROR_IF(pos < 0 || pos >= table_rows, ctx, TN_ERR_VALUE,
                       "%s: rope position %" PRId64 " of row %" PRId64
                       " is outside the cos_sin table (rows 0 to %" PRId64 ")",
                       tn_op_name(args->op), pos, r, table_rows - 1);
  }
  return TN_OK;
}

/* A quantized output's static scale (or NVFP4's global scale): read once, refused unless finite and > 0. */
static tn_status read_quant_scale(tn_context *ctx, const tn_op_args *args, float *scale) {
  *scale = 1.0f;
  const tn_tensor *t = args->quant.scale;
  if (t == NULL) return TN_OK;
  memcpy(scale, t->data, sizeof *scale);
  TN_RETURN_ERROR_IF(!(isfinite(*scale) && *scale > 0.0f), ctx, TN_ERR_VALUE,
                     "%s: quant.scale is %g; must be finite and > 0", tn_op_name(args->op), (double)*scale);
  return TN_OK;
}

/* The swizzled scales' padding (rows past x's, groups past the row's) is zeros: the whole tensor is
 * cleared first, then every row writes its own scales. */
static void clear_swizzled_scales(const tn_op_args *args) {
  const tn_quant *q = &args->quant;
  if (q->format == TN_QUANT_NONE || q->layout != TN_SCALES_SWIZZLED || args->x->rows == 0) return;
  memset(q->scales->data, 0, (size_t)q->scales->rows * (size_t)q->scales->dim);
}

static tn_status run_aligned(void *state, tn_context *ctx, const tn_op_args *args, const tn_run_options *options) {
  cpu_state *s = state;
  const int rope = args->op == TN_OP_RMS_NORM && args->rope.style != TN_ROPE_NONE;
  if (rope) TN_FORWARD_IF_ERROR(check_rope_positions(ctx, args));
  /* The units of work: rows, or for 3-D views every head of every row (each is normalised on its own). */
  const int64_t rows = args->x->rows * tn_tensor_head_count(args->x), dim = args->x->dim;
  const int threads = tn_threads_wanted(ctx);
  int parallel = rows >= 2 && rows * dim >= TN_CPU_PARALLEL_MIN_ELEMENTS && threads > 1;
  if (parallel) TN_FORWARD_IF_ERROR(ensure_pool(s, ctx, threads));
  int64_t chunks = parallel ? (int64_t)tn_thread_pool_size(s->pool) * TN_CPU_CHUNKS_PER_THREAD : 1;
  if (chunks > rows) chunks = rows;
  const int has_weight = args->weight != NULL, has_bias = args->bias != NULL;
  const int theta = rope && args->rope.cos_sin == NULL;
  /* A norm with a quantized output holds its result in a second scratch row. */
  const size_t rows_per_chunk = args->quant.format != TN_QUANT_NONE && args->op != TN_OP_QUANTIZE ? 2 : 1;
  float quant_scale;
  TN_FORWARD_IF_ERROR(read_quant_scale(ctx, args, &quant_scale));
  const size_t vectors = (size_t)chunks * rows_per_chunk + (size_t)has_weight + (size_t)has_bias + (size_t)theta;
  TN_FORWARD_IF_ERROR(ensure_buffer(s, ctx, vectors, dim));

  float *next = s->buffer + (size_t)chunks * rows_per_chunk * (size_t)dim;
  float *weight = NULL, *bias = NULL, *inv_freq = NULL;
  if (has_weight) {
    weight = next;
    next += dim;
    s->kernels->prepare_weight(args->weight, args->weight_offset, weight);
  }
  if (has_bias) {
    bias = next;
    next += dim;
    s->kernels->prepare_vector(args->bias, bias);
  }
  if (theta) {
    /* The frequencies of the pairs, once per call: inv_freq_i = float(theta^(-2i / rotary_dim)), taken in
     * double. */
    inv_freq = next;
    const int64_t rot = args->rope.rotary_dim != 0 ? args->rope.rotary_dim : dim;
    for (int64_t i = 0; i < rot / 2; i++)
      inv_freq[i] = (float)(1.0 / pow((double)args->rope.theta, (double)(2 * i) / (double)rot));
  }
  /* The bytes the call writes: y (when given), q, residual_out. */
  size_t out_bytes = args->y != NULL ? (size_t)rows * (size_t)dim * tn_elem_size(args->x->dtype) : 0;
  if (args->quant.q != NULL) out_bytes += (size_t)args->quant.q->rows * (size_t)args->quant.q->dim;
  if (args->residual_out != NULL)
    out_bytes += (size_t)args->x->rows * (size_t)dim * tn_elem_size(args->residual_out->dtype);
  tn_cpu_call call = {args, weight, bias, inv_freq, out_bytes >= TN_CPU_STREAM_MIN_BYTES, options->round_before_last,
                      quant_scale, tn_quant_group(&args->quant, dim)};
  row_job job = {rope ? s->kernels->rms_norm_rope : s->kernels->rows[args->op], &call, s->buffer, rows,
                 (int64_t)rows_per_chunk * dim, chunks};
  clear_swizzled_scales(args);
  if (parallel) tn_thread_pool_run(s->pool, chunks, run_chunk, &job);
  else run_chunk(&job, 0);
  return TN_OK;
}

static tn_status cpu_run(void *state, tn_context *ctx, const tn_op_args *args, const tn_run_options *options) {
  if (!tn_cpu_needs_staging(args)) return run_aligned(state, ctx, args, options);
  tn_cpu_staging staging;
  TN_FORWARD_IF_ERROR(tn_cpu_stage(ctx, args, &staging));
  const tn_status status = run_aligned(state, ctx, &staging.args, options);
  tn_cpu_unstage(&staging, args, status == TN_OK);
  return status;
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
