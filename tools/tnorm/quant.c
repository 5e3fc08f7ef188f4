/* The quantized outputs as the command writes them: the dtypes and shapes of q and of the dynamic scales,
 * and the safetensors metadata that says what their bytes are (a U8 tensor alone cannot say it holds
 * packed E2M1 pairs or UE8M0 exponents). */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "cli.h"

int64_t cli_quant_group(const tn_quant *q, int64_t dim) {
  if (q->scaling != TN_QUANT_SCALE_GROUP) return dim;
  if (q->group_size != 0) return q->group_size;
  return q->format == TN_QUANT_NVFP4 ? 16 : 32;
}

void cli_quant_shapes_of(const tn_quant *q, int64_t rows, int64_t dim, cli_quant_shapes *out) {
  const tn_quant_format f = q->format;
  const int64_t groups = dim / cli_quant_group(q, dim);
  out->q_dtype = f == TN_QUANT_FP8_E5M2 ? TN_F8_E5M2 : f == TN_QUANT_INT8 ? TN_I8 : f == TN_QUANT_NVFP4 ? TN_U8 : TN_F8_E4M3;
  out->q_dim = f == TN_QUANT_NVFP4 ? dim / 2 : dim;
  out->scales_dtype = f == TN_QUANT_NVFP4 ? TN_F8_E4M3 : f == TN_QUANT_MXFP8 || q->pow2_scales ? TN_U8 : TN_F32;
  if (q->scaling == TN_QUANT_SCALE_TENSOR) {
    out->scales_rows = out->scales_dim = 0;
  } else if (q->layout == TN_SCALES_COLUMN_MAJOR) {
    out->scales_rows = groups;
    out->scales_dim = rows;
  } else if (q->layout == TN_SCALES_SWIZZLED) {
    out->scales_rows = (rows + 127) / 128 * 128;
    out->scales_dim = (groups + 3) / 4 * 4;
  } else {
    out->scales_rows = rows;
    out->scales_dim = groups;
  }
}

static const char *layout_text(tn_scale_layout layout) {
  return layout == TN_SCALES_COLUMN_MAJOR ? "column-major (groups x rows)"
         : layout == TN_SCALES_SWIZZLED   ? "swizzled 128x4 tiles (cuBLASLt, CUTLASS block scales)"
                                          : "row-major (rows x groups)";
}

static const char *scaling_text(tn_quant_scaling scaling) {
  return scaling == TN_QUANT_SCALE_TENSOR ? "tensor" : scaling == TN_QUANT_SCALE_TOKEN ? "token" : "group";
}

void cli_quant_metadata(const tn_quant *q, int64_t dim, cli_quant_meta *m) {
  const tn_quant_format f = q->format;
  const char *scale_format = f == TN_QUANT_NVFP4 ? "e4m3" : f == TN_QUANT_MXFP8 || q->pow2_scales ? "ue8m0" : "f32";
  int nq = 0, ns = 0;
  snprintf(m->group_size, sizeof m->group_size, "%" PRId64, cli_quant_group(q, dim));
  memset(m->q, 0, sizeof m->q);
  memset(m->scales, 0, sizeof m->scales);
  m->q[nq++] = (tn_file_meta){"format", tn_quant_format_name(f)};
  m->q[nq++] = (tn_file_meta){"scaling", scaling_text(q->scaling)};
  if (f == TN_QUANT_NVFP4) m->q[nq++] = (tn_file_meta){"packing", "e2m1x2, low nibble first"};
  m->scales[ns++] = (tn_file_meta){"format", scale_format};
  m->scales[ns++] = (tn_file_meta){"layout", layout_text(q->layout)};
  m->scales[ns++] = (tn_file_meta){"of", tn_quant_format_name(f)};
  if (q->scaling == TN_QUANT_SCALE_GROUP) {
    m->q[nq++] = (tn_file_meta){"group_size", m->group_size};
    m->scales[ns++] = (tn_file_meta){"group_size", m->group_size};
  }
}
