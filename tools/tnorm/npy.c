/* NumPy .npy files: versions 1.0, 2.0 and 3.0 read, 1.0 written byte for byte as numpy writes it.
 * The header is a Python dict literal; it is parsed by a small strict parser that accepts what numpy's
 * ast.literal_eval would for the three keys, and nothing else. */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "tensor_file_impl.h"

static const char NPY_MAGIC[6] = {'\x93', 'N', 'U', 'M', 'P', 'Y'};
/* np.load refuses a header over 10000 characters unless allow_pickle is set (_MAX_HEADER_SIZE in
 * numpy/lib/format.py); a 1-D or 2-D float header takes about 128. */
#define NPY_MAX_HEADER 10000u
#define NPY_ALIGN 64

typedef struct npy_header {
  char descr[16];
  int fortran;
  int ndim;
  int64_t shape[2]; /* the first two extents; ndim says how many there were */
  int seen_descr, seen_fortran, seen_shape;
} npy_header;

typedef struct npy_parser {
  const char *s;
  size_t n, i;
  char why[96];
} npy_parser;

/* ------------------------------------------------------------------------------------------------ */
/* The header dict                                                                                  */
/* ------------------------------------------------------------------------------------------------ */

static int perr(npy_parser *ps, const char *fmt, ...) TN_TF_PRINTF(2, 3);
static int perr(npy_parser *ps, const char *fmt, ...) {
  va_list ap;
  if (ps->why[0]) return -1; /* the innermost reason is the useful one */
  va_start(ap, fmt);
  vsnprintf(ps->why, sizeof ps->why, fmt, ap);
  va_end(ap);
  return -1;
}

static int peek(npy_parser *ps) {
  while (ps->i < ps->n && ps->s[ps->i] != '\0' && strchr(" \t\r\n", ps->s[ps->i])) ps->i++;
  return ps->i < ps->n ? (unsigned char)ps->s[ps->i] : -1;
}

static int expect(npy_parser *ps, char c) {
  if (peek(ps) != (unsigned char)c) return perr(ps, "expected '%c'", c);
  ps->i++;
  return 0;
}

static int is_word_char(int c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == '.';
}

/* A quoted string without escapes: numpy never writes any, and refusing them keeps this exact. */
static int parse_string(npy_parser *ps, char *buf, size_t cap) {
  int q = peek(ps);
  size_t len = 0;
  if (q != '\'' && q != '"') return perr(ps, "expected a quoted string");
  for (ps->i++; ps->i < ps->n && ps->s[ps->i] != q; ps->i++) {
    unsigned char c = (unsigned char)ps->s[ps->i];
    if (c < 0x20 || c >= 0x7f || c == '\\') return perr(ps, "unexpected character in a string");
    if (len + 1 >= cap) return perr(ps, "string too long");
    buf[len++] = (char)c;
  }
  if (ps->i >= ps->n) return perr(ps, "unterminated string");
  ps->i++;
  buf[len] = '\0';
  return 0;
}

static int parse_bool(npy_parser *ps, int *v) {
  peek(ps);
  for (int b = 0; b < 2; b++) {
    const char *word = b ? "True" : "False";
    size_t len = strlen(word);
    if (ps->n - ps->i >= len && memcmp(ps->s + ps->i, word, len) == 0 &&
        (ps->i + len == ps->n || !is_word_char((unsigned char)ps->s[ps->i + len]))) {
      ps->i += len;
      *v = b;
      return 0;
    }
  }
  return perr(ps, "fortran_order must be True or False");
}

static int parse_int(npy_parser *ps, int64_t *v) {
  int c = peek(ps);
  if (c == '-') return perr(ps, "negative shape value");
  if (c < '0' || c > '9') return perr(ps, "expected an integer in the shape");
  /* Python 3 has no leading zeros ("08" is a syntax error, "00" is 0 but no writer spells it so). */
  if (c == '0' && ps->i + 1 < ps->n && ps->s[ps->i + 1] >= '0' && ps->s[ps->i + 1] <= '9')
    return perr(ps, "shape value with a leading zero");
  for (*v = 0; ps->i < ps->n && ps->s[ps->i] >= '0' && ps->s[ps->i] <= '9'; ps->i++) {
    int d = ps->s[ps->i] - '0';
    if (*v > (INT64_MAX - d) / 10) return perr(ps, "shape value overflows int64");
    *v = *v * 10 + d;
  }
  if (ps->i < ps->n && is_word_char((unsigned char)ps->s[ps->i]))
    return perr(ps, "shape value is not a plain integer");
  return 0;
}

/* A tuple: "()", "(n,)", "(r, c)", "(r, c,)". "(n)" is an int in Python, not a tuple. */
static int parse_shape(npy_parser *ps, npy_header *h) {
  int comma = 0;
  if (peek(ps) != '(') return perr(ps, "shape must be a tuple");
  ps->i++;
  for (h->ndim = 0; peek(ps) != ')';) {
    int64_t v = 0;
    if (h->ndim > 0 && !comma) return perr(ps, "expected ',' or ')' in the shape");
    if (parse_int(ps, &v) != 0) return -1;
    if (h->ndim < 2) h->shape[h->ndim] = v;
    if (h->ndim < 1000) h->ndim++; /* more is refused later; the cap only keeps ndim from wrapping */
    comma = peek(ps) == ',';
    if (comma) ps->i++;
  }
  ps->i++;
  if (h->ndim == 1 && !comma) return perr(ps, "shape must be a tuple: write (n,)");
  return 0;
}

static int parse_value(npy_parser *ps, const char *key, npy_header *h) {
  int *seen = strcmp(key, "descr") == 0           ? &h->seen_descr
              : strcmp(key, "fortran_order") == 0 ? &h->seen_fortran
              : strcmp(key, "shape") == 0         ? &h->seen_shape
                                                  : NULL;
  if (!seen) return perr(ps, "unknown key '%s'", key);
  if (*seen) return perr(ps, "duplicate key '%s'", key);
  *seen = 1;
  if (seen == &h->seen_descr) return parse_string(ps, h->descr, sizeof h->descr);
  if (seen == &h->seen_fortran) return parse_bool(ps, &h->fortran);
  return parse_shape(ps, h);
}

/* What ast.literal_eval takes around the dict, which is less than any whitespace: before it, spaces
 * and tabs (it strips those); after it, spaces and tabs, then only whole blank lines (a last line of
 * spaces without its newline is an indentation error). */
static int lead_blank(npy_parser *ps) {
  while (ps->i < ps->n && (ps->s[ps->i] == ' ' || ps->s[ps->i] == '\t')) ps->i++;
  return ps->i < ps->n && ps->s[ps->i] == '{' ? 0 : perr(ps, "expected '{' (only spaces and tabs before it)");
}

static int tail_blank(npy_parser *ps) {
  size_t i = ps->i;
  while (i < ps->n && (ps->s[i] == ' ' || ps->s[i] == '\t')) i++;
  if (i == ps->n) return 0;
  ps->i = i;
  if ((ps->s[i] != '\n' && ps->s[i] != '\r') || (ps->s[ps->n - 1] != '\n' && ps->s[ps->n - 1] != '\r'))
    return perr(ps, "unexpected text after the dict");
  for (; i < ps->n; i++)
    if (ps->s[i] == '\0' || !strchr(" \t\r\n", ps->s[i])) {
      ps->i = i;
      return perr(ps, "unexpected text after the dict");
    }
  return 0;
}

static int parse_dict(npy_parser *ps, npy_header *h) {
  char key[32];
  if (lead_blank(ps) != 0 || expect(ps, '{') != 0) return -1;
  while (peek(ps) != '}') {
    if (parse_string(ps, key, sizeof key) != 0 || expect(ps, ':') != 0 || parse_value(ps, key, h) != 0) return -1;
    if (peek(ps) == ',')
      ps->i++;
    else if (peek(ps) != '}')
      return perr(ps, "expected ',' or '}'");
  }
  ps->i++;
  if (tail_blank(ps) != 0) return -1;
  if (!h->seen_descr || !h->seen_fortran || !h->seen_shape)
    return perr(ps, "missing key '%s'", !h->seen_descr ? "descr" : !h->seen_fortran ? "fortran_order" : "shape");
  return 0;
}

static int npy_parse(const char *text, size_t n, npy_header *h, const char *path, char *err, size_t errlen) {
  npy_parser ps;
  memset(&ps, 0, sizeof ps);
  memset(h, 0, sizeof *h);
  ps.s = text;
  ps.n = n;
  if (parse_dict(&ps, h) == 0) return 0;
  return tn_tf_fail(err, errlen, path, "malformed .npy header at byte %zu: %s", ps.i, ps.why);
}

/* ------------------------------------------------------------------------------------------------ */
/* Reading                                                                                          */
/* ------------------------------------------------------------------------------------------------ */

/* The one-byte integers, whose descr has no byte order: numpy writes '|i1' and '|u1', and reads '<', '>'
 * and '=' there too. */
static int npy_byte_dtype(const char *descr, tn_dtype *dtype) {
  if (descr[0] == '\0' || !strchr("|<>=", descr[0])) return -1;
  if (strcmp(descr + 1, "i1") == 0) *dtype = TN_I8;
  else if (strcmp(descr + 1, "u1") == 0) *dtype = TN_U8;
  else return -1;
  return 0;
}

static int npy_dtype(const char *descr, tn_dtype *dtype, const char *path, char *err, size_t errlen) {
  const char *kind = descr[0] ? descr + 1 : descr;
  int le = descr[0] == '<' || (descr[0] == '=' && tn_tf_host_is_little_endian());
  if (npy_byte_dtype(descr, dtype) == 0) return 0;
  if (strcmp(kind, "f4") != 0 && strcmp(kind, "f2") != 0)
    return tn_tf_fail(err, errlen, path, "unsupported dtype '%s' (expected '<f4', '<f2', '|i1' or '|u1')", descr);
  if (descr[0] == '>' || (descr[0] == '=' && !le))
    return tn_tf_fail(err, errlen, path, "big-endian dtype '%s' is not supported; convert with arr.astype('<%s')",
                      descr, kind);
  if (!le) return tn_tf_fail(err, errlen, path, "invalid dtype '%s' (a float needs a byte order, '<')", descr);
  *dtype = strcmp(kind, "f4") == 0 ? TN_F32 : TN_F16;
  return 0;
}

static int npy_shape(const npy_header *h, int allow_0d, tn_file_tensor *out, const char *path, char *err,
                     size_t errlen) {
  if (npy_dtype(h->descr, &out->dtype, path, err, errlen) != 0) return -1;
  if (h->fortran)
    return tn_tf_fail(err, errlen, path, "fortran_order True is not supported; save np.ascontiguousarray(a)");
  if (h->ndim == 0 && allow_0d) { /* a scalar: one element */
    out->ndim = 1;
    out->rows = out->dim = 1;
    return 0;
  }
  if (h->ndim == 0)
    return tn_tf_fail(err, errlen, path, "0-d array (shape ()) is not supported; expected 1-D or 2-D");
  if (h->ndim > 2)
    return tn_tf_fail(err, errlen, path, "%s%d-D array is not supported; expected 1-D or 2-D",
                      h->ndim >= 1000 ? ">=" : "", h->ndim);
  out->ndim = h->ndim;
  out->rows = h->ndim == 1 ? 1 : h->shape[0];
  out->dim = h->shape[h->ndim - 1];
  return 0;
}

static uint64_t le_u32(const unsigned char *b) {
  return (uint64_t)b[0] | (uint64_t)b[1] << 8 | (uint64_t)b[2] << 16 | (uint64_t)b[3] << 24;
}

/* Magic, version and header length; on success the stream is at the start of the header and
 * *data_off is where the data starts. */
static int npy_preamble(FILE *f, const char *path, uint64_t size, uint64_t *hlen, uint64_t *data_off, char *err,
                        size_t errlen) {
  unsigned char b[12] = {0};
  size_t have = size < 8 ? (size_t)size : 8, lenbytes;
  if (size == 0) return tn_tf_fail(err, errlen, path, "empty file, not a .npy file");
  if (tn_tf_read_exact(f, b, have) != 0) return tn_tf_fail(err, errlen, path, "read error");
  if (memcmp(b, NPY_MAGIC, have < 6 ? have : 6) != 0)
    return tn_tf_fail(err, errlen, path, "not a .npy file (no \\x93NUMPY magic)");
  if (size < 10)
    return tn_tf_fail(err, errlen, path, "truncated: %" PRIu64 " bytes, shorter than a .npy preamble", size);
  if (b[6] < 1 || b[6] > 3 || b[7] != 0)
    return tn_tf_fail(err, errlen, path, "unsupported .npy version %u.%u (1.0, 2.0 and 3.0 are)", (unsigned)b[6],
                      (unsigned)b[7]);
  lenbytes = b[6] == 1 ? 2 : 4;
  if (size < 8 + lenbytes)
    return tn_tf_fail(err, errlen, path, "truncated: %" PRIu64 " bytes, no header length", size);
  if (tn_tf_read_exact(f, b + 8, lenbytes) != 0) return tn_tf_fail(err, errlen, path, "read error");
  *hlen = lenbytes == 2 ? le_u32(b + 8) & 0xffffu : le_u32(b + 8);
  if (*hlen > NPY_MAX_HEADER)
    return tn_tf_fail(err, errlen, path, "header length %" PRIu64 " is absurd (more than %u)", *hlen,
                      NPY_MAX_HEADER);
  *data_off = 8 + lenbytes + *hlen;
  if (*data_off > size)
    return tn_tf_fail(err, errlen, path,
                      "header length %" PRIu64 " runs past the end of the file (%" PRIu64 " bytes)", *hlen, size);
  return 0;
}

static int npy_read_header(FILE *f, const char *path, uint64_t hlen, npy_header *h, char *err, size_t errlen) {
  char *text = malloc((size_t)hlen + 1);
  int rc;
  if (!text) return tn_tf_fail(err, errlen, path, "out of memory");
  if (tn_tf_read_exact(f, text, (size_t)hlen) != 0) {
    free(text);
    return tn_tf_fail(err, errlen, path, "read error in the header");
  }
  rc = npy_parse(text, (size_t)hlen, h, path, err, errlen);
  free(text);
  return rc;
}

static int npy_read(FILE *f, const char *path, uint64_t size, int allow_0d, tn_file_tensor *out, char *err,
                    size_t errlen) {
  uint64_t hlen = 0, data_off = 0, nbytes = 0, have;
  npy_header h;
  if (npy_preamble(f, path, size, &hlen, &data_off, err, errlen) != 0) return -1;
  if (npy_read_header(f, path, hlen, &h, err, errlen) != 0) return -1;
  if (npy_shape(&h, allow_0d, out, path, err, errlen) != 0) return -1;
  if (tn_tf_nbytes(out->rows, out->dim, out->dtype, &nbytes) != 0)
    return tn_tf_fail(err, errlen, path, "shape %" PRId64 " x %" PRId64 " is too large (its byte size overflows)",
                      out->rows, out->dim);
  have = size - data_off;
  /* The data must be exactly the rest of the file: anything else is a truncated or foreign file. */
  if (have != nbytes)
    return tn_tf_fail(err, errlen, path, "header says %" PRIu64 " bytes of data, file has %" PRIu64, nbytes, have);
  return tn_tf_read_data(f, path, nbytes, &out->data, err, errlen);
}

int tn_npy_load(const char *path, int allow_0d, tn_file_tensor *out, char *err, size_t errlen) {
  FILE *f;
  uint64_t size;
  int rc;
  if (tn_tf_open(path, &f, &size, err, errlen) != 0) return -1;
  rc = npy_read(f, path, size, allow_0d, out, err, errlen);
  fclose(f);
  return rc;
}

/* ------------------------------------------------------------------------------------------------ */
/* Writing                                                                                          */
/* ------------------------------------------------------------------------------------------------ */

/* The descr numpy writes for each dtype .npy can hold (check_dtype refused the others). */
static const char *npy_descr(tn_dtype dtype) {
  switch (dtype) {
    case TN_F32: return "<f4";
    case TN_F16: return "<f2";
    case TN_I8: return "|i1";
    default: return "|u1";
  }
}

/* The dict as numpy 1.x writes it (keys sorted, repr of the values), padded with spaces and a '\n' so
 * the data starts at a multiple of 64; numpy pads a full 64 when already aligned, and so do we. */
static size_t npy_header_text(const tn_file_tensor *t, char *buf, size_t cap) {
  char shape[64];
  int n;
  size_t pad;
  if (t->ndim == 1)
    snprintf(shape, sizeof shape, "(%" PRId64 ",)", t->dim);
  else
    snprintf(shape, sizeof shape, "(%" PRId64 ", %" PRId64 ")", t->rows, t->dim);
  n = snprintf(buf, cap, "{'descr': '%s', 'fortran_order': False, 'shape': %s, }", npy_descr(t->dtype), shape);
  if (n < 0 || (size_t)n + NPY_ALIGN + 1 > cap) return 0;
  pad = NPY_ALIGN - (sizeof NPY_MAGIC + 4 + (size_t)n + 1) % NPY_ALIGN;
  memset(buf + n, ' ', pad);
  buf[(size_t)n + pad] = '\n';
  return (size_t)n + pad + 1;
}

/* name: unused, .npy files hold one unnamed array. */
int tn_npy_write(FILE *f, const char *path, const tn_file_tensor *t, const char *name, char *err, size_t errlen) {
  char header[256];
  unsigned char pre[10];
  size_t hlen = npy_header_text(t, header, sizeof header);
  uint64_t nbytes = 0;
  (void)name;
  if (hlen == 0 || hlen > 0xffff || tn_tf_nbytes(t->rows, t->dim, t->dtype, &nbytes) != 0)
    return tn_tf_fail(err, errlen, path, "cannot build the .npy header");
  memcpy(pre, NPY_MAGIC, sizeof NPY_MAGIC);
  pre[6] = 1;
  pre[7] = 0;
  pre[8] = (unsigned char)(hlen & 0xff);
  pre[9] = (unsigned char)(hlen >> 8);
  if (fwrite(pre, 1, sizeof pre, f) != sizeof pre || fwrite(header, 1, hlen, f) != hlen ||
      (nbytes && fwrite(t->data, 1, (size_t)nbytes, f) != (size_t)nbytes))
    return tn_tf_fail(err, errlen, path, "write failed: %s", strerror(errno));
  return 0;
}
