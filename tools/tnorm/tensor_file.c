/* Tensor files: the spec ("PATH.npy", "PATH.safetensors:NAME"), the dispatch to a format, the atomic
 * save, and the helpers the two formats share. */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L /* mkstemp, fchmod, fsync, fileno, strnlen */
#endif

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tensor_file_impl.h"

enum { TF_NPY = 1, TF_SAFETENSORS = 2 };

static const char ST_SPLIT[] = ".safetensors:";

typedef struct tf_spec {
  int kind;
  char *path;       /* malloc'd */
  const char *name; /* points into the spec; NULL when the spec names no tensor */
} tf_spec;

typedef int (*tf_writer)(FILE *f, const char *path, const tn_file_tensor *t, const char *name, char *err,
                         size_t errlen);

/* ------------------------------------------------------------------------------------------------ */
/* Shared helpers                                                                                   */
/* ------------------------------------------------------------------------------------------------ */

int tn_tf_fail(char *err, size_t errlen, const char *path, const char *fmt, ...) {
  va_list ap;
  size_t used = 0;
  if (!err || errlen == 0) return -1;
  err[0] = '\0';
  if (path && *path) {
    int n = snprintf(err, errlen, "%s: ", path);
    used = n < 0 ? 0 : (size_t)n < errlen ? (size_t)n : errlen - 1;
  }
  va_start(ap, fmt);
  vsnprintf(err + used, errlen - used, fmt, ap);
  va_end(ap);
  /* Paths and tensor names come from users and hostile files; the message must stay one line. */
  for (char *p = err; *p; p++)
    if ((unsigned char)*p < 0x20 || *p == 0x7f) *p = '?';
  return -1;
}

int tn_tf_open(const char *path, FILE **f, uint64_t *size, char *err, size_t errlen) {
  struct stat st;
  *f = fopen(path, "rb");
  if (!*f) return tn_tf_fail(err, errlen, path, "cannot open: %s", strerror(errno));
  if (fstat(fileno(*f), &st) != 0) {
    int e = errno;
    fclose(*f);
    return tn_tf_fail(err, errlen, path, "cannot stat: %s", strerror(e));
  }
  /* The size bounds every allocation; devices, pipes and directories have no trustworthy size. */
  if (!S_ISREG(st.st_mode) || st.st_size < 0) {
    fclose(*f);
    return tn_tf_fail(err, errlen, path, "not a regular file");
  }
  *size = (uint64_t)st.st_size;
  return 0;
}

int tn_tf_read_exact(FILE *f, void *buf, size_t n) { return fread(buf, 1, n, f) == n ? 0 : -1; }

int tn_tf_nbytes(int64_t rows, int64_t dim, tn_dtype dtype, uint64_t *nbytes) {
  uint64_t es = tn_dtype_size(dtype), n;
  if (rows < 0 || dim < 0 || es == 0) return -1;
  /* The element count must fit the library's int64 index arithmetic, the byte count a size_t. */
  if (dim != 0 && (uint64_t)rows > (uint64_t)INT64_MAX / (uint64_t)dim) return -1;
  n = (uint64_t)rows * (uint64_t)dim;
  if (n > (uint64_t)INT64_MAX / es) return -1;
  n *= es;
#if SIZE_MAX < UINT64_MAX
  if (n > SIZE_MAX) return -1;
#endif
  *nbytes = n;
  return 0;
}

int tn_tf_read_data(FILE *f, const char *path, uint64_t nbytes, void **data, char *err, size_t errlen) {
  void *buf;
  *data = NULL;
  if (nbytes == 0) return 0;
  buf = malloc((size_t)nbytes);
  if (!buf) return tn_tf_fail(err, errlen, path, "out of memory reading %" PRIu64 " bytes of data", nbytes);
  if (tn_tf_read_exact(f, buf, (size_t)nbytes) != 0) {
    free(buf);
    return tn_tf_fail(err, errlen, path, "cannot read %" PRIu64 " bytes of data (file changed or unreadable)",
                      nbytes);
  }
  *data = buf;
  return 0;
}

int tn_tf_host_is_little_endian(void) {
  const uint16_t one = 1;
  unsigned char first;
  memcpy(&first, &one, 1);
  return first == 1;
}

/* ------------------------------------------------------------------------------------------------ */
/* Specs                                                                                            */
/* ------------------------------------------------------------------------------------------------ */

static int ends_with(const char *s, size_t len, const char *suffix) {
  size_t n = strlen(suffix);
  return len >= n && memcmp(s + len - n, suffix, n) == 0;
}

static int check_name(const char *path, const char *name, char *err, size_t errlen) {
  size_t n;
  if (!name || !*name) return tn_tf_fail(err, errlen, path, "no tensor name (write PATH.safetensors:NAME)");
  n = strnlen(name, sizeof((tn_file_tensor *)0)->name);
  if (n >= sizeof((tn_file_tensor *)0)->name)
    return tn_tf_fail(err, errlen, path, "tensor name is longer than 255 bytes");
  /* The header's "__metadata__" key is not a tensor; naming one so would corrupt the file. */
  if (strcmp(name, "__metadata__") == 0)
    return tn_tf_fail(err, errlen, path, "'__metadata__' is reserved and names no tensor");
  return 0;
}

/* The path ends at the first ".safetensors:", so only the tensor name may contain that text. */
static int parse_spec(const char *spec, tf_spec *s, char *err, size_t errlen) {
  const char *split;
  size_t len, pathlen;
  memset(s, 0, sizeof *s);
  if (!spec || !*spec) return tn_tf_fail(err, errlen, NULL, "empty tensor file name");
  len = strlen(spec);
  split = strstr(spec, ST_SPLIT);
  if (split) {
    s->kind = TF_SAFETENSORS;
    pathlen = (size_t)(split - spec) + sizeof ST_SPLIT - 2;
    s->name = split + sizeof ST_SPLIT - 1;
  } else if (ends_with(spec, len, ".safetensors") || ends_with(spec, len, ".npy")) {
    s->kind = ends_with(spec, len, ".npy") ? TF_NPY : TF_SAFETENSORS;
    pathlen = len;
  } else {
    return tn_tf_fail(err, errlen, spec,
                      "unknown tensor file type (expected PATH.npy or PATH.safetensors:TENSOR)");
  }
  s->path = malloc(pathlen + 1);
  if (!s->path) return tn_tf_fail(err, errlen, spec, "out of memory");
  memcpy(s->path, spec, pathlen);
  s->path[pathlen] = '\0';
  if (s->name && check_name(s->path, s->name, err, errlen) != 0) {
    free(s->path);
    s->path = NULL;
    return -1;
  }
  return 0;
}

static int check_dtype(const tf_spec *s, tn_dtype dtype, char *err, size_t errlen) {
  if (tn_dtype_size(dtype) == 0) return tn_tf_fail(err, errlen, s->path, "unknown dtype %d", (int)dtype);
  if (s->kind == TF_NPY && dtype != TN_F32 && dtype != TN_F16)
    return tn_tf_fail(err, errlen, s->path, ".npy cannot hold %s (numpy has no bfloat16); save it as .safetensors",
                      tn_dtype_name(dtype));
  return 0;
}

static int check_tensor(const char *path, const tn_file_tensor *t, char *err, size_t errlen) {
  uint64_t nbytes;
  if (t->ndim != 1 && t->ndim != 2)
    return tn_tf_fail(err, errlen, path, "cannot save a %d-D tensor (only 1-D and 2-D)", t->ndim);
  if (t->ndim == 1 && t->rows != 1)
    return tn_tf_fail(err, errlen, path, "a 1-D tensor must have rows == 1, not %" PRId64, t->rows);
  if (tn_tf_nbytes(t->rows, t->dim, t->dtype, &nbytes) != 0)
    return tn_tf_fail(err, errlen, path, "invalid tensor size %" PRId64 " x %" PRId64, t->rows, t->dim);
  if (nbytes != 0 && !t->data) return tn_tf_fail(err, errlen, path, "tensor data is NULL");
  return 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* Atomic save                                                                                      */
/* ------------------------------------------------------------------------------------------------ */

/* mkstemp creates the file 0600; a saved tensor should get the permissions of any file the user
 * creates. umask() can only be read by setting it, so it is set back at once. */
static mode_t current_umask(void) {
  mode_t m = umask(022);
  umask(m);
  return m;
}

/* The temporary lives in the target's directory so that rename() is atomic (same filesystem). */
static char *temp_template(const char *path) {
  static const char base[] = ".tnorm-tmp-XXXXXX";
  const char *slash = strrchr(path, '/');
  size_t dirlen = slash ? (size_t)(slash - path) + 1 : 0;
  char *tmpl = malloc(dirlen + sizeof base);
  if (!tmpl) return NULL;
  memcpy(tmpl, path, dirlen);
  memcpy(tmpl + dirlen, base, sizeof base);
  return tmpl;
}

/* Writes the whole file through fd and closes it; the data is on disk when it returns 0. */
static int write_temp(int fd, const char *path, tf_writer writer, const tn_file_tensor *t, const char *name,
                      char *err, size_t errlen) {
  FILE *f;
  int rc;
  if (fchmod(fd, 0666 & ~current_umask()) != 0) {
    /* Not fatal: a 0600 file still holds the right bytes. */
  }
  f = fdopen(fd, "wb");
  if (!f) {
    int e = errno;
    close(fd);
    return tn_tf_fail(err, errlen, path, "cannot write: %s", strerror(e));
  }
  rc = writer(f, path, t, name, err, errlen);
  if (rc == 0 && (fflush(f) != 0 || ferror(f) || fsync(fileno(f)) != 0))
    rc = tn_tf_fail(err, errlen, path, "write failed: %s", strerror(errno));
  if (fclose(f) != 0 && rc == 0) rc = tn_tf_fail(err, errlen, path, "write failed: %s", strerror(errno));
  return rc;
}

static int save_atomic(const char *path, tf_writer writer, const tn_file_tensor *t, const char *name, char *err,
                       size_t errlen) {
  char *tmp = temp_template(path);
  int fd, rc;
  if (!tmp) return tn_tf_fail(err, errlen, path, "out of memory");
  fd = mkstemp(tmp);
  if (fd < 0) {
    rc = tn_tf_fail(err, errlen, path, "cannot create a temporary file in its directory: %s", strerror(errno));
    free(tmp);
    return rc;
  }
  rc = write_temp(fd, path, writer, t, name, err, errlen);
  if (rc == 0 && rename(tmp, path) != 0)
    rc = tn_tf_fail(err, errlen, path, "cannot replace it with the written file: %s", strerror(errno));
  if (rc != 0) unlink(tmp);
  free(tmp);
  return rc;
}

/* ------------------------------------------------------------------------------------------------ */
/* Public API                                                                                       */
/* ------------------------------------------------------------------------------------------------ */

int tn_file_load(const char *spec, tn_file_tensor *out, char *err, size_t errlen) {
  tf_spec s;
  int rc;
  if (err && errlen) err[0] = '\0';
  if (!out) return tn_tf_fail(err, errlen, spec, "no tensor to load into");
  memset(out, 0, sizeof *out);
  if (parse_spec(spec, &s, err, errlen) != 0) return -1;
  if (s.kind == TF_NPY)
    rc = tn_npy_load(s.path, out, err, errlen);
  else if (!s.name)
    rc = tn_tf_fail(err, errlen, s.path, "name the tensor to load, as %s:TENSOR", s.path);
  else
    rc = tn_st_load(s.path, s.name, out, err, errlen);
  free(s.path);
  if (rc != 0) tn_file_tensor_free(out);
  return rc;
}

int tn_file_check_save(const char *spec, tn_dtype dtype, char *err, size_t errlen) {
  tf_spec s;
  int rc;
  if (err && errlen) err[0] = '\0';
  if (parse_spec(spec, &s, err, errlen) != 0) return -1;
  rc = check_dtype(&s, dtype, err, errlen);
  free(s.path);
  return rc;
}

int tn_file_check_directory(const char *spec, char *err, size_t errlen) {
  tf_spec s;
  if (err && errlen) err[0] = '\0';
  if (parse_spec(spec, &s, err, errlen) != 0) return -1;
  const char *slash = strrchr(s.path, '/');
  int ok;
  if (slash == NULL) {
    ok = access(".", W_OK | X_OK) == 0;
  } else if (slash == s.path) {
    ok = access("/", W_OK | X_OK) == 0;
  } else {
    s.path[slash - s.path] = '\0'; /* the directory part */
    ok = access(s.path, W_OK | X_OK) == 0;
  }
  free(s.path);
  return ok ? 0 : tn_tf_fail(err, errlen, spec, "cannot write into its directory");
}

static const char *save_name(const tf_spec *s, const tn_file_tensor *t, const char *default_name) {
  if (s->name) return s->name;
  if (default_name && *default_name) return default_name;
  return t->name[0] && memchr(t->name, '\0', sizeof t->name) ? t->name : NULL;
}

int tn_file_save(const char *spec, const tn_file_tensor *t, const char *default_name, char *err, size_t errlen) {
  tf_spec s;
  const char *name;
  int rc;
  if (err && errlen) err[0] = '\0';
  if (parse_spec(spec, &s, err, errlen) != 0) return -1;
  if (!t) {
    rc = tn_tf_fail(err, errlen, s.path, "no tensor to save");
  } else {
    name = save_name(&s, t, default_name);
    rc = check_dtype(&s, t->dtype, err, errlen);
    if (rc == 0) rc = check_tensor(s.path, t, err, errlen);
    if (rc == 0 && s.kind == TF_SAFETENSORS) rc = check_name(s.path, name, err, errlen);
    if (rc == 0) rc = save_atomic(s.path, s.kind == TF_NPY ? tn_npy_write : tn_st_write, t, name, err, errlen);
  }
  free(s.path);
  return rc;
}

void tn_file_tensor_free(tn_file_tensor *t) {
  if (!t) return;
  free(t->data);
  memset(t, 0, sizeof *t);
}
