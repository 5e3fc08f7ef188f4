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

/* ---- Quantized outputs ---- */

/* A quantized output of an op (tn_quant's fields; the op has a weight, and a bias for the layer norms). */
typedef struct quant_variant {
  const char *label;
  tn_op op;
  int mul;
  tn_quant_format format;
  tn_quant_scaling scaling;
  int64_t group_size;
  int pow2;
  tn_scale_layout layout;
  tn_quant_source source;
  float scale_ub;
} quant_variant;

#define Q(lbl, o, f, s, ...) {.label = lbl, .op = o, .format = f, .scaling = TN_QUANT_SCALE_##s, __VA_ARGS__}
static const quant_variant quant_variants[] = {
    Q("quantize fp8 token", TN_OP_QUANTIZE, TN_QUANT_FP8_E4M3, TOKEN),
    Q("quantize e5m2 token", TN_OP_QUANTIZE, TN_QUANT_FP8_E5M2, TOKEN),
    Q("quantize int8 token", TN_OP_QUANTIZE, TN_QUANT_INT8, TOKEN),
    Q("quantize fp8 tensor", TN_OP_QUANTIZE, TN_QUANT_FP8_E4M3, TENSOR),
    Q("quantize int8 g128 pow2", TN_OP_QUANTIZE, TN_QUANT_INT8, GROUP, .group_size = 128, .pow2 = 1),
    Q("quantize mxfp8", TN_OP_QUANTIZE, TN_QUANT_MXFP8, GROUP),
    Q("quantize nvfp4", TN_OP_QUANTIZE, TN_QUANT_NVFP4, GROUP),
    Q("rms_norm fp8 token", TN_OP_RMS_NORM, TN_QUANT_FP8_E4M3, TOKEN),
    Q("rms_norm fp8 token ub", TN_OP_RMS_NORM, TN_QUANT_FP8_E4M3, TOKEN, .scale_ub = 0.002f),
    Q("rms_norm fp8 token f32", TN_OP_RMS_NORM, TN_QUANT_FP8_E4M3, TOKEN, .source = TN_QUANT_FROM_F32),
    Q("rms_norm +mul fp8 token", TN_OP_RMS_NORM, TN_QUANT_FP8_E4M3, TOKEN, .mul = 1),
    Q("rms_norm fp8 g32", TN_OP_RMS_NORM, TN_QUANT_FP8_E4M3, GROUP, .group_size = 32),
    Q("rms_norm fp8 g128 col", TN_OP_RMS_NORM, TN_QUANT_FP8_E4M3, GROUP, .group_size = 128,
      .layout = TN_SCALES_COLUMN_MAJOR),
    Q("rms_norm fp8 g128 pow2", TN_OP_RMS_NORM, TN_QUANT_FP8_E4M3, GROUP, .group_size = 128, .pow2 = 1,
      .layout = TN_SCALES_COLUMN_MAJOR),
    Q("rms_norm e5m2 tensor", TN_OP_RMS_NORM, TN_QUANT_FP8_E5M2, TENSOR),
    Q("rms_norm int8 token", TN_OP_RMS_NORM, TN_QUANT_INT8, TOKEN),
    Q("rms_norm int8 g64 f32", TN_OP_RMS_NORM, TN_QUANT_INT8, GROUP, .group_size = 64, .source = TN_QUANT_FROM_F32),
    Q("rms_norm mxfp8 swizzled", TN_OP_RMS_NORM, TN_QUANT_MXFP8, GROUP, .layout = TN_SCALES_SWIZZLED),
    Q("rms_norm mxfp8 col f32", TN_OP_RMS_NORM, TN_QUANT_MXFP8, GROUP, .layout = TN_SCALES_COLUMN_MAJOR,
      .source = TN_QUANT_FROM_F32),
    Q("rms_norm nvfp4 swizzled", TN_OP_RMS_NORM, TN_QUANT_NVFP4, GROUP, .layout = TN_SCALES_SWIZZLED),
    Q("rms_norm nvfp4 f32", TN_OP_RMS_NORM, TN_QUANT_NVFP4, GROUP, .source = TN_QUANT_FROM_F32),
    Q("add_rms_norm fp8 token", TN_OP_ADD_RMS_NORM, TN_QUANT_FP8_E4M3, TOKEN),
    Q("add_rms_norm nvfp4", TN_OP_ADD_RMS_NORM, TN_QUANT_NVFP4, GROUP),
    Q("layer_norm int8 token", TN_OP_LAYER_NORM, TN_QUANT_INT8, TOKEN),
    Q("layer_norm fp8 token f32", TN_OP_LAYER_NORM, TN_QUANT_FP8_E4M3, TOKEN, .source = TN_QUANT_FROM_F32),
    Q("add_layer_norm mxfp8 col", TN_OP_ADD_LAYER_NORM, TN_QUANT_MXFP8, GROUP, .layout = TN_SCALES_COLUMN_MAJOR),
};
#undef Q
#define QUANT_VARIANT_COUNT (sizeof quant_variants / sizeof quant_variants[0])

/* Dims are multiples of 128 (every group); 130 rows spill into a second swizzled tile of 128. */
static const shape quant_shapes[] = {{0, 128}, {1, 128}, {3, 256}, {17, 640}, {130, 128}, {4, 4096}, {2, 16384}};
#define QUANT_SHAPE_COUNT (sizeof quant_shapes / sizeof quant_shapes[0])

/* The static scale, or NVFP4's global one: about what each format's range needs at rms_norm's
 * magnitudes, so that quantize's rows of 30 saturate and its rows of 1e-3 reach the subnormals. */
static float static_scale_of(tn_quant_format f) {
  return f == TN_QUANT_NVFP4 ? 500.0f : f == TN_QUANT_INT8 ? 0.0371f : 0.0123f;
}

/* A quantized output's two buffers: q (rows of qdim bytes, row_stride apart) and the dynamic scales
 * (srows of sdim elements, s_stride apart), every byte 0xff to start with. */
typedef struct quant_buffers {
  buffer q, scales;
} quant_buffers;

static int quant_buffers_make(quant_buffers *b, const tn_quant *q, int64_t rows, int64_t dim, int strided) {
  int64_t srows, sdim;
  size_t es;
  tn_reference_scales_shape(q, rows, dim, &srows, &sdim, &es);
  const tn_dtype qdtype = q->format == TN_QUANT_FP8_E5M2 ? TN_F8_E5M2 : q->format == TN_QUANT_INT8 ? TN_I8
                          : q->format == TN_QUANT_NVFP4 ? TN_U8 : TN_F8_E4M3;
  const tn_dtype sdtype = es == 4 ? TN_F32 : q->format == TN_QUANT_NVFP4 ? TN_F8_E4M3 : TN_U8;
  const int64_t qdim = q->format == TN_QUANT_NVFP4 ? dim / 2 : dim;
  /* Padded rows where the layout allows them (DeepGEMM pads column-major scales); swizzled is contiguous. */
  const int64_t pad = strided ? 3 : 0, s_pad = strided && q->layout != TN_SCALES_SWIZZLED ? 3 : 0;
  if (buffer_make(&b->q, qdtype, rows, qdim, qdim + pad)) return -1;
  if (q->scaling == TN_QUANT_SCALE_TENSOR) return 0; /* a static scale: no scales */
  return buffer_make(&b->scales, sdtype, srows, sdim, sdim + s_pad);
}

static void quant_buffers_free(quant_buffers *b) {
  buffer_free(&b->q);
  buffer_free(&b->scales);
}

/* The first element (row, column) where a view's rows and `want` (rows x dim elements, contiguous)
 * differ: 1 when there is one, else 0. */
static int first_difference(const buffer *b, const uint8_t *want, int64_t *row, int64_t *col) {
  const tn_tensor *t = &b->view;
  const size_t es = tn_dtype_size(t->dtype);
  for (int64_t r = 0; r < t->rows; r++)
    for (int64_t i = 0; i < t->dim; i++)
      if (memcmp(b->bytes + ((size_t)r * (size_t)t->row_stride + (size_t)i) * es,
                 want + ((size_t)r * (size_t)t->dim + (size_t)i) * es, es) != 0) {
        *row = r;
        *col = i;
        return 1;
      }
  return 0;
}

/* The element's bytes as hex, for messages (up to 4 bytes). */
static unsigned element_hex(const tn_tensor *t, const uint8_t *base, int64_t index) {
  uint32_t v = 0;
  memcpy(&v, base + (size_t)index * tn_dtype_size(t->dtype), tn_dtype_size(t->dtype));
  return v;
}

static void compare_exact(tally *t, const char *what, const char *name, const buffer *got, const uint8_t *want) {
  int64_t r, c;
  if (got->bytes == NULL || !first_difference(got, want, &r, &c)) return;
  const tn_tensor *v = &got->view;
  record_failure(t, "%s %s[%" PRId64 ", %" PRId64 "] = 0x%02x, the reference's 0x%02x", what, name, r, c,
                 element_hex(v, got->bytes, r * v->row_stride + c), element_hex(v, want, r * v->dim + c));
}

/* Copies a view's rows into a contiguous array. */
static void gather_rows(const buffer *b, uint8_t *out) {
  const tn_tensor *t = &b->view;
  const size_t es = tn_dtype_size(t->dtype), row_bytes = (size_t)t->dim * es;
  for (int64_t r = 0; r < t->rows; r++)
    memcpy(out + (size_t)r * row_bytes, b->bytes + (size_t)r * (size_t)t->row_stride * es, row_bytes);
}

static size_t view_bytes(const buffer *b) {
  return b->bytes == NULL ? 0 : (size_t)(b->view.rows * b->view.dim) * tn_dtype_size(b->view.dtype);
}

/* The library's q and scales against the reference: exactly where the value quantized is known (quantize,
 * source ROUNDED, f32 x: what y holds), else within the bands of the float64 result. */
static void compare_quant(tally *t, const char *what, const tn_quant *q, const quant_buffers *got, const tn_tensor *x,
                          const double *ref, const double *slack, const buffer *y, float scale) {
  const int64_t rows = x->rows, dim = x->dim;
  const int exact = q->source == TN_QUANT_FROM_ROUNDED || x->dtype == TN_F32 || y == NULL;
  const size_t n = (size_t)(rows * dim) + 1, scales_bytes = view_bytes(&got->scales) + 1;
  float *v = malloc(n * sizeof *v);
  double *dev = malloc(n * sizeof *dev);
  uint8_t *q_ref = malloc(n), *s_ref = malloc(scales_bytes), *s_got = malloc(scales_bytes);
  char why[256];
  if (v == NULL || dev == NULL || q_ref == NULL || s_ref == NULL || s_got == NULL) {
    record_failure(t, "%s: out of memory", what);
  } else if (exact) {
    const tn_tensor *src = y != NULL ? &y->view : x;
    for (int64_t r = 0; r < rows; r++)
      for (int64_t i = 0; i < dim; i++) v[r * dim + i] = tn_reference_load(src, r, i);
    tn_reference_quantize(q, rows, dim, v, scale, q_ref, s_ref);
    compare_exact(t, what, "q", &got->q, q_ref);
    compare_exact(t, what, "scales", &got->scales, s_ref);
  } else {
    for (size_t k = 0; k + 1 < n; k++) dev[k] = 2e-5 * fabs(ref[k]) + (slack != NULL ? slack[k] : 0.0);
    if (got->scales.bytes != NULL) gather_rows(&got->scales, s_got);
    if (tn_reference_quant_check_band(q, rows, dim, ref, dev, scale, got->q.bytes, got->q.view.row_stride, s_got, why,
                                      sizeof why) != 0)
      record_failure(t, "%s %s", what, why);
  }
  free(v), free(dev), free(q_ref), free(s_ref), free(s_got);
}

/* The second call's outputs (no y, padded rows) must be the first's bytes, its gaps untouched. */
static void compare_same_bytes(tally *t, const char *what, const quant_buffers *first, const quant_buffers *second) {
  const buffer *pairs[2][2] = {{&first->q, &second->q}, {&first->scales, &second->scales}};
  for (int k = 0; k < 2; k++) {
    const buffer *a = pairs[k][0], *b = pairs[k][1];
    if (a->bytes == NULL) continue;
    uint8_t *dense = malloc(view_bytes(a) + 1);
    if (dense == NULL) {
      record_failure(t, "%s: out of memory", what);
      return;
    }
    int64_t r, c;
    gather_rows(a, dense);
    if (first_difference(b, dense, &r, &c))
      record_failure(t, "%s: %s differ between a call with y and one without", what, k == 0 ? "q" : "the scales");
    if (!gaps_untouched(b)) record_failure(t, "%s: %s written into a row gap", what, k == 0 ? "q" : "the scales");
    free(dense);
  }
}

/* Runs one quantized case twice: with y and dense outputs, then without y into padded rows. Returns 0, -1
 * when out of memory, 1 when the device has no quantized outputs (TN_ERR_UNAVAILABLE; *why says why). */
static int run_quant_case(tn_context *ctx, tn_device device, tally *t, tn_rng *rng, const quant_variant *v,
                          tn_dtype dtype, shape s, char *why, size_t why_len) {
  const int is_add = v->op == TN_OP_ADD_RMS_NORM || v->op == TN_OP_ADD_LAYER_NORM;
  const int is_layer = v->op == TN_OP_LAYER_NORM || v->op == TN_OP_ADD_LAYER_NORM;
  const int is_norm = v->op != TN_OP_QUANTIZE;
  const size_t elems = (size_t)(s.rows * s.dim) + 1;
  buffer x = {0}, w = {0}, bias = {0}, m = {0}, res = {0}, y = {0}, ro = {0}, scale = {0};
  quant_buffers first = {0}, second = {0};
  double *ref_y = malloc(elems * sizeof *ref_y), *slack = malloc(elems * sizeof *slack);
  double *ref_ro = malloc(elems * sizeof *ref_ro);
  tn_quant q = tn_quant_init(v->format);
  q.scaling = v->scaling;
  q.group_size = v->group_size;
  q.pow2_scales = v->pow2;
  q.layout = v->layout;
  q.source = v->source;
  q.scale_ub = v->scale_ub;
  int rc = -1;
  if (ref_y == NULL || slack == NULL || ref_ro == NULL || buffer_make(&x, dtype, s.rows, s.dim, s.dim) ||
      buffer_make(&w, dtype, 1, s.dim, s.dim) || buffer_make(&bias, dtype, 1, s.dim, s.dim) ||
      buffer_make(&m, dtype, s.rows, s.dim, s.dim) || buffer_make(&res, dtype, s.rows, s.dim, s.dim) ||
      buffer_make(&y, dtype, s.rows, s.dim, s.dim) || buffer_make(&ro, dtype, s.rows, s.dim, s.dim) ||
      buffer_make(&scale, TN_F32, 1, 1, 1) || quant_buffers_make(&first, &q, s.rows, s.dim, 0) ||
      quant_buffers_make(&second, &q, s.rows, s.dim, 1))
    goto out;
  fill_random(&x, rng, is_layer ? 0.5 : 0.0, 1.0);
  fill_random(&w, rng, 1.0, 0.1);
  fill_random(&bias, rng, 0.0, 1.0);
  fill_random(&m, rng, 0.0, 1.0);
  fill_random(&res, rng, 0.0, 1.0);
  const float scale_value = static_scale_of(v->format);
  tn_reference_store(&scale.view, 0, 0, scale_value);

  tn_op_args a = tn_op_args_init(v->op);
  a.x = &x.view;
  a.weight = is_norm ? &w.view : NULL;
  a.bias = is_layer ? &bias.view : NULL;
  a.mul = v->mul ? &m.view : NULL;
  a.residual = is_add ? &res.view : NULL;
  a.y = is_norm ? &y.view : NULL;
  a.residual_out = is_add ? &ro.view : NULL;
  a.eps = is_layer ? 1e-5f : 1e-6f;
  q.scale = q.scaling == TN_QUANT_SCALE_TENSOR || q.format == TN_QUANT_NVFP4 ? &scale.view : NULL;
  q.q = &first.q.view;
  q.scales = first.scales.bytes != NULL ? &first.scales.view : NULL;
  a.quant = q;
  if (tn_reference_run_slack(&a, ref_y, ref_ro, slack) != 0) goto out;

  t->cases++;
  char what[96];
  snprintf(what, sizeof what, "%" PRId64 "x%" PRId64, s.rows, s.dim);
  tn_status st = cli_op_on_device(ctx, device, &a);
  rc = 0;
  if (st == TN_ERR_UNAVAILABLE) {
    snprintf(why, why_len, "%s", tn_context_last_error(ctx));
    t->cases--;
    rc = 1;
    goto out;
  }
  if (st != TN_OK) {
    record_failure(t, "%s: %s", what, tn_context_last_error(ctx));
    goto out;
  }
  if (is_norm) compare(t, what, a.y, ref_y, slack);
  if (is_add) compare(t, what, a.residual_out, ref_ro, NULL);
  compare_quant(t, what, &q, &first, &x.view, ref_y, slack, is_norm ? &y : NULL, scale_value);

  /* Without y (the library then writes q alone) into padded rows: the same bytes. */
  a.y = NULL;
  a.quant.q = &second.q.view;
  a.quant.scales = second.scales.bytes != NULL ? &second.scales.view : NULL;
  if (cli_op_on_device(ctx, device, &a) != TN_OK) record_failure(t, "%s without y: %s", what, tn_context_last_error(ctx));
  else compare_same_bytes(t, what, &first, &second);
out:
  buffer_free(&x), buffer_free(&w), buffer_free(&bias), buffer_free(&m), buffer_free(&res), buffer_free(&y);
  buffer_free(&ro), buffer_free(&scale);
  quant_buffers_free(&first), quant_buffers_free(&second);
  free(ref_y), free(slack), free(ref_ro);
  return rc;
}

static int check_quant_device(tn_context *ctx, tn_device dev, uint64_t seed, long *failures) {
  const char *device = cli_device_name(dev);
  for (size_t vi = 0; vi < QUANT_VARIANT_COUNT; vi++) {
    for (int d = 0; d < TN_DTYPE_COUNT; d++) {
      tally t = {0};
      tn_rng rng = {seed ^ (0x51000 + vi * 0x100 + (uint64_t)d)};
      char why[256] = "";
      int unavailable = 0;
      for (size_t si = 0; si < QUANT_SHAPE_COUNT && !unavailable; si++) {
        const int rc = run_quant_case(ctx, dev, &t, &rng, &quant_variants[vi], (tn_dtype)d, quant_shapes[si], why,
                                      sizeof why);
        if (rc < 0) return cli_fail("check: out of memory");
        unavailable = rc == 1;
      }
      if (unavailable) {
        printf("%-6s %-24s %-5s %6s %10s  not built for %s (%s)\n", device, quant_variants[vi].label,
               tn_dtype_name((tn_dtype)d), "-", "-", device, why);
        continue;
      }
      printf("%-6s %-24s %-5s %6ld %10.3f  %s %s\n", device, quant_variants[vi].label, tn_dtype_name((tn_dtype)d),
             t.cases, t.max_error, t.failures ? "FAIL" : "ok", t.first_failure);
      *failures += t.failures;
    }
  }
  return CLI_OK;
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
      printf("%-6s %-24s %-5s %6ld %10.3f  %s %s\n", device, variants[vi].label, tn_dtype_name((tn_dtype)d),
             t.cases, t.max_error, t.failures ? "FAIL" : "ok", t.first_failure);
      *failures += t.failures;
    }
  }
  return check_quant_device(ctx, dev, seed, failures);
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
  printf("; layouts contiguous, strided, in place.\nQuantized outputs (fp8 is e4m3): q and the scales byte for byte "
         "against the reference's\nquantization of y (quantize: of x), or within the float64 result's bands with "
         "source f32 on\nf16/bf16; each case twice, with y into dense outputs and without y into padded rows; "
         "shapes");
  for (size_t si = 0; si < QUANT_SHAPE_COUNT; si++)
    printf(" %" PRId64 "x%" PRId64, quant_shapes[si].rows, quant_shapes[si].dim);
  printf("\n\n%-6s %-24s %-5s %6s %10s  %s\n", "device", "op", "dtype", "cases", "max error", "result");
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
