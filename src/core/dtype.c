#include "dtype.h"

const char *tn_dtype_name(tn_dtype dtype) {
  switch (dtype) {
    case TN_F32:
      return "f32";
    case TN_F16:
      return "f16";
    case TN_BF16:
      return "bf16";
  }
  return "?";
}

size_t tn_dtype_size(tn_dtype dtype) { return tn_elem_size(dtype); }
