/* A content-addressed store of compiled kernels on disk. An entry is found by its key text (which holds
 * everything the binary depends on); the file name is a hash of the key, and the file repeats the key
 * and carries a checksum, so a collision, a truncated or a corrupt file reads as a miss and is rebuilt.
 * Entries are written to a temporary file and renamed into place, so readers never see half a file.
 * Needs no GPU (tested on machines without one). */
#ifndef TN_CUDA_DISK_CACHE_H
#define TN_CUDA_DISK_CACHE_H

#include <stddef.h>
#include <stdint.h>

/* FNV-1a, 64-bit, continuing from h (start with TN_HASH_SEED). */
#define TN_HASH_SEED 0xcbf29ce484222325ull
uint64_t tn_hash64(uint64_t h, const void *data, size_t n);

/* The cache directory: TNORM_CACHE_DIR, else $XDG_CACHE_HOME/tnorm, else $HOME/.cache/tnorm. Returns 0
 * (and "" in out) when none can be named or it does not fit; an empty TNORM_CACHE_DIR disables the cache. */
int tn_disk_cache_dir(char *out, size_t capacity);

typedef enum tn_disk_lookup {
  TN_DISK_MISS = 0,     /* no entry */
  TN_DISK_HIT = 1,      /* *payload (malloc'ed, the caller frees) and *size are set */
  TN_DISK_REJECTED = 2, /* an entry exists but is truncated, corrupt or for another key */
} tn_disk_lookup;

tn_disk_lookup tn_disk_cache_load(const char *dir, const char *key, void **payload, size_t *size);

/* Writes the entry atomically (creating dir and its parents). Returns 0 on success, -1 otherwise: a cache
 * that cannot be written only costs a recompile next time. */
int tn_disk_cache_store(const char *dir, const char *key, const void *payload, size_t size);

/* The entry's file path for key, into out. */
void tn_disk_cache_path(const char *dir, const char *key, char *out, size_t capacity);

#endif
