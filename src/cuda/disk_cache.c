#include "disk_cache.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* File layout: magic (8 bytes), key length, payload length, checksum of key + payload (little-endian
 * u64 each), then the key and the payload. */
static const char magic[8] = {'T', 'N', 'K', 'C', 'A', 'C', 'H', '1'};
#define HEADER_BYTES 32
#define MAX_ENTRY_BYTES ((uint64_t)256 << 20)

uint64_t tn_hash64(uint64_t h, const void *data, size_t n) {
  const unsigned char *p = data;
  for (size_t i = 0; i < n; i++) {
    h ^= p[i];
    h *= 0x100000001b3ull;
  }
  return h;
}

int tn_disk_cache_dir(char *out, size_t capacity) {
  const char *env = getenv("TNORM_CACHE_DIR");
  int n = -1;
  out[0] = '\0';
  if (env != NULL) {
    if (env[0] == '\0') return 0;
    n = snprintf(out, capacity, "%s", env);
  } else if ((env = getenv("XDG_CACHE_HOME")) != NULL && env[0] == '/') {
    n = snprintf(out, capacity, "%s/tnorm", env);
  } else if ((env = getenv("HOME")) != NULL && env[0] != '\0') {
    n = snprintf(out, capacity, "%s/.cache/tnorm", env);
  }
  if (n <= 0 || (size_t)n >= capacity) {
    out[0] = '\0';
    return 0;
  }
  return 1;
}

void tn_disk_cache_path(const char *dir, const char *key, char *out, size_t capacity) {
  uint64_t a = tn_hash64(TN_HASH_SEED, key, strlen(key));
  uint64_t b = tn_hash64(a ^ 0x9e3779b97f4a7c15ull, key, strlen(key));
  snprintf(out, capacity, "%s/%016llx%016llx.cubin", dir, (unsigned long long)a, (unsigned long long)b);
}

static void put_u64(unsigned char *p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static uint64_t get_u64(const unsigned char *p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; i++) v |= (uint64_t)p[i] << (8 * i);
  return v;
}

static uint64_t entry_checksum(const char *key, size_t key_len, const void *payload, size_t size) {
  return tn_hash64(tn_hash64(TN_HASH_SEED, key, key_len), payload, size);
}

tn_disk_lookup tn_disk_cache_load(const char *dir, const char *key, void **payload, size_t *size) {
  char path[4096];
  tn_disk_cache_path(dir, key, path, sizeof path);
  FILE *f = fopen(path, "rb");
  if (f == NULL) return TN_DISK_MISS;
  tn_disk_lookup result = TN_DISK_REJECTED;
  unsigned char header[HEADER_BYTES];
  char *body = NULL;
  const size_t key_len = strlen(key);
  if (fread(header, 1, HEADER_BYTES, f) != HEADER_BYTES || memcmp(header, magic, 8) != 0) goto done;
  uint64_t stored_key_len = get_u64(header + 8), payload_len = get_u64(header + 16), sum = get_u64(header + 24);
  if (stored_key_len != key_len || payload_len == 0 || payload_len > MAX_ENTRY_BYTES) goto done;
  body = malloc(key_len + (size_t)payload_len + 1);
  if (body == NULL) goto done;
  /* The body must be exactly the lengths the header gives: one byte more is also a bad file. */
  if (fread(body, 1, key_len + (size_t)payload_len + 1, f) != key_len + (size_t)payload_len) goto done;
  if (memcmp(body, key, key_len) != 0) goto done;
  if (entry_checksum(body, key_len, body + key_len, (size_t)payload_len) != sum) goto done;
  memmove(body, body + key_len, (size_t)payload_len);
  *payload = body;
  *size = (size_t)payload_len;
  body = NULL;
  result = TN_DISK_HIT;
done:
  free(body);
  fclose(f);
  return result;
}

/* mkdir -p */
static int make_dirs(const char *dir) {
  char path[4096];
  size_t n = strlen(dir);
  if (n == 0 || n >= sizeof path) return -1;
  memcpy(path, dir, n + 1);
  for (size_t i = 1; i <= n; i++) {
    if (path[i] == '/' || path[i] == '\0') {
      char c = path[i];
      path[i] = '\0';
      if (mkdir(path, 0755) != 0 && errno != EEXIST) return -1;
      path[i] = c;
    }
  }
  return 0;
}

static int write_all(int fd, const void *data, size_t n) {
  const char *p = data;
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

int tn_disk_cache_store(const char *dir, const char *key, const void *payload, size_t size) {
  if (make_dirs(dir) != 0) return -1;
  char path[4096], tmp[4200];
  tn_disk_cache_path(dir, key, path, sizeof path);
  snprintf(tmp, sizeof tmp, "%s.tmp.XXXXXX", path);
  int fd = mkstemp(tmp);
  if (fd < 0) return -1;
  const size_t key_len = strlen(key);
  unsigned char header[HEADER_BYTES];
  memcpy(header, magic, 8);
  put_u64(header + 8, key_len);
  put_u64(header + 16, size);
  put_u64(header + 24, entry_checksum(key, key_len, payload, size));
  int ok = write_all(fd, header, sizeof header) == 0 && write_all(fd, key, key_len) == 0 &&
           write_all(fd, payload, size) == 0 && fchmod(fd, 0644) == 0;
  ok = close(fd) == 0 && ok;
  if (!ok || rename(tmp, path) != 0) {
    unlink(tmp);
    return -1;
  }
  return 0;
}
