/* Tensor files of the tnorm command: NumPy .npy and safetensors, read and written.
 * Every function here treats files as hostile: it never aborts, exits or prints, and on failure it
 * returns -1 with a one-line message naming the file and the problem. */
#ifndef TN_TOOLS_TENSOR_FILE_H
#define TN_TOOLS_TENSOR_FILE_H

#include <stddef.h>
#include <stdint.h>

#include "tnorm.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tn_file_tensor {
  tn_dtype dtype; /* TN_F32, TN_F16 or TN_BF16 */
  int ndim;       /* 1 or 2 */
  int64_t rows;   /* 1-D: 1 */
  int64_t dim;    /* 1-D: the length; 2-D: the second extent */
  void *data;     /* malloc'd, rows*dim contiguous little-endian elements (NULL when rows*dim == 0) */
  char name[256]; /* tensor name for safetensors, "" for npy */
} tn_file_tensor;

/* spec: "PATH.npy" or "PATH.safetensors:TENSOR". Returns 0, or -1 with a one-line message in err
 * (no trailing newline, it names the file and the problem, e.g.
 * "x.npy: header says 4096 bytes of data, file has 100"). On failure *out is left zeroed.
 * The path ends at the first ".safetensors:", so a tensor name may itself contain ':'. */
int tn_file_load(const char *spec, tn_file_tensor *out, char *err, size_t errlen);

/* spec: "PATH.npy" (f32/f16 only) or "PATH.safetensors" or "PATH.safetensors:NAME" (name defaults to
 * default_name). Checks only whether the format can hold the dtype and the spec is well formed;
 * touches no file. */
int tn_file_check_save(const char *spec, tn_dtype dtype, char *err, size_t errlen);
/* Whether the directory that spec's file would be written into exists and is writable; touches no file. */
int tn_file_check_directory(const char *spec, char *err, size_t errlen);

/* Writes atomically: a temporary file in the same directory (mkstemp), fully written and flushed, then
 * rename() over the target; on any failure the temporary is removed and an existing target is left
 * untouched. A safetensors tensor is named by the spec, else default_name, else t->name. */
int tn_file_save(const char *spec, const tn_file_tensor *t, const char *default_name, char *err, size_t errlen);

/* Frees data; NULL-safe; leaves the struct zeroed. */
void tn_file_tensor_free(tn_file_tensor *t);

#ifdef __cplusplus
}
#endif

#endif
