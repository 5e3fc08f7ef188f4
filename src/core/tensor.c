#include "tensor.h"

#include "dtype.h"

tn_extent tn_tensor_extent(const tn_tensor *t) {
  tn_extent e;
  e.begin = (uintptr_t)t->data;
  e.end = e.begin;
  if (t->rows > 0 && t->dim > 0) {
    uint64_t elems = (uint64_t)(t->rows - 1) * (uint64_t)t->row_stride + (uint64_t)tn_tensor_row_span(t);
    e.end = e.begin + (uintptr_t)(elems * tn_dtype_size(t->dtype));
  }
  return e;
}

int tn_tensor_same_view(const tn_tensor *a, const tn_tensor *b) {
  const int64_t heads = tn_tensor_head_count(a);
  return a->data == b->data && a->dtype == b->dtype && a->rows == b->rows && a->dim == b->dim &&
         heads == tn_tensor_head_count(b) && (heads == 1 || a->head_stride == b->head_stride) &&
         (a->rows <= 1 || a->row_stride == b->row_stride) && a->device.kind == b->device.kind &&
         a->device.index == b->device.index;
}

/* Rows of b, each `width_b` bytes, start at offset `d` (>= 0) from a's first row, with the same row
 * pitch `pitch` as a; a has rows_a rows of width_a bytes. Does any byte coincide? */
static int same_pitch_overlap(uint64_t d, uint64_t pitch, uint64_t width_a, uint64_t rows_a,
                              uint64_t width_b, uint64_t rows_b) {
  uint64_t first_slot = d / pitch; /* b's row k lies in a's slot first_slot + k (and maybe the next) */
  uint64_t offset = d % pitch;
  if (first_slot >= rows_a) return 0;
  if (offset < width_a) return 1; /* b's first row starts inside a row of a */
  /* b's rows start in the gap after a's rows; they reach into the next slot's row of a when they
   * are longer than the gap. */
  if (offset + width_b > pitch) {
    uint64_t slots_left = rows_a - first_slot - 1; /* rows of a after the first slot */
    return slots_left > 0 && rows_b > 0;
  }
  return 0;
}

/* floor(a / b) for b > 0, without the overflow of -a + b - 1 on extents near 2^63 bytes. */
static int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -1 - (-(a + 1)) / b; }

/* Does the byte interval [s, e) (relative to b's first row) meet one of b's rows? b's row j covers
 * [j * pitch, j * pitch + width), width <= pitch, j in [0, rows). */
static int interval_meets_rows(int64_t s, int64_t e, int64_t pitch, int64_t width, int64_t rows) {
  int64_t j_min = floor_div(s - width, pitch) + 1; /* rows ending after s */
  int64_t j_max = floor_div(e - 1, pitch);         /* rows starting before e */
  if (j_min < 0) j_min = 0;
  if (j_max > rows - 1) j_max = rows - 1;
  return j_min <= j_max;
}

int tn_tensors_overlap(const tn_tensor *a, const tn_tensor *b) {
  if (a->device.kind != b->device.kind || a->device.index != b->device.index) return 0;
  tn_extent ea = tn_tensor_extent(a), eb = tn_tensor_extent(b);
  if (ea.begin == ea.end || eb.begin == eb.end) return 0;
  if (ea.end <= eb.begin || eb.end <= ea.begin) return 0;
  uint64_t pitch_a = (uint64_t)a->row_stride * tn_dtype_size(a->dtype);
  uint64_t pitch_b = (uint64_t)b->row_stride * tn_dtype_size(b->dtype);
  uint64_t wa = (uint64_t)tn_tensor_row_span(a) * tn_dtype_size(a->dtype);
  uint64_t wb = (uint64_t)tn_tensor_row_span(b) * tn_dtype_size(b->dtype);
  if (a->rows > 1 && b->rows > 1 && pitch_a == pitch_b) {
    if (ea.begin <= eb.begin)
      return same_pitch_overlap(eb.begin - ea.begin, pitch_a, wa, (uint64_t)a->rows, wb, (uint64_t)b->rows);
    return same_pitch_overlap(ea.begin - eb.begin, pitch_a, wb, (uint64_t)b->rows, wa, (uint64_t)a->rows);
  }
  /* Different pitches, or a single row: walk the rows of the view with fewer of them, each an interval
   * tested against the other's rows in O(1). Extents that intersect make this rare. */
  const tn_tensor *few = a->rows <= b->rows ? a : b, *many = few == a ? b : a;
  uint64_t pitch_few = few == a ? pitch_a : pitch_b, w_few = few == a ? wa : wb;
  uint64_t pitch_many = few == a ? pitch_b : pitch_a, w_many = few == a ? wb : wa;
  if (many->rows == 1) pitch_many = w_many; /* one row: any pitch >= its width describes it */
  int64_t base = (int64_t)((uintptr_t)few->data - (uintptr_t)many->data); /* extents intersect: small */
  for (int64_t r = 0; r < few->rows; r++) {
    int64_t s = base + r * (int64_t)pitch_few;
    if (interval_meets_rows(s, s + (int64_t)w_few, (int64_t)pitch_many, (int64_t)w_many, many->rows)) return 1;
  }
  return 0;
}
