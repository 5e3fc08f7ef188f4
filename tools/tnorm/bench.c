/* tnorm bench: time each op and dtype over a list of shapes and report GB/s next to the memory-copy
 * ceiling measured in the same run.
 *
 * Napkin math: an op moves every operand once, bytes = rows * dim * elem * (inputs + outputs)
 * + dim * weight_elem. rms_norm bf16 at 4096 x 4096: 2 * 4096 * 4096 * 2 B + 8 KiB = 64 MiB. A quantized
 * output writes q and its scales instead of y: rms_norm+fp8_token bf16 at 4096 x 4096 moves
 * 4096 * 4096 * (2 + 1) B + 4096 * 4 B + 8 KiB, about 48 MiB.
 * The ceiling is a copy, counting read + write; % of ceiling = op GB/s / copy GB/s. On a GPU it is a
 * device-to-device copy of a large buffer, once per run. On the CPU each measurement has its own: copies
 * of the op's own x into its y by as many threads as the op uses, timed between the op's batches.
 * Successive calls (and copies) rotate over copies of the operands (1 GiB in all, at most 64 copies),
 * so they run from memory; only shapes so small that 64 copies fit in cache can exceed 100%. */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"
#include "copy_ceiling.h"
#include "reference.h"
#include "rng.h"

#define MAX_SHAPES 64
#define COPY_BYTES ((size_t)512 << 20) /* the ceiling's buffer: well past any CPU cache */
#define ROTATION_BYTES (1024.0 * 1024 * 1024) /* operands rotated per call, at least this much in all */
#define MAX_SETS 64
#define BATCHES 9 /* timed batches per measurement; the median is reported */

/* The quantized outputs benched: an op writing its result quantized and no y (the fused path an engine
 * takes before a low-precision GEMM), named OP+FORMAT; bytes count x (and the residual in and out), the
 * weight, q and the scales. */
typedef struct bench_quant {
  const char *name;
  tn_op op;
  tn_quant_format format;
  tn_quant_scaling scaling;
  int64_t group_size;
  int pow2;
  tn_scale_layout layout;
} bench_quant;

#define BENCH_QUANT_COUNT 10
static const bench_quant bench_quants[BENCH_QUANT_COUNT] = {
    {"rms_norm+fp8_token", TN_OP_RMS_NORM, TN_QUANT_FP8_E4M3, TN_QUANT_SCALE_TOKEN, 0, 0, TN_SCALES_ROW_MAJOR},
    {"rms_norm+fp8_tensor", TN_OP_RMS_NORM, TN_QUANT_FP8_E4M3, TN_QUANT_SCALE_TENSOR, 0, 0, TN_SCALES_ROW_MAJOR},
    /* DeepGEMM's activations: groups of 128, scales column-major */
    {"rms_norm+fp8_group128", TN_OP_RMS_NORM, TN_QUANT_FP8_E4M3, TN_QUANT_SCALE_GROUP, 128, 0,
     TN_SCALES_COLUMN_MAJOR},
    {"rms_norm+int8_token", TN_OP_RMS_NORM, TN_QUANT_INT8, TN_QUANT_SCALE_TOKEN, 0, 0, TN_SCALES_ROW_MAJOR},
    {"rms_norm+mxfp8", TN_OP_RMS_NORM, TN_QUANT_MXFP8, TN_QUANT_SCALE_GROUP, 0, 0, TN_SCALES_SWIZZLED},
    {"rms_norm+nvfp4", TN_OP_RMS_NORM, TN_QUANT_NVFP4, TN_QUANT_SCALE_GROUP, 0, 0, TN_SCALES_SWIZZLED},
    {"add_rms_norm+fp8_token", TN_OP_ADD_RMS_NORM, TN_QUANT_FP8_E4M3, TN_QUANT_SCALE_TOKEN, 0, 0, TN_SCALES_ROW_MAJOR},
    {"add_rms_norm+nvfp4", TN_OP_ADD_RMS_NORM, TN_QUANT_NVFP4, TN_QUANT_SCALE_GROUP, 0, 0, TN_SCALES_SWIZZLED},
    {"quantize+fp8_token", TN_OP_QUANTIZE, TN_QUANT_FP8_E4M3, TN_QUANT_SCALE_TOKEN, 0, 0, TN_SCALES_ROW_MAJOR},
    {"quantize+nvfp4", TN_OP_QUANTIZE, TN_QUANT_NVFP4, TN_QUANT_SCALE_GROUP, 0, 0, TN_SCALES_SWIZZLED},
};

/* The bench's ops: the library's (quantize only with a format, below), then rms_norm with a rope (a NEOX
 * rotation of every head, positions one per token) with its cos/sin from an f32 table or computed from
 * theta; add_rms_norm with a float32 residual stream (residual and residual_out f32 beside x and y of the
 * dtype); rms_norm of every head times a multiplicand of x's shape (a gated per-head norm, as Gated
 * DeltaNet's output norm); then the quantized outputs. */
enum {
  BENCH_ROPE_TABLE = TN_OP_COUNT,
  BENCH_ROPE_THETA,
  BENCH_ADD_F32_STREAM,
  BENCH_GATED_HEADS,
  BENCH_QUANT_FIRST,
  BENCH_OP_COUNT = BENCH_QUANT_FIRST + BENCH_QUANT_COUNT
};
static const char *const bench_extra_names[] = {"rms_norm_rope", "rms_norm_rope_theta", "add_rms_norm_f32_stream",
                                                "rms_norm_gated_heads"};
static int bench_is_rope(int op) { return op == BENCH_ROPE_TABLE || op == BENCH_ROPE_THETA; }
#define ROPE_TABLE_ROWS 4096 /* positions in the table; token t is at position t % ROPE_TABLE_ROWS */
#define BENCH_STATIC_SCALE 0.01f /* the static scale, a value well inside FP8's range at rms_norm's sizes */
#define BENCH_NVFP4_GLOBAL 500.0f /* NVFP4's global scale, about 448 * 6 / amax */

static const bench_quant *bench_quant_of(int op) {
  return op >= BENCH_QUANT_FIRST ? &bench_quants[op - BENCH_QUANT_FIRST] : NULL;
}

/* The library's quantize is benched only through its formats (quantize+...): it has no output without one. */
static int bench_op_exists(int op) { return op != TN_OP_QUANTIZE; }

static const char *bench_op_name(int op) {
  if (op < TN_OP_COUNT) return tn_op_name((tn_op)op);
  if (op < BENCH_QUANT_FIRST) return bench_extra_names[op - TN_OP_COUNT];
  return bench_quant_of(op)->name;
}

static tn_quant bench_quant_config(const bench_quant *bq) {
  tn_quant q = tn_quant_init(bq->format);
  q.scaling = bq->scaling;
  q.group_size = bq->group_size;
  q.pow2_scales = bq->pow2;
  q.layout = bq->layout;
  return q;
}

/* Whether a shape suits an op: a rope's heads are short, a quantized output's rows split into groups. */
static int bench_fits(int op, int64_t dim) {
  if (bench_is_rope(op)) return dim <= TN_ROPE_MAX_DIM;
  const bench_quant *bq = bench_quant_of(op);
  if (bq == NULL) return 1;
  const tn_quant q = bench_quant_config(bq);
  return dim % cli_quant_group(&q, dim) == 0;
}

typedef struct bench_options {
  cli_device device;
  const char *csv;
  int64_t shapes[MAX_SHAPES][3]; /* rows, heads, dim */
  int shape_count;
  int ops[BENCH_OP_COUNT];
  int dtypes[TN_DTYPE_COUNT];
  long long iters; /* 0: automatic, ~0.3 s per measurement */
} bench_options;

static double now_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- the ceiling ---- */

/* The copy ceilings, in read + write bytes per second. */
typedef struct copy_ceiling {
  double memcpy_bw; /* memcpy */
  double best_bw;   /* the better of memcpy and the streaming copy: the ceiling percentages refer to */
} copy_ceiling;

/* The run's headline ceiling on the CPU: the best of a few rounds of memcpy and of a streaming copy of
 * COPY_BYTES (all 0 on failure). Each measurement also gets a ceiling of its own (see measure). */
static copy_ceiling measure_copy_ceiling(cpu_copier *copier) {
  unsigned char *src = malloc(COPY_BYTES), *dst = malloc(COPY_BYTES);
  copy_ceiling best = {0.0, 0.0};
  if (src != NULL && dst != NULL) {
    memset(src, 1, COPY_BYTES);
    memset(dst, 0, COPY_BYTES); /* touch every page before timing */
    for (int r = 0; r < 8; r++) {
      double t0 = now_seconds();
      cpu_copier_run(copier, dst, src, COPY_BYTES, r % 2);
      double bw = 2.0 * (double)COPY_BYTES / (now_seconds() - t0);
      if (r <= 1) continue; /* rounds 0 and 1 warm up */
      if (bw > best.best_bw) best.best_bw = bw;
      if (r % 2 == 0 && bw > best.memcpy_bw) best.memcpy_bw = bw;
    }
  }
  free(src), free(dst);
  return best;
}

/* ---- one measurement ---- */

typedef struct measurement {
  double seconds; /* median time per call */
  double bytes;
  copy_ceiling copy; /* CPU: copies of the same operands, timed between the op's batches (else 0) */
} measurement;

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* The median of BATCHES figures (sorts them). */
static double median_of_batches(double *v) {
  qsort(v, BATCHES, sizeof *v, cmp_double);
  return v[BATCHES / 2];
}

/* sets copies of elems random values on the device (drawn once on the host, copied to every set). */
static void *alloc_random(tn_context *ctx, tn_device dev, tn_dtype dtype, size_t elems, size_t sets, tn_rng *rng,
                          double mean, int *failed) {
  size_t bytes = elems * tn_dtype_size(dtype);
  char *host = malloc(bytes);
  void *p = NULL;
  if (host == NULL || tn_malloc(ctx, dev, bytes * sets, &p) != TN_OK) {
    *failed = 1;
    free(host);
    return NULL;
  }
  /* At most 2^20 values are drawn, then repeated: the speed of an op does not depend on them. */
  const size_t drawn = elems < ((size_t)1 << 20) ? elems : (size_t)1 << 20;
  tn_tensor t = tn_tensor_2d(host, dtype, 1, (int64_t)elems);
  for (size_t i = 0; i < drawn; i++) tn_reference_store(&t, 0, (int64_t)i, (float)(mean + tn_rng_normal(rng)));
  for (size_t i = drawn; i < elems; i += drawn) {
    const size_t n = elems - i < drawn ? elems - i : drawn;
    memcpy(host + i * tn_dtype_size(dtype), host, n * tn_dtype_size(dtype));
  }
  for (size_t k = 0; k < sets && !*failed; k++)
    if (tn_memcpy(ctx, (char *)p + k * bytes, dev, host, tn_cpu_device(), bytes) != TN_OK) *failed = 1;
  free(host);
  return p;
}

/* Seconds per call over a batch of n calls rotating over the sets, between two timing marks (CUDA events
 * on a GPU: calls queue back to back, as in an engine). -2 on an op error. */
typedef struct bench_call {
  tn_context *ctx;
  tn_device dev;
  tn_op_args *a;
  tn_tensor *xt, *yt, *rt, *rot, *qt, *st;
  char *x, *y, *r, *ro, *q, *sc;
  size_t sets, set_bytes, r_set_bytes; /* one set of x (and y), of the residual (or mul) */
  size_t q_set_bytes, s_set_bytes;     /* one set of q, of the scales */
  tn_event *start, *end;
} bench_call;

static void use_set(bench_call *c, long long k) {
  const size_t set = (size_t)k % c->sets;
  c->xt->data = c->x + set * c->set_bytes;
  c->yt->data = c->y + set * c->set_bytes;
  if (c->r != NULL) c->rt->data = c->r + set * c->r_set_bytes;
  if (c->ro != NULL) c->rot->data = c->ro + set * c->r_set_bytes;
  if (c->q != NULL) c->qt->data = c->q + set * c->q_set_bytes;
  if (c->sc != NULL) c->st->data = c->sc + set * c->s_set_bytes;
}

/* -2 on an op error, -3 when the device has no kernel for it (TN_ERR_UNAVAILABLE). */
static int time_batch(bench_call *c, long long n, long long first, double *seconds) {
  double ms = 0;
  if (tn_event_record(c->ctx, c->start) != TN_OK) return -2;
  for (long long i = 0; i < n; i++) {
    use_set(c, first + i);
    const tn_status st = tn_op_run(c->ctx, c->a);
    if (st != TN_OK) return st == TN_ERR_UNAVAILABLE ? -3 : -2;
  }
  if (tn_event_record(c->ctx, c->end) != TN_OK || tn_event_elapsed_ms(c->ctx, c->start, c->end, &ms) != TN_OK)
    return -2;
  *seconds = ms * 1e-3 / (double)n;
  return 0;
}

/* Bytes per second of one copy of every x set into the y sets (read + write), all threads at once. */
static double time_copy(bench_call *c, cpu_copier *copier, int streaming) {
  const size_t bytes = c->sets * c->set_bytes;
  double t0 = now_seconds();
  cpu_copier_run(copier, c->y, c->x, bytes, streaming);
  return 2.0 * (double)bytes / (now_seconds() - t0);
}

/* sets copies of bytes on the device, uninitialised (outputs: the warm-up touches them). */
static void *alloc_sets(tn_context *ctx, tn_device dev, size_t bytes, size_t sets, int *failed) {
  void *p = NULL;
  if (*failed || bytes == 0) return NULL;
  if (tn_malloc(ctx, dev, bytes * sets, &p) != TN_OK) *failed = 1;
  return p;
}

/* One f32 on the device: a static or global scale. */
static void *alloc_value(tn_context *ctx, tn_device dev, float value, int *failed) {
  void *p = alloc_sets(ctx, dev, sizeof value, 1, failed);
  if (p != NULL && tn_memcpy(ctx, p, dev, &value, tn_cpu_device(), sizeof value) != TN_OK) *failed = 1;
  return p;
}

/* Times op on rows x dim (weight in x's dtype where the op takes one) on dev. Calls rotate over enough
 * copies of the operands (1 GiB in all, at most 64 copies) to exceed the caches, so every call reads and
 * writes memory, as the ceiling does. The time per call is the median over batches of calls (a batch
 * runs ~20 ms, or `iters` calls). On the CPU (copier set) each batch is followed by one memcpy and one
 * streaming copy of all the x sets into the y sets: the measurement's own ceiling, over the very bytes
 * the calls rotate through, and close enough in time that a host whose bandwidth drifts (a shared
 * machine's does, by 10-30%) moves both alike; the median of each. Returns 0, -1 when out of memory, -2
 * on an op error, -3 when the device has no kernel for the op (its message on ctx). */
static int measure(tn_context *ctx, tn_device dev, int bench_op, tn_dtype dtype, int64_t rows, int64_t heads,
                   int64_t dim, long long iters, cpu_copier *copier, measurement *out) {
  tn_rng rng = {0x5eed ^ (uint64_t)(rows * 31 + dim)};
  const int rope = bench_is_rope(bench_op), gated = bench_op == BENCH_GATED_HEADS;
  const bench_quant *bq = bench_quant_of(bench_op);
  const tn_op op = bq != NULL            ? bq->op
                   : rope || gated       ? TN_OP_RMS_NORM
                   : bench_op == BENCH_ADD_F32_STREAM ? TN_OP_ADD_RMS_NORM
                                                      : (tn_op)bench_op;
  tn_quant quant = bq != NULL ? bench_quant_config(bq) : tn_quant_init(TN_QUANT_NONE);
  cli_quant_shapes qs = {TN_U8, TN_U8, 0, 0, 0};
  if (bq != NULL) cli_quant_shapes_of(&quant, rows * heads, dim, &qs);
  /* q and the dynamic scales of one call; y is not written beside them. */
  const size_t q_set_bytes = (size_t)(rows * heads * qs.q_dim) * tn_dtype_size(qs.q_dtype);
  const size_t s_set_bytes = (size_t)(qs.scales_rows * qs.scales_dim) * tn_dtype_size(qs.scales_dtype);
  /* The residual's dtype (f32 for the f32 stream), also the multiplicand's (x's) for the gated norm. */
  const tn_dtype rdtype = bench_op == BENCH_ADD_F32_STREAM ? TN_F32 : dtype;
  size_t elems = (size_t)rows * (size_t)heads * (size_t)dim, es = tn_dtype_size(dtype), res = tn_dtype_size(rdtype);
  /* add_rms_norm, add_layer_norm: x, residual, y, residual_out; add and mul (and the gated norm): x, b, y;
   * the others: x, y. */
  int is_add = op == TN_OP_ADD_RMS_NORM || op == TN_OP_ADD_LAYER_NORM;
  int has_b = op == TN_OP_ADD || op == TN_OP_MUL || gated;
  int is_layer = op == TN_OP_LAYER_NORM || op == TN_OP_ADD_LAYER_NORM;
  int has_weight = op == TN_OP_RMS_NORM || op == TN_OP_ADD_RMS_NORM || is_layer;
  double r_operands = is_add ? 2 : has_b ? 1 : 0;
  double set_bytes = (double)elems * ((double)es * (bq != NULL ? 1 : 2) + (double)res * r_operands) +
                     (double)q_set_bytes + (double)s_set_bytes;
  size_t sets = (size_t)(ROTATION_BYTES / set_bytes) + 1;
  if (sets > MAX_SETS) sets = MAX_SETS;
  int failed = 0;
  char *x = alloc_random(ctx, dev, dtype, elems, sets, &rng, 0.0, &failed);
  char *y = failed ? NULL : alloc_random(ctx, dev, dtype, elems, sets, &rng, 0.0, &failed);
  void *w = failed ? NULL : alloc_random(ctx, dev, dtype, (size_t)dim, 1, &rng, 1.0, &failed);
  void *bias = failed || !is_layer ? NULL : alloc_random(ctx, dev, dtype, (size_t)dim, 1, &rng, 0.0, &failed);
  /* The rope's positions (int64, one per token) and its f32 cos/sin table. */
  void *positions = NULL, *table = NULL;
  if (!failed && rope) {
    int64_t *host = malloc((size_t)rows * sizeof *host);
    if (host == NULL || tn_malloc(ctx, dev, (size_t)rows * sizeof *host, &positions) != TN_OK) failed = 1;
    for (int64_t t = 0; !failed && t < rows; t++) host[t] = t % ROPE_TABLE_ROWS;
    if (!failed && tn_memcpy(ctx, positions, dev, host, tn_cpu_device(), (size_t)rows * sizeof *host) != TN_OK)
      failed = 1;
    free(host);
    if (!failed && bench_op == BENCH_ROPE_TABLE)
      table = alloc_random(ctx, dev, TN_F32, (size_t)ROPE_TABLE_ROWS * (size_t)dim, 1, &rng, 0.0, &failed);
  }
  char *r = failed || !(is_add || has_b) ? NULL : alloc_random(ctx, dev, rdtype, elems, sets, &rng, 0.0, &failed);
  char *ro = failed || !is_add ? NULL : alloc_random(ctx, dev, rdtype, elems, sets, &rng, 0.0, &failed);
  char *q = bq != NULL ? alloc_sets(ctx, dev, q_set_bytes, sets, &failed) : NULL;
  char *sc = bq != NULL ? alloc_sets(ctx, dev, s_set_bytes, sets, &failed) : NULL;
  const int wants_scale = bq != NULL && (quant.scaling == TN_QUANT_SCALE_TENSOR || quant.format == TN_QUANT_NVFP4);
  void *scale = wants_scale ? alloc_value(ctx, dev, quant.format == TN_QUANT_NVFP4 ? BENCH_NVFP4_GLOBAL
                                                                                     : BENCH_STATIC_SCALE, &failed)
                            : NULL;
  double times[BATCHES], memcpy_bw[BATCHES], stream_bw[BATCHES];
  tn_event *start = NULL, *end = NULL;
  int rc = -1;
  if (failed || tn_event_create(ctx, dev, &start) != TN_OK || tn_event_create(ctx, dev, &end) != TN_OK) goto out;
  /* [rows, heads, dim], contiguous: a 3-D view for the rope (its positions are per token), else rows of dim. */
  tn_tensor xt = tn_tensor_on(rope || gated ? tn_tensor_heads(x, dtype, rows, heads, dim, heads * dim, dim)
                                             : tn_tensor_2d(x, dtype, rows * heads, dim), dev);
  tn_tensor yt = xt, rt = xt, rot = xt;
  rt.dtype = rot.dtype = rdtype; /* contiguous: the same strides in elements */
  tn_tensor wt = tn_tensor_on(tn_tensor_vector(w, dtype, dim), dev);
  tn_tensor bt = tn_tensor_on(tn_tensor_vector(bias, dtype, dim), dev);
  tn_tensor cs = tn_tensor_on(tn_tensor_2d(table, TN_F32, ROPE_TABLE_ROWS, dim), dev);
  tn_tensor qt = tn_tensor_on(tn_tensor_2d(q, qs.q_dtype, rows * heads, qs.q_dim), dev);
  tn_tensor st = tn_tensor_on(tn_tensor_2d(sc, qs.scales_dtype, qs.scales_rows, qs.scales_dim), dev);
  tn_tensor scale_t = tn_tensor_on(tn_tensor_2d(scale, TN_F32, 1, 1), dev);
  tn_op_args a = tn_op_args_init(op);
  a.x = &xt;
  a.y = bq != NULL ? NULL : &yt;
  if (bq != NULL) {
    quant.q = &qt;
    quant.scales = quant.scaling != TN_QUANT_SCALE_TENSOR ? &st : NULL;
    quant.scale = wants_scale ? &scale_t : NULL;
    a.quant = quant;
  }
  a.weight = has_weight ? &wt : NULL;
  a.bias = is_layer ? &bt : NULL;
  if (is_layer) a.eps = 1e-5f;
  if (rope) {
    a.rope.style = TN_ROPE_NEOX;
    a.rope.positions = positions;
    a.rope.positions_i64 = 1;
    a.rope.theta = 10000.0f;
    a.rope.cos_sin = table != NULL ? &cs : NULL;
  }
  a.residual = is_add || op == TN_OP_ADD ? &rt : NULL;
  a.mul = op == TN_OP_MUL || gated ? &rt : NULL;
  a.residual_out = is_add ? &rot : NULL;
  bench_call c = {ctx, dev, &a, &xt, &yt, &rt, &rot, &qt, &st, x, y, r, ro, q, sc, sets, elems * es, elems * res,
                  q_set_bytes, s_set_bytes, start, end};

  double per_call = 0;
  /* Warm-up: the kernel loaded, pages touched, every set used once. */
  if ((rc = time_batch(&c, (long long)sets, 0, &per_call)) != 0) goto out;
  rc = -2;
  long long n = iters;
  if (n == 0) {
    n = 1;
    while (time_batch(&c, n, 0, &per_call) == 0 && per_call * (double)n < 0.02 && n < 100000) n *= 2;
  }
  if (copier != NULL) { /* the copies' warm-up */
    time_copy(&c, copier, 0);
    time_copy(&c, copier, 1);
  }
  for (int b = 0; b < BATCHES; b++) {
    if (time_batch(&c, n, (long long)b * n, &times[b]) != 0) goto out;
    if (copier != NULL) {
      memcpy_bw[b] = time_copy(&c, copier, 0);
      stream_bw[b] = time_copy(&c, copier, 1);
    }
  }
  out->seconds = median_of_batches(times);
  /* Each vector operand once; the rope's positions, and the table rows its positions reach. */
  out->bytes = set_bytes + (has_weight ? (double)dim * (double)es : 0.0) + (is_layer ? (double)dim * (double)es : 0.0);
  if (rope) {
    const double reached = (double)(rows < ROPE_TABLE_ROWS ? rows : ROPE_TABLE_ROWS);
    out->bytes += 8.0 * (double)rows + (table != NULL ? reached * (double)dim * 4.0 : 0.0);
  }
  out->copy = (copy_ceiling){0.0, 0.0};
  if (copier != NULL) {
    const double memcpy_median = median_of_batches(memcpy_bw), stream_median = median_of_batches(stream_bw);
    out->copy.memcpy_bw = memcpy_median;
    out->copy.best_bw = stream_median > memcpy_median ? stream_median : memcpy_median;
  }
  rc = 0;
out:
  tn_event_destroy(start);
  tn_event_destroy(end);
  /* The first error's message stays on ctx for the caller. */
  cli_free_quietly(dev, x), cli_free_quietly(dev, y), cli_free_quietly(dev, w), cli_free_quietly(dev, r);
  cli_free_quietly(dev, ro), cli_free_quietly(dev, bias), cli_free_quietly(dev, positions);
  cli_free_quietly(dev, table), cli_free_quietly(dev, q), cli_free_quietly(dev, sc), cli_free_quietly(dev, scale);
  return rc;
}

/* The GPU ceiling: a device-to-device copy of COPY_BYTES, best of several rounds, read + write. */
static double measure_device_copy(tn_context *ctx, tn_device dev) {
  void *src = NULL, *dst = NULL;
  tn_event *start = NULL, *end = NULL;
  double best = 0.0;
  if (tn_malloc(ctx, dev, COPY_BYTES, &src) != TN_OK || tn_malloc(ctx, dev, COPY_BYTES, &dst) != TN_OK ||
      tn_event_create(ctx, dev, &start) != TN_OK || tn_event_create(ctx, dev, &end) != TN_OK)
    goto out;
  for (int round = 0; round < 12; round++) {
    double ms = 0;
    if (tn_event_record(ctx, start) != TN_OK || tn_memcpy(ctx, dst, dev, src, dev, COPY_BYTES) != TN_OK ||
        tn_event_record(ctx, end) != TN_OK || tn_event_elapsed_ms(ctx, start, end, &ms) != TN_OK) {
      best = 0.0;
      break;
    }
    double bw = 2.0 * (double)COPY_BYTES / (ms * 1e-3);
    if (round >= 2 && bw > best) best = bw; /* rounds 0 and 1 warm up */
  }
out:
  tn_event_destroy(start);
  tn_event_destroy(end);
  tn_free(ctx, dev, src);
  tn_free(ctx, dev, dst);
  return best;
}

/* ---- options ---- */

static const int64_t default_shapes[][3] = {{1, 1, 4096},    {64, 1, 4096},   {4096, 1, 4096}, {131072, 1, 128},
                                            {8192, 1, 2048},  {512, 1, 16384}, {16, 1, 65536},  {8192, 40, 128}};

static int parse_shapes(const char *s, bench_options *o) {
  o->shape_count = 0;
  char *copy = strdup(s), *save = NULL;
  if (copy == NULL) return cli_fail("out of memory");
  int rc = CLI_OK;
  for (char *tok = strtok_r(copy, ",", &save); tok != NULL; tok = strtok_r(NULL, ",", &save)) {
    /* ROWSxDIM, or TOKENSxHEADSxDIM (the per-head ops see a 3-D view; the others its rows of dim). */
    long long v[3];
    int n = 0;
    char *part = tok, *xpos;
    int bad = o->shape_count == MAX_SHAPES;
    while (!bad) {
      xpos = strchr(part, 'x');
      if (xpos != NULL) *xpos = '\0';
      if (n == 3 || cli_parse_count(part, &v[n]) != 0) bad = 1;
      n++;
      if (xpos == NULL) break;
      part = xpos + 1;
    }
    if (bad || n < 2) {
      rc = cli_usage("--shapes: '%s' is not ROWSxDIM or TOKENSxHEADSxDIM (at most %d shapes)", tok, MAX_SHAPES);
      break;
    }
    long long rows = v[0], heads = n == 3 ? v[1] : 1, dim = v[n - 1];
    if (dim == 0 || heads == 0 || rows > (1ll << 40) / dim / heads) {
      rc = cli_usage("--shapes: '%s' is not a valid shape", tok);
      break;
    }
    o->shapes[o->shape_count][0] = rows;
    o->shapes[o->shape_count][1] = heads;
    o->shapes[o->shape_count][2] = dim;
    o->shape_count++;
  }
  free(copy);
  if (rc == CLI_OK && o->shape_count == 0) rc = cli_usage("--shapes: no shape given");
  return rc;
}

/* A comma list of names into flags, via parse (cli_parse_op or cli_parse_dtype). */
static int parse_list(const char *flag, const char *s, int *flags, int count, int (*parse)(const char *, int *)) {
  memset(flags, 0, (size_t)count * sizeof *flags);
  char *copy = strdup(s), *save = NULL;
  if (copy == NULL) return cli_fail("out of memory");
  int rc = CLI_OK, any = 0;
  for (char *tok = strtok_r(copy, ",", &save); tok != NULL; tok = strtok_r(NULL, ",", &save)) {
    int v;
    if (parse(tok, &v) != 0) {
      /* The library's quantize has no output without a format; the bench names its formats. */
      const int quantize = strcmp(tok, tn_op_name(TN_OP_QUANTIZE)) == 0;
      rc = cli_usage("--%s: unknown name '%s'%s", flag, tok,
                     quantize ? " (bench quantize with a format: quantize+fp8_token or quantize+nvfp4)" : "");
      break;
    }
    flags[v] = any = 1;
  }
  free(copy);
  if (rc == CLI_OK && !any) rc = cli_usage("--%s: empty list", flag);
  return rc;
}

static int parse_op_index(const char *s, int *out) {
  for (int k = TN_OP_COUNT; k < BENCH_OP_COUNT; k++) {
    if (strcmp(s, bench_op_name(k)) == 0) {
      *out = k;
      return 0;
    }
  }
  tn_op op;
  if (cli_parse_op(s, &op) != 0 || !bench_op_exists((int)op)) return -1;
  *out = (int)op;
  return 0;
}

static int parse_dtype_index(const char *s, int *out) {
  tn_dtype d;
  if (cli_parse_dtype(s, &d) != 0) return -1;
  *out = (int)d;
  return 0;
}

static int parse_bench_options(int argc, char **argv, bench_options *o) {
  static const struct option long_options[] = {
      {"device", required_argument, NULL, 'd'}, {"csv", required_argument, NULL, 'c'},
      {"shapes", required_argument, NULL, 's'}, {"ops", required_argument, NULL, 'o'},
      {"dtypes", required_argument, NULL, 't'}, {"iters", required_argument, NULL, 'i'},
      {NULL, 0, NULL, 0}};
  o->device = CLI_DEVICE_AUTO;
  o->shape_count = (int)(sizeof default_shapes / sizeof default_shapes[0]);
  memcpy(o->shapes, default_shapes, sizeof default_shapes);
  for (int i = 0; i < BENCH_OP_COUNT; i++) o->ops[i] = bench_op_exists(i);
  for (int i = 0; i < TN_DTYPE_COUNT; i++) o->dtypes[i] = 1;
  opterr = 0;
  optind = 1;
  int c, rc = CLI_OK;
  while (rc == CLI_OK && (c = getopt_long(argc, argv, ":", long_options, NULL)) != -1) {
    switch (c) {
      case 'd':
        if (cli_parse_device(optarg, &o->device) != 0) rc = cli_usage("--device: unknown device '%s'", optarg);
        break;
      case 'c': o->csv = optarg; break;
      case 's': rc = parse_shapes(optarg, o); break;
      case 'o': rc = parse_list("ops", optarg, o->ops, BENCH_OP_COUNT, parse_op_index); break;
      case 't': rc = parse_list("dtypes", optarg, o->dtypes, TN_DTYPE_COUNT, parse_dtype_index); break;
      case 'i':
        if (cli_parse_count(optarg, &o->iters) != 0 || o->iters > 1000000)
          rc = cli_usage("--iters: '%s' is not a count in 1..1000000", optarg);
        break;
      case ':': return cli_usage("bench: %s needs a value", argv[optind - 1]);
      default: return cli_usage("bench: unknown option '%s'", argv[optind - 1]);
    }
  }
  if (rc == CLI_OK && optind < argc) rc = cli_usage("bench: unexpected argument '%s'", argv[optind]);
  return rc;
}

int cli_bench_main(int argc, char **argv) {
  bench_options o = {0};
  int rc = parse_bench_options(argc, argv, &o);
  if (rc != CLI_OK) return rc;
  tn_context *ctx = NULL;
  if (tn_context_create(&ctx) != TN_OK) return cli_fail("out of memory");
  FILE *csv = NULL;
  cpu_copier *copier = NULL;
  tn_device dev;
  if ((rc = cli_pick_device(ctx, o.device, &dev)) != CLI_OK) goto done;
  int threads = tn_context_num_threads(ctx);
  copy_ceiling cc = {0.0, 0.0};
  if (dev.kind == TN_DEVICE_CPU) {
    if ((copier = cpu_copier_start(threads)) != NULL) cc = measure_copy_ceiling(copier);
  } else {
    cc.best_bw = cc.memcpy_bw = measure_device_copy(ctx, dev);
  }
  double ceiling = cc.best_bw;
  if (ceiling <= 0.0 || cc.memcpy_bw <= 0.0) {
    rc = cli_fail("bench: could not measure the copy ceiling (%s)",
                  dev.kind == TN_DEVICE_CPU ? "out of memory or threads" : tn_context_last_error(ctx));
    goto done;
  }
  if (o.csv != NULL && (csv = fopen(o.csv, "w")) == NULL) {
    rc = cli_fail("--csv: cannot write '%s'", o.csv);
    goto done;
  }
  if (dev.kind == TN_DEVICE_CPU)
    printf("tnorm bench: device cpu, %d thread(s); copies of %zu MiB by %d thread(s), read + write: memcpy %.1f GB/s, "
           "best copy (memcpy or streaming) %.1f GB/s.\nEach line's ceiling is its own: copies of the operands "
           "its calls rotate through (x into y, read + write) by %d thread(s), timed between the op's batches; "
           "%% ceiling is against the better of memcpy and a streaming copy, %% memcpy against memcpy.\n\n",
           threads, COPY_BYTES >> 20, threads, cc.memcpy_bw * 1e-9, ceiling * 1e-9, threads);
  else
    printf("tnorm bench: device cuda:%d; device-to-device copy of %zu MiB, read + write: %.1f GB/s = the ceiling; "
           "times are CUDA events over batches of back-to-back calls (median of %d batches)\n\n",
           dev.index, COPY_BYTES >> 20, ceiling * 1e-9, BATCHES);
  if (dev.kind != TN_DEVICE_CPU) threads = 0;
  printf("%-23s %-5s %15s %12s %10s %9s %9s\n", "op", "dtype", "shape", "time (us)", "GB/s", "% ceiling", "% memcpy");
  if (csv != NULL)
    fprintf(csv, "device,op,dtype,rows,dim,threads,time_us,gbps,ceiling_gbps,pct_ceiling,memcpy_gbps,pct_memcpy\n");
  for (int op = 0; op < BENCH_OP_COUNT && rc == CLI_OK; op++) {
    if (!o.ops[op]) continue;
    for (int d = 0; d < TN_DTYPE_COUNT && rc == CLI_OK; d++) {
      if (!o.dtypes[d]) continue;
      for (int si = 0; si < o.shape_count; si++) {
        measurement m = {0};
        int64_t rows = o.shapes[si][0], heads = o.shapes[si][1], dim = o.shapes[si][2];
        if (!bench_fits(op, dim)) continue;
        int mr = measure(ctx, dev, op, (tn_dtype)d, rows, heads, dim, o.iters, copier, &m);
        if (mr == -3) { /* one line for the op and dtype, and on to the next */
          printf("%-23s %-5s   not built for %s (%s)\n", bench_op_name(op), tn_dtype_name((tn_dtype)d),
                 cli_device_name(dev), tn_context_last_error(ctx));
          break;
        }
        if (mr == -1) {
          rc = cli_fail("bench: out of memory for %s %s %" PRId64 " x %" PRId64 " x %" PRId64, bench_op_name(op),
                        tn_dtype_name((tn_dtype)d), rows, heads, dim);
          break;
        }
        if (mr == -2) {
          rc = cli_fail("bench: %s", tn_context_last_error(ctx));
          break;
        }
        const copy_ceiling line = copier != NULL ? m.copy : cc;
        double gbps = m.bytes / m.seconds * 1e-9, pct = 100.0 * m.bytes / m.seconds / line.best_bw;
        double pct_memcpy = 100.0 * m.bytes / m.seconds / line.memcpy_bw;
        char shape[64];
        if (heads > 1) snprintf(shape, sizeof shape, "%" PRId64 "x%" PRId64 "x%" PRId64, rows, heads, dim);
        else snprintf(shape, sizeof shape, "%" PRId64 "x%" PRId64, rows, dim);
        printf("%-23s %-5s %15s %12.2f %10.1f %8.1f%% %8.1f%%\n", bench_op_name(op), tn_dtype_name((tn_dtype)d),
               shape, m.seconds * 1e6, gbps, pct, pct_memcpy);
        if (csv != NULL)
          fprintf(csv, "%s,%s,%s,%" PRId64 ",%" PRId64 ",%d,%.3f,%.3f,%.3f,%.2f,%.3f,%.2f\n", cli_device_name(dev),
                  bench_op_name(op), tn_dtype_name((tn_dtype)d), rows * heads, dim, threads, m.seconds * 1e6, gbps,
                  line.best_bw * 1e-9, pct, line.memcpy_bw * 1e-9, pct_memcpy);
      }
    }
  }
  if (rc == CLI_OK && dev.kind != TN_DEVICE_CPU) {
    tn_kernel_cache_stats ks;
    tn_kernel_cache_stats_get(&ks);
    printf("\nkernels: %llu compiled (%.2f s in NVRTC), %llu read from the disk cache, %llu damaged entries rebuilt\n",
           (unsigned long long)ks.compiled, ks.compile_seconds, (unsigned long long)ks.loaded_from_disk,
           (unsigned long long)ks.disk_rejected);
  }
done:
  cpu_copier_stop(copier);
  if (csv != NULL && fclose(csv) != 0 && rc == CLI_OK) rc = cli_fail("--csv: error writing '%s'", o.csv);
  tn_context_destroy(ctx);
  return rc;
}
