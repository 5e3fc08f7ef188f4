#include "registry.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../core/error.h"
#include "disk_cache.h"
#include "driver.h"

/* The kernel sources, embedded at build time (cmake/embed_sources.cmake). */
extern const char tn_cuda_source_params_h[];
extern const char tn_cuda_source_row_cuh[];
extern const char tn_cuda_source_ops_cuh[];
extern const char tn_cuda_source_norm_cu[];
extern const char tn_cuda_source_add_rms_norm_cu[];
extern const char tn_cuda_source_elementwise_cu[];
extern const char tn_cuda_source_norm_x_cu[];
extern const char tn_cuda_source_layer_norm_cu[];
extern const char tn_cuda_source_general_cu[];
extern const char tn_cuda_source_rope_cu[];

static const char *const header_names[] = {"params.h", "row.cuh", "ops.cuh"};
#define HEADER_COUNT 3

static const char *family_source(tn_kernel_family f) {
  switch (f) {
    case TN_FAMILY_ADD_NORM:
    case TN_FAMILY_ADD_NORM_MUL:
      return tn_cuda_source_add_rms_norm_cu;
    case TN_FAMILY_ELEMENTWISE:
      return tn_cuda_source_elementwise_cu;
    case TN_FAMILY_NORM_X:
      return tn_cuda_source_norm_x_cu;
    case TN_FAMILY_LAYER:
    case TN_FAMILY_ADD_LAYER:
      return tn_cuda_source_layer_norm_cu;
    case TN_FAMILY_GENERAL:
      return tn_cuda_source_general_cu;
    case TN_FAMILY_ROPE:
      return tn_cuda_source_rope_cu;
    default:
      return tn_cuda_source_norm_cu;
  }
}

static const char *const family_prefix[TN_FAMILY_COUNT] = {
    "tn_norm", "tn_norm_mul", "tn_add_norm", "tn_add_norm_mul", "tn_elementwise",
    "tn_normx", "tn_layer", "tn_general", "tn_rope", "tn_add_layer", "tn_norm_unweighted"};

/* Each family's shapes and access modes, in key order (see registry.h). The later families keep the
 * shapes their calls need (a row takes the family's pair shape where it has one, else its smallest register
 * shape that holds it, else a staged one: tn_kernel_call_shape; the reduction order still depends on
 * (dtype, dim) alone within a family). */
/* rms_norm's, l2_norm's and add_rms_norm's families (with and without a multiplicand, or a weight): the pair
 * shapes of G = 32 .. 128 (rows of 33 .. 256 chunks; norm.cu says why), the register shapes but G = 64
 * (whose rows take a pair shape; G = 32 keeps float32 rows of 65 .. 128 chunks, tn_kernel_pair_shape), the
 * staged ones, and the few-rows forms of G = 128 .. 512. norm_x.cu's family has the same G for every row
 * (its G = 1 too): a graph fuses an add and an rms_norm into an add_rms_norm, an rms_norm and a mul into an
 * rms_norm with a multiplicand, an l2_norm and a scale into norm_x.cu's l2_norm with a scale, and the fused
 * op must reduce a row as the ops it replaces did (the reduction order is G's). */
#define TN_PAIR_SHAPES TN_SHAPE_PAIR_FIRST, TN_SHAPE_PAIR_FIRST + 1, TN_SHAPE_PAIR_FIRST + 2
/* What the lists below share: the register shapes but G = 64, the staged ones, the few-rows forms of G = 128
 * and 256. */
#define TN_NORM_COMMON_SHAPES \
  0, 1, 2, 3, 4, 5, 7, 8, 9, 10, TN_SHAPE_SHARED, TN_SHAPE_REREAD, TN_SHAPE_WIDE_FIRST + 1, TN_SHAPE_WIDE_FIRST + 2
#define TN_NORM_SHAPES TN_NORM_COMMON_SHAPES, TN_SHAPE_WIDE_FIRST + 3, TN_PAIR_SHAPES
static const signed char norm_shapes[TN_NORM_SHAPE_COUNT] = {TN_NORM_SHAPES};
static const signed char normx_shapes[TN_NORM_X_SHAPE_COUNT] = {TN_NORM_COMMON_SHAPES, TN_PAIR_SHAPES};
/* add_rms_norm's families: the norm families' shapes (a graph's add + rms_norm reduces as rms_norm does) and
 * the pair shapes of G = 256 .. 1024, which its own calls take for rows of 257 .. 2048 chunks (add_rms_norm.cu
 * says why). */
static const signed char add_norm_shapes[TN_ADD_NORM_SHAPE_COUNT] = {
    TN_NORM_SHAPES, TN_SHAPE_PAIR_FIRST + 3, TN_SHAPE_PAIR_FIRST + 4, TN_SHAPE_PAIR_FIRST + 5};
_Static_assert((TN_KERNEL_PAIR_MIN_GROUP << 3) == TN_KERNEL_ADD_PAIR_MIN_GROUP &&
                   (TN_KERNEL_PAIR_MIN_GROUP << 5) == TN_KERNEL_MAX_GROUP,
               "add_norm_shapes lists the pair shapes of G = TN_KERNEL_ADD_PAIR_MIN_GROUP .. TN_KERNEL_MAX_GROUP");
/* layer_norm's and add_layer_norm's families: the register shapes from G = 8 (bf16 x 128: 16 chunks on 8
 * threads, none idle, where G = 16 leaves half of each thread's chunks empty) and the staged ones. The same
 * list for both: a graph fuses an add and a layer_norm into an add_layer_norm, which must reduce a row as
 * layer_norm did, though add_layer_norm alone runs those rows faster on G = 16 (docs/performance.md,
 * "layer_norm's kernels (layer_norm.cu)"). */
static const signed char layer_shapes[TN_LAYER_SHAPE_COUNT] = {3, 4, 5, 6, 7, 8, 9, 10, TN_SHAPE_SHARED, TN_SHAPE_REREAD};
/* general.cu's family takes the G of norm_x's for every row: an rms_norm (or add_rms_norm) in
 * TN_CASTING_LLAMA or on a 3-D view runs there, and fused with a mul here, and the fused op must reduce a
 * row as the two ops did. So: the register shapes of G = 1 .. 32, 128, 256 and 512 (G = 64's rows take the
 * pair shape of G = 64, as f16/bf16 rows of 65 .. 128 chunks do in norm_x's; the rows of G = 1024's are
 * staged here, on the same 1024 threads), the staged ones and that pair shape; no few-rows form (its
 * staged row would not fit). Rows of 129 .. 256 chunks, pairs in norm_x's family, take the four-chunk
 * G = 128 here: the same G, so the same order. */
static const signed char general_shapes[TN_GENERAL_SHAPE_COUNT] = {0, 1, 2, 3, 4, 5, 7, 8, 9, TN_SHAPE_SHARED,
                                                                   TN_SHAPE_REREAD, TN_SHAPE_PAIR_FIRST + 1};

/* A family's shapes: `count` of them, listed in `list`, or 0 .. count - 1 where list is NULL. */
typedef struct {
  const signed char *list;
  int count;
} shape_set;

static shape_set family_shapes(int f) {
  switch (f) {
    case TN_FAMILY_ELEMENTWISE:
      return (shape_set){NULL, TN_KERNEL_ELEMENTWISE_COUNT};
    case TN_FAMILY_NORM_X:
      return (shape_set){normx_shapes, (int)sizeof normx_shapes};
    case TN_FAMILY_LAYER:
    case TN_FAMILY_ADD_LAYER:
      return (shape_set){layer_shapes, (int)sizeof layer_shapes};
    case TN_FAMILY_GENERAL:
      return (shape_set){general_shapes, (int)sizeof general_shapes};
    case TN_FAMILY_ROPE:
      return (shape_set){NULL, TN_ROPE_SHAPE_COUNT};
    case TN_FAMILY_ADD_NORM:
    case TN_FAMILY_ADD_NORM_MUL:
      return (shape_set){add_norm_shapes, (int)sizeof add_norm_shapes};
    default: /* rms_norm's (l2_norm's): with a multiplicand or not, unweighted */
      return (shape_set){norm_shapes, (int)sizeof norm_shapes};
  }
}

static int family_shape_count(int f) { return family_shapes(f).count; }

static int family_shape_at(int f, int i) {
  const shape_set set = family_shapes(f);
  return set.list != NULL ? set.list[i] : i;
}

static int family_shape_index(int f, int shape) {
  const shape_set set = family_shapes(f);
  if (set.list == NULL) return shape >= 0 && shape < set.count ? shape : -1;
  for (int i = 0; i < set.count; i++)
    if (set.list[i] == shape) return i;
  return -1;
}

/* The families with an element-access mode: rms_norm's and add_rms_norm's (with a multiplicand or not,
 * unweighted) have every mode, the elementwise family every mode but whole chunks (modes 0 .. count - 1
 * both); the later ones three modes, later_modes. */
static int family_has_every_mode(int f) {
  return f == TN_FAMILY_NORM || f == TN_FAMILY_NORM_MUL || f == TN_FAMILY_ADD_NORM || f == TN_FAMILY_ADD_NORM_MUL ||
         f == TN_FAMILY_NORM_UNWEIGHTED;
}

static int family_has_later_modes(int f) { return !family_has_every_mode(f) && f != TN_FAMILY_ELEMENTWISE; }

static int family_mode_count(int f) {
  return family_has_every_mode(f)        ? TN_KERNEL_MODE_COUNT
         : f == TN_FAMILY_ELEMENTWISE ? TN_ELEMENTWISE_MODE_COUNT
                                        : TN_LATER_MODE_COUNT;
}

/* The later families' modes: bytes, vectors, whole chunks (no element-access kernels). */
static const signed char later_modes[TN_LATER_MODE_COUNT] = {TN_KERNEL_MODE_BYTES, TN_KERNEL_MODE_VECTORS,
                                                             TN_KERNEL_MODE_WHOLE};

static int family_mode_at(int f, int i) { return family_has_later_modes(f) ? later_modes[i] : i; }

static int family_mode_index(int f, int mode) {
  if (!family_has_later_modes(f)) return mode < family_mode_count(f) ? mode : -1;
  for (int i = 0; i < TN_LATER_MODE_COUNT; i++)
    if (later_modes[i] == mode) return i;
  return -1;
}

static int family_first(int f) {
  int first = 0;
  for (int g = 0; g < f; g++) first += TN_DTYPE_COUNT * family_shape_count(g) * family_mode_count(g);
  return first;
}

int tn_kernel_family_has_mode(tn_kernel_family family, int mode) {
  return (unsigned)family < TN_FAMILY_COUNT && mode >= 0 && mode < TN_KERNEL_MODE_COUNT &&
         family_mode_index(family, mode) >= 0;
}

int tn_kernel_family_has(tn_kernel_family family, int shape, int mode) {
  return (unsigned)family < TN_FAMILY_COUNT && shape >= 0 && family_shape_index(family, shape) >= 0 && mode >= 0 &&
         mode < TN_KERNEL_MODE_COUNT && family_mode_index(family, mode) >= 0;
}

int tn_kernel_key_index(tn_kernel_key k) {
  const int f = k.family;
  return family_first(f) +
         ((int)k.dtype * family_shape_count(f) + family_shape_index(f, k.shape)) * family_mode_count(f) +
         family_mode_index(f, k.mode);
}

tn_kernel_key tn_kernel_key_at(int index) {
  tn_kernel_key k;
  int f = 0;
  while (f + 1 < TN_FAMILY_COUNT && index >= family_first(f + 1)) f++;
  index -= family_first(f);
  k.family = (tn_kernel_family)f;
  k.mode = family_mode_at(f, index % family_mode_count(f));
  index /= family_mode_count(f);
  k.shape = family_shape_at(f, index % family_shape_count(f));
  k.dtype = (tn_dtype)(index / family_shape_count(f));
  return k;
}

void tn_kernel_name(tn_kernel_key k, char *out, size_t capacity) {
  if (k.family == TN_FAMILY_ELEMENTWISE)
    snprintf(out, capacity, "%s<%d,%d,%d>", family_prefix[k.family], (int)k.dtype, k.shape, k.mode);
  else if (k.shape < TN_SHAPE_REGISTER_COUNT)
    snprintf(out, capacity, "%s_registers<%d,%d,%d>", family_prefix[k.family], (int)k.dtype, 1 << k.shape, k.mode);
  else if (tn_kernel_shape_is_pair(k.shape))
    snprintf(out, capacity, "%s_registers<%d,%d,%d,%d>", family_prefix[k.family], (int)k.dtype,
             tn_kernel_group_threads(k.shape), k.mode, TN_KERNEL_PAIR_CHUNKS);
  else if (tn_kernel_shape_is_wide(k.shape))
    snprintf(out, capacity, "%s_wide<%d,%d,%d>", family_prefix[k.family], (int)k.dtype,
             tn_kernel_group_threads(k.shape), k.mode);
  else
    snprintf(out, capacity, "%s_staged<%d,%d,%d>", family_prefix[k.family], (int)k.dtype,
             k.shape == TN_SHAPE_SHARED ? TN_KERNEL_STAGE_SHARED : TN_KERNEL_STAGE_REREAD, k.mode);
}

int64_t tn_kernel_chunk_elements(tn_dtype dtype) { return dtype == TN_F32 ? 4 : 8; }

int tn_kernel_row_shape(tn_dtype dtype, int64_t dim, size_t max_stage_bytes) {
  const int64_t per_chunk = tn_kernel_chunk_elements(dtype);
  const int64_t chunks = (dim + per_chunk - 1) / per_chunk;
  if (chunks <= (int64_t)TN_KERNEL_REG_CHUNKS * TN_KERNEL_MAX_GROUP) {
    /* The fewest threads that hold the row, a power of two, each TN_KERNEL_CHUNKS_OF(G) chunks. */
    int shape = 0;
    while (((int64_t)1 << shape) * TN_KERNEL_CHUNKS_OF(1 << shape) < chunks) shape++;
    return shape;
  }
  return (uint64_t)chunks * 16u <= max_stage_bytes ? TN_SHAPE_SHARED : TN_SHAPE_REREAD;
}

int tn_kernel_call_shape(tn_kernel_family family, tn_dtype dtype, int64_t dim, int mode, size_t max_stage_bytes,
                         int few_rows) {
  /* Whether a staged row fits in shared memory depends on what the family holds of a chunk. */
  const size_t stage = tn_kernel_stage_bytes(family, dtype, dim);
  int shape = tn_kernel_row_shape(dtype, dim, max_stage_bytes);
  /* The smallest register shape of the family that holds the row, else staged (G = 1024, the order of the
   * largest register shape). */
  while (shape < TN_SHAPE_REGISTER_COUNT && !tn_kernel_family_has(family, shape, mode)) shape++;
  if (shape >= TN_SHAPE_REGISTER_COUNT) shape = stage <= max_stage_bytes ? TN_SHAPE_SHARED : TN_SHAPE_REREAD;
  /* A family that has the row's pair shape (two chunks a thread, twice the threads) takes it, few rows or
   * many. */
  const int pair = tn_kernel_pair_shape(dtype, dim);
  if (pair >= 0 && tn_kernel_family_has(family, pair, mode)) shape = pair;
  /* Rows few enough for a block each: the wide form of the same G (the same bits, a quarter of the serial
   * work per thread; what a decode step's one-row calls are bound by). */
  const int wide = tn_kernel_wide_shape(shape);
  if (few_rows && wide >= 0 && tn_kernel_family_has(family, wide, mode)) shape = wide;
  return shape;
}

tn_kernel_family tn_kernel_order_family(tn_kernel_family family, int as_rms_norm) {
  return as_rms_norm && (family == TN_FAMILY_ADD_NORM || family == TN_FAMILY_ADD_NORM_MUL) ? TN_FAMILY_NORM : family;
}

int tn_kernel_shape_is_wide(int shape) { return shape >= TN_SHAPE_WIDE_FIRST && shape < TN_SHAPE_PAIR_FIRST; }

int tn_kernel_shape_is_pair(int shape) { return shape >= TN_SHAPE_PAIR_FIRST && shape < TN_SHAPE_COUNT; }

int tn_kernel_pair_shape(tn_dtype dtype, int64_t dim) {
  const int64_t per_chunk = tn_kernel_chunk_elements(dtype);
  const int64_t chunks = (dim + per_chunk - 1) / per_chunk;
  if (chunks <= (int64_t)TN_KERNEL_PAIR_MIN_GROUP || chunks > (int64_t)TN_KERNEL_PAIR_CHUNKS * TN_KERNEL_MAX_GROUP)
    return -1;
  /* float32 rows of 65 .. 128 chunks (257 .. 512 elements) stay on G = 32, four chunks a thread: rope.cu
   * reduces a head of up to TN_ROPE_MAX_DIM elements as rms_norm does, on at most 32 threads (and pairs
   * gain nothing for f32 there: docs/performance.md, "The norm family's kernels (norm.cu)"). */
  if (dtype == TN_F32 && chunks > 2 * (int64_t)TN_KERNEL_PAIR_MIN_GROUP && chunks <= (int64_t)TN_ROPE_MAX_DIM / 4)
    return -1;
  int shape = TN_SHAPE_PAIR_FIRST, g = TN_KERNEL_PAIR_MIN_GROUP;
  while ((int64_t)g * TN_KERNEL_PAIR_CHUNKS < chunks) g *= 2, shape++;
  return shape;
}

int tn_kernel_wide_shape(int shape) {
  if (shape >= TN_SHAPE_REGISTER_COUNT) return -1;
  const int g = 1 << shape;
  if (g < TN_KERNEL_WIDE_MIN_GROUP || g > TN_KERNEL_WIDE_MAX_GROUP) return -1;
  int wide = TN_SHAPE_WIDE_FIRST;
  for (int w = TN_KERNEL_WIDE_MIN_GROUP; w < g; w *= 2) wide++;
  return wide;
}

int tn_kernel_group_threads(int shape) {
  if (tn_kernel_shape_is_wide(shape)) return TN_KERNEL_WIDE_MIN_GROUP << (shape - TN_SHAPE_WIDE_FIRST);
  if (tn_kernel_shape_is_pair(shape)) return TN_KERNEL_PAIR_MIN_GROUP << (shape - TN_SHAPE_PAIR_FIRST);
  return shape < TN_SHAPE_REGISTER_COUNT ? 1 << shape : TN_KERNEL_MAX_GROUP;
}

int tn_kernel_rows_per_block(int shape) {
  return tn_kernel_shape_is_wide(shape) ? 1 : tn_kernel_block_threads(shape) / tn_kernel_group_threads(shape);
}

int tn_kernel_key_block_threads(tn_kernel_key key) {
  if (key.family == TN_FAMILY_ROPE)
    return key.mode == TN_KERNEL_MODE_WHOLE ? TN_KERNEL_BLOCK_OF(tn_kernel_group_threads(key.shape)) : TN_KERNEL_ROPE_MAX_BLOCK;
  return key.family == TN_FAMILY_ELEMENTWISE ? TN_KERNEL_ELEMENTWISE_BLOCK : tn_kernel_block_threads(key.shape);
}

size_t tn_kernel_stage_bytes(tn_kernel_family family, tn_dtype dtype, int64_t dim) {
  const int64_t per_chunk = tn_kernel_chunk_elements(dtype);
  const size_t held = family == TN_FAMILY_GENERAL ? (size_t)per_chunk * 4 : 16;
  return (size_t)((dim + per_chunk - 1) / per_chunk) * held;
}

int tn_kernel_block_threads(int shape) {
  const int g = tn_kernel_group_threads(shape);
  return tn_kernel_shape_is_wide(shape) ? TN_KERNEL_WIDE_BLOCK_OF(g) : TN_KERNEL_BLOCK_OF(g);
}

/* ---- statistics ---- */

static pthread_mutex_t stats_lock = PTHREAD_MUTEX_INITIALIZER;
static tn_kernel_cache_stats stats;

void tn_kernel_stats_add_memory_hit(void) {
  __atomic_fetch_add(&stats.memory_hits, 1, __ATOMIC_RELAXED); /* on every op: no lock */
}

void tn_kernel_stats_get(tn_kernel_cache_stats *out) {
  pthread_mutex_lock(&stats_lock);
  *out = stats;
  out->memory_hits = __atomic_load_n(&stats.memory_hits, __ATOMIC_RELAXED);
  pthread_mutex_unlock(&stats_lock);
}

static void stats_add(uint64_t *counter, double seconds, double *total) {
  pthread_mutex_lock(&stats_lock);
  (*counter)++;
  if (total != NULL) *total += seconds;
  pthread_mutex_unlock(&stats_lock);
}

/* ---- NVRTC ---- */

static void options_for(int arch, char *arch_option, size_t capacity, const char **options, int *count) {
  snprintf(arch_option, capacity, "--gpu-architecture=sm_%d", arch);
  options[0] = arch_option;
  options[1] = "--std=c++17";
  options[2] = "--fmad=false"; /* no fused multiply-add: the CPU backend's expression, bit for bit */
  options[3] = "--prec-div=true";
  options[4] = "--prec-sqrt=true";
  options[5] = "--ftz=false";
  *count = 6;
}

static tn_status nvrtc_fail(tn_context *ctx, const tn_nvrtc *nv, nvrtcProgram prog, nvrtcResult r, const char *what,
                            const char *name) {
  char log[400] = "";
  size_t log_size = 0;
  if (prog != NULL && nv->GetProgramLogSize(prog, &log_size) == NVRTC_SUCCESS && log_size > 1) {
    char *full = malloc(log_size);
    if (full != NULL && nv->GetProgramLog(prog, full) == NVRTC_SUCCESS) {
      /* One line: the log's newlines become " | ". */
      size_t o = 0;
      for (size_t i = 0; full[i] != '\0' && o + 4 < sizeof log; i++) {
        if (full[i] == '\n') {
          if (full[i + 1] != '\0') {
            memcpy(log + o, " | ", 3);
            o += 3;
          }
        } else {
          log[o++] = full[i];
        }
      }
      log[o] = '\0';
    }
    free(full);
  }
  if (prog != NULL) nv->DestroyProgram(&prog);
  return tn_error(ctx, TN_ERR_BACKEND, "cuda: NVRTC %s of %s failed: %s%s%s", what, name, nv->GetErrorString(r),
                  log[0] != '\0' ? ": " : "", log);
}

tn_status tn_kernel_compile_source(tn_context *ctx, const char *source, const char *name, int arch,
                                   tn_kernel_binary *out) {
  const char *reason = NULL;
  const tn_nvrtc *nv = tn_nvrtc_get(&reason);
  TN_RETURN_ERROR_IF(nv == NULL, ctx, TN_ERR_UNAVAILABLE, "cuda: %s", reason);
  const char *headers[HEADER_COUNT] = {tn_cuda_source_params_h, tn_cuda_source_row_cuh, tn_cuda_source_ops_cuh};
  nvrtcProgram prog = NULL;
  nvrtcResult r = nv->CreateProgram(&prog, source, "tnorm_kernel.cu", HEADER_COUNT, headers, header_names);
  if (r != NVRTC_SUCCESS) return nvrtc_fail(ctx, nv, NULL, r, "program creation", name);
  if ((r = nv->AddNameExpression(prog, name)) != NVRTC_SUCCESS) return nvrtc_fail(ctx, nv, prog, r, "naming", name);
  char arch_option[64];
  const char *options[8];
  int count;
  options_for(arch, arch_option, sizeof arch_option, options, &count);
  if ((r = nv->CompileProgram(prog, count, options)) != NVRTC_SUCCESS)
    return nvrtc_fail(ctx, nv, prog, r, "compilation", name);
  const char *lowered = NULL;
  size_t cubin_size = 0;
  if ((r = nv->GetLoweredName(prog, name, &lowered)) != NVRTC_SUCCESS)
    return nvrtc_fail(ctx, nv, prog, r, "name lookup", name);
  if ((r = nv->GetCUBINSize(prog, &cubin_size)) != NVRTC_SUCCESS || cubin_size == 0)
    return nvrtc_fail(ctx, nv, prog, r, "cubin output", name);
  const size_t name_len = strlen(lowered);
  char *blob = malloc(name_len + 1 + cubin_size);
  if (blob == NULL) {
    nv->DestroyProgram(&prog);
    return tn_error(ctx, TN_ERR_NO_MEMORY, "cuda: out of memory for a %zu-byte kernel binary", cubin_size);
  }
  memcpy(blob, lowered, name_len + 1);
  r = nv->GetCUBIN(prog, blob + name_len + 1);
  if (r != NVRTC_SUCCESS) {
    free(blob);
    return nvrtc_fail(ctx, nv, prog, r, "cubin output", name);
  }
  nv->DestroyProgram(&prog);
  out->blob = blob;
  out->size = name_len + 1 + cubin_size;
  out->lowered_name = blob;
  out->cubin = blob + name_len + 1;
  out->cubin_size = cubin_size;
  return TN_OK;
}

void tn_kernel_binary_free(tn_kernel_binary *b) {
  if (b == NULL) return;
  free(b->blob);
  memset(b, 0, sizeof *b);
}

/* A cache payload is a blob: a NUL-terminated name followed by a cubin. */
static int blob_split(char *blob, size_t size, tn_kernel_binary *out) {
  const char *nul = memchr(blob, '\0', size);
  if (nul == NULL || nul == blob || (size_t)(nul - blob) + 1 >= size) return 0;
  out->blob = blob;
  out->size = size;
  out->lowered_name = blob;
  out->cubin = nul + 1;
  out->cubin_size = size - (size_t)(nul - blob) - 1;
  return 1;
}

/* The key text of a kernel: everything its binary depends on. */
static void cache_key(tn_kernel_key key, int arch, const tn_nvrtc *nv, char *out, size_t capacity) {
  uint64_t h = TN_HASH_SEED;
  const char *parts[] = {tn_cuda_source_params_h, tn_cuda_source_row_cuh, tn_cuda_source_ops_cuh,
                         family_source(key.family)};
  const size_t part_count = sizeof parts / sizeof parts[0];
  for (size_t i = 0; i < part_count; i++) h = tn_hash64(h, parts[i], strlen(parts[i]) + 1);
  uint64_t h2 = 0x84222325cbf29ce4ull;
  for (size_t i = 0; i < part_count; i++) h2 = tn_hash64(h2, parts[i], strlen(parts[i]) + 1);
  char name[128], arch_option[64];
  const char *options[8];
  int count;
  tn_kernel_name(key, name, sizeof name);
  options_for(arch, arch_option, sizeof arch_option, options, &count);
  int n = snprintf(out, capacity, "tnorm kernel cache 1\nnvrtc %d.%d\nsource %016llx%016llx\nkernel %s\noptions",
                   nv->major, nv->minor, (unsigned long long)h, (unsigned long long)h2, name);
  for (int i = 0; i < count && n > 0 && (size_t)n < capacity; i++) n += snprintf(out + n, capacity - (size_t)n, " %s", options[i]);
}

static double now_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

tn_status tn_kernel_build(tn_context *ctx, tn_kernel_key key, int arch, tn_kernel_binary *out) {
  const char *reason = NULL;
  const tn_nvrtc *nv = tn_nvrtc_get(&reason);
  TN_RETURN_ERROR_IF(nv == NULL, ctx, TN_ERR_UNAVAILABLE, "cuda: %s", reason);
  char dir[2048], key_text[1024];
  const int cached = tn_disk_cache_dir(dir, sizeof dir);
  cache_key(key, arch, nv, key_text, sizeof key_text);
  if (cached) {
    void *payload = NULL;
    size_t size = 0;
    tn_disk_lookup found = tn_disk_cache_load(dir, key_text, &payload, &size);
    if (found == TN_DISK_HIT) {
      if (blob_split(payload, size, out)) {
        stats_add(&stats.loaded_from_disk, 0, NULL);
        return TN_OK;
      }
      free(payload);
      found = TN_DISK_REJECTED;
    }
    if (found == TN_DISK_REJECTED) stats_add(&stats.disk_rejected, 0, NULL);
  }
  char name[128];
  tn_kernel_name(key, name, sizeof name);
  const double start = now_seconds();
  TN_FORWARD_IF_ERROR(tn_kernel_compile_source(ctx, family_source(key.family), name, arch, out));
  stats_add(&stats.compiled, now_seconds() - start, &stats.compile_seconds);
  if (cached && tn_disk_cache_store(dir, key_text, out->blob, out->size) == 0) stats_add(&stats.disk_writes, 0, NULL);
  return TN_OK;
}
