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
  int weight; /* 0 none, 1 x's dtype, 2 f32 (the bias likewise, for the layer norms) */
  int mul;
  float weight_offset;
  float scale;   /* l2_norm, scale; 0 stands for 1 */
  int broadcast; /* add/mul: b is one row applied to every row */
  tn_casting casting;
  int residual_f32; /* add_rms_norm, add_layer_norm: the residual stream in f32 */
  tn_residual_mode residual_mode;
  tn_l2_mode l2_mode;
  int heads;           /* > 1: x (and y, mul) a 3-D view with this many heads per row */
  tn_rope_style rope;  /* with a rope: 0 theta, 1 an f32 table, 2 a table of x's dtype (rope_table) */
  int rope_table;
  int rotary_half;     /* rotate the first half of each head only */
} variant;

/* Designated fields only: whatever a variant does not name is 0 (no weight, exact casting, no rope...). */
#define V(lbl, o, ...) {.label = lbl, .op = o, __VA_ARGS__}
static const variant variants[] = {
    V("rms_norm", TN_OP_RMS_NORM, .weight = 0),
    V("rms_norm +w", TN_OP_RMS_NORM, .weight = 1),
    V("rms_norm +w(f32) +1", TN_OP_RMS_NORM, .weight = 2, .weight_offset = 1.0f),
    V("rms_norm +w +mul", TN_OP_RMS_NORM, .weight = 1, .mul = 1),
    V("rms_norm +w llama", TN_OP_RMS_NORM, .weight = 1, .casting = TN_CASTING_LLAMA),
    V("rms_norm 3 heads +w", TN_OP_RMS_NORM, .weight = 1, .heads = 3),
    V("rope neox table", TN_OP_RMS_NORM, .weight = 1, .heads = 3, .rope = TN_ROPE_NEOX, .rope_table = 1),
    V("rope gptj theta half", TN_OP_RMS_NORM, .weight = 1, .heads = 2, .rope = TN_ROPE_GPTJ, .rotary_half = 1),
    V("rope neox llama", TN_OP_RMS_NORM, .weight = 1, .casting = TN_CASTING_LLAMA, .heads = 2, .rope = TN_ROPE_NEOX,
      .rope_table = 2),
    V("l2_norm", TN_OP_L2_NORM, .weight = 0),
    V("l2_norm scale", TN_OP_L2_NORM, .scale = 0.37f),
    V("l2_norm max(norm,eps)", TN_OP_L2_NORM, .l2_mode = TN_L2_MAX_NORM_EPS, .heads = 2),
    V("add_rms_norm", TN_OP_ADD_RMS_NORM, .weight = 0),
    V("add_rms_norm +w", TN_OP_ADD_RMS_NORM, .weight = 1),
    V("add_rms_norm +w +mul", TN_OP_ADD_RMS_NORM, .weight = 1, .mul = 1),
    V("add_rms_norm r:f32", TN_OP_ADD_RMS_NORM, .weight = 1, .residual_f32 = 1),
    V("add_rms_norm sum:f32", TN_OP_ADD_RMS_NORM, .weight = 1, .residual_mode = TN_RESIDUAL_NORM_F32),
    V("layer_norm", TN_OP_LAYER_NORM, .weight = 0),
    V("layer_norm +w +b", TN_OP_LAYER_NORM, .weight = 1),
    V("layer_norm +w +b(f32)", TN_OP_LAYER_NORM, .weight = 2),
    V("add_layer_norm +w +b", TN_OP_ADD_LAYER_NORM, .weight = 1),
    V("add_layer_norm r:f32", TN_OP_ADD_LAYER_NORM, .weight = 1, .residual_f32 = 1),
    V("add", TN_OP_ADD, .weight = 0),
    V("add (b one row)", TN_OP_ADD, .broadcast = 1),
    V("mul", TN_OP_MUL, .mul = 1),
    V("mul (b one row)", TN_OP_MUL, .mul = 1, .broadcast = 1),
    V("scale", TN_OP_SCALE, .scale = -0.37f),
};
#undef V
#define VARIANT_COUNT (sizeof variants / sizeof variants[0])
#define ROPE_POSITIONS 50 /* rows of the rope's table */

typedef struct shape {
  int64_t rows, dim;
} shape;

static const shape shapes[] = {{0, 16},  {1, 1},    {3, 7},    {17, 33},    {64, 128},    {65, 257},  {7, 4096},
                               {3, 5120}, {2, 8193}, {1, 70000}, {300, 96}, {2, 32768}, {1, 131072}, {5, 64},
                               {33, 256},  {4, 512}};
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

/* heads > 1: a 3-D view whose heads are head_stride apart and whose rows hold them with `pad` elements
 * more (strided layouts leave gaps between heads and between rows). */
static int buffer_make_heads(buffer *b, tn_dtype dtype, int64_t rows, int64_t heads, int64_t dim, int64_t head_stride,
                             int64_t row_stride) {
  const int64_t span = (heads - 1) * head_stride + dim;
  size_t elems = rows > 0 ? (size_t)((rows - 1) * row_stride + span) : 1;
  b->size = elems * tn_dtype_size(dtype);
  b->bytes = malloc(b->size);
  if (b->bytes == NULL) return -1;
  memset(b->bytes, 0xff, b->size);
  b->view = tn_tensor_heads(b->bytes, dtype, rows, heads, dim, row_stride, head_stride);
  if (heads <= 1) b->view.heads = 1, b->view.head_stride = dim;
  return 0;
}

static int buffer_make(buffer *b, tn_dtype dtype, int64_t rows, int64_t dim, int64_t stride) {
  return buffer_make_heads(b, dtype, rows, 1, dim, dim, stride);
}

static void buffer_free(buffer *b) {
  free(b->bytes);
  b->bytes = NULL;
}

/* Rows (every head of them) of N(mean, spread * row scale), the row scale cycling through 1e-3, 1 and 30. */
static void fill_random(const buffer *b, tn_rng *rng, double mean, double spread) {
  const tn_tensor *t = &b->view;
  for (int64_t r = 0; r < t->rows; r++) {
    double row_scale = spread * (r % 3 == 0 ? 1.0 : r % 3 == 1 ? 1e-3 : 30.0);
    for (int64_t h = 0; h < t->heads; h++)
      for (int64_t i = 0; i < t->dim; i++)
        tn_reference_store_head(t, r, h, i, (float)(mean + row_scale * tn_rng_normal(rng)));
  }
}

/* Whether every byte outside the view's heads (the gaps of a strided view) is still 0xff. */
static int gaps_untouched(const buffer *b) {
  const tn_tensor *t = &b->view;
  const size_t es = tn_dtype_size(t->dtype), elems = b->size / es;
  const int64_t hs = t->heads > 1 ? t->head_stride : t->row_stride;
  for (size_t e = 0; e < elems; e++) {
    const int64_t r = (int64_t)e / t->row_stride, o = (int64_t)e % t->row_stride;
    const int inside = r < t->rows && o / hs < t->heads && o % hs < t->dim;
    if (inside) continue;
    for (size_t k = 0; k < es; k++)
      if (b->bytes[e * es + k] != 0xff) return 0;
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

/* Compares an output view with the reference (with its slack, see reference.h; NULL: none); every
 * element must be within tolerance. */
static void compare(tally *t, const char *what, const tn_tensor *got, const double *ref, const double *slack) {
  for (int64_t r = 0; r < got->rows; r++) {
    for (int64_t h = 0; h < got->heads; h++) {
      for (int64_t i = 0; i < got->dim; i++) {
        const int64_t k = (r * got->heads + h) * got->dim + i;
        float g = tn_reference_load_head(got, r, h, i);
        double e = tn_reference_error_slack(got->dtype, g, ref[k], slack != NULL ? slack[k] : 0.0);
        if (e > t->max_error) t->max_error = e;
        if (!(e <= 1.0)) {
          record_failure(t, "%s[%" PRId64 ", %" PRId64 ", %" PRId64 "] = %.9g, expected %.9g", what, r, h, i,
                         (double)g, ref[k]);
          return;
        }
      }
    }
  }
}

/* Runs one case; returns -1 when out of memory. */
static int run_case(tn_context *ctx, tn_device device, tally *t, tn_rng *rng, const variant *v, tn_dtype dtype, shape s, int layout) {
  const int64_t heads = v->heads > 1 ? v->heads : 1;
  /* Strided layouts: gaps between heads and between rows. */
  const int64_t head_stride = heads > 1 && layout == LAYOUT_STRIDED ? s.dim + 3 : s.dim;
  const int64_t stride = (heads - 1) * head_stride + s.dim + (layout == LAYOUT_STRIDED ? STRIDE_PAD : 0);
  const int is_add = v->op == TN_OP_ADD_RMS_NORM || v->op == TN_OP_ADD_LAYER_NORM;
  const int is_layer = v->op == TN_OP_LAYER_NORM || v->op == TN_OP_ADD_LAYER_NORM;
  const tn_dtype wdtype = v->weight == 2 ? TN_F32 : dtype, rdtype = v->residual_f32 ? TN_F32 : dtype;
  const tn_dtype table_dtype = v->rope_table == 2 ? dtype : TN_F32;
  /* The rope's elements per head (a table row): shape_fits made it even; 2 where there is no rope. */
  const int64_t rotary = v->rope == TN_ROPE_NONE ? 2 : v->rotary_half ? s.dim / 2 : s.dim;
  const size_t out_elems = (size_t)(s.rows * heads * s.dim + 1);
  buffer x = {0}, w = {0}, bias = {0}, m = {0}, res = {0}, y = {0}, ro = {0}, row = {0}, table = {0};
  double *ref_y = malloc(out_elems * sizeof *ref_y), *slack = malloc(out_elems * sizeof *slack);
  double *ref_ro = malloc((size_t)(s.rows * s.dim + 1) * sizeof *ref_ro);
  int64_t *positions = malloc((size_t)(s.rows + 1) * sizeof *positions);
  int rc = -1;
  if (ref_y == NULL || slack == NULL || ref_ro == NULL || positions == NULL ||
      buffer_make_heads(&x, dtype, s.rows, heads, s.dim, head_stride, stride) ||
      buffer_make(&w, wdtype, 1, s.dim, s.dim) || buffer_make(&bias, wdtype, 1, s.dim, s.dim) ||
      buffer_make_heads(&m, dtype, s.rows, heads, s.dim, head_stride, stride) ||
      buffer_make(&res, rdtype, s.rows, s.dim, stride) ||
      buffer_make_heads(&y, dtype, s.rows, heads, s.dim, head_stride, stride) ||
      buffer_make(&ro, rdtype, s.rows, s.dim, stride) || buffer_make(&row, dtype, 1, s.dim, s.dim) ||
      buffer_make(&table, table_dtype, ROPE_POSITIONS, rotary, rotary))
    goto out;
  fill_random(&x, rng, is_layer ? 0.5 : 0.0, 1.0); /* a mean for layer_norm to remove */
  fill_random(&w, rng, 1.0, 0.1);
  fill_random(&bias, rng, 0.0, 1.0);
  fill_random(&m, rng, 0.0, 1.0);
  fill_random(&res, rng, 0.0, 1.0);
  fill_random(&row, rng, 0.5, 1.0);
  for (int64_t p = 0; p < ROPE_POSITIONS; p++) /* cosines and sines of some angles */
    for (int64_t i = 0; i < table.view.dim; i++) {
      const double angle = 0.37 * (double)p * (double)(i % (table.view.dim / 2) + 1);
      tn_reference_store(&table.view, p, i, (float)(i < table.view.dim / 2 ? cos(angle) : sin(angle)));
    }
  for (int64_t r = 0; r < s.rows; r++) positions[r] = (int64_t)(tn_rng_next(rng) % ROPE_POSITIONS);

  tn_op_args a = tn_op_args_init(v->op);
  a.x = &x.view;
  a.weight = v->weight ? &w.view : NULL;
  a.bias = v->weight && is_layer ? &bias.view : NULL;
  a.mul = v->mul ? (v->broadcast ? &row.view : &m.view) : NULL;
  a.residual = is_add || v->op == TN_OP_ADD ? (v->broadcast ? &row.view : &res.view) : NULL;
  a.y = layout == LAYOUT_IN_PLACE ? &x.view : &y.view;
  a.residual_out = is_add ? (layout == LAYOUT_IN_PLACE ? &res.view : &ro.view) : NULL;
  a.eps = 1e-6f;
  a.scale = v->scale != 0.0f ? v->scale : 1.0f;
  a.weight_offset = v->weight_offset;
  a.casting = v->casting;
  a.residual_mode = v->residual_mode;
  a.l2_mode = v->l2_mode;
  if (v->rope != TN_ROPE_NONE) {
    a.rope.style = v->rope;
    a.rope.rotary_dim = v->rotary_half ? s.dim / 2 : 0;
    a.rope.positions = positions;
    a.rope.positions_i64 = 1;
    a.rope.theta = 10000.0f;
    a.rope.cos_sin = v->rope_table ? &table.view : NULL;
  }
  if (tn_reference_run_slack(&a, ref_y, ref_ro, slack) != 0) goto out;

  t->cases++;
  tn_status st = cli_op_on_device(ctx, device, &a);
  if (st != TN_OK) {
    record_failure(t, "%" PRId64 " x %" PRId64 " %s: %s", s.rows, s.dim, layout_names[layout],
                   tn_context_last_error(ctx));
  } else {
    char what[96];
    snprintf(what, sizeof what, "%" PRId64 "x%" PRId64 " %s y", s.rows, s.dim, layout_names[layout]);
    compare(t, what, a.y, ref_y, slack);
    if (is_add) {
      snprintf(what, sizeof what, "%" PRId64 "x%" PRId64 " %s residual_out", s.rows, s.dim, layout_names[layout]);
      compare(t, what, a.residual_out, ref_ro, NULL);
    }
    const buffer *outs[] = {layout == LAYOUT_IN_PLACE ? &x : &y, layout == LAYOUT_IN_PLACE ? &res : &ro};
    for (int k = 0; k < 1 + is_add; k++)
      if (!gaps_untouched(outs[k])) record_failure(t, "%" PRId64 " x %" PRId64 ": wrote into a row gap", s.rows, s.dim);
  }
  rc = 0;
out:
  buffer_free(&x), buffer_free(&w), buffer_free(&bias), buffer_free(&m), buffer_free(&res), buffer_free(&y);
  buffer_free(&ro), buffer_free(&row), buffer_free(&table);
  free(ref_y), free(slack), free(ref_ro), free(positions);
  return rc;
}

/* Whether a shape suits a variant: a rope's heads have at most TN_ROPE_MAX_DIM elements, and an even
 * number (a quarter of them with half of them rotated, in pairs). */
static int shape_fits(const variant *v, shape s) {
  if (v->rope == TN_ROPE_NONE) return 1;
  return s.dim <= TN_ROPE_MAX_DIM && s.dim % (v->rotary_half ? 4 : 2) == 0;
}

static int check_device(tn_context *ctx, tn_device dev, uint64_t seed, long *failures) {
  const char *device = cli_device_name(dev);
  for (size_t vi = 0; vi < VARIANT_COUNT; vi++) {
    for (int d = 0; d < TN_DTYPE_COUNT; d++) {
      tally t = {0};
      tn_rng rng = {seed ^ (vi * 0x100 + (uint64_t)d)};
      for (size_t si = 0; si < SHAPE_COUNT; si++)
        for (int layout = 0; layout < LAYOUT_COUNT && shape_fits(&variants[vi], shapes[si]); layout++)
          if (run_case(ctx, dev, &t, &rng, &variants[vi], (tn_dtype)d, shapes[si], layout) != 0)
            return cli_fail("check: out of memory");
      printf("%-6s %-22s %-5s %6ld %10.3f  %s %s\n", device, variants[vi].label, tn_dtype_name((tn_dtype)d),
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

  /* Line by line, so that a run cut short (a timeout) still shows the rows it finished. */
  setvbuf(stdout, NULL, _IOLBF, 0);
  tn_context *ctx = NULL;
  if (tn_context_create(&ctx) != TN_OK) return cli_fail("out of memory");
  printf("tnorm check: seed %" PRIu64 ", float64 reference; error in tolerance units (<= 1 passes:\n"
         "1 ulp for f16/bf16, 2e-5 relative for f32); shapes", seed);
  for (size_t si = 0; si < SHAPE_COUNT; si++) printf(" %" PRId64 "x%" PRId64, shapes[si].rows, shapes[si].dim);
  printf("; layouts contiguous, strided, in place\n\n%-6s %-22s %-5s %6s %10s  %s\n", "device", "op", "dtype",
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
