/* The CPU backend: the op's row function, with rows spread over the context's thread pool. */
#include "backend.h"

#include <stdlib.h>

#include "../core/error.h"
#include "ops.h"
#include "thread_pool.h"

/* Below this many elements a call stays on the calling thread: waking workers costs more. */
#define TN_CPU_PARALLEL_MIN_ELEMENTS (1 << 16)
/* Chunks per thread: enough for dynamic balancing, few enough to keep per-chunk overhead small. */
#define TN_CPU_CHUNKS_PER_THREAD 4

static const tn_cpu_rows_fn cpu_ops[TN_OP_COUNT] = {
    [TN_OP_RMS_NORM] = tn_cpu_rms_norm_rows,
    [TN_OP_L2_NORM] = tn_cpu_l2_norm_rows,
    [TN_OP_ADD_RMS_NORM] = tn_cpu_add_rms_norm_rows,
};

typedef struct cpu_state {
  tn_thread_pool *pool;
} cpu_state;

typedef struct row_job {
  tn_cpu_rows_fn fn;
  const tn_op_args *args;
  int64_t rows;
  int64_t chunks;
} row_job;

static void run_chunk(void *p, int64_t chunk) {
  const row_job *job = p;
  int64_t begin = job->rows * chunk / job->chunks;
  int64_t end = job->rows * (chunk + 1) / job->chunks;
  job->fn(job->args, begin, end);
}

static tn_status cpu_open(tn_context *ctx, void **state) {
  cpu_state *s = calloc(1, sizeof *s);
  TN_RETURN_ERROR_IF(s == NULL, ctx, TN_ERR_NO_MEMORY, "cpu: out of memory creating the backend");
  *state = s;
  return TN_OK;
}

static void cpu_close(void *state) {
  cpu_state *s = state;
  if (s == NULL) return;
  tn_thread_pool_destroy(s->pool);
  free(s);
}

/* (Re)creates the pool when the wanted thread count changed since the last call. */
static tn_status ensure_pool(cpu_state *s, tn_context *ctx) {
  int wanted = tn_threads_wanted(ctx);
  if (s->pool != NULL && tn_thread_pool_size(s->pool) == wanted) return TN_OK;
  tn_thread_pool_destroy(s->pool);
  s->pool = tn_thread_pool_create(wanted);
  TN_RETURN_ERROR_IF(s->pool == NULL, ctx, TN_ERR_NO_MEMORY, "cpu: cannot start a pool of %d threads", wanted);
  return TN_OK;
}

static tn_status cpu_run(void *state, tn_context *ctx, const tn_op_args *args) {
  cpu_state *s = state;
  tn_cpu_rows_fn fn = cpu_ops[args->op];
  const int64_t rows = args->x->rows;
  if (rows < 2 || rows * args->x->dim < TN_CPU_PARALLEL_MIN_ELEMENTS || tn_threads_wanted(ctx) == 1) {
    fn(args, 0, rows);
    return TN_OK;
  }
  TN_FORWARD_IF_ERROR(ensure_pool(s, ctx));
  int64_t chunks = (int64_t)tn_thread_pool_size(s->pool) * TN_CPU_CHUNKS_PER_THREAD;
  row_job job = {fn, args, rows, chunks < rows ? chunks : rows};
  tn_thread_pool_run(s->pool, job.chunks, run_chunk, &job);
  return TN_OK;
}

const tn_backend tn_cpu_backend = {
    .name = "cpu",
    .kind = TN_DEVICE_CPU,
    .open = cpu_open,
    .close = cpu_close,
    .run = cpu_run,
};
