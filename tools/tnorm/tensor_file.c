/* Tensor files: the spec ("PATH.npy", "PATH.safetensors:NAME"), the dispatch to a format, the atomic
 * save, and the helpers the two formats share. */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L /* mkstemp, fchmod, fsync, fileno, strnlen, linkat */
#endif
#ifndef _XOPEN_SOURCE
#define _XOPEN_SOURCE 700 /* realpath */
#endif

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdatomic.h>
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
  int fd, flags;
  *f = NULL;
  /* O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer, forever. */
  fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) {
    int e = errno;
    /* A socket cannot be opened at all; say what it is rather than ENXIO's "no such device". */
    if (stat(path, &st) == 0 && !S_ISREG(st.st_mode)) return tn_tf_fail(err, errlen, path, "not a regular file");
    return tn_tf_fail(err, errlen, path, "cannot open: %s", strerror(e));
  }
  if (fstat(fd, &st) != 0) {
    int e = errno;
    close(fd);
    return tn_tf_fail(err, errlen, path, "cannot stat: %s", strerror(e));
  }
  /* The size bounds every allocation; devices, pipes and directories have no trustworthy size. */
  if (!S_ISREG(st.st_mode) || st.st_size < 0) {
    close(fd);
    return tn_tf_fail(err, errlen, path, "not a regular file");
  }
  flags = fcntl(fd, F_GETFL);
  if (flags == -1 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) == -1 || !(*f = fdopen(fd, "rb"))) {
    int e = errno;
    close(fd);
    return tn_tf_fail(err, errlen, path, "cannot open: %s", strerror(e));
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

int tn_tf_utf8_check(const unsigned char *s, size_t n, size_t *bad) {
  size_t i = 0;
  while (i < n) {
    unsigned c = s[i];
    size_t len, k;
    unsigned lo = 0x80, hi = 0xbf;
    if (c < 0x80) {
      /* ASCII eight bytes at a time: most headers are nothing else. */
      uint64_t w;
      while (n - i >= 8 && (memcpy(&w, s + i, 8), (w & 0x8080808080808080u) == 0)) i += 8;
      while (i < n && s[i] < 0x80) i++;
      continue;
    }
    if (c >= 0xc2 && c <= 0xdf) {
      len = 2;
    } else if (c >= 0xe0 && c <= 0xef) {
      len = 3;
      if (c == 0xe0) lo = 0xa0;
      if (c == 0xed) hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
      len = 4;
      if (c == 0xf0) lo = 0x90;
      if (c == 0xf4) hi = 0x8f;
    } else {
      *bad = i;
      return -1;
    }
    if (n - i < len || s[i + 1] < lo || s[i + 1] > hi) {
      *bad = i;
      return -1;
    }
    for (k = 2; k < len; k++)
      if ((s[i + k] & 0xc0) != 0x80) {
        *bad = i;
        return -1;
      }
    i += len;
  }
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
  size_t n, bad;
  if (!name || !*name) return tn_tf_fail(err, errlen, path, "no tensor name (write PATH.safetensors:NAME)");
  n = strnlen(name, sizeof((tn_file_tensor *)0)->name);
  if (n >= sizeof((tn_file_tensor *)0)->name)
    return tn_tf_fail(err, errlen, path, "tensor name is longer than 255 bytes");
  /* A safetensors header is UTF-8: refused here, before anything is computed, rather than at the write. */
  if (tn_tf_utf8_check((const unsigned char *)name, n, &bad) != 0)
    return tn_tf_fail(err, errlen, path, "tensor name is not valid UTF-8 (at byte %zu)", bad);
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

/* numpy has no bfloat16 and no FP8 dtype of its own (ml_dtypes' FP8 arrays are saved as opaque void
 * bytes, '|V1', which no reader can tell apart), so those go to .safetensors, which names them. */
static int check_dtype(const tf_spec *s, tn_dtype dtype, char *err, size_t errlen) {
  if (tn_dtype_size(dtype) == 0) return tn_tf_fail(err, errlen, s->path, "unknown dtype %d", (int)dtype);
  if (s->kind == TF_NPY && dtype == TN_BF16)
    return tn_tf_fail(err, errlen, s->path, ".npy cannot hold bf16 (numpy has no bfloat16); save it as .safetensors");
  if (s->kind == TF_NPY && (dtype == TN_F8_E4M3 || dtype == TN_F8_E5M2))
    return tn_tf_fail(err, errlen, s->path, ".npy cannot hold %s (numpy has no FP8 dtype); save it as .safetensors",
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

/* Every pending save has an entry in a fixed table, so that a signal handler can find its files
 * without allocating or locking: the target, the temporary written beside it, and during a commit
 * the name that keeps the target's previous file until the commit is complete. A path that does not
 * fit TF_PATH_MAX would be refused by the system calls anyway. */
enum { TF_PATH_MAX = 4096 };

enum {
  SLOT_FREE,
  SLOT_CLAIMED,    /* being filled in; no file yet */
  SLOT_TEMP,       /* a prepared save: tmp may exist */
  SLOT_COMMITTING, /* in a commit that may not have completed */
  SLOT_COMMITTED   /* in a completed commit; only the backup is left to remove */
};

/* What the backup name may be at this moment; a handler must know to remove or use it. */
enum {
  BACKUP_NONE,
  BACKUP_RESERVING, /* an empty file that only reserves the name */
  BACKUP_LINKING,   /* a second name of the target, when linkat has done its work */
  BACKUP_KEPT       /* the target's previous file */
};

typedef struct tf_slot {
  _Atomic int state;        /* SLOT_* */
  _Atomic int backup_state; /* BACKUP_* */
  int had_target;           /* the target existed when the commit began */
  int move_aside;           /* no hard links there: the previous file is renamed to backup at commit */
  int last;                 /* in a commit: the entry whose rename completes it */
  char target[TF_PATH_MAX], tmp[TF_PATH_MAX], backup[TF_PATH_MAX];
} tf_slot;

static tf_slot slots[TN_FILE_MAX_PENDING];

static tf_slot *claim_slot(void) {
  for (int i = 0; i < TN_FILE_MAX_PENDING; i++) {
    int expected = SLOT_FREE;
    if (atomic_compare_exchange_strong(&slots[i].state, &expected, SLOT_CLAIMED)) {
      atomic_store(&slots[i].backup_state, BACKUP_NONE);
      slots[i].had_target = slots[i].move_aside = 0;
      slots[i].last = i;
      return &slots[i];
    }
  }
  return NULL;
}

static void release_slot(tf_slot *sl) { atomic_store(&sl->state, SLOT_FREE); }

/* The entry of a prepared save, or NULL when p holds none. */
static tf_slot *pending_slot(const tn_file_pending *p) {
  if (!p || p->id < 1 || p->id > TN_FILE_MAX_PENDING) return NULL;
  return atomic_load(&slots[p->id - 1].state) == SLOT_TEMP ? &slots[p->id - 1] : NULL;
}

/* A name beside path (in the same directory, so that rename() is atomic: one filesystem) made of base,
 * a mkstemp template. */
static int beside(const char *path, const char *base, char *out) {
  const char *slash = strrchr(path, '/');
  size_t dirlen = slash ? (size_t)(slash - path) + 1 : 0, baselen = strlen(base);
  if (dirlen + baselen >= TF_PATH_MAX) return -1;
  memcpy(out, path, dirlen);
  memcpy(out + dirlen, base, baselen + 1);
  return 0;
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

static int write_pending(const char *path, tf_writer writer, const tn_file_tensor *t, const char *name,
                         tn_file_pending *p, char *err, size_t errlen) {
  tf_slot *sl;
  size_t len = strlen(path);
  int fd, rc;
  if (len >= TF_PATH_MAX) return tn_tf_fail(err, errlen, path, "file name too long");
  sl = claim_slot();
  if (!sl) return tn_tf_fail(err, errlen, path, "more than %d saves pending at once", TN_FILE_MAX_PENDING);
  memcpy(sl->target, path, len + 1);
  if (beside(path, ".tnorm-tmp-XXXXXX", sl->tmp) != 0) {
    release_slot(sl);
    return tn_tf_fail(err, errlen, path, "file name too long");
  }
  /* Recorded before mkstemp creates the file, so that there is no moment a signal could leave it. */
  atomic_store(&sl->state, SLOT_TEMP);
  fd = mkstemp(sl->tmp);
  if (fd < 0) {
    rc = tn_tf_fail(err, errlen, path, "cannot create a temporary file in its directory: %s", strerror(errno));
    release_slot(sl);
    return rc;
  }
  rc = write_temp(fd, path, writer, t, name, err, errlen);
  if (rc != 0) {
    unlink(sl->tmp);
    release_slot(sl);
    return rc;
  }
  p->id = (int)(sl - slots) + 1;
  return 0;
}

/* The directory a file of path lives in ("." or "/" where path names none), malloc'd, or NULL. */
static char *directory_of(const char *path) {
  const char *slash = strrchr(path, '/');
  size_t len = slash == NULL ? 0 : slash == path ? 1 : (size_t)(slash - path);
  char *dir = malloc(len + 2);
  if (!dir) return NULL;
  if (slash == NULL) memcpy(dir, ".", 2);
  else {
    memcpy(dir, path, len);
    dir[len] = '\0';
  }
  return dir;
}

/* The directory part of path, resolved to an absolute path free of symbolic links (malloc'd), or NULL. */
static char *resolved_directory(const char *path) {
  char *dir = directory_of(path), *real = dir ? realpath(dir, NULL) : NULL;
  free(dir);
  return real;
}

/* Whether two paths are one file: its device and inode when both exist, which sees through hard and
 * symbolic links; otherwise one directory entry, the same name in the same resolved directory. */
static int same_path(const char *a, const char *b) {
  struct stat sa, sb;
  char *da, *db;
  int same;
  if (stat(a, &sa) == 0 && stat(b, &sb) == 0) return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
  da = resolved_directory(a);
  db = resolved_directory(b);
  if (da && db) {
    const char *na = strrchr(a, '/'), *nb = strrchr(b, '/');
    same = strcmp(da, db) == 0 && strcmp(na ? na + 1 : a, nb ? nb + 1 : b) == 0;
  } else {
    same = strcmp(a, b) == 0; /* a directory that does not resolve fails the save anyway */
  }
  free(da);
  free(db);
  return same;
}

/* Keeps the target's previous file under a fresh name beside it until the commit completes, so that
 * a failed commit can rename it back: a hard link, or where the filesystem has none, the file itself,
 * moved aside just before it is replaced. */
static int keep_aside(tf_slot *sl, char *err, size_t errlen) {
  for (int attempt = 0; attempt < 100; attempt++) {
    int fd;
    if (beside(sl->target, ".tnorm-old-XXXXXX", sl->backup) != 0)
      return tn_tf_fail(err, errlen, sl->target, "file name too long");
    /* mkstemp finds a free name; linkat needs it free, so a name taken again meanwhile is tried anew. */
    atomic_store(&sl->backup_state, BACKUP_RESERVING);
    fd = mkstemp(sl->backup);
    if (fd < 0) {
      atomic_store(&sl->backup_state, BACKUP_NONE);
      return tn_tf_fail(err, errlen, sl->target, "cannot create a file in its directory: %s", strerror(errno));
    }
    close(fd);
    unlink(sl->backup);
    atomic_store(&sl->backup_state, BACKUP_LINKING);
    if (linkat(AT_FDCWD, sl->target, AT_FDCWD, sl->backup, 0) == 0) {
      atomic_store(&sl->backup_state, BACKUP_KEPT);
      return 0;
    }
    atomic_store(&sl->backup_state, BACKUP_NONE);
    if (errno == EEXIST) continue;
    if (errno == EPERM || errno == EMLINK || errno == ENOTSUP || errno == EOPNOTSUPP || errno == ENOSYS) {
      sl->move_aside = 1;
      return 0;
    }
    return tn_tf_fail(err, errlen, sl->target, "cannot keep its previous file while replacing it: %s",
                      strerror(errno));
  }
  return tn_tf_fail(err, errlen, sl->target, "cannot find a free name beside it");
}

static int same_inode(const char *a, const char *b) {
  struct stat sa, sb;
  return lstat(a, &sa) == 0 && lstat(b, &sb) == 0 && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

/* Removes the name that kept, or was about to keep, the target's previous file. Async-signal-safe. */
static void drop_backup(tf_slot *sl) {
  int b = atomic_load(&sl->backup_state);
  /* While linking, the name is ours only once it names the target: it may be another's file. */
  if (b == BACKUP_RESERVING || b == BACKUP_KEPT || (b == BACKUP_LINKING && same_inode(sl->backup, sl->target)))
    unlink(sl->backup);
  atomic_store(&sl->backup_state, BACKUP_NONE);
}

/* Puts an entry's target back as it was before its commit began, whether or not its rename has
 * happened, and removes its temporary. Only async-signal-safe calls, so that a signal handler can run
 * it. -1 when the previous file could not be renamed back: it stays under the backup name. */
static int undo_slot(tf_slot *sl) {
  unlink(sl->tmp);
  if (atomic_load(&sl->backup_state) == BACKUP_KEPT) {
    /* With a hard link and the target not yet replaced, both names are one file: rename() then does
     * nothing, and drop_backup() removes the extra name. */
    if (rename(sl->backup, sl->target) != 0 && errno != ENOENT) return -1;
  } else if (!sl->had_target) {
    unlink(sl->target);
  }
  drop_backup(sl);
  return 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* Public API                                                                                       */
/* ------------------------------------------------------------------------------------------------ */

static int load(const char *spec, int allow_0d, tn_file_tensor *out, char *err, size_t errlen) {
  tf_spec s;
  int rc;
  if (err && errlen) err[0] = '\0';
  if (!out) return tn_tf_fail(err, errlen, spec, "no tensor to load into");
  memset(out, 0, sizeof *out);
  if (parse_spec(spec, &s, err, errlen) != 0) return -1;
  if (s.kind == TF_NPY)
    rc = tn_npy_load(s.path, allow_0d, out, err, errlen);
  else if (!s.name)
    rc = tn_tf_fail(err, errlen, s.path, "name the tensor to load, as %s:TENSOR", s.path);
  else
    rc = tn_st_load(s.path, s.name, allow_0d, out, err, errlen);
  free(s.path);
  if (rc != 0) tn_file_tensor_free(out);
  return rc;
}

int tn_file_load(const char *spec, tn_file_tensor *out, char *err, size_t errlen) {
  return load(spec, 0, out, err, errlen);
}

int tn_file_load_scalar(const char *spec, tn_file_tensor *out, char *err, size_t errlen) {
  return load(spec, 1, out, err, errlen);
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
  struct stat st;
  if (err && errlen) err[0] = '\0';
  if (parse_spec(spec, &s, err, errlen) != 0) return -1;
  /* rename() replaces a file or a symbolic link, never a directory: refused before any work is done. */
  int is_dir = lstat(s.path, &st) == 0 && S_ISDIR(st.st_mode);
  char *dir = directory_of(s.path);
  int ok = dir != NULL && access(dir, W_OK | X_OK) == 0;
  free(dir);
  free(s.path);
  if (!ok) return tn_tf_fail(err, errlen, spec, "cannot write into its directory");
  return is_dir ? tn_tf_fail(err, errlen, spec, "is a directory") : 0;
}

int tn_file_same_target(const char *spec_a, const char *spec_b, char *err, size_t errlen) {
  tf_spec a, b;
  int same;
  if (err && errlen) err[0] = '\0';
  if (parse_spec(spec_a, &a, err, errlen) != 0) return -1;
  if (parse_spec(spec_b, &b, err, errlen) != 0) {
    free(a.path);
    return -1;
  }
  same = same_path(a.path, b.path);
  if (same && a.kind == TF_SAFETENSORS && b.kind == TF_SAFETENSORS)
    tn_tf_fail(err, errlen, NULL,
               "%s and %s are the same file; a save writes a .safetensors file whole, with one tensor, "
               "so save the two tensors to two files",
               a.path, b.path);
  else if (same)
    tn_tf_fail(err, errlen, NULL, "%s and %s are the same file", a.path, b.path);
  free(a.path);
  free(b.path);
  return same;
}

static const char *save_name(const tf_spec *s, const tn_file_tensor *t, const char *default_name) {
  if (s->name) return s->name;
  if (default_name && *default_name) return default_name;
  return t->name[0] && memchr(t->name, '\0', sizeof t->name) ? t->name : NULL;
}

int tn_file_prepare(const char *spec, const tn_file_tensor *t, const char *default_name, tn_file_pending *p,
                    char *err, size_t errlen) {
  tf_spec s;
  const char *name;
  int rc;
  if (err && errlen) err[0] = '\0';
  if (!p) return tn_tf_fail(err, errlen, spec, "nowhere to record the save");
  p->id = 0;
  if (parse_spec(spec, &s, err, errlen) != 0) return -1;
  if (!t) {
    rc = tn_tf_fail(err, errlen, s.path, "no tensor to save");
  } else {
    name = save_name(&s, t, default_name);
    rc = check_dtype(&s, t->dtype, err, errlen);
    if (rc == 0) rc = check_tensor(s.path, t, err, errlen);
    if (rc == 0 && s.kind == TF_SAFETENSORS) rc = check_name(s.path, name, err, errlen);
    if (rc == 0)
      rc = write_pending(s.path, s.kind == TF_NPY ? tn_npy_write : tn_st_write, t, name, p, err, errlen);
  }
  free(s.path);
  return rc;
}

void tn_file_discard(tn_file_pending *p) {
  tf_slot *sl = pending_slot(p);
  if (sl) {
    unlink(sl->tmp);
    release_slot(sl);
  }
  if (p) p->id = 0;
}

static void discard_all(tn_file_pending *p, size_t count) {
  for (size_t i = 0; i < count; i++) tn_file_discard(&p[i]);
}

/* Adds to a failed commit's message that a previous file could not be put back, and where it is. */
static void report_not_restored(const tf_slot *sl, char *err, size_t errlen) {
  char *first = err && errlen ? strdup(err) : NULL;
  if (!first) return;
  tn_tf_fail(err, errlen, NULL, "%s; and %s could not be put back: its previous file is %s", first, sl->target,
             sl->backup);
  free(first);
}

int tn_file_commit(tn_file_pending *p, size_t count, size_t *failed, char *err, size_t errlen) {
  tf_slot *group[TN_FILE_MAX_PENDING];
  size_t i, j, at = count;
  int last, restored = 1;
  if (err && errlen) err[0] = '\0';
  if (failed) *failed = count;
  if (count == 0) return 0;
  if (!p) return tn_tf_fail(err, errlen, NULL, "no saves to commit");
  if (count > TN_FILE_MAX_PENDING) {
    discard_all(p, count);
    return tn_tf_fail(err, errlen, NULL, "more than %d saves to commit", TN_FILE_MAX_PENDING);
  }
  for (i = 0; i < count; i++) {
    group[i] = pending_slot(&p[i]);
    for (j = 0; group[i] && j < i; j++)
      if (group[j] == group[i]) group[i] = NULL;
    if (!group[i]) {
      discard_all(p, count);
      if (failed) *failed = i;
      return tn_tf_fail(err, errlen, NULL, "save %zu of the commit is not a prepared save", i);
    }
  }
  for (i = 1; i < count; i++) {
    for (j = 0; j < i; j++) {
      if (same_path(group[j]->target, group[i]->target)) {
        tn_tf_fail(err, errlen, NULL, "%s and %s are the same file", group[j]->target, group[i]->target);
        discard_all(p, count);
        if (failed) *failed = i;
        return -1;
      }
    }
  }

  last = (int)(group[count - 1] - slots);
  for (i = 0; i < count; i++) {
    struct stat st;
    tf_slot *sl = group[i];
    sl->had_target = lstat(sl->target, &st) == 0;
    sl->last = last;
    atomic_store(&sl->state, SLOT_COMMITTING);
    /* The last rename completes the commit, so its target's previous file need not be kept. */
    if (i + 1 < count && sl->had_target && !S_ISDIR(st.st_mode) && keep_aside(sl, err, errlen) != 0) {
      at = i;
      goto undo;
    }
  }
  for (i = 0; i < count; i++) {
    tf_slot *sl = group[i];
    if (sl->move_aside) {
      atomic_store(&sl->backup_state, BACKUP_KEPT);
      if (rename(sl->target, sl->backup) != 0) {
        atomic_store(&sl->backup_state, BACKUP_NONE);
        tn_tf_fail(err, errlen, sl->target, "cannot move its previous file aside: %s", strerror(errno));
        at = i;
        goto undo;
      }
    }
    if (rename(sl->tmp, sl->target) != 0) {
      tn_tf_fail(err, errlen, sl->target, "cannot replace it with the written file: %s", strerror(errno));
      at = i;
      goto undo;
    }
  }
  atomic_store(&slots[last].state, SLOT_COMMITTED);
  for (i = 0; i < count; i++) {
    atomic_store(&group[i]->state, SLOT_COMMITTED);
    drop_backup(group[i]);
    release_slot(group[i]);
    p[i].id = 0;
  }
  return 0;

undo:
  for (i = count; i-- > 0;) {
    if (undo_slot(group[i]) != 0 && restored) {
      report_not_restored(group[i], err, errlen);
      restored = 0;
    }
    release_slot(group[i]);
    p[i].id = 0;
  }
  if (failed) *failed = at;
  return -1;
}

int tn_file_save(const char *spec, const tn_file_tensor *t, const char *default_name, char *err, size_t errlen) {
  tn_file_pending p = {0};
  if (tn_file_prepare(spec, t, default_name, &p, err, errlen) != 0) return -1;
  return tn_file_commit(&p, 1, NULL, err, errlen);
}

void tn_file_remove_pending(void) {
  int done[TN_FILE_MAX_PENDING], saved = errno;
  /* A commit is complete once the rename of its last save has happened: that temporary is gone. */
  for (int i = 0; i < TN_FILE_MAX_PENDING; i++) {
    int st = atomic_load(&slots[i].state);
    done[i] = st == SLOT_COMMITTED ||
              (st == SLOT_COMMITTING && slots[i].last == i && access(slots[i].tmp, F_OK) != 0 && errno == ENOENT);
  }
  for (int i = 0; i < TN_FILE_MAX_PENDING; i++) {
    tf_slot *sl = &slots[i];
    int st = atomic_load(&sl->state);
    if (st == SLOT_TEMP) {
      unlink(sl->tmp);
    } else if (st == SLOT_COMMITTING || st == SLOT_COMMITTED) {
      if (!done[sl->last])
        undo_slot(sl);
      else
        drop_backup(sl);
    }
  }
  errno = saved;
}

void tn_file_tensor_free(tn_file_tensor *t) {
  if (!t) return;
  free(t->data);
  memset(t, 0, sizeof *t);
}
