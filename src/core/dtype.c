#include "dtype.h"

const char *tn_dtype_name(tn_dtype dtype) {
  switch (dtype) {
    case TN_F32:
      return "f32";
    case TN_F16:
      return "f16";
    case TN_BF16:
      return "bf16";
    case TN_F8_E4M3:
      return "f8_e4m3";
    case TN_F8_E5M2:
      return "f8_e5m2";
    case TN_I8:
      return "i8";
    case TN_U8:
      return "u8";
  }
  return "?";
}

size_t tn_dtype_size(tn_dtype dtype) { return tn_elem_size(dtype); }
