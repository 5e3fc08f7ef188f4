/* Tensor views: byte extents and how two views overlap. */
#ifndef TN_CORE_TENSOR_H
#define TN_CORE_TENSOR_H

#include <stdint.h>

#include "tnorm.h"

/* The bytes a view touches, as [begin, end) addresses; end == begin for an empty view.
 * Only meaningful for a view that passed the size checks of validation. */
typedef struct tn_extent {
  uintptr_t begin;
  uintptr_t end;
} tn_extent;

tn_extent tn_tensor_extent(const tn_tensor *t);

/* Heads per row: 1 for a 2-D view (heads 0 or 1). */
static inline int64_t tn_tensor_head_count(const tn_tensor *t) { return t->heads > 1 ? t->heads : 1; }

/* Elements from the start of a row to the end of its last head: dim for a 2-D view. */
static inline int64_t tn_tensor_row_span(const tn_tensor *t) {
  return t->heads > 1 ? (t->heads - 1) * t->head_stride + t->dim : t->dim;
}

/* Same data, dtype, rows, heads, dim, strides and device: an output may be exactly such a view of an input. */
int tn_tensor_same_view(const tn_tensor *a, const tn_tensor *b);

/* Whether some byte is in both views, exactly: interleaved views of one packed buffer (Q and K in a QKV
 * buffer, a weight in the gap after a row) do not overlap. O(1) for views with the same row pitch, else
 * O(rows of the smaller view) when their extents intersect. A row of a 3-D view counts as its whole span
 * (tn_tensor_row_span), so heads interleaved with another view's heads count as overlapping. */
int tn_tensors_overlap(const tn_tensor *a, const tn_tensor *b);

#endif
