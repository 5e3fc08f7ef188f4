/* safetensors files: an 8-byte little-endian header length N, N bytes of JSON, then the byte buffer
 * that every tensor's data_offsets point into. One tensor is read per load, one written per save. */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L /* fseeko */
#endif

#include <cjson/cJSON.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

#include "tensor_file_impl.h"

/* The reference implementation's limit: a bigger header is an attack, not a model. */
#define ST_MAX_HEADER 100000000u
/* JSON numbers are doubles; above 2^53 they no longer name one integer. */
#define ST_MAX_EXACT 9007199254740992.0

typedef struct st_entry {
  tn_dtype dtype;
  int ndim;
  int64_t shape[2];
  uint64_t begin, end;
} st_entry;

/* ------------------------------------------------------------------------------------------------ */
/* Reading                                                                                          */
/* ------------------------------------------------------------------------------------------------ */

static int is_json_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

static int st_parse_json(char *text, uint64_t n, cJSON **root, const char *path, char *err, size_t errlen) {
  const char *end = NULL;
  *root = cJSON_ParseWithLengthOpts(text, (size_t)n, &end, 0);
  if (!*root) {
    size_t at = end && end >= text && end <= text + n ? (size_t)(end - text) : 0;
    return tn_tf_fail(err, errlen, path, "header is not valid JSON (near byte %zu)", at);
  }
  /* Only padding may follow the object, as for the reference reader (serde_json::from_str). */
  while (end && end < text + n && is_json_space(*end)) end++;
  if (!end || end != text + n) {
    cJSON_Delete(*root);
    *root = NULL;
    return tn_tf_fail(err, errlen, path, "unexpected bytes after the header JSON");
  }
  if (!cJSON_IsObject(*root)) {
    cJSON_Delete(*root);
    *root = NULL;
    return tn_tf_fail(err, errlen, path, "header JSON is not an object");
  }
  return 0;
}

static int st_header(FILE *f, const char *path, uint64_t size, cJSON **root, uint64_t *hlen, char *err,
                     size_t errlen) {
  unsigned char b[8];
  char *text;
  int rc;
  if (size == 0) return tn_tf_fail(err, errlen, path, "empty file, not a safetensors file");
  if (size < 8)
    return tn_tf_fail(err, errlen, path, "truncated: %" PRIu64 " bytes, shorter than a safetensors header length",
                      size);
  if (tn_tf_read_exact(f, b, 8) != 0) return tn_tf_fail(err, errlen, path, "read error");
  *hlen = 0;
  for (int i = 7; i >= 0; i--) *hlen = *hlen << 8 | b[i];
  if (*hlen > ST_MAX_HEADER)
    return tn_tf_fail(err, errlen, path, "header length %" PRIu64 " is absurd (more than %u)", *hlen,
                      ST_MAX_HEADER);
  if (*hlen > size - 8)
    return tn_tf_fail(err, errlen, path,
                      "header length %" PRIu64 " runs past the end of the file (%" PRIu64 " bytes)", *hlen, size);
  text = malloc((size_t)*hlen + 1);
  if (!text) return tn_tf_fail(err, errlen, path, "out of memory");
  if (tn_tf_read_exact(f, text, (size_t)*hlen) != 0) {
    free(text);
    return tn_tf_fail(err, errlen, path, "read error in the header");
  }
  text[*hlen] = '\0';
  rc = st_parse_json(text, *hlen, root, path, err, errlen);
  free(text);
  return rc;
}

/* "no tensor 'x' (the file has: a, b, c, ... 12 more)", names cut short: the file may hold thousands. */
static int st_missing(const cJSON *root, const char *path, const char *name, char *err, size_t errlen) {
  char list[400] = "";
  size_t used = 0;
  int shown = 0, more = 0;
  const cJSON *it;
  cJSON_ArrayForEach(it, root) {
    if (!it->string || strcmp(it->string, "__metadata__") == 0) continue;
    if (shown < 8 && used < sizeof list - 64) {
      int n = snprintf(list + used, sizeof list - used, "%s'%.40s'", shown ? ", " : "", it->string);
      used += n > 0 ? (size_t)n : 0;
      shown++;
    } else {
      more++;
    }
  }
  if (shown == 0) return tn_tf_fail(err, errlen, path, "no tensor '%.100s' (the file has no tensors)", name);
  if (more == 0) return tn_tf_fail(err, errlen, path, "no tensor '%.100s' (the file has: %s)", name, list);
  return tn_tf_fail(err, errlen, path, "no tensor '%.100s' (the file has: %s and %d more)", name, list, more);
}

static const cJSON *st_find(const cJSON *root, const char *path, const char *name, char *err, size_t errlen) {
  const cJSON *it, *found = NULL;
  int count = 0;
  cJSON_ArrayForEach(it, root) {
    if (it->string && strcmp(it->string, name) == 0) {
      if (!found) found = it;
      count++;
    }
  }
  if (!found) {
    st_missing(root, path, name, err, errlen);
    return NULL;
  }
  /* JSON readers disagree on which duplicate wins; refusing is the only answer that is not a guess. */
  if (count > 1) {
    tn_tf_fail(err, errlen, path, "tensor '%.100s' appears %d times in the header", name, count);
    return NULL;
  }
  return found;
}

static int st_uint(const cJSON *v, uint64_t *out) {
  double d;
  if (!cJSON_IsNumber(v)) return -1;
  d = v->valuedouble;
  if (!(d >= 0 && d <= ST_MAX_EXACT) || d != (double)(uint64_t)d) return -1;
  *out = (uint64_t)d;
  return 0;
}

static int st_dtype(const cJSON *t, const char *path, const char *name, st_entry *e, char *err, size_t errlen) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(t, "dtype");
  const char *s = cJSON_IsString(v) ? v->valuestring : NULL;
  if (!s) return tn_tf_fail(err, errlen, path, "tensor '%.100s' has no dtype string", name);
  if (strcmp(s, "F32") == 0)
    e->dtype = TN_F32;
  else if (strcmp(s, "F16") == 0)
    e->dtype = TN_F16;
  else if (strcmp(s, "BF16") == 0)
    e->dtype = TN_BF16;
  else
    return tn_tf_fail(err, errlen, path, "tensor '%.100s' has unsupported dtype '%.20s' (F32, F16 and BF16 are)",
                      name, s);
  return 0;
}

static int st_shape(const cJSON *t, const char *path, const char *name, st_entry *e, char *err, size_t errlen) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(t, "shape"), *it;
  int n = cJSON_IsArray(v) ? cJSON_GetArraySize(v) : -1;
  if (n < 0) return tn_tf_fail(err, errlen, path, "tensor '%.100s' has no shape array", name);
  if (n < 1 || n > 2)
    return tn_tf_fail(err, errlen, path, "tensor '%.100s' is %d-D; only 1-D and 2-D are supported", name, n);
  e->ndim = 0;
  cJSON_ArrayForEach(it, v) {
    uint64_t x;
    if (st_uint(it, &x) != 0)
      return tn_tf_fail(err, errlen, path, "tensor '%.100s' has a shape value that is not an integer in [0, 2^53]",
                        name);
    e->shape[e->ndim++] = (int64_t)x;
  }
  return 0;
}

static int st_offsets(const cJSON *t, const char *path, const char *name, st_entry *e, char *err, size_t errlen) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(t, "data_offsets");
  if (!cJSON_IsArray(v) || cJSON_GetArraySize(v) != 2)
    return tn_tf_fail(err, errlen, path, "tensor '%.100s' has no data_offsets [begin, end]", name);
  if (st_uint(cJSON_GetArrayItem(v, 0), &e->begin) != 0 || st_uint(cJSON_GetArrayItem(v, 1), &e->end) != 0)
    return tn_tf_fail(err, errlen, path, "tensor '%.100s' has data_offsets that are not integers in [0, 2^53]",
                      name);
  if (e->begin > e->end)
    return tn_tf_fail(err, errlen, path,
                      "tensor '%.100s' has data_offsets [%" PRIu64 ", %" PRIu64 "]: begin > end", name, e->begin,
                      e->end);
  return 0;
}

/* The entry's size must agree with its shape and lie within the buffer. */
static int st_check(const st_entry *e, uint64_t buflen, const char *path, const char *name, char *err,
                    size_t errlen) {
  int64_t rows = e->ndim == 1 ? 1 : e->shape[0], dim = e->shape[e->ndim - 1];
  uint64_t nbytes;
  if (tn_tf_nbytes(rows, dim, e->dtype, &nbytes) != 0)
    return tn_tf_fail(err, errlen, path,
                      "tensor '%.100s' has shape %" PRId64 " x %" PRId64 ", too large (overflow)", name, rows,
                      dim);
  if (e->end > buflen)
    return tn_tf_fail(err, errlen, path,
                      "tensor '%.100s' ends at byte %" PRIu64 ", past the %" PRIu64 "-byte buffer", name, e->end,
                      buflen);
  if (e->end - e->begin != nbytes)
    return tn_tf_fail(err, errlen, path, "tensor '%.100s' has %" PRIu64 " bytes of data, its shape needs %" PRIu64,
                      name, e->end - e->begin, nbytes);
  return 0;
}

static int st_entry_of(const cJSON *root, const char *path, const char *name, uint64_t buflen, st_entry *e,
                       char *err, size_t errlen) {
  const cJSON *t = st_find(root, path, name, err, errlen);
  if (!t) return -1;
  if (!cJSON_IsObject(t)) return tn_tf_fail(err, errlen, path, "entry of tensor '%.100s' is not an object", name);
  if (st_dtype(t, path, name, e, err, errlen) != 0 || st_shape(t, path, name, e, err, errlen) != 0 ||
      st_offsets(t, path, name, e, err, errlen) != 0)
    return -1;
  return st_check(e, buflen, path, name, err, errlen);
}

static int st_read(FILE *f, const char *path, uint64_t size, const char *name, tn_file_tensor *out, char *err,
                   size_t errlen) {
  cJSON *root;
  uint64_t hlen;
  st_entry e;
  int rc;
  memset(&e, 0, sizeof e);
  if (st_header(f, path, size, &root, &hlen, err, errlen) != 0) return -1;
  rc = st_entry_of(root, path, name, size - 8 - hlen, &e, err, errlen);
  cJSON_Delete(root);
  if (rc != 0) return -1;
  out->dtype = e.dtype;
  out->ndim = e.ndim;
  out->rows = e.ndim == 1 ? 1 : e.shape[0];
  out->dim = e.shape[e.ndim - 1];
  snprintf(out->name, sizeof out->name, "%s", name);
  /* The offset is within the file (checked above), so it fits off_t. */
  if (fseeko(f, (off_t)(8 + hlen + e.begin), SEEK_SET) != 0)
    return tn_tf_fail(err, errlen, path, "cannot seek to tensor '%.100s': %s", name, strerror(errno));
  return tn_tf_read_data(f, path, e.end - e.begin, &out->data, err, errlen);
}

int tn_st_load(const char *path, const char *name, tn_file_tensor *out, char *err, size_t errlen) {
  FILE *f;
  uint64_t size;
  int rc;
  if (tn_tf_open(path, &f, &size, err, errlen) != 0) return -1;
  rc = st_read(f, path, size, name, out, err, errlen);
  fclose(f);
  return rc;
}

/* ------------------------------------------------------------------------------------------------ */
/* Writing                                                                                          */
/* ------------------------------------------------------------------------------------------------ */

/* The name as a JSON string body: quotes, backslashes and control characters escaped. */
static int json_escape(const char *s, char *buf, size_t cap) {
  size_t n = 0;
  for (; *s && n + 7 < cap; s++) {
    unsigned char c = (unsigned char)*s;
    if (c == '"' || c == '\\')
      n += (size_t)snprintf(buf + n, cap - n, "\\%c", c);
    else if (c < 0x20)
      n += (size_t)snprintf(buf + n, cap - n, "\\u%04x", c);
    else
      buf[n++] = (char)c;
  }
  buf[n] = '\0';
  return *s ? -1 : 0;
}

/* One entry, offsets [0, nbytes], padded with spaces to a multiple of 8 as the reference writer does. */
static size_t st_header_text(const tn_file_tensor *t, const char *name, uint64_t nbytes, char *buf, size_t cap) {
  static const char *const names[] = {"F32", "F16", "BF16"};
  char key[256 * 6 + 8], shape[48];
  int n;
  if (json_escape(name, key, sizeof key) != 0) return 0;
  if (t->ndim == 1)
    snprintf(shape, sizeof shape, "[%" PRId64 "]", t->dim);
  else
    snprintf(shape, sizeof shape, "[%" PRId64 ",%" PRId64 "]", t->rows, t->dim);
  n = snprintf(buf, cap, "{\"%s\":{\"dtype\":\"%s\",\"shape\":%s,\"data_offsets\":[0,%" PRIu64 "]}}", key,
               names[t->dtype], shape, nbytes);
  if (n < 0 || (size_t)n + 8 > cap) return 0;
  while (n % 8 != 0) buf[n++] = ' ';
  return (size_t)n;
}

int tn_st_write(FILE *f, const char *path, const tn_file_tensor *t, const char *name, char *err, size_t errlen) {
  char header[256 * 6 + 256];
  unsigned char len[8];
  uint64_t nbytes = 0;
  size_t hlen = 0;
  if (tn_tf_nbytes(t->rows, t->dim, t->dtype, &nbytes) == 0)
    hlen = st_header_text(t, name, nbytes, header, sizeof header);
  if (hlen == 0) return tn_tf_fail(err, errlen, path, "cannot build the safetensors header");
  for (int i = 0; i < 8; i++) len[i] = (unsigned char)((uint64_t)hlen >> (8 * i));
  if (fwrite(len, 1, 8, f) != 8 || fwrite(header, 1, hlen, f) != hlen ||
      (nbytes && fwrite(t->data, 1, (size_t)nbytes, f) != (size_t)nbytes))
    return tn_tf_fail(err, errlen, path, "write failed: %s", strerror(errno));
  return 0;
}
