/* What the two tensor-file fuzz targets share: a scratch directory of their own, the input written
 * into it, and the checks every load must pass, whatever the bytes. A broken check aborts, which is
 * how libFuzzer learns of it. */
#ifndef TN_FUZZ_COMMON_H
#define TN_FUZZ_COMMON_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tensor_file.h"

static char fz_dir[4096];

static void fz_cleanup(void) {
  static const char *const names[] = {"in.npy", "in.safetensors", "out.npy", "out.safetensors"};
  char p[4200];
  for (size_t k = 0; k < sizeof names / sizeof names[0]; k++) {
    snprintf(p, sizeof p, "%s/%s", fz_dir, names[k]);
    unlink(p);
  }
  rmdir(fz_dir);
}

/* The path of `name` in this process's scratch directory, made on first use. */
static const char *fz_path(const char *name, char *buf, size_t cap) {
  if (!fz_dir[0]) {
    const char *tmp = getenv("TMPDIR");
    snprintf(fz_dir, sizeof fz_dir, "%s/tnorm-fuzz-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(fz_dir)) abort();
    atexit(fz_cleanup);
  }
  snprintf(buf, cap, "%s/%s", fz_dir, name);
  return buf;
}

static void fz_write(const char *path, const uint8_t *data, size_t size) {
  FILE *f = fopen(path, "wb");
  if (!f || (size && fwrite(data, 1, size, f) != size) || fclose(f) != 0) abort();
}

static int fz_zeroed(const tn_file_tensor *t) {
  static const tn_file_tensor zero;
  return memcmp(t, &zero, sizeof *t) == 0;
}

/* Loads spec and checks the contract of tn_file_load: on failure a one-line message and a zeroed
 * tensor; on success a 1-D or 2-D tensor of a known dtype whose data is all there (ASan sees a short
 * buffer when every byte is read). Returns the load's result, the tensor left for the caller. */
static int fz_load(const char *spec, tn_file_tensor *t) {
  char err[512];
  volatile unsigned char sum = 0;
  int rc = tn_file_load(spec, t, err, sizeof err);
  if (rc != 0) {
    if (rc != -1 || !err[0] || strchr(err, '\n') || !fz_zeroed(t)) abort();
    return rc;
  }
  size_t es = tn_dtype_size(t->dtype);
  if (es == 0 || (t->ndim != 1 && t->ndim != 2) || (t->ndim == 1 && t->rows != 1) || t->rows < 0 || t->dim < 0)
    abort();
  size_t n = (size_t)t->rows * (size_t)t->dim * es;
  if ((n == 0) != (t->data == NULL)) abort();
  for (size_t k = 0; k < n; k++) sum ^= ((const unsigned char *)t->data)[k];
  (void)sum;
  return 0;
}

/* A loaded tensor written back and read again must be the same tensor. */
static void fz_round_trip(const tn_file_tensor *t, const char *out_spec) {
  char err[512];
  tn_file_tensor back;
  if (tn_file_save(out_spec, t, "w", err, sizeof err) != 0) abort();
  if (fz_load(out_spec, &back) != 0) abort();
  size_t n = (size_t)t->rows * (size_t)t->dim * tn_dtype_size(t->dtype);
  if (back.dtype != t->dtype || back.ndim != t->ndim || back.rows != t->rows || back.dim != t->dim ||
      (n && memcmp(back.data, t->data, n) != 0))
    abort();
  tn_file_tensor_free(&back);
}

#endif
