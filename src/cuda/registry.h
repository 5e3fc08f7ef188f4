/* The kernel registry: every kernel the CUDA backend can launch is named by a key (family, dtype, row
 * shape, access mode); its source is compiled with NVRTC on first use for the device's architecture and
 * kept in the disk cache. This part needs no GPU, so a machine without one can compile (and so check)
 * every variant. Loading onto a device and the in-memory cache are the backend's (backend.c). */
#ifndef TN_CUDA_REGISTRY_H
#define TN_CUDA_REGISTRY_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/params.h"
#include "tnorm.h"

/* norm.cu: rms_norm and l2_norm (with a scale of 1), rms_norm with a multiplicand, and both without a weight
 * (TN_FAMILY_NORM_UNWEIGHTED: kernels with no code for one, the same arithmetic); add_rms_norm.cu:
 * add_rms_norm, and add_rms_norm with a multiplicand (the default path of each: 2-D views,
 * TN_CASTING_EXACT, the default modes); elementwise.cu: add, mul and scale (whose key's shape is the op:
 * TN_KERNEL_ELEMENTWISE_*). The families after them carry their rarer knobs as run-time flags
 * (kernels/ops.cuh):
 * norm_x.cu: rms_norm and l2_norm on 3-D views, with TN_CASTING_LLAMA or max(norm, eps), l2_norm with a
 * scale other than 1, and add_rms_norm
 * with TN_CASTING_LLAMA (a residual of x's dtype normalised as stored), none with a multiplicand;
 * layer_norm.cu: layer_norm (TN_FAMILY_LAYER), and add_layer_norm with a residual of x's dtype normalised
 * as stored (TN_FAMILY_ADD_LAYER), both in exact casting;
 * general.cu: the rest of the norms (a float32 residual stream, the unrounded sum, a multiplicand with
 * TN_CASTING_LLAMA or a 3-D view, layer_norm with TN_CASTING_LLAMA), the row held in float32;
 * rope.cu: rms_norm with a rope (its whole-chunk kernels are the paired ones, which backend.c takes only
 * where every pair lies in one thread's chunks; other whole-chunk calls take its vector kernels). */
typedef enum tn_kernel_family {
  TN_FAMILY_NORM = 0,
  TN_FAMILY_NORM_MUL = 1,
  TN_FAMILY_ADD_NORM = 2,
  TN_FAMILY_ADD_NORM_MUL = 3,
  TN_FAMILY_ELEMENTWISE = 4,
  TN_FAMILY_NORM_X = 5,
  TN_FAMILY_LAYER = 6,
  TN_FAMILY_GENERAL = 7,
  TN_FAMILY_ROPE = 8,
  TN_FAMILY_ADD_LAYER = 9,
  TN_FAMILY_NORM_UNWEIGHTED = 10,
  TN_FAMILY_COUNT = 11
} tn_kernel_family;

/* Row shapes: 0 .. 10 keep rows in registers with G = 1 << shape threads per row; then the staged ones;
 * then the few-rows ("wide") form of the register shapes with G = 64, 128, 256 and 512 (no family keeps
 * G = 64's: its rows take the pair shapes where a family has a few-rows form), which the backend
 * picks for those G when every row gets a block of its own (it reduces a row exactly as the register
 * shape of the same G); then the pair shapes of G = 32 .. 1024 (params.h), which only some families have
 * (a few-rows call of theirs takes the pair shape itself: its threads hold two chunks, not four). */
#define TN_SHAPE_REGISTER_COUNT 11
#define TN_SHAPE_SHARED 11
#define TN_SHAPE_REREAD 12
#define TN_SHAPE_WIDE_FIRST 13 /* G = TN_KERNEL_WIDE_MIN_GROUP */
#define TN_SHAPE_PAIR_FIRST 17 /* G = TN_KERNEL_PAIR_MIN_GROUP */
#define TN_SHAPE_COUNT 23
/* Access modes and elementwise ops: TN_KERNEL_MODE_* and TN_KERNEL_ELEMENTWISE_* (kernels/params.h). */

typedef struct tn_kernel_key {
  tn_kernel_family family;
  tn_dtype dtype;
  int shape;
  int mode;
} tn_kernel_key;

/* Keys per family: the first four row families and the unweighted one have every access mode, the pair
 * shapes of G = 32 .. 128 (TN_NORM_PAIR_COUNT; the two add_rms_norm families those of G = 256 .. 1024 too,
 * TN_ADD_NORM_PAIR_COUNT), the register shapes but G = 64 (its rows take a pair shape), the staged ones and
 * the few-rows form of G = 128 .. 512; the elementwise family one shape per op and every mode but whole
 * chunks. The later families have three access modes (16-byte vectors, with whole chunks only or not,
 * else bytes: element-aligned calls, rare beside them, take the byte kernels) and the shapes their calls
 * need (registry.c): norm_x the register shapes but G = 64, the staged ones, the few-rows form of G = 128
 * and 256 (a decode step's hidden sizes) and rms_norm's pair shapes (G = 32 .. 128); layer_norm and add_layer_norm
 * the register shapes from G = 8 and the staged ones; general the register shapes but G = 64 and
 * 1024, the staged ones and the pair shape of G = 64 (the G of norm_x's for every row); rope the register
 * shapes up to G = 32 (heads of at most TN_ROPE_MAX_DIM elements). A row takes its family's pair shape
 * where the family has it, else the family's smallest register shape that holds it, else a staged one, so
 * that within a family the reduction order still depends on (dtype, dim) alone, and it is the same in the
 * norm families (weighted or not, with a multiplicand or not), norm_x's and general's, and in layer_norm's and
 * add_layer_norm's (a graph's fusions move an op between them). The add_rms_norm families' own order
 * differs from rms_norm's on rows of 257 .. 2048 chunks (pairs there); a graph's add + rms_norm takes
 * rms_norm's (tn_kernel_order_family). */
#define TN_NORM_PAIR_COUNT 3
#define TN_ADD_NORM_PAIR_COUNT 6
#define TN_NORM_SHAPE_COUNT (15 + TN_NORM_PAIR_COUNT)
#define TN_ADD_NORM_SHAPE_COUNT (TN_NORM_SHAPE_COUNT - TN_NORM_PAIR_COUNT + TN_ADD_NORM_PAIR_COUNT)
#define TN_NORM_X_SHAPE_COUNT (14 + TN_NORM_PAIR_COUNT)
#define TN_LAYER_SHAPE_COUNT 10
#define TN_ADD_LAYER_SHAPE_COUNT TN_LAYER_SHAPE_COUNT
#define TN_GENERAL_SHAPE_COUNT 12
#define TN_ROPE_SHAPE_COUNT 6
#define TN_LATER_MODE_COUNT 3
#define TN_ELEMENTWISE_MODE_COUNT 3 /* every mode but TN_KERNEL_MODE_WHOLE */
#define TN_KERNEL_VARIANTS                                                                               \
  (TN_DTYPE_COUNT * (3 * TN_NORM_SHAPE_COUNT + 2 * TN_ADD_NORM_SHAPE_COUNT) * TN_KERNEL_MODE_COUNT +     \
   TN_DTYPE_COUNT * TN_KERNEL_ELEMENTWISE_COUNT * TN_ELEMENTWISE_MODE_COUNT +                            \
   TN_DTYPE_COUNT * TN_LATER_MODE_COUNT *                                                                \
       (TN_NORM_X_SHAPE_COUNT + TN_LAYER_SHAPE_COUNT + TN_ADD_LAYER_SHAPE_COUNT + TN_GENERAL_SHAPE_COUNT + \
        TN_ROPE_SHAPE_COUNT))

/* Whether the family has a kernel of this shape and access mode (the backend asks only for those). */
int tn_kernel_family_has(tn_kernel_family family, int shape, int mode);
int tn_kernel_family_has_mode(tn_kernel_family family, int mode);

int tn_kernel_key_index(tn_kernel_key key);
tn_kernel_key tn_kernel_key_at(int index);
/* The kernel's C++ name expression, e.g. "tn_norm_registers<2,128,2>". */
void tn_kernel_name(tn_kernel_key key, char *out, size_t capacity);

/* Elements of a 16-byte chunk of dtype: 4 (f32) or 8 (f16, bf16). */
int64_t tn_kernel_chunk_elements(tn_dtype dtype);

/* The row shape for rows of dim elements of dtype: the threads per row (and so the reduction order)
 * follow from (dtype, dim) alone. max_stage_bytes: the most dynamic shared memory a block may have. */
int tn_kernel_row_shape(tn_dtype dtype, int64_t dim, size_t max_stage_bytes);
/* The shape a row kernel of `family` takes for rows of dim elements of dtype in access mode `mode` (one the
 * family has): its pair shape where it has one, else its smallest register shape that holds the row, else
 * a staged one; then, for few_rows (every row a block of its own), that shape's few-rows form where the
 * family has it. The threads per row G follow from (family, dtype, dim), and with them the reduction order
 * (thread t sums chunks t, t + G, ...: how many a thread can hold does not change it). */
int tn_kernel_call_shape(tn_kernel_family family, tn_dtype dtype, int64_t dim, int mode, size_t max_stage_bytes,
                         int few_rows);
/* The family whose shapes (and so reduction order) a call of `family` takes: its own, or for
 * as_rms_norm (an add_rms_norm that a graph fused from an add and an rms_norm, with or without a
 * multiplicand: it must give the bytes of the rms_norm it replaces) the norm family's, whose shapes the
 * add_rms_norm families have too. */
tn_kernel_family tn_kernel_order_family(tn_kernel_family family, int as_rms_norm);
/* Threads per row of a row shape (the reduction's group), threads per block of a row shape, and rows a
 * block takes at a time. */
int tn_kernel_group_threads(int shape);
int tn_kernel_block_threads(int shape);
int tn_kernel_rows_per_block(int shape);
/* The wide shape of register shape `shape`, or -1 when it has none. */
int tn_kernel_wide_shape(int shape);
int tn_kernel_shape_is_wide(int shape);
/* The pair shape of rows of dim elements of dtype (G threads, G + 1 .. 2 G chunks, G >= 32), or -1 where
 * they have none; whether a shape is a pair shape. */
int tn_kernel_pair_shape(tn_dtype dtype, int64_t dim);
int tn_kernel_shape_is_pair(int shape);
/* Threads per block of any kernel (rope.cu's slot kernels: the most they are launched with). */
int tn_kernel_key_block_threads(tn_kernel_key key);
/* Bytes of shared memory a staged row of dim elements takes in the family's kernels (what it holds of a
 * chunk: 16 bytes, or general.cu's float32 elements). */
size_t tn_kernel_stage_bytes(tn_kernel_family family, tn_dtype dtype, int64_t dim);

/* A compiled kernel: the mangled name to look up in the module, then the cubin. */
typedef struct tn_kernel_binary {
  char *blob; /* lowered name, NUL, cubin */
  size_t size;
  const char *lowered_name;
  const void *cubin;
  size_t cubin_size;
} tn_kernel_binary;

/* Builds the kernel for compute capability `arch` (90 for sm_90): from the disk cache when a valid
 * entry is there, else with NVRTC (then stored). A compile failure returns TN_ERR_BACKEND with the
 * NVRTC log in the message. */
tn_status tn_kernel_build(tn_context *ctx, tn_kernel_key key, int arch, tn_kernel_binary *out);
void tn_kernel_binary_free(tn_kernel_binary *b);

/* Compiles `source` (which may include "row.cuh", "ops.cuh" and "params.h") and returns the binary of the kernel
 * named by name_expression; no disk cache. For tests of the compile path itself. */
tn_status tn_kernel_compile_source(tn_context *ctx, const char *source, const char *name_expression, int arch,
                                   tn_kernel_binary *out);

/* Process-wide counters (see tn_kernel_cache_stats in tnorm.h). */
void tn_kernel_stats_add_memory_hit(void);
void tn_kernel_stats_get(tn_kernel_cache_stats *out);

#endif
