/* tnorm bench-graph: one decode step of a model, as the issue states it: per layer the chain
 * add -> rms_norm -> mul (residual add, the norm, a gate), for `layers` layers, at a few small row counts.
 * Each step is timed three ways: the ops launched one by one, the step recorded as a graph without fusion
 * and replayed, and the fused graph replayed. The layers feed each other (a layer's sum is the next
 * layer's residual, its output the next layer's input), so nothing can be skipped. */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "reference.h"
#include "rng.h"

#define MAX_ROWS_LIST 8

typedef struct step_buffers {
  tn_device dev;
  tn_dtype dtype;
  int64_t rows, dim;
  int layers;
  void *x0, *h0, *w, *m;
  void **s, **n, **y; /* per layer: the sum, the normed sum, the gated output */
} step_buffers;

static void *device_random(tn_context *ctx, tn_device dev, tn_dtype dt, int64_t elems, tn_rng *rng, double mean) {
  size_t bytes = (size_t)elems * tn_dtype_size(dt);
  void *host = malloc(bytes), *p = NULL;
  if (host == NULL) return NULL;
  tn_tensor t = tn_tensor_2d(host, dt, 1, elems);
  for (int64_t i = 0; i < elems; i++) tn_reference_store(&t, 0, i, (float)(mean + 0.5 * tn_rng_normal(rng)));
  if (tn_malloc(ctx, dev, bytes, &p) != TN_OK || tn_memcpy(ctx, p, dev, host, tn_cpu_device(), bytes) != TN_OK) {
    tn_free(ctx, dev, p);
    p = NULL;
  }
  free(host);
  return p;
}

static void buffers_free(tn_context *ctx, step_buffers *b) {
  void *singles[] = {b->x0, b->h0, b->w, b->m};
  for (int i = 0; i < 4; i++) tn_free(ctx, b->dev, singles[i]);
  for (int l = 0; l < b->layers; l++) {
    if (b->s != NULL) tn_free(ctx, b->dev, b->s[l]);
    if (b->n != NULL) tn_free(ctx, b->dev, b->n[l]);
    if (b->y != NULL) tn_free(ctx, b->dev, b->y[l]);
  }
  free(b->s), free(b->n), free(b->y);
}

static int buffers_make(tn_context *ctx, step_buffers *b) {
  tn_rng rng = {0xdec0de ^ (uint64_t)b->rows};
  const int64_t e = b->rows * b->dim;
  b->x0 = device_random(ctx, b->dev, b->dtype, e, &rng, 0.0);
  b->h0 = device_random(ctx, b->dev, b->dtype, e, &rng, 0.0);
  b->w = device_random(ctx, b->dev, b->dtype, b->dim, &rng, 1.0);
  b->m = device_random(ctx, b->dev, b->dtype, e, &rng, 1.0);
  b->s = calloc((size_t)b->layers, sizeof *b->s);
  b->n = calloc((size_t)b->layers, sizeof *b->n);
  b->y = calloc((size_t)b->layers, sizeof *b->y);
  if (!b->x0 || !b->h0 || !b->w || !b->m || !b->s || !b->n || !b->y) return -1;
  const size_t bytes = (size_t)e * tn_dtype_size(b->dtype);
  for (int l = 0; l < b->layers; l++)
    if (tn_malloc(ctx, b->dev, bytes, &b->s[l]) != TN_OK || tn_malloc(ctx, b->dev, bytes, &b->n[l]) != TN_OK ||
        tn_malloc(ctx, b->dev, bytes, &b->y[l]) != TN_OK)
      return -1;
  return 0;
}

#define TN_STATUS_CHECK(call)         \
  do {                                \
    tn_status check_st_ = (call);     \
    if (check_st_ != TN_OK) return check_st_; \
  } while (0)

/* One decode step, op by op (or recorded, when ctx is recording). */
static tn_status step(tn_context *ctx, const step_buffers *b) {
  tn_tensor w = tn_tensor_on(tn_tensor_vector(b->w, b->dtype, b->dim), b->dev);
  tn_tensor m = tn_tensor_on(tn_tensor_2d(b->m, b->dtype, b->rows, b->dim), b->dev);
  for (int l = 0; l < b->layers; l++) {
    const void *xin = l == 0 ? b->x0 : b->y[l - 1], *hin = l == 0 ? b->h0 : b->s[l - 1];
    tn_tensor x = tn_tensor_on(tn_tensor_2d(xin, b->dtype, b->rows, b->dim), b->dev);
    tn_tensor h = tn_tensor_on(tn_tensor_2d(hin, b->dtype, b->rows, b->dim), b->dev);
    tn_tensor s = tn_tensor_on(tn_tensor_2d(b->s[l], b->dtype, b->rows, b->dim), b->dev);
    tn_tensor n = tn_tensor_on(tn_tensor_2d(b->n[l], b->dtype, b->rows, b->dim), b->dev);
    tn_tensor y = tn_tensor_on(tn_tensor_2d(b->y[l], b->dtype, b->rows, b->dim), b->dev);
    TN_STATUS_CHECK(tn_add(ctx, &x, &h, &s));
    TN_STATUS_CHECK(tn_rms_norm(ctx, &s, &w, 0.0f, 1e-6f, &n));
    TN_STATUS_CHECK(tn_mul(ctx, &n, &m, &y));
  }
  return TN_OK;
}

/* Milliseconds per step over `steps` steps: op by op (graph NULL) or graph launches. */
static tn_status time_steps(tn_context *ctx, const step_buffers *b, tn_graph *graph, int steps, double *ms) {
  tn_event *start = NULL, *end = NULL;
  tn_status st = tn_event_create(ctx, b->dev, &start);
  if (st == TN_OK) st = tn_event_create(ctx, b->dev, &end);
  for (int warm = 0; warm < 3 && st == TN_OK; warm++) st = graph ? tn_graph_launch(ctx, graph) : step(ctx, b);
  if (st == TN_OK) st = tn_synchronize(ctx, b->dev);
  if (st == TN_OK) st = tn_event_record(ctx, start);
  for (int i = 0; i < steps && st == TN_OK; i++) st = graph ? tn_graph_launch(ctx, graph) : step(ctx, b);
  if (st == TN_OK) st = tn_event_record(ctx, end);
  if (st == TN_OK) st = tn_event_elapsed_ms(ctx, start, end, ms);
  if (st == TN_OK) *ms /= steps;
  tn_event_destroy(start);
  tn_event_destroy(end);
  return st;
}

static tn_status record(tn_context *ctx, const step_buffers *b, int fuse, tn_graph **graph) {
  if (!fuse) setenv("TNORM_GRAPH_FUSION", "0", 1);
  tn_status st = tn_graph_begin(ctx);
  if (st == TN_OK) st = step(ctx, b);
  tn_graph *g = NULL;
  tn_status end = tn_graph_end(ctx, &g); /* always leave recording */
  if (!fuse) unsetenv("TNORM_GRAPH_FUSION");
  if (st == TN_OK) st = end;
  if (st != TN_OK) {
    tn_graph_destroy(g);
    return st;
  }
  *graph = g;
  return TN_OK;
}

int cli_bench_graph_main(int argc, char **argv) {
  static const struct option long_options[] = {{"device", required_argument, NULL, 'd'},
                                               {"layers", required_argument, NULL, 'l'},
                                               {"dim", required_argument, NULL, 'D'},
                                               {"dtype", required_argument, NULL, 't'},
                                               {"steps", required_argument, NULL, 's'},
                                               {NULL, 0, NULL, 0}};
  cli_device choice = CLI_DEVICE_AUTO;
  long long layers = 32, dim = 4096, steps = 200;
  tn_dtype dtype = TN_BF16;
  const int64_t rows_list[] = {1, 8, 64};
  opterr = 0;
  optind = 1;
  int c;
  while ((c = getopt_long(argc, argv, ":", long_options, NULL)) != -1) {
    switch (c) {
      case 'd':
        if (cli_parse_device(optarg, &choice) != 0) return cli_usage("--device: unknown device '%s'", optarg);
        break;
      case 'l':
        if (cli_parse_count(optarg, &layers) != 0 || layers > 1024) return cli_usage("--layers: 1..1024");
        break;
      case 'D':
        if (cli_parse_count(optarg, &dim) != 0 || dim > (1 << 20)) return cli_usage("--dim: 1..1048576");
        break;
      case 's':
        if (cli_parse_count(optarg, &steps) != 0 || steps > 100000) return cli_usage("--steps: 1..100000");
        break;
      case 't':
        if (cli_parse_dtype(optarg, &dtype) != 0) return cli_usage("--dtype: f32, f16 or bf16");
        break;
      case ':': return cli_usage("bench-graph: %s needs a value", argv[optind - 1]);
      default: return cli_usage("bench-graph: unknown option '%s'", argv[optind - 1]);
    }
  }
  if (optind < argc) return cli_usage("bench-graph: unexpected argument '%s'", argv[optind]);
  tn_context *ctx = NULL;
  if (tn_context_create(&ctx) != TN_OK) return cli_fail("out of memory");
  tn_device dev;
  int rc = cli_pick_device(ctx, choice, &dev);
  if (rc == CLI_OK)
    printf("tnorm bench-graph: device %s, %s, dim %lld, %lld layers of add -> rms_norm -> mul per step; time per "
           "step over %lld steps\n\n%6s %14s %16s %14s %9s  %s\n",
           cli_device_name(dev), tn_dtype_name(dtype), dim, layers, steps, "rows", "op by op (us)",
           "graph, unfused", "graph, fused", "fused/op", "fusions");
  for (size_t r = 0; r < sizeof rows_list / sizeof rows_list[0] && rc == CLI_OK; r++) {
    step_buffers b = {dev, dtype, rows_list[r], dim, (int)layers, NULL, NULL, NULL, NULL, NULL, NULL, NULL};
    tn_graph *plain = NULL, *fused = NULL;
    double t_ops = 0, t_plain = 0, t_fused = 0;
    tn_status st = buffers_make(ctx, &b) == 0 ? TN_OK : TN_ERR_NO_MEMORY;
    if (st == TN_OK) st = record(ctx, &b, 0, &plain);
    if (st == TN_OK) st = record(ctx, &b, 1, &fused);
    if (st == TN_OK) st = time_steps(ctx, &b, NULL, (int)steps, &t_ops);
    if (st == TN_OK) st = time_steps(ctx, &b, plain, (int)steps, &t_plain);
    if (st == TN_OK) st = time_steps(ctx, &b, fused, (int)steps, &t_fused);
    if (st != TN_OK) {
      rc = st == TN_ERR_NO_MEMORY && tn_context_last_error(ctx)[0] == '\0'
               ? cli_fail("bench-graph: out of memory")
               : cli_fail("bench-graph: %s", tn_context_last_error(ctx));
    } else {
      tn_graph_info info;
      tn_graph_get_info(fused, &info);
      printf("%6" PRId64 " %14.1f %16.1f %14.1f %8.2fx  %d ops -> %d (add + rms_norm: %d, norm + mul: %d)\n", b.rows,
             t_ops * 1e3, t_plain * 1e3, t_fused * 1e3, t_fused / t_ops, info.recorded_ops, info.ops,
             info.fused_add_rms_norm, info.fused_rms_norm_mul);
    }
    tn_graph_destroy(plain);
    tn_graph_destroy(fused);
    buffers_free(ctx, &b);
  }
  tn_context_destroy(ctx);
  return rc;
}
