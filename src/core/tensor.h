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

/* Same data, dtype, rows, dim, row stride and device: an output may be exactly such a view of an input. */
int tn_tensor_same_view(const tn_tensor *a, const tn_tensor *b);

/* Whether some byte is in both views, exactly: interleaved views of one packed buffer (Q and K in a QKV
 * buffer, a weight in the gap after a row) do not overlap. O(1) for views with the same row pitch, else
 * O(rows of the smaller view) when their extents intersect. */
int tn_tensors_overlap(const tn_tensor *a, const tn_tensor *b);

#endif
