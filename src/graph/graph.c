/* Recording and the fusion passes. A pass fuses a producer (node i) with the first later node that
 * touches the producer's output (node j), and only where the bytes come out exactly as the two ops in
 * turn would give them:
 * - add -> rms_norm  => add_rms_norm (the sum is still written, as residual_out); add -> layer_norm
 *                       => add_layer_norm likewise;
 * - rms_norm -> mul  => rms_norm with the multiplicand, rounding before it (the intermediate must not be
 *                       read by any later node, since the fused op no longer writes it); the same for
 *                       add_rms_norm -> mul (so add -> rms_norm -> mul becomes one op), whose sum then
 *                       must not be touched between the two;
 * - l2_norm -> scale => l2_norm with the scale, rounding before it (same condition; l2_norm's own scale
 *                       must be 1).
 * The fused node runs at j's place, so no node between i and j may write what the producer read; the
 * fused arguments must pass validation like any call. */
#include "graph.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../core/error.h"
#include "../core/ops.h"
#include "../core/tensor.h"
#include "../core/validate.h"

tn_status tn_graph_new(tn_context *ctx, tn_graph **out) {
  tn_graph *g = calloc(1, sizeof *g);
  TN_RETURN_ERROR_IF(g == NULL, ctx, TN_ERR_NO_MEMORY, "graph_begin: out of memory");
  *out = g;
  return TN_OK;
}

/* Rebinds a node's operand pointers to its own tensor copies. */
static void bind(tn_graph_node *n) {
  for (int k = 0; k < TN_OPERAND_COUNT; k++) {
    const tn_tensor **slot = tn_op_operand_slot(&n->args, (tn_operand)k);
    if (*slot != NULL) *slot = &n->tensors[k];
  }
}

/* A node holding copies of args' tensors, its pointers bound to them (re-bind after moving a node). */
static void node_init(tn_graph_node *n, const tn_op_args *args) {
  tn_graph_node tmp;
  memset(&tmp, 0, sizeof tmp);
  tmp.args = *args;
  for (int k = 0; k < TN_OPERAND_COUNT; k++) {
    const tn_tensor *t = tn_op_operand(args, (tn_operand)k);
    if (t != NULL) tmp.tensors[k] = *t;
  }
  *n = tmp; /* args may point into n itself: copy the tensors first */
  bind(n);
}

tn_status tn_graph_append(tn_context *ctx, tn_graph *g, const tn_op_args *args) {
  if (g->count == g->capacity) {
    TN_RETURN_ERROR_IF(g->capacity > INT_MAX / 2, ctx, TN_ERR_OVERFLOW, "graph: more than %d ops recorded",
                       g->capacity);
    int cap = g->capacity ? 2 * g->capacity : 16;
    tn_graph_node *p = realloc(g->nodes, (size_t)cap * sizeof *p);
    TN_RETURN_ERROR_IF(p == NULL, ctx, TN_ERR_NO_MEMORY, "graph: out of memory recording op %d", g->count);
    g->nodes = p;
    g->capacity = cap;
    for (int i = 0; i < g->count; i++) bind(&g->nodes[i]); /* the copies moved */
  }
  node_init(&g->nodes[g->count++], args);
  g->info.recorded_ops = g->count;
  g->info.ops = g->count;
  return TN_OK;
}

tn_status tn_graph_copy_nodes(tn_context *ctx, tn_graph *g, const tn_graph *src) {
  tn_graph_node *nodes = NULL;
  if (src->count > 0) {
    nodes = malloc((size_t)src->count * sizeof *nodes);
    TN_RETURN_ERROR_IF(nodes == NULL, ctx, TN_ERR_NO_MEMORY, "graph_update: out of memory copying %d ops",
                       src->count);
    memcpy(nodes, src->nodes, (size_t)src->count * sizeof *nodes);
    for (int i = 0; i < src->count; i++) bind(&nodes[i]);
  }
  free(g->nodes);
  g->nodes = nodes;
  g->count = g->capacity = src->count;
  const tn_graph_info own = g->info;
  g->info = src->info;
  g->info.device_graph = own.device_graph;
  g->info.instantiations = own.instantiations;
  g->info.updates_in_place = own.updates_in_place;
  memcpy(g->fusions, src->fusions, sizeof g->fusions);
  return TN_OK;
}

/* ---- data flow ---- */

static int reads(const tn_graph_node *n, const tn_tensor *t) {
  for (int k = 0; k < TN_OPERAND_COUNT; k++) {
    const tn_tensor *o = tn_op_operand(&n->args, (tn_operand)k);
    if (o != NULL && !tn_operand_is_output((tn_operand)k) && tn_tensors_overlap(o, t)) return 1;
  }
  return 0;
}

static int writes(const tn_graph_node *n, const tn_tensor *t) {
  for (int k = 0; k < TN_OPERAND_COUNT; k++) {
    const tn_tensor *o = tn_op_operand(&n->args, (tn_operand)k);
    if (o != NULL && tn_operand_is_output((tn_operand)k) && tn_tensors_overlap(o, t)) return 1;
  }
  return 0;
}

/* The first node after i that reads or writes a byte of t; -1 when none. */
static int first_toucher(const tn_graph *g, int i, const tn_tensor *t) {
  for (int j = i + 1; j < g->count; j++)
    if (reads(&g->nodes[j], t) || writes(&g->nodes[j], t)) return j;
  return -1;
}

/* Whether a node in (i, j) writes a byte of t. */
static int written_between(const tn_graph *g, int i, int j, const tn_tensor *t) {
  if (t == NULL) return 0;
  for (int k = i + 1; k < j; k++)
    if (writes(&g->nodes[k], t)) return 1;
  return 0;
}

/* Whether some node after j reads t before a node writes all of it again. */
static int read_after(const tn_graph *g, int j, const tn_tensor *t) {
  for (int k = j + 1; k < g->count; k++) {
    const tn_graph_node *n = &g->nodes[k];
    if (reads(n, t)) return 1;
    if (writes(n, t)) {
      int whole = 0;
      for (int o = 0; o < TN_OPERAND_COUNT; o++) {
        const tn_tensor *out = tn_op_operand(&n->args, (tn_operand)o);
        if (out != NULL && tn_operand_is_output((tn_operand)o) && tn_tensor_same_view(out, t)) whole = 1;
      }
      return !whole; /* a partial rewrite leaves bytes a later node might read: stay safe */
    }
  }
  return 0;
}

static int is_broadcast(const tn_tensor *b, const tn_tensor *x) { return b->rows == 1 && x->rows != 1; }

/* Replaces nodes i and j (i < j) by `fused` at j's place, if it validates; returns whether it did. */
static int replace(tn_graph *g, int i, int j, const tn_graph_node *fused, const char *what) {
  if (tn_validate(NULL, &fused->args) != TN_OK) return 0; /* NULL: no message wanted, only the verdict */
  g->nodes[j] = *fused;
  bind(&g->nodes[j]);
  memmove(&g->nodes[i], &g->nodes[i + 1], (size_t)(g->count - i - 1) * sizeof *g->nodes);
  g->count--;
  for (int k = i; k < g->count; k++) bind(&g->nodes[k]);
  size_t used = strlen(g->fusions);
  if (used + strlen(what) + 3 < sizeof g->fusions)
    snprintf(g->fusions + used, sizeof g->fusions - used, "%s%s", used ? "; " : "", what);
  return 1;
}

static int fuse_add_rms_norm(tn_graph *g, int i) {
  const tn_graph_node *a = &g->nodes[i];
  if (a->args.op != TN_OP_ADD || is_broadcast(a->args.residual, a->args.x)) return 0;
  const tn_tensor *sum = a->args.y;
  int j = first_toucher(g, i, sum);
  if (j < 0) return 0;
  const tn_graph_node *r = &g->nodes[j];
  const int layer = r->args.op == TN_OP_LAYER_NORM;
  if ((r->args.op != TN_OP_RMS_NORM && !layer) || r->args.mul != NULL || r->args.rope.style != TN_ROPE_NONE ||
      r->options.round_before_last || !tn_tensor_same_view(r->args.x, sum) || writes(r, sum))
    return 0;
  if (written_between(g, i, j, a->args.x) || written_between(g, i, j, a->args.residual)) return 0;
  /* The add rounded its sum to x's dtype, and the norm read that: the default residual mode. */
  tn_op_args f = tn_op_args_init(layer ? TN_OP_ADD_LAYER_NORM : TN_OP_ADD_RMS_NORM);
  f.x = a->args.x;
  f.residual = a->args.residual;
  f.weight = r->args.weight;
  f.bias = r->args.bias;
  f.weight_offset = r->args.weight_offset;
  f.eps = r->args.eps;
  f.casting = r->args.casting;
  f.y = r->args.y;
  f.residual_out = sum;
  f.quant = r->args.quant; /* add -> rms_norm with a quantized output: add_rms_norm with it */
  tn_graph_node fused;
  node_init(&fused, &f);
  fused.options.as_rms_norm = !layer; /* the rms_norm's reduction order, not add_rms_norm's own */
  if (!replace(g, i, j, &fused, layer ? "add + layer_norm -> add_layer_norm" : "add + rms_norm -> add_rms_norm"))
    return 0;
  g->info.fused_add_rms_norm++;
  return 1;
}

/* Whether a node in (i, j) reads or writes a byte of t. */
static int touched_between(const tn_graph *g, int i, int j, const tn_tensor *t) {
  if (t == NULL) return 0;
  for (int k = i + 1; k < j; k++)
    if (reads(&g->nodes[k], t) || writes(&g->nodes[k], t)) return 1;
  return 0;
}

static int fuse_norm_then_factor(tn_graph *g, int i) {
  const tn_graph_node *a = &g->nodes[i];
  const int add = a->args.op == TN_OP_ADD_RMS_NORM;
  const int rms = a->args.op == TN_OP_RMS_NORM || add, l2 = a->args.op == TN_OP_L2_NORM;
  if ((!rms && !l2) || a->options.round_before_last || (rms && a->args.mul != NULL) || (l2 && a->args.scale != 1.0f) ||
      a->args.rope.style != TN_ROPE_NONE || a->args.quant.format != TN_QUANT_NONE)
    return 0;
  const tn_tensor *t = a->args.y;
  int j = first_toucher(g, i, t);
  if (j < 0) return 0;
  const tn_graph_node *b = &g->nodes[j];
  const tn_tensor *m = NULL;
  if (rms) {
    if (b->args.op != TN_OP_MUL) return 0;
    if (tn_tensor_same_view(b->args.x, t)) m = b->args.mul;
    else if (tn_tensor_same_view(b->args.mul, t)) m = b->args.x;
    if (m == NULL || is_broadcast(m, t) || tn_tensors_overlap(m, t)) return 0;
  } else if (b->args.op != TN_OP_SCALE || !tn_tensor_same_view(b->args.x, t)) {
    return 0;
  }
  if (writes(b, t) && !tn_tensor_same_view(b->args.y, t)) return 0;
  /* The fused op no longer writes t: nothing after may read it (t rewritten in place by j is fine). */
  if (!tn_tensor_same_view(b->args.y, t) && read_after(g, j, t)) return 0;
  if (written_between(g, i, j, a->args.x) || written_between(g, i, j, a->args.weight)) return 0;
  /* add_rms_norm's other input, and its sum, which the fused op now writes at j's place. */
  if (add && (written_between(g, i, j, a->args.residual) || touched_between(g, i, j, a->args.residual_out)))
    return 0;
  tn_op_args f = a->args;
  f.y = b->args.y;
  if (rms) f.mul = m;
  else f.scale = b->args.scale;
  tn_graph_node fused;
  node_init(&fused, &f);
  fused.options = a->options; /* an add_rms_norm fused from add + rms_norm keeps rms_norm's order */
  fused.options.round_before_last = 1;
  if (!replace(g, i, j, &fused,
               add   ? "add_rms_norm + mul -> add_rms_norm with mul"
               : rms ? "rms_norm + mul -> rms_norm with mul"
                     : "l2_norm + scale -> l2_norm with scale"))
    return 0;
  if (rms) g->info.fused_rms_norm_mul++;
  else g->info.fused_l2_norm_scale++;
  return 1;
}

/* A norm, then a quantize of its y: the norm with that quantized output, source ROUNDED (what the quantize
 * read was the rounded y), giving the bytes of the two ops one by one. y is still written where a later
 * node reads it, else left out. */
static int fuse_norm_then_quantize(tn_graph *g, int i) {
  const tn_graph_node *a = &g->nodes[i];
  const tn_op op = a->args.op;
  if ((op != TN_OP_RMS_NORM && op != TN_OP_ADD_RMS_NORM && op != TN_OP_LAYER_NORM && op != TN_OP_ADD_LAYER_NORM) ||
      a->args.rope.style != TN_ROPE_NONE || a->args.quant.format != TN_QUANT_NONE ||
      tn_tensor_head_count(a->args.x) != 1)
    return 0;
  const tn_tensor *t = a->args.y;
  int j = first_toucher(g, i, t);
  if (j < 0) return 0;
  const tn_graph_node *b = &g->nodes[j];
  if (b->args.op != TN_OP_QUANTIZE || !tn_tensor_same_view(b->args.x, t) || writes(b, t)) return 0;
  if (written_between(g, i, j, a->args.x) || written_between(g, i, j, a->args.weight) ||
      written_between(g, i, j, a->args.bias) || written_between(g, i, j, a->args.mul) ||
      written_between(g, i, j, a->args.residual) || touched_between(g, i, j, a->args.residual_out))
    return 0;
  tn_op_args f = a->args;
  f.quant = b->args.quant;
  f.quant.source = TN_QUANT_FROM_ROUNDED;
  if (!read_after(g, j, t)) f.y = NULL;
  tn_graph_node fused;
  node_init(&fused, &f);
  fused.options = a->options;
  if (!replace(g, i, j, &fused, "norm + quantize -> norm with a quantized output")) return 0;
  g->info.fused_norm_quantize++;
  return 1;
}

void tn_graph_fuse(tn_graph *g) {
  const char *off = getenv("TNORM_GRAPH_FUSION");
  if (off == NULL || strcmp(off, "0") != 0) {
    /* add + rms_norm first: in add -> rms_norm -> mul it saves the most launches and traffic. */
    for (int i = 0; i < g->count; i++)
      if (fuse_add_rms_norm(g, i)) i--;
    for (int i = 0; i < g->count; i++)
      if (fuse_norm_then_factor(g, i)) i--;
    for (int i = 0; i < g->count; i++)
      if (fuse_norm_then_quantize(g, i)) i--;
  }
  g->info.ops = g->count;
}
