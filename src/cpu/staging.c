#include "staging.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../core/error.h"
#include "../core/tensor.h"

static int misaligned(const void *p, size_t alignment) { return alignment > 1 && (uintptr_t)p % alignment != 0; }

static size_t position_size(const tn_rope *rope) { return rope->positions_i64 ? sizeof(int64_t) : sizeof(int32_t); }

static int stages_positions(const tn_op_args *args) {
  return args->rope.style != TN_ROPE_NONE && misaligned(args->rope.positions, position_size(&args->rope));
}

int tn_cpu_needs_staging(const tn_op_args *args) {
  for (int o = 0; o < TN_OPERAND_COUNT; o++) {
    const tn_tensor *t = tn_op_operand(args, (tn_operand)o);
    if (t != NULL && misaligned(t->data, tn_dtype_size(t->dtype))) return 1;
  }
  return stages_positions(args);
}

/* 64-byte aligned, as the kernels' streaming stores want; the size was bounded by validation. */
static void *aligned_buffer(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

/* Copies every vector (a row's head, or the row of a 2-D view) between the caller's view and the packed
 * copy: element (r, h, i) of the view is element (r * heads + h) * dim + i of the copy. */
static void copy_vectors(const tn_tensor *view, unsigned char *packed, int to_packed) {
  const size_t es = tn_dtype_size(view->dtype), bytes = (size_t)view->dim * es;
  const int64_t heads = tn_tensor_head_count(view);
  unsigned char *base = view->data;
  for (int64_t r = 0; r < view->rows; r++) {
    for (int64_t h = 0; h < heads; h++) {
      unsigned char *v = base + (size_t)(r * view->row_stride + h * view->head_stride) * es;
      unsigned char *p = packed + (size_t)(r * heads + h) * bytes;
      if (to_packed) memcpy(p, v, bytes);
      else memcpy(v, p, bytes);
    }
  }
}

tn_status tn_cpu_stage(tn_context *ctx, const tn_op_args *args, tn_cpu_staging *st) {
  memset(st, 0, sizeof *st);
  st->args = *args;
  for (int o = 0; o < TN_OPERAND_COUNT; o++) {
    const tn_tensor *t = tn_op_operand(args, (tn_operand)o);
    if (t == NULL || !misaligned(t->data, tn_dtype_size(t->dtype))) continue;
    const int64_t heads = tn_tensor_head_count(t);
    const size_t bytes = (size_t)t->rows * (size_t)heads * (size_t)t->dim * tn_dtype_size(t->dtype);
    st->buffers[o] = aligned_buffer(bytes);
    if (st->buffers[o] == NULL) {
      tn_cpu_unstage(st, args, 0);
      return tn_error(ctx, TN_ERR_NO_MEMORY, "%s: out of memory for an aligned copy of %s (%zu bytes)",
                      tn_op_name(args->op), tn_operand_name((tn_operand)o), bytes);
    }
    tn_tensor *s = &st->tensors[o];
    *s = *t;
    s->data = st->buffers[o];
    s->row_stride = heads * t->dim;
    s->head_stride = t->dim;
    *tn_op_operand_slot(&st->args, (tn_operand)o) = s;
    /* Outputs are written whole, so only the inputs need their values. */
    if (!tn_operand_is_output((tn_operand)o)) copy_vectors(t, st->buffers[o], 1);
  }
  if (stages_positions(args)) {
    const size_t bytes = (size_t)args->x->rows * position_size(&args->rope);
    st->positions = aligned_buffer(bytes);
    if (st->positions == NULL) {
      tn_cpu_unstage(st, args, 0);
      return tn_error(ctx, TN_ERR_NO_MEMORY, "%s: out of memory for an aligned copy of the rope's positions",
                      tn_op_name(args->op));
    }
    memcpy(st->positions, args->rope.positions, bytes);
    st->args.rope.positions = st->positions;
  }
  return TN_OK;
}

void tn_cpu_unstage(tn_cpu_staging *st, const tn_op_args *args, int ran) {
  for (int o = 0; o < TN_OPERAND_COUNT; o++) {
    if (st->buffers[o] == NULL) continue;
    if (ran && tn_operand_is_output((tn_operand)o)) copy_vectors(tn_op_operand(args, (tn_operand)o), st->buffers[o], 0);
    free(st->buffers[o]);
    st->buffers[o] = NULL;
  }
  free(st->positions);
  st->positions = NULL;
}
