/* safetensors files: an 8-byte little-endian header length N, N bytes of JSON, then the byte buffer
 * that every tensor's data_offsets point into. One tensor is read per load, one written per save.
 *
 * The header is read by a single-pass parser written for the format's schema, to accept what the
 * reference reader (huggingface/safetensors: serde_json into its HashMetadata, then
 * Metadata::validate) accepts. Where readers disagree it refuses instead: a tensor name given twice,
 * a tensor name holding U+0000 (no C string can), and the spellings that only serde's generic
 * machinery takes (an entry written as an array, a dtype written as a one-key map). Memory is the
 * header text plus one 24-byte record per tensor (and as much again while qsort sorts them),
 * whatever the header holds, and time is linear but for sorting the records. */
#define _GNU_SOURCE /* qsort_r */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L /* fseeko */
#endif

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

#include "tensor_file_impl.h"

/* The reference implementation's limit: a bigger header is an attack, not a model. */
#define ST_MAX_HEADER 100000000u
/* serde_json refuses the 128th nested array or object (the header's own object is the first). */
#define ST_MAX_DEPTH 128
/* The shortest entry that parses, "":{"dtype":"U8","shape":[],"data_offsets":[0,0]}, takes 50 bytes
 * of the header, so the header's length bounds the number of entries. */
#define ST_MIN_ENTRY 50

/* Every dtype the reference knows (its Dtype enum and Dtype::bitsize), with the tnorm dtype of the
 * seven that can be loaded (F8_E4M3 is torch's float8_e4m3fn, as TN_F8_E4M3). Tensors of the others are
 * validated like any other. */
static const struct st_dtype {
  const char *name;
  unsigned bits;
  int tn; /* a tn_dtype, or -1 */
} ST_DTYPES[] = {
    {"BOOL", 8, -1},          {"F4", 4, -1},          {"F6_E2M3", 6, -1},         {"F6_E3M2", 6, -1},
    {"U8", 8, TN_U8},         {"I8", 8, TN_I8},       {"F8_E5M2", 8, TN_F8_E5M2}, {"F8_E4M3", 8, TN_F8_E4M3},
    {"F8_E8M0", 8, -1},       {"F8_E4M3FNUZ", 8, -1}, {"F8_E5M2FNUZ", 8, -1},     {"I16", 16, -1},
    {"U16", 16, -1},          {"F16", 16, TN_F16},    {"BF16", 16, TN_BF16},      {"I32", 32, -1},
    {"U32", 32, -1},          {"F32", 32, TN_F32},    {"C64", 64, -1},            {"F64", 64, -1},
    {"I64", 64, -1},          {"U64", 64, -1},
};
#define ST_NDTYPES (sizeof ST_DTYPES / sizeof ST_DTYPES[0])

/* What the checks that span entries need of each one. */
typedef struct st_rec {
  uint64_t begin, end;
  uint32_t name_off, name_len; /* the name, unescaped in place in the header text */
} st_rec;

/* One entry as parsed. */
typedef struct st_entry {
  int dtype; /* index into ST_DTYPES */
  uint64_t ndim;
  uint64_t shape[2]; /* the first two extents */
  uint64_t count;    /* the product of the extents, when !overflow */
  int overflow;
  uint64_t begin, end;
} st_entry;

typedef struct st_parser {
  char *s; /* the header text, NUL-terminated */
  size_t n, i;
  int depth;
  const char *path;
  char *err;
  size_t errlen;
  st_rec *recs;
  size_t nrec, cap;
  const char *want; /* the tensor asked for */
  size_t want_len, found;
  st_entry got; /* its entry */
  int seen_metadata;
} st_parser;

/* ------------------------------------------------------------------------------------------------ */
/* Messages                                                                                         */
/* ------------------------------------------------------------------------------------------------ */

/* How many bytes of a name a message shows: at most max, cut on a character boundary. */
static int st_shown(const char *name, size_t len, size_t max) {
  size_t n = len < max ? len : max;
  if (n < len)
    while (n > 0 && ((unsigned char)name[n] & 0xc0) == 0x80) n--;
  return (int)n;
}

static int st_syntax(st_parser *p, const char *why) {
  return tn_tf_fail(p->err, p->errlen, p->path, "header is not valid JSON at byte %zu: %s", p->i, why);
}

/* ------------------------------------------------------------------------------------------------ */
/* JSON as serde_json reads it                                                                      */
/* ------------------------------------------------------------------------------------------------ */

/* The next byte after JSON whitespace, or -1 at the end. */
static int st_peek(st_parser *p) {
  for (;; p->i++) {
    unsigned char c = (unsigned char)p->s[p->i];
    if (c > ' ') return c;
    if (p->i >= p->n) return -1;
    if (c != ' ' && c != '\t' && c != '\n' && c != '\r') return c;
  }
}

static int st_enter(st_parser *p) {
  if (++p->depth >= ST_MAX_DEPTH) return st_syntax(p, "arrays and objects nested more than 127 deep");
  p->i++;
  return 0;
}

/* After a member or an element: 1 when another follows (the ',' eaten), 0 at the closing bracket
 * (eaten), -1 on anything else. */
static int st_next(st_parser *p, char close) {
  int c = st_peek(p);
  if (c == ',') {
    p->i++;
    return 1;
  }
  if (c == close) {
    p->i++;
    p->depth--;
    return 0;
  }
  return st_syntax(p, close == '}' ? "expected ',' or '}'" : "expected ',' or ']'");
}

static int st_hex4(st_parser *p, unsigned *v) {
  *v = 0;
  for (int k = 0; k < 4; k++, p->i++) {
    int c = p->i < p->n ? (unsigned char)p->s[p->i] : -1, d;
    if (c >= '0' && c <= '9')
      d = c - '0';
    else if (c >= 'a' && c <= 'f')
      d = c - 'a' + 10;
    else if (c >= 'A' && c <= 'F')
      d = c - 'A' + 10;
    else
      return st_syntax(p, "invalid \\u escape");
    *v = *v << 4 | (unsigned)d;
  }
  return 0;
}

/* A code point as UTF-8 into b; returns the byte count. */
static int st_put_utf8(unsigned cp, unsigned char *b) {
  if (cp < 0x80) {
    b[0] = (unsigned char)cp;
    return 1;
  }
  if (cp < 0x800) {
    b[0] = (unsigned char)(0xc0 | cp >> 6);
    b[1] = (unsigned char)(0x80 | (cp & 0x3f));
    return 2;
  }
  if (cp < 0x10000) {
    b[0] = (unsigned char)(0xe0 | cp >> 12);
    b[1] = (unsigned char)(0x80 | (cp >> 6 & 0x3f));
    b[2] = (unsigned char)(0x80 | (cp & 0x3f));
    return 3;
  }
  b[0] = (unsigned char)(0xf0 | cp >> 18);
  b[1] = (unsigned char)(0x80 | (cp >> 12 & 0x3f));
  b[2] = (unsigned char)(0x80 | (cp >> 6 & 0x3f));
  b[3] = (unsigned char)(0x80 | (cp & 0x3f));
  return 4;
}

/* The string at p->i (its opening quote), with serde_json's rules: the RFC 8259 escapes only, no
 * raw control characters, and every \u surrogate in a pair. With out, the decoded bytes go there,
 * cut at cap (*len is the whole length); out may be the string's own first byte, since decoding
 * never writes past what it has read. */
static int st_string(st_parser *p, char *out, size_t cap, size_t *len) {
  static const char esc[] = "\"\\/bfnrt", unesc[] = "\"\\/\b\f\n\r\t";
  size_t n = 0;
  p->i++;
  for (;;) {
    unsigned char c, buf[4];
    unsigned cp, lo;
    const char *e;
    int nb;
    if (p->i >= p->n) return st_syntax(p, "unterminated string");
    c = (unsigned char)p->s[p->i];
    if (c == '"') break;
    if (c < 0x20) return st_syntax(p, "control character in a string");
    p->i++;
    if (c != '\\') {
      if (out && n < cap) out[n] = (char)c;
      n++;
      continue;
    }
    c = (unsigned char)p->s[p->i]; /* the NUL after the text when the backslash ends it */
    if (c != 'u') {
      if (c == 0 || !(e = strchr(esc, c))) return st_syntax(p, "invalid escape in a string");
      p->i++;
      buf[0] = (unsigned char)unesc[e - esc];
      nb = 1;
    } else {
      p->i++;
      if (st_hex4(p, &cp) != 0) return -1;
      if (cp >= 0xdc00 && cp <= 0xdfff) return st_syntax(p, "lone low surrogate in a \\u escape");
      if (cp >= 0xd800 && cp <= 0xdbff) {
        if (p->n - p->i < 2 || p->s[p->i] != '\\' || p->s[p->i + 1] != 'u')
          return st_syntax(p, "high surrogate in a \\u escape without a low one");
        p->i += 2;
        if (st_hex4(p, &lo) != 0) return -1;
        if (lo < 0xdc00 || lo > 0xdfff) return st_syntax(p, "high surrogate in a \\u escape without a low one");
        cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
      }
      nb = st_put_utf8(cp, buf);
    }
    for (int k = 0; k < nb; k++, n++)
      if (out && n < cap) out[n] = (char)buf[k];
  }
  p->i++;
  *len = n;
  return 0;
}

/* The text ends in a NUL, which is no digit, so i may be the end. */
static int st_digit(const st_parser *p, size_t i) { return (unsigned char)(p->s[i] - '0') < 10; }

/* A shape extent or an offset, which serde reads as a usize: only a plain integer from 0 to 2^64-1
 * is one (serde_json reads 4.0, 1e3, -0 and 2^64 as floats, and a usize refuses a float). */
static int st_u64(st_parser *p, uint64_t *v) {
  size_t i = p->i;
  uint64_t x = 0;
  if (!st_digit(p, i) || (p->s[i] == '0' && st_digit(p, i + 1))) return -1;
  for (; st_digit(p, i); i++) {
    unsigned d = (unsigned)(p->s[i] - '0');
    if (x > (UINT64_MAX - d) / 10) return -1;
    x = x * 10 + d;
  }
  if (i < p->n && (p->s[i] == '.' || p->s[i] == 'e' || p->s[i] == 'E')) return -1;
  p->i = i;
  *v = x;
  return 0;
}

/* 1e0 ... 1e308, the table serde_json scales by. */
#define ST_P10_ROW(d) \
  1e##d##0, 1e##d##1, 1e##d##2, 1e##d##3, 1e##d##4, 1e##d##5, 1e##d##6, 1e##d##7, 1e##d##8, 1e##d##9
static const double ST_POW10[309] = {
    1e0,            1e1,            1e2,            1e3,            1e4,            1e5,            1e6,
    1e7,            1e8,            1e9,            ST_P10_ROW(1),  ST_P10_ROW(2),  ST_P10_ROW(3),  ST_P10_ROW(4),
    ST_P10_ROW(5),  ST_P10_ROW(6),  ST_P10_ROW(7),  ST_P10_ROW(8),  ST_P10_ROW(9),  ST_P10_ROW(10), ST_P10_ROW(11),
    ST_P10_ROW(12), ST_P10_ROW(13), ST_P10_ROW(14), ST_P10_ROW(15), ST_P10_ROW(16), ST_P10_ROW(17), ST_P10_ROW(18),
    ST_P10_ROW(19), ST_P10_ROW(20), ST_P10_ROW(21), ST_P10_ROW(22), ST_P10_ROW(23), ST_P10_ROW(24), ST_P10_ROW(25),
    ST_P10_ROW(26), ST_P10_ROW(27), ST_P10_ROW(28), ST_P10_ROW(29), 1e300,          1e301,          1e302,
    1e303,          1e304,          1e305,          1e306,          1e307,          1e308};

/* Any other number: serde_json keeps the first digits that fit a u64 as the significand, counts the
 * rest into a decimal exponent, and refuses the number when significand * 10^exponent, computed as
 * it computes it (without its float_roundtrip feature, as the reference builds it), is infinite.
 * The same steps here refuse exactly the numbers it refuses. */
static int st_number(st_parser *p) {
  size_t i = p->i;
  uint64_t sig = 0;
  int64_t exp = 0;
  if (i < p->n && p->s[i] == '-') i++;
  if (!st_digit(p, i)) {
    p->i = i;
    return st_syntax(p, "invalid number");
  }
  if (p->s[i] == '0') {
    if (st_digit(p, ++i)) {
      p->i = i;
      return st_syntax(p, "invalid number (leading zero)");
    }
  } else {
    for (; st_digit(p, i); i++) {
      unsigned d = (unsigned)(p->s[i] - '0');
      if (sig > (UINT64_MAX - d) / 10) break;
      sig = sig * 10 + d;
    }
    for (; st_digit(p, i); i++) exp++;
  }
  if (i < p->n && p->s[i] == '.') {
    int full = 0;
    if (!st_digit(p, ++i)) {
      p->i = i;
      return st_syntax(p, "invalid number (no digit after '.')");
    }
    for (; st_digit(p, i); i++) {
      unsigned d = (unsigned)(p->s[i] - '0');
      if (!full && sig > (UINT64_MAX - d) / 10) full = 1;
      if (!full) {
        sig = sig * 10 + d;
        exp--;
      }
    }
  }
  if (i < p->n && (p->s[i] == 'e' || p->s[i] == 'E')) {
    int positive = 1;
    int64_t e;
    i++;
    if (i < p->n && (p->s[i] == '+' || p->s[i] == '-')) positive = p->s[i++] == '+';
    if (!st_digit(p, i)) {
      p->i = i;
      return st_syntax(p, "invalid number (no digit in the exponent)");
    }
    for (e = 0; st_digit(p, i); i++) {
      e = e * 10 + (p->s[i] - '0');
      if (e > INT32_MAX) {
        /* An exponent beyond i32: zero for a zero significand or a negative exponent. */
        while (st_digit(p, i)) i++;
        if (sig != 0 && positive) {
          p->i = i;
          return st_syntax(p, "number out of range");
        }
        p->i = i;
        return 0;
      }
    }
    exp = positive ? exp + e : exp - e;
    if (exp > INT32_MAX) exp = INT32_MAX; /* serde_json's saturating i32 */
    if (exp < INT32_MIN) exp = INT32_MIN;
  }
  p->i = i;
  if (sig != 0 && exp >= 0 && (exp > 308 || isinf((double)sig * ST_POW10[exp])))
    return st_syntax(p, "number out of range");
  return 0;
}

static int st_literal(st_parser *p, const char *word) {
  size_t len = strlen(word);
  if (p->n - p->i < len || memcmp(p->s + p->i, word, len) != 0) return st_syntax(p, "expected a value");
  p->i += len;
  return 0;
}

/* An object member's key and its ':' (the key decoded into out as st_string does). */
static int st_key(st_parser *p, char *out, size_t cap, size_t *len) {
  if (st_peek(p) != '"') return st_syntax(p, "expected a string key");
  if (st_string(p, out, cap, len) != 0) return -1;
  if (st_peek(p) != ':') return st_syntax(p, "expected ':'");
  p->i++;
  return 0;
}

/* Any JSON value, checked and passed over: the fields of an entry that the reference ignores. */
static int st_skip(st_parser *p) {
  size_t len;
  int c = st_peek(p), more;
  switch (c) {
    case -1:
      return st_syntax(p, "unexpected end of the header");
    case '"':
      return st_string(p, NULL, 0, &len);
    case 't':
      return st_literal(p, "true");
    case 'f':
      return st_literal(p, "false");
    case 'n':
      return st_literal(p, "null");
    case '[':
      if (st_enter(p) != 0) return -1;
      if (st_peek(p) == ']') return st_next(p, ']');
      do {
        if (st_skip(p) != 0) return -1;
      } while ((more = st_next(p, ']')) == 1);
      return more;
    case '{':
      if (st_enter(p) != 0) return -1;
      if (st_peek(p) == '}') return st_next(p, '}');
      do {
        if (st_key(p, NULL, 0, &len) != 0 || st_skip(p) != 0) return -1;
      } while ((more = st_next(p, '}')) == 1);
      return more;
    default:
      if (c == '-' || (c >= '0' && c <= '9')) return st_number(p);
      return st_syntax(p, "expected a value");
  }
}

/* ------------------------------------------------------------------------------------------------ */
/* The header's schema                                                                              */
/* ------------------------------------------------------------------------------------------------ */

/* "__metadata__": null, or an object of strings (Option<HashMap<String, String>>). A key given twice
 * inside it is taken by the reference (the last wins); nothing here reads the values, so it is too. */
static int st_metadata(st_parser *p) {
  size_t len;
  int c = st_peek(p), more;
  if (c == -1) return st_syntax(p, "unexpected end of the header");
  if (c == 'n') return st_literal(p, "null");
  if (c != '{') return tn_tf_fail(p->err, p->errlen, p->path, "__metadata__ is not an object of strings");
  if (st_enter(p) != 0) return -1;
  if (st_peek(p) == '}') return st_next(p, '}');
  do {
    if (st_key(p, NULL, 0, &len) != 0) return -1;
    c = st_peek(p);
    if (c == -1) return st_syntax(p, "unexpected end of the header");
    if (c != '"')
      return tn_tf_fail(p->err, p->errlen, p->path, "__metadata__ holds a value that is not a string");
    if (st_string(p, NULL, 0, &len) != 0) return -1;
  } while ((more = st_next(p, '}')) == 1);
  return more;
}

#define ST_NAME(name, len) st_shown(name, len, 100), name

static int st_dtype(st_parser *p, const char *name, size_t nlen, st_entry *e) {
  char buf[16];
  size_t len;
  int c = st_peek(p);
  if (c == -1) return st_syntax(p, "unexpected end of the header");
  if (c != '"')
    return tn_tf_fail(p->err, p->errlen, p->path, "tensor '%.*s' has a dtype that is not a string",
                      ST_NAME(name, nlen));
  if (st_string(p, buf, sizeof buf, &len) != 0) return -1;
  for (size_t k = 0; k < ST_NDTYPES; k++)
    if (len == strlen(ST_DTYPES[k].name) && memcmp(buf, ST_DTYPES[k].name, len) == 0) {
      e->dtype = (int)k;
      return 0;
    }
  /* Only the first bytes were kept: the message shows what fits, cut on a character boundary. */
  return tn_tf_fail(p->err, p->errlen, p->path, "tensor '%.*s' has unknown dtype '%.*s%s'", ST_NAME(name, nlen),
                    st_shown(buf, len < sizeof buf ? len : sizeof buf, sizeof buf - 1), buf,
                    len < sizeof buf ? "" : "...");
}

static int st_shape(st_parser *p, const char *name, size_t nlen, st_entry *e) {
  int c = st_peek(p), more;
  if (c == -1) return st_syntax(p, "unexpected end of the header");
  if (c != '[')
    return tn_tf_fail(p->err, p->errlen, p->path, "tensor '%.*s' has no shape array", ST_NAME(name, nlen));
  if (st_enter(p) != 0) return -1;
  e->count = 1;
  if (st_peek(p) == ']') return st_next(p, ']');
  do {
    uint64_t v;
    if (st_peek(p) == -1) return st_syntax(p, "unexpected end of the header");
    if (st_u64(p, &v) != 0)
      return tn_tf_fail(p->err, p->errlen, p->path,
                        "tensor '%.*s' has a shape value that is not an integer in [0, 2^64-1]",
                        ST_NAME(name, nlen));
    if (e->ndim < 2) e->shape[e->ndim] = v;
    e->ndim++;
    /* Checked as the reference multiplies: the first overflow refuses the shape, a later 0 or not. */
    if (!e->overflow && e->count != 0 && v > UINT64_MAX / e->count) e->overflow = 1;
    if (!e->overflow) e->count *= v;
  } while ((more = st_next(p, ']')) == 1);
  return more;
}

static int st_offsets(st_parser *p, const char *name, size_t nlen, st_entry *e) {
  int c;
  if (st_peek(p) == '[') {
    if (st_enter(p) != 0) return -1;
    if ((c = st_peek(p)) != ']' && c != -1) {
      if (st_u64(p, &e->begin) != 0) goto not_integers;
      if (st_peek(p) == ',') {
        p->i++;
        if ((c = st_peek(p)) != ']' && c != -1) {
          if (st_u64(p, &e->end) != 0) goto not_integers;
          if (st_peek(p) == ']') return st_next(p, ']');
        }
      }
    }
  }
  if (st_peek(p) == -1) return st_syntax(p, "unexpected end of the header");
  return tn_tf_fail(p->err, p->errlen, p->path, "tensor '%.*s' has data_offsets that are not [begin, end]",
                    ST_NAME(name, nlen));
not_integers:
  if (p->i >= p->n) return st_syntax(p, "unexpected end of the header");
  return tn_tf_fail(p->err, p->errlen, p->path,
                    "tensor '%.*s' has data_offsets that are not integers in [0, 2^64-1]", ST_NAME(name, nlen));
}

/* One tensor entry (TensorInfo): the three fields once each, others ignored as serde ignores them,
 * then the entry's own checks from Metadata::validate. */
static int st_entry_parse(st_parser *p, const char *name, size_t nlen, st_entry *e) {
  static const char *const fields[] = {"dtype", "shape", "data_offsets"};
  int c = st_peek(p), more, seen[3] = {0, 0, 0};
  uint64_t nbits;
  memset(e, 0, sizeof *e);
  if (c == -1) return st_syntax(p, "unexpected end of the header");
  if (c != '{')
    return tn_tf_fail(p->err, p->errlen, p->path, "entry of tensor '%.*s' is not an object", ST_NAME(name, nlen));
  if (st_enter(p) != 0) return -1;
  if (st_peek(p) == '}') {
    more = st_next(p, '}');
  } else {
    do {
      char key[16];
      size_t klen;
      int f = 3, rc;
      if (st_key(p, key, sizeof key, &klen) != 0) return -1;
      for (int k = 0; k < 3; k++)
        if (klen == strlen(fields[k]) && memcmp(key, fields[k], klen) == 0) f = k;
      if (f < 3 && seen[f]++)
        return tn_tf_fail(p->err, p->errlen, p->path, "tensor '%.*s' has the field '%s' twice",
                          ST_NAME(name, nlen), fields[f]);
      rc = f == 0   ? st_dtype(p, name, nlen, e)
           : f == 1 ? st_shape(p, name, nlen, e)
           : f == 2 ? st_offsets(p, name, nlen, e)
                    : st_skip(p);
      if (rc != 0) return -1;
    } while ((more = st_next(p, '}')) == 1);
  }
  if (more != 0) return -1;
  if (!seen[0]) return tn_tf_fail(p->err, p->errlen, p->path, "tensor '%.*s' has no dtype", ST_NAME(name, nlen));
  if (!seen[1])
    return tn_tf_fail(p->err, p->errlen, p->path, "tensor '%.*s' has no shape array", ST_NAME(name, nlen));
  if (!seen[2])
    return tn_tf_fail(p->err, p->errlen, p->path, "tensor '%.*s' has no data_offsets [begin, end]",
                      ST_NAME(name, nlen));
  if (e->begin > e->end)
    return tn_tf_fail(p->err, p->errlen, p->path,
                      "tensor '%.*s' has data_offsets [%" PRIu64 ", %" PRIu64 "]: begin > end",
                      ST_NAME(name, nlen), e->begin, e->end);
  if (e->overflow || e->count > UINT64_MAX / ST_DTYPES[e->dtype].bits)
    return tn_tf_fail(p->err, p->errlen, p->path, "tensor '%.*s' has a shape whose size overflows 64 bits",
                      ST_NAME(name, nlen));
  nbits = e->count * ST_DTYPES[e->dtype].bits;
  if (nbits % 8 != 0)
    return tn_tf_fail(p->err, p->errlen, p->path,
                      "tensor '%.*s' has %" PRIu64 " elements of %u bits, which do not end on a byte",
                      ST_NAME(name, nlen), e->count, ST_DTYPES[e->dtype].bits);
  if (e->end - e->begin != nbits / 8)
    return tn_tf_fail(p->err, p->errlen, p->path,
                      "tensor '%.*s' has %" PRIu64 " bytes of data, its shape needs %" PRIu64,
                      ST_NAME(name, nlen), e->end - e->begin, nbits / 8);
  return 0;
}

/* A top-level member other than __metadata__: a tensor, recorded. */
static int st_tensor(st_parser *p, size_t off, size_t len) {
  const char *name = p->s + off;
  st_entry e;
  st_rec *r;
  if (memchr(name, '\0', len))
    return tn_tf_fail(p->err, p->errlen, p->path,
                      "tensor name '%.*s\\u0000...' contains U+0000, which a C string cannot hold",
                      ST_NAME(name, len));
  if (st_entry_parse(p, name, len, &e) != 0) return -1;
  if (p->nrec == p->cap)
    return tn_tf_fail(p->err, p->errlen, p->path, "header holds more entries than its length allows");
  r = &p->recs[p->nrec++];
  r->begin = e.begin;
  r->end = e.end;
  r->name_off = (uint32_t)off;
  r->name_len = (uint32_t)len;
  if (len == p->want_len && memcmp(name, p->want, len) == 0 && p->found++ == 0) p->got = e;
  return 0;
}

/* The whole header: optional JSON whitespace, one object, optional JSON whitespace (the reference
 * reads it with serde_json::from_str, which allows both). */
static int st_parse(st_parser *p) {
  size_t bad, off, len;
  int more;
  if (p->n >= 3 && memcmp(p->s, "\xef\xbb\xbf", 3) == 0)
    return tn_tf_fail(p->err, p->errlen, p->path,
                      "header starts with a UTF-8 byte order mark, which JSON does not allow");
  if (tn_tf_utf8_check((const unsigned char *)p->s, p->n, &bad) != 0)
    return tn_tf_fail(p->err, p->errlen, p->path, "header is not valid UTF-8 (at byte %zu)", bad);
  switch (st_peek(p)) {
    case '{':
      break;
    case -1:
      return st_syntax(p, "no JSON value");
    default:
      return tn_tf_fail(p->err, p->errlen, p->path, "header JSON is not an object");
  }
  if (st_enter(p) != 0) return -1;
  if (st_peek(p) == '}') {
    more = st_next(p, '}');
  } else {
    do {
      st_peek(p); /* to the key's opening quote: the key is decoded in place, from the byte after it */
      off = p->i + 1;
      if (st_key(p, p->s + off, SIZE_MAX, &len) != 0) return -1;
      if (len == 12 && memcmp(p->s + off, "__metadata__", 12) == 0) {
        if (p->seen_metadata) return tn_tf_fail(p->err, p->errlen, p->path, "header has __metadata__ twice");
        p->seen_metadata = 1;
        if (st_metadata(p) != 0) return -1;
      } else if (st_tensor(p, off, len) != 0) {
        return -1;
      }
    } while ((more = st_next(p, '}')) == 1);
  }
  if (more != 0) return -1;
  if (st_peek(p) != -1) return tn_tf_fail(p->err, p->errlen, p->path, "unexpected bytes after the header JSON");
  return 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* Checks across entries                                                                            */
/* ------------------------------------------------------------------------------------------------ */

/* qsort_r's comparator: by name, the header text as its argument. */
static int st_by_name(const void *pa, const void *pb, void *text) {
  const st_rec *a = pa, *b = pb;
  const char *s = text;
  size_t n = a->name_len < b->name_len ? a->name_len : b->name_len;
  int c = memcmp(s + a->name_off, s + b->name_off, n);
  return c ? c : (a->name_len > b->name_len) - (a->name_len < b->name_len);
}

static int st_by_offsets(const void *pa, const void *pb) {
  const st_rec *a = pa, *b = pb;
  if (a->begin != b->begin) return a->begin < b->begin ? -1 : 1;
  return (a->end > b->end) - (a->end < b->end);
}

#define ST_REC_NAME(p, r) st_shown((p)->s + (r)->name_off, (r)->name_len, 100), (p)->s + (r)->name_off

/* JSON readers disagree on which of two same-named entries wins; refusing is the only answer that
 * is not a guess. */
static int st_check_names(st_parser *p) {
  qsort_r(p->recs, p->nrec, sizeof *p->recs, st_by_name, p->s);
  for (size_t k = 0, j; k < p->nrec; k = j) {
    for (j = k + 1; j < p->nrec && st_by_name(&p->recs[k], &p->recs[j], p->s) == 0;) j++;
    if (j - k > 1)
      return tn_tf_fail(p->err, p->errlen, p->path, "tensor '%.*s' appears %zu times in the header",
                        ST_REC_NAME(p, &p->recs[k]), j - k);
  }
  return 0;
}

/* As Metadata::validate and read_metadata: sorted by offsets, the tensors tile the data buffer from
 * its first byte to its last, without a gap or an overlap, so that no byte of the file is unread.
 * The records must be in that order. */
static int st_check_tiling(st_parser *p, uint64_t buflen) {
  uint64_t at = 0;
  for (size_t k = 0; k < p->nrec; k++) {
    const st_rec *r = &p->recs[k];
    if (r->begin > at)
      return tn_tf_fail(p->err, p->errlen, p->path,
                        "no tensor covers bytes [%" PRIu64 ", %" PRIu64
                        ") of the data buffer (before tensor '%.*s')",
                        at, r->begin, ST_REC_NAME(p, r));
    if (r->begin < at)
      return tn_tf_fail(p->err, p->errlen, p->path, "tensors '%.*s' and '%.*s' overlap in the data buffer",
                        ST_REC_NAME(p, &p->recs[k - 1]), ST_REC_NAME(p, r));
    at = r->end;
  }
  if (at > buflen)
    return tn_tf_fail(p->err, p->errlen, p->path,
                      "tensor '%.*s' ends at byte %" PRIu64 ", past the %" PRIu64 "-byte buffer",
                      ST_REC_NAME(p, &p->recs[p->nrec - 1]), at, buflen);
  if (at < buflen)
    return tn_tf_fail(p->err, p->errlen, p->path,
                      "the tensors end at byte %" PRIu64 " of the %" PRIu64
                      "-byte data buffer; no tensor covers the rest",
                      at, buflen);
  return 0;
}

/* The checks across entries. Writers put the entries in offset order, so the tiling is checked in
 * the header's order when it is already sorted, before the sort by name; a duplicate name is the
 * message that wins either way. */
static int st_check_all(st_parser *p, uint64_t buflen) {
  int tiled = 2, sorted = 1;
  for (size_t k = 1; k < p->nrec && sorted; k++) sorted = st_by_offsets(&p->recs[k - 1], &p->recs[k]) <= 0;
  if (sorted) tiled = st_check_tiling(p, buflen);
  if (st_check_names(p) != 0) return -1;
  if (tiled != 2) return tiled;
  qsort(p->recs, p->nrec, sizeof *p->recs, st_by_offsets);
  return st_check_tiling(p, buflen);
}

/* "no tensor 'x' (the file has: 'a', 'b', ... and 12 more)", the first eight in the header's order,
 * names cut short: the file may hold thousands. */
static int st_missing(st_parser *p) {
  const st_rec *first[8];
  char list[400] = "";
  size_t used = 0, shown = 0;
  /* The header's order is the order of the names' offsets. */
  for (size_t k = 0; k < p->nrec; k++) {
    size_t at = shown < 8 ? shown++ : 8;
    while (at > 0 && first[at - 1]->name_off > p->recs[k].name_off) {
      if (at < 8) first[at] = first[at - 1];
      at--;
    }
    if (at < 8) first[at] = &p->recs[k];
  }
  for (size_t k = 0; k < shown && used < sizeof list - 64; k++) {
    int n = snprintf(list + used, sizeof list - used, "%s'%.*s'", k ? ", " : "",
                     st_shown(p->s + first[k]->name_off, first[k]->name_len, 40), p->s + first[k]->name_off);
    used += n > 0 ? (size_t)n : 0;
  }
  if (shown == 0)
    return tn_tf_fail(p->err, p->errlen, p->path, "no tensor '%.100s' (the file has no tensors)", p->want);
  if (shown == p->nrec)
    return tn_tf_fail(p->err, p->errlen, p->path, "no tensor '%.100s' (the file has: %s)", p->want, list);
  return tn_tf_fail(p->err, p->errlen, p->path, "no tensor '%.100s' (the file has: %s and %zu more)", p->want,
                    list, p->nrec - shown);
}

/* The tensor asked for, in the shapes and dtypes tnorm takes; a 0-d one, with allow_0d, as one element. */
static int st_pick(st_parser *p, int allow_0d, tn_file_tensor *out, uint64_t *begin, uint64_t *nbytes) {
  const st_entry *e = &p->got;
  uint64_t rows, dim;
  if (p->found == 0) return st_missing(p);
  if (ST_DTYPES[e->dtype].tn < 0)
    return tn_tf_fail(p->err, p->errlen, p->path,
                      "tensor '%.100s' has unsupported dtype '%s' (F32, F16, BF16, F8_E4M3, F8_E5M2, I8 and U8 are)",
                      p->want, ST_DTYPES[e->dtype].name);
  if ((e->ndim < 1 && !allow_0d) || e->ndim > 2)
    return tn_tf_fail(p->err, p->errlen, p->path,
                      "tensor '%.100s' is %" PRIu64 "-D; only 1-D and 2-D are supported", p->want, e->ndim);
  rows = e->ndim == 2 ? e->shape[0] : 1;
  dim = e->ndim == 0 ? 1 : e->shape[e->ndim - 1];
  if (rows > INT64_MAX || dim > INT64_MAX ||
      tn_tf_nbytes((int64_t)rows, (int64_t)dim, (tn_dtype)ST_DTYPES[e->dtype].tn, nbytes) != 0)
    return tn_tf_fail(p->err, p->errlen, p->path,
                      "tensor '%.100s' has shape %" PRIu64 " x %" PRIu64 ", too large for int64 indexing",
                      p->want, rows, dim);
  out->dtype = (tn_dtype)ST_DTYPES[e->dtype].tn;
  out->ndim = e->ndim == 0 ? 1 : (int)e->ndim;
  out->rows = (int64_t)rows;
  out->dim = (int64_t)dim;
  snprintf(out->name, sizeof out->name, "%s", p->want);
  *begin = e->begin;
  return 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* Reading                                                                                          */
/* ------------------------------------------------------------------------------------------------ */

static int st_header(FILE *f, const char *path, uint64_t size, char **text, uint64_t *hlen, char *err,
                     size_t errlen) {
  unsigned char b[8];
  *text = NULL;
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
  *text = malloc((size_t)*hlen + 1);
  if (!*text) return tn_tf_fail(err, errlen, path, "out of memory");
  if (tn_tf_read_exact(f, *text, (size_t)*hlen) != 0) {
    free(*text);
    *text = NULL;
    return tn_tf_fail(err, errlen, path, "read error in the header");
  }
  (*text)[*hlen] = '\0';
  return 0;
}

static int st_read(FILE *f, const char *path, uint64_t size, const char *name, int allow_0d, tn_file_tensor *out,
                   char *err, size_t errlen) {
  st_parser p;
  uint64_t hlen = 0, begin = 0, nbytes = 0;
  int rc;
  memset(&p, 0, sizeof p);
  if (st_header(f, path, size, &p.s, &hlen, err, errlen) != 0) return -1;
  p.n = (size_t)hlen;
  p.path = path;
  p.err = err;
  p.errlen = errlen;
  p.want = name;
  p.want_len = strlen(name);
  /* Untouched capacity costs address space, not memory. */
  p.cap = p.n / ST_MIN_ENTRY + 1;
  p.recs = malloc(p.cap * sizeof *p.recs);
  if (!p.recs)
    rc = tn_tf_fail(err, errlen, path, "out of memory");
  else if ((rc = st_parse(&p)) == 0 && (rc = st_check_all(&p, size - 8 - hlen)) == 0)
    rc = st_pick(&p, allow_0d, out, &begin, &nbytes);
  free(p.recs);
  free(p.s);
  if (rc != 0) return -1;
  /* The offset is within the file (checked above), so it fits off_t. */
  if (fseeko(f, (off_t)(8 + hlen + begin), SEEK_SET) != 0)
    return tn_tf_fail(err, errlen, path, "cannot seek to tensor '%.100s': %s", name, strerror(errno));
  return tn_tf_read_data(f, path, nbytes, &out->data, err, errlen);
}

int tn_st_load(const char *path, const char *name, int allow_0d, tn_file_tensor *out, char *err, size_t errlen) {
  FILE *f;
  uint64_t size;
  int rc;
  if (tn_tf_open(path, &f, &size, err, errlen) != 0) return -1;
  rc = st_read(f, path, size, name, allow_0d, out, err, errlen);
  fclose(f);
  return rc;
}

/* ------------------------------------------------------------------------------------------------ */
/* Writing                                                                                          */
/* ------------------------------------------------------------------------------------------------ */

/* s as a JSON string body: quotes, backslashes and control characters escaped. */
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

/* The writer's safetensors dtype names, by tn_dtype. */
static const char *const ST_WRITE_NAMES[TN_DTYPE_ALL_COUNT] = {
    [TN_F32] = "F32",         [TN_F16] = "F16", [TN_BF16] = "BF16", [TN_F8_E4M3] = "F8_E4M3",
    [TN_F8_E5M2] = "F8_E5M2", [TN_I8] = "I8",   [TN_U8] = "U8"};

/* Room for the tensor's escaped name, its metadata and the rest of its entry. */
#define ST_META_TEXT 512
#define ST_HEADER_CAP (256 * 6 + TN_FILE_MAX_META * 2 * ST_META_TEXT + 256)

/* `"__metadata__":{...},` from the tensor's entries (nothing when it has none); the length, or -1 when
 * a string does not fit. */
static int st_metadata_text(const tn_file_tensor *t, char *buf, size_t cap) {
  char key[ST_META_TEXT], value[ST_META_TEXT];
  size_t n = 0;
  int k;
  buf[0] = '\0';
  for (k = 0; k < TN_FILE_MAX_META && t->meta[k].key != NULL; k++) {
    int m;
    if (json_escape(t->meta[k].key, key, sizeof key) != 0 ||
        json_escape(t->meta[k].value ? t->meta[k].value : "", value, sizeof value) != 0)
      return -1;
    m = snprintf(buf + n, cap - n, "%s\"%s\":\"%s\"", k == 0 ? "\"__metadata__\":{" : ",", key, value);
    if (m < 0 || (size_t)m >= cap - n) return -1;
    n += (size_t)m;
  }
  if (k > 0) {
    if (n + 3 > cap) return -1;
    memcpy(buf + n, "},", 3);
    n += 2;
  }
  return (int)n;
}

/* One entry, offsets [0, nbytes], after the metadata when there is any (the reference writer puts it
 * first too), padded with spaces to a multiple of 8 as the reference writer does. The extents are int64,
 * which the reader takes exactly, so whatever is written reads back. */
static size_t st_header_text(const tn_file_tensor *t, const char *name, uint64_t nbytes, char *buf, size_t cap) {
  char key[256 * 6 + 8], shape[48], meta[TN_FILE_MAX_META * 2 * ST_META_TEXT + 32];
  int n;
  if (json_escape(name, key, sizeof key) != 0 || st_metadata_text(t, meta, sizeof meta) < 0) return 0;
  if ((unsigned)t->dtype >= TN_DTYPE_ALL_COUNT) return 0;
  if (t->ndim == 1)
    snprintf(shape, sizeof shape, "[%" PRId64 "]", t->dim);
  else
    snprintf(shape, sizeof shape, "[%" PRId64 ",%" PRId64 "]", t->rows, t->dim);
  n = snprintf(buf, cap, "{%s\"%s\":{\"dtype\":\"%s\",\"shape\":%s,\"data_offsets\":[0,%" PRIu64 "]}}", meta, key,
               ST_WRITE_NAMES[t->dtype], shape, nbytes);
  if (n < 0 || (size_t)n + 8 > cap) return 0;
  while (n % 8 != 0) buf[n++] = ' ';
  return (size_t)n;
}

int tn_st_write(FILE *f, const char *path, const tn_file_tensor *t, const char *name, char *err, size_t errlen) {
  char header[ST_HEADER_CAP];
  unsigned char len[8];
  uint64_t nbytes = 0;
  size_t hlen = 0, bad;
  /* A header that is not UTF-8 is refused by every reader, this one included. */
  if (tn_tf_utf8_check((const unsigned char *)name, strlen(name), &bad) != 0)
    return tn_tf_fail(err, errlen, path, "tensor name is not valid UTF-8 (at byte %zu)", bad);
  if (tn_tf_nbytes(t->rows, t->dim, t->dtype, &nbytes) == 0)
    hlen = st_header_text(t, name, nbytes, header, sizeof header);
  if (hlen == 0) return tn_tf_fail(err, errlen, path, "cannot build the safetensors header");
  for (int i = 0; i < 8; i++) len[i] = (unsigned char)((uint64_t)hlen >> (8 * i));
  if (fwrite(len, 1, 8, f) != 8 || fwrite(header, 1, hlen, f) != hlen ||
      (nbytes && fwrite(t->data, 1, (size_t)nbytes, f) != (size_t)nbytes))
    return tn_tf_fail(err, errlen, path, "write failed: %s", strerror(errno));
  return 0;
}
