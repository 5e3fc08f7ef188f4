/* tnorm check: every op variant, dtype, layout and a spread of shapes, on every available device,
 * against the float64 reference on fresh random data. Prints a table; exit 1 on any mismatch. */
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"
#include "reference.h"
#include "rng.h"

typedef struct variant {
  const char *label;
  tn_op op;
  int weight; /* 0 none, 1 x's dtype, 2 f32 */
  int mul;
  float weight_offset;
  float scale;
  int broadcast; /* add/mul: b is one row applied to every row */
} variant;

static const variant variants[] = {
    {"rms_norm", TN_OP_RMS_NORM, 0, 0, 0.0f, 1.0f, 0},
    {"rms_norm +w", TN_OP_RMS_NORM, 1, 0, 0.0f, 1.0f, 0},
    {"rms_norm +w(f32) +1", TN_OP_RMS_NORM, 2, 0, 1.0f, 1.0f, 0},
    {"rms_norm +w +mul", TN_OP_RMS_NORM, 1, 1, 0.0f, 1.0f, 0},
    {"l2_norm", TN_OP_L2_NORM, 0, 0, 0.0f, 1.0f, 0},
    {"l2_norm scale", TN_OP_L2_NORM, 0, 0, 0.0f, 0.37f, 0},
    {"add_rms_norm", TN_OP_ADD_RMS_NORM, 0, 0, 0.0f, 1.0f, 0},
    {"add_rms_norm +w", TN_OP_ADD_RMS_NORM, 1, 0, 0.0f, 1.0f, 0},
    {"add_rms_norm +w +mul", TN_OP_ADD_RMS_NORM, 1, 1, 0.0f, 1.0f, 0},
    {"add", TN_OP_ADD, 0, 0, 0.0f, 1.0f, 0},
    {"add (b one row)", TN_OP_ADD, 0, 0, 0.0f, 1.0f, 1},
    {"mul", TN_OP_MUL, 0, 1, 0.0f, 1.0f, 0},
    {"mul (b one row)", TN_OP_MUL, 0, 1, 0.0f, 1.0f, 1},
    {"scale", TN_OP_SCALE, 0, 0, 0.0f, -0.37f, 0},
};
#define VARIANT_COUNT (sizeof variants / sizeof variants[0])

typedef struct shape {
  int64_t rows, dim;
} shape;

static const shape shapes[] = {{0, 16},  {1, 1},    {3, 7},    {17, 33},    {64, 128},    {65, 257},  {7, 4096},
                               {3, 5120}, {2, 8193}, {1, 70000}, {300, 96}, {2, 32768}, {1, 131072}};
#define SHAPE_COUNT (sizeof shapes / sizeof shapes[0])

enum { LAYOUT_CONTIGUOUS, LAYOUT_STRIDED, LAYOUT_IN_PLACE, LAYOUT_COUNT };
static const char *const layout_names[LAYOUT_COUNT] = {"contiguous", "strided", "in place"};
#define STRIDE_PAD 5 /* the strided layout's row_stride is dim + 5 */

/* A host buffer holding one view; every byte starts as 0xff (NaN in every dtype), so an element the op
 * should have written and did not, or a gap it should not have touched and did, is seen. */
typedef struct buffer {
  tn_tensor view;
  unsigned char *bytes;
  size_t size;
} buffer;

static int buffer_make(buffer *b, tn_dtype dtype, int64_t rows, int64_t dim, int64_t stride) {
  size_t elems = rows > 0 ? (size_t)((rows - 1) * stride + dim) : 1;
  b->size = elems * tn_dtype_size(dtype);
  b->bytes = malloc(b->size);
  if (b->bytes == NULL) return -1;
  memset(b->bytes, 0xff, b->size);
  b->view = tn_tensor_strided(b->bytes, dtype, rows, dim, stride);
  return 0;
}

static void buffer_free(buffer *b) {
  free(b->bytes);
  b->bytes = NULL;
}

/* Rows of N(mean, spread * row scale), the row scale cycling through 1e-3, 1 and 30. */
static void fill_random(const buffer *b, tn_rng *rng, double mean, double spread) {
  const tn_tensor *t = &b->view;
  for (int64_t r = 0; r < t->rows; r++) {
    double row_scale = spread * (r % 3 == 0 ? 1.0 : r % 3 == 1 ? 1e-3 : 30.0);
    for (int64_t i = 0; i < t->dim; i++) tn_reference_store(t, r, i, (float)(mean + row_scale * tn_rng_normal(rng)));
  }
}

/* Whether every byte outside the view's rows (the gaps of a strided view) is still 0xff. */
static int gaps_untouched(const buffer *b) {
  const tn_tensor *t = &b->view;
  size_t es = tn_dtype_size(t->dtype);
  for (int64_t r = 0; r + 1 < t->rows; r++) {
    const unsigned char *gap = b->bytes + (size_t)(r * t->row_stride + t->dim) * es;
    for (size_t k = 0; k < (size_t)(t->row_stride - t->dim) * es; k++)
      if (gap[k] != 0xff) return 0;
  }
  return 1;
}

typedef struct tally {
  long cases, failures;
  double max_error;
  char first_failure[256];
} tally;

static void record_failure(tally *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void record_failure(tally *t, const char *fmt, ...) {
  if (t->failures++ == 0) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->first_failure, sizeof t->first_failure, fmt, ap);
    va_end(ap);
  }
}

/* Compares an output view with the reference; every element must be within tolerance. */
static void compare(tally *t, const char *what, const tn_tensor *got, const double *ref) {
  for (int64_t r = 0; r < got->rows; r++) {
    for (int64_t i = 0; i < got->dim; i++) {
      float g = tn_reference_load(got, r, i);
      double e = tn_reference_error(got->dtype, g, ref[r * got->dim + i]);
      if (e > t->max_error) t->max_error = e;
      if (!(e <= 1.0)) {
        record_failure(t, "%s[%" PRId64 ", %" PRId64 "] = %.9g, expected %.9g", what, r, i, (double)g,
                       ref[r * got->dim + i]);
        return;
      }
    }
  }
}

/* Runs one case; returns -1 when out of memory. */
static int run_case(tn_context *ctx, tn_device device, tally *t, tn_rng *rng, const variant *v, tn_dtype dtype, shape s, int layout) {
  int64_t stride = layout == LAYOUT_STRIDED ? s.dim + STRIDE_PAD : s.dim;
  int is_add = v->op == TN_OP_ADD_RMS_NORM;
  tn_dtype wdtype = v->weight == 2 ? TN_F32 : dtype;
  buffer x = {0}, w = {0}, m = {0}, res = {0}, y = {0}, ro = {0}, row = {0};
  double *ref_y = malloc((size_t)(s.rows * s.dim + 1) * sizeof *ref_y);
  double *ref_ro = malloc((size_t)(s.rows * s.dim + 1) * sizeof *ref_ro);
  int rc = -1;
  if (ref_y == NULL || ref_ro == NULL || buffer_make(&x, dtype, s.rows, s.dim, stride) ||
      buffer_make(&w, wdtype, 1, s.dim, s.dim) || buffer_make(&m, dtype, s.rows, s.dim, stride) ||
      buffer_make(&res, dtype, s.rows, s.dim, stride) || buffer_make(&y, dtype, s.rows, s.dim, stride) ||
      buffer_make(&ro, dtype, s.rows, s.dim, stride) || buffer_make(&row, dtype, 1, s.dim, s.dim))
    goto out;
  fill_random(&x, rng, 0.0, 1.0);
  fill_random(&w, rng, 1.0, 0.1);
  fill_random(&m, rng, 0.0, 1.0);
  fill_random(&res, rng, 0.0, 1.0);
  fill_random(&row, rng, 0.5, 1.0);

  tn_op_args a = tn_op_args_init(v->op);
  a.x = &x.view;
  a.weight = v->weight ? &w.view : NULL;
  a.mul = v->mul ? (v->broadcast ? &row.view : &m.view) : NULL;
  a.residual = is_add || v->op == TN_OP_ADD ? (v->broadcast ? &row.view : &res.view) : NULL;
  a.y = layout == LAYOUT_IN_PLACE ? &x.view : &y.view;
  a.residual_out = is_add ? (layout == LAYOUT_IN_PLACE ? &res.view : &ro.view) : NULL;
  a.eps = 1e-6f;
  a.scale = v->scale;
  a.weight_offset = v->weight_offset;
  if (tn_reference_run(&a, ref_y, ref_ro) != 0) goto out;

  t->cases++;
  tn_status st = cli_op_on_device(ctx, device, &a);
  if (st != TN_OK) {
    record_failure(t, "%" PRId64 " x %" PRId64 " %s: %s", s.rows, s.dim, layout_names[layout],
                   tn_context_last_error(ctx));
  } else {
    char what[96];
    snprintf(what, sizeof what, "%" PRId64 "x%" PRId64 " %s y", s.rows, s.dim, layout_names[layout]);
    compare(t, what, a.y, ref_y);
    if (is_add) {
      snprintf(what, sizeof what, "%" PRId64 "x%" PRId64 " %s residual_out", s.rows, s.dim, layout_names[layout]);
      compare(t, what, a.residual_out, ref_ro);
    }
    const buffer *outs[] = {layout == LAYOUT_IN_PLACE ? &x : &y, layout == LAYOUT_IN_PLACE ? &res : &ro};
    for (int k = 0; k < 1 + is_add; k++)
      if (!gaps_untouched(outs[k])) record_failure(t, "%" PRId64 " x %" PRId64 ": wrote into a row gap", s.rows, s.dim);
  }
  rc = 0;
out:
  buffer_free(&x), buffer_free(&w), buffer_free(&m), buffer_free(&res), buffer_free(&y), buffer_free(&ro);
  buffer_free(&row);
  free(ref_y);
  free(ref_ro);
  return rc;
}

static int check_device(tn_context *ctx, tn_device dev, uint64_t seed, long *failures) {
  const char *device = cli_device_name(dev);
  for (size_t vi = 0; vi < VARIANT_COUNT; vi++) {
    for (int d = 0; d < TN_DTYPE_COUNT; d++) {
      tally t = {0};
      tn_rng rng = {seed ^ (vi * 0x100 + (uint64_t)d)};
      for (size_t si = 0; si < SHAPE_COUNT; si++)
        for (int layout = 0; layout < LAYOUT_COUNT; layout++)
          if (run_case(ctx, dev, &t, &rng, &variants[vi], (tn_dtype)d, shapes[si], layout) != 0)
            return cli_fail("check: out of memory");
      printf("%-6s %-20s %-5s %6ld %10.3f  %s %s\n", device, variants[vi].label, tn_dtype_name((tn_dtype)d),
             t.cases, t.max_error, t.failures ? "FAIL" : "ok", t.first_failure);
      *failures += t.failures;
    }
  }
  return CLI_OK;
}

int cli_check_main(int argc, char **argv) {
  static const struct option long_options[] = {
      {"device", required_argument, NULL, 'd'}, {"seed", required_argument, NULL, 's'}, {NULL, 0, NULL, 0}};
  int all_devices = 1;
  cli_device choice = CLI_DEVICE_AUTO;
  uint64_t seed = (uint64_t)time(NULL) ^ ((uint64_t)clock() << 32);
  opterr = 0;
  optind = 1;
  int c;
  while ((c = getopt_long(argc, argv, ":", long_options, NULL)) != -1) {
    long long n;
    switch (c) {
      case 'd':
        if (cli_parse_device(optarg, &choice) != 0) return cli_usage("--device: unknown device '%s'", optarg);
        all_devices = choice == CLI_DEVICE_AUTO;
        break;
      case 's':
        if (cli_parse_count(optarg, &n) != 0) return cli_usage("--seed: '%s' is not a positive integer", optarg);
        seed = (uint64_t)n;
        break;
      case ':': return cli_usage("check: %s needs a value", argv[optind - 1]);
      default: return cli_usage("check: unknown option '%s'", argv[optind - 1]);
    }
  }
  if (optind < argc) return cli_usage("check: unexpected argument '%s'", argv[optind]);

  tn_context *ctx = NULL;
  if (tn_context_create(&ctx) != TN_OK) return cli_fail("out of memory");
  printf("tnorm check: seed %" PRIu64 ", float64 reference; error in tolerance units (<= 1 passes:\n"
         "1 ulp for f16/bf16, 2e-5 relative for f32); shapes", seed);
  for (size_t si = 0; si < SHAPE_COUNT; si++) printf(" %" PRId64 "x%" PRId64, shapes[si].rows, shapes[si].dim);
  printf("; layouts contiguous, strided, in place\n\n%-6s %-20s %-5s %6s %10s  %s\n", "device", "op", "dtype",
         "cases", "max error", "result");
  long failures = 0;
  int rc = CLI_OK;
  if (all_devices || choice == CLI_DEVICE_CPU) rc = check_device(ctx, tn_cpu_device(), seed, &failures);
  if (rc == CLI_OK && (all_devices || choice == CLI_DEVICE_CUDA)) {
    tn_device gpu;
    if (tn_device_available(ctx, TN_DEVICE_CUDA) == TN_OK) {
      rc = check_device(ctx, tn_cuda_device(0), seed, &failures);
    } else if (all_devices) {
      printf("%-6s (skipped: %s)\n", "cuda", tn_context_last_error(ctx));
    } else {
      rc = cli_pick_device(ctx, choice, &gpu); /* prints why */
    }
  }
  tn_context_destroy(ctx);
  if (rc != CLI_OK) return rc;
  printf("\n%s: %ld mismatching case(s)\n", failures ? "FAILED" : "all passed", failures);
  return failures ? CLI_FAIL : CLI_OK;
}
