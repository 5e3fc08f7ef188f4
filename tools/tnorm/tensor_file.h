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

/* One entry of a safetensors header's "__metadata__" (both strings; neither is owned). */
typedef struct tn_file_meta {
  const char *key, *value;
} tn_file_meta;

#define TN_FILE_MAX_META 4

typedef struct tn_file_tensor {
  tn_dtype dtype; /* any tn_dtype; .npy holds f32, f16, i8 and u8 only */
  int ndim;       /* 1 or 2 */
  int64_t rows;   /* 1-D: 1 */
  int64_t dim;    /* 1-D: the length; 2-D: the second extent */
  void *data;     /* malloc'd, rows*dim contiguous little-endian elements (NULL when rows*dim == 0) */
  char name[256]; /* tensor name for safetensors, "" for npy */
  /* What a save writes into a safetensors header's "__metadata__" (what the bytes of a packed or
   * quantized tensor mean); entries from the first NULL key on are unused. .npy has no place for it.
   * Loads leave it empty. */
  tn_file_meta meta[TN_FILE_MAX_META];
} tn_file_tensor;

/* spec: "PATH.npy" or "PATH.safetensors:TENSOR". Returns 0, or -1 with a one-line message in err
 * (no trailing newline, it names the file and the problem, e.g.
 * "x.npy: header says 4096 bytes of data, file has 100"). On failure *out is left zeroed.
 * The path ends at the first ".safetensors:", so a tensor name may itself contain ':'. */
int tn_file_load(const char *spec, tn_file_tensor *out, char *err, size_t errlen);

/* tn_file_load that also takes a 0-d tensor (shape ()), as a 1-D tensor of one element: checkpoints
 * store quantization scales so. */
int tn_file_load_scalar(const char *spec, tn_file_tensor *out, char *err, size_t errlen);

/* spec: "PATH.npy" (f32, f16, i8 and u8 only) or "PATH.safetensors" or "PATH.safetensors:NAME" (name defaults to
 * default_name). Checks only whether the format can hold the dtype and the spec is well formed;
 * touches no file. */
int tn_file_check_save(const char *spec, tn_dtype dtype, char *err, size_t errlen);
/* Whether the directory that spec's file would be written into exists and is writable, and the file
 * itself is not a directory (which no save could replace); touches no file. */
int tn_file_check_directory(const char *spec, char *err, size_t errlen);

/* 1 when the two specs would write one file, so that saving both would lose the first: the same
 * device and inode where the file exists (hard links and symbolic links included), else the same
 * resolved directory and file name; also when both name tensors of one .safetensors file, which a
 * save writes whole. err then says which. 0 when they are different files, -1 for a malformed spec. */
int tn_file_same_target(const char *spec_a, const char *spec_b, char *err, size_t errlen);

/* Writes atomically: a temporary file in the same directory (mkstemp), fully written and flushed, then
 * rename() over the target; on any failure the temporary is removed and an existing target is left
 * untouched. A safetensors tensor is named by the spec, else default_name, else t->name.
 * The same as tn_file_prepare followed by tn_file_commit of that one save. */
int tn_file_save(const char *spec, const tn_file_tensor *t, const char *default_name, char *err, size_t errlen);

/* Several outputs saved all or nothing. tn_file_prepare writes each in full to a temporary file beside
 * its target; tn_file_commit then renames them all into place, and when one cannot be, puts every
 * target already replaced back as it was (its previous file, or no file). A pending save holds a
 * temporary file until it is committed or discarded. At most TN_FILE_MAX_PENDING saves are pending
 * at once in a process; a zeroed tn_file_pending is "nothing pending". */
#define TN_FILE_MAX_PENDING 8

typedef struct tn_file_pending {
  int id; /* 0: nothing pending; otherwise private to tensor_file.c */
} tn_file_pending;

/* The checks and the write of tn_file_save, up to the rename. On failure nothing is left and *p is
 * zeroed. */
int tn_file_prepare(const char *spec, const tn_file_tensor *t, const char *default_name, tn_file_pending *p,
                    char *err, size_t errlen);

/* Commits count prepared saves. On failure no target has changed (unless putting one back failed too,
 * which err then names with where its previous file was kept), and *failed, when not NULL, is the
 * index of the save that failed (count when none in particular). Either way nothing is pending after
 * it returns and every p[i] is zeroed. Targets that are one file (tn_file_same_target) are refused. */
int tn_file_commit(tn_file_pending *p, size_t count, size_t *failed, char *err, size_t errlen);

/* Removes a pending save's temporary file; a zeroed or already committed *p is left alone. */
void tn_file_discard(tn_file_pending *p);

/* For a handler of fatal signals: removes the temporary files of every pending save and undoes a
 * commit that has not completed, with async-signal-safe calls only. The process must not go on
 * saving afterwards: it is meant to be followed by the signal's default action. */
void tn_file_remove_pending(void);

/* Frees data; NULL-safe; leaves the struct zeroed. */
void tn_file_tensor_free(tn_file_tensor *t);

#ifdef __cplusplus
}
#endif

#endif
