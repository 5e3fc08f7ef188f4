/* Private to tensor_file.c, npy.c and safetensors.c: the per-format entry points and shared helpers. */
#ifndef TN_TOOLS_TENSOR_FILE_IMPL_H
#define TN_TOOLS_TENSOR_FILE_IMPL_H

#include <stdint.h>
#include <stdio.h>

#include "tensor_file.h"

#if defined(__GNUC__)
#define TN_TF_PRINTF(f, a) __attribute__((format(printf, f, a)))
#else
#define TN_TF_PRINTF(f, a)
#endif

/* Writes "PATH: message" into err as one line (control characters from hostile names become '?').
 * Always returns -1, so a failing path reads `return tn_tf_fail(...)`. */
int tn_tf_fail(char *err, size_t errlen, const char *path, const char *fmt, ...) TN_TF_PRINTF(4, 5);

/* Opens a regular file for reading and gives its size. */
int tn_tf_open(const char *path, FILE **f, uint64_t *size, char *err, size_t errlen);

/* 0 when exactly n bytes were read. */
int tn_tf_read_exact(FILE *f, void *buf, size_t n);

/* rows * dim * size of dtype, refusing anything that overflows int64 or size_t. */
int tn_tf_nbytes(int64_t rows, int64_t dim, tn_dtype dtype, uint64_t *nbytes);

/* Reads nbytes of tensor data at the current position into a fresh buffer (NULL when nbytes == 0). */
int tn_tf_read_data(FILE *f, const char *path, uint64_t nbytes, void **data, char *err, size_t errlen);

/* 0 when s[0, n) is valid UTF-8 as Rust's str::from_utf8 (and so the safetensors reference) takes it:
 * no overlong forms, no surrogates, nothing above U+10FFFF; else -1 with the offending byte's offset. */
int tn_tf_utf8_check(const unsigned char *s, size_t n, size_t *bad);

/* 1 on a little-endian host, where '=' in a .npy descr means '<'. */
int tn_tf_host_is_little_endian(void);

/* Per-format entry points. The writers share one signature so the atomic save can take either;
 * they get a tensor already checked (dtype fits the format, shape and byte size valid). */
/* allow_0d: a 0-d tensor loads as one element (tn_file_load_scalar); else it is refused. */
int tn_npy_load(const char *path, int allow_0d, tn_file_tensor *out, char *err, size_t errlen);
int tn_npy_write(FILE *f, const char *path, const tn_file_tensor *t, const char *name, char *err, size_t errlen);

int tn_st_load(const char *path, const char *name, int allow_0d, tn_file_tensor *out, char *err, size_t errlen);
int tn_st_write(FILE *f, const char *path, const tn_file_tensor *t, const char *name, char *err, size_t errlen);

#endif
